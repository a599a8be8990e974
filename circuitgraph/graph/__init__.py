"""Step 2: the computational graph (MIB / EAP-IG node and edge names)."""

from circuitgraph.graph.computational_graph import PORTS, Graph, GraphError

__all__ = ["PORTS", "Graph", "GraphError"]
