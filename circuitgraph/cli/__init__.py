"""Step 10: the ``circuitgraph`` command line."""

from circuitgraph.cli.main import main

__all__ = ["main"]
