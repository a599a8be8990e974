"""``circuitgraph curve``: the faithfulness curves of a scored circuit under MIB's rules."""

from __future__ import annotations


def register_cli(subparsers) -> None:
    """Add ``circuitgraph curve --model M --data FILE --scores SPEC [--json] [-o FIG]``."""
