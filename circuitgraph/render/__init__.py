"""Step 9: figures of circuits."""

from circuitgraph.render.figure import infer_graph, render, write

__all__ = ["infer_graph", "render", "write"]
