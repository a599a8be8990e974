"""Step 2: the computational graph (MIB / EAP-IG node and edge names) and typed node references."""

from circuitgraph.graph.computational_graph import Graph, GraphError
from circuitgraph.graph.nodes import PORTS, NodeNameError, NodeRef, parse_edge
from circuitgraph.graph.prune import mib_prune

__all__ = ["PORTS", "Graph", "GraphError", "NodeNameError", "NodeRef", "mib_prune", "parse_edge"]
