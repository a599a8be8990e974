"""``circuitgraph mib-export``: a discovered circuit as the submission layout MIB's circuit track accepts."""

from __future__ import annotations


def register_cli(subparsers) -> None:
    """Add ``circuitgraph mib-export``."""
