"""EAP-IG's pruning of a selected edge set to the edges on input -> logits paths: a graph operation,
shared by discovery's selections and curves and by MIB submissions."""

from __future__ import annotations

import torch

from circuitgraph.graph.computational_graph import Graph


def _source_of_destination(graph: Graph) -> torch.Tensor:
    """``[n_sources, n_destinations]``: source s is the node that destination d feeds (EAP-IG's forward_to_backward)."""
    out = torch.zeros(graph.legal.shape, dtype=torch.bool)
    for d, name in enumerate(graph.destinations[:-1]):
        out[graph.source_index[graph.node_of(name)], d] = True
    return out


def mib_prune(graph: Graph, mask: torch.Tensor, passes: int | None = None) -> torch.Tensor:
    """EAP-IG's ``Graph.prune``: keep the nodes with an outgoing and an incoming edge (``input`` counts
    as having one), drop edges whose source or destination node is gone, and repeat until nothing
    changes (``passes=None``) or ``passes`` times.  ``logits`` is always present.  By position (a mask
    ``[..., n_spans]``) an edge's spans stay while the edge, selected at any of them, does."""
    if mask.dim() == 3:
        return mask & mib_prune(graph, mask.any(-1), passes)[..., None]
    f2b = _source_of_destination(graph).float()
    mask = mask.clone()
    done = 0
    nodes = None
    while passes is None or done < passes:
        has_out = mask.any(1)
        has_in = (f2b @ mask.any(0).float()) > 0
        has_in[0] = True
        new_nodes = has_out & has_in
        if nodes is not None and bool((new_nodes == nodes).all()):
            break
        nodes = new_nodes
        alive_dst = (nodes.float() @ f2b) > 0
        alive_dst[-1] = True
        mask &= nodes[:, None] & alive_dst[None, :]
        done += 1
    return mask
