"""The explorer's layered layout, computed here so that neither the user nor the viewer needs graphviz.

Like the static figure, layers are ranks from the bottom (``input``) to the top (``logits``): a
layer's heads sit side by side on one rank and its MLP on the rank above (on the same rank for
models with parallel attention and MLP blocks).  MLPs have a column of their own, one slot right of
the last head, whatever the head count: centred over the heads, an MLP would sit on the middle
head's column (an odd count) and cover the edges leaving that head upwards.  Coordinates are in
abstract units (one head slot wide, one rank high); the page scales them to its panel.
"""

from __future__ import annotations

from circuitgraph.graph.computational_graph import Graph


def node_kind(name: str) -> str:
    """``input``, ``logits``, ``head`` or ``mlp``: how the page draws a node."""
    if name in ("input", "logits"):
        return name
    return "head" if name.startswith("a") else "mlp"


def layout(graph: Graph) -> list[dict]:
    """One record per graph node: name, kind, layer, head, and ``x, y`` (rank) positions."""
    L, H, parallel = graph.n_layers, graph.n_heads, graph.parallel_attn_mlp
    mid = (H - 1) / 2
    per_layer = 1 if parallel else 2
    top = 1 + L * per_layer
    out = [dict(id="input", kind="input", layer=-1, head=None, x=mid, y=0)]
    for layer in range(L):
        y = 1 + layer * per_layer
        out += [dict(id=f"a{layer}.h{h}", kind="head", layer=layer, head=h, x=float(h), y=y) for h in range(H)]
        out.append(dict(id=f"m{layer}", kind="mlp", layer=layer, head=None, x=float(H), y=y if parallel else y + 1))
    out.append(dict(id="logits", kind="logits", layer=L, head=None, x=mid, y=top))
    return out


__all__ = ["layout", "node_kind"]
