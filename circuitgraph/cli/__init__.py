"""Step 10: the ``circuitgraph`` command line."""

from circuitgraph.cli.commands import main

__all__ = ["main"]
