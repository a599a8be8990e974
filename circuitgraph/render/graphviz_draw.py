"""A :class:`~circuitgraph.render.scene.Scene` as a graphviz ``Digraph`` (the full-quality layout).

``dot`` lays out layered graphs natively: one ``rank=same`` row per layer, chained by an invisible
axis of row labels so layers keep their order even where no circuit edge connects them.
"""

from __future__ import annotations

import html

import graphviz

from circuitgraph.render.scene import Scene

FONT = "Helvetica"
SHAPES = {"input": "house", "logits": "invhouse", "mlp": "box", "head": "ellipse", "group": "box"}
_LEGEND_MARK = {"normal": "&#9656;", "vee": "&gt;", "tee": "|"}


def _node_label(label: str, sub: str | None, bold: bool) -> str:
    main = f"<B>{html.escape(label)}</B>" if bold else html.escape(label)
    return f"<{main}<BR/><FONT POINT-SIZE=\"9\">{html.escape(sub)}</FONT>>" if sub else f"<{main}>"


def _legend(scene: Scene) -> str:
    """An HTML table: group colours on the left, edge styles and notes on the right."""
    left, right = [], []
    for it in scene.legend:
        if it.kind == "group":
            left.append(f'<TD BGCOLOR="{it.color}" BORDER="1" WIDTH="18"> </TD><TD ALIGN="LEFT">{html.escape(it.text)}</TD>')
        elif it.kind == "edge":
            line = "&#183;&#183;&#183;&#183;&#183;" if it.style == "dotted" else "&#9473;&#9473;"
            mark = _LEGEND_MARK.get(it.arrowhead, "")
            right.append(f'<TD><FONT COLOR="{it.color}" POINT-SIZE="12"><B>{line}{mark}</B></FONT></TD>'
                         f'<TD ALIGN="LEFT">{html.escape(it.text)}</TD>')
        else:
            right.append(f'<TD></TD><TD ALIGN="LEFT">{html.escape(it.text)}</TD>')
    blank = "<TD></TD><TD></TD>"
    rows = [f"<TR>{left[i] if i < len(left) else blank}<TD WIDTH=\"12\"></TD>{right[i] if i < len(right) else blank}</TR>"
            for i in range(max(len(left), len(right)))]
    return f'<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="3">{"".join(rows)}</TABLE>>'


def to_digraph(scene: Scene, name: str = "circuit", digraph_class=graphviz.Digraph) -> graphviz.Digraph:
    """A Graphviz digraph of the scene: ranked layers, ports as arrowheads, scores as widths and colours."""
    dot = digraph_class(name=name)
    dot.attr(rankdir=scene.rankdir, ranksep="0.4", nodesep="0.18", bgcolor="white", fontname=FONT, newrank="true")
    if scene.title:
        dot.attr(label=scene.title, labelloc="t", fontsize="16")
    dot.attr("node", fontname=FONT, fontsize="11", style="filled", color="#444444", margin="0.06,0.03", height="0.3")
    dot.attr("edge", fontname=FONT, fontsize="8", arrowsize="0.6")

    axis = {r: f"_axis{i}" for i, (r, _) in enumerate(scene.ranks)}
    for r, label in scene.ranks:
        with dot.subgraph(name=f"rank_{r[0] + 1}_{r[1]}") as s:
            s.attr(rank="same")
            s.node(axis[r], label=label, shape="plaintext", style="", fontcolor="#888888")
            row = [n for n in scene.nodes if n.rank == r]
            for n in row:
                attrs = dict(label=_node_label(n.label, n.sub, n.kind == "group"), shape=SHAPES[n.kind],
                             fillcolor=n.fill, tooltip=n.tooltip)
                if n.kind in ("input", "logits", "group"):
                    attrs["penwidth"] = "1.5"
                if n.kind == "group":
                    attrs["style"] = "rounded,filled"
                s.node(n.id, **attrs)
            chain = [axis[r]] + [n.id for n in row]
            for a, b in zip(chain, chain[1:]):  # keep the row label first and heads in index order
                s.edge(a, b, style="invis")
    order = [r for r, _ in scene.ranks]
    for a, b in zip(order, order[1:]):
        dot.edge(axis[a], axis[b], style="invis", weight="100")

    for e in scene.edges:
        attrs = {"color": f"{e.color}{int(255 * e.alpha):02x}", "penwidth": f"{e.width:.2f}", "tooltip": e.tooltip,
                 "arrowhead": e.arrowhead}
        if e.style != "solid":
            attrs["style"] = e.style
        if e.label:
            attrs.update(label=e.label, fontcolor=e.color)
        dot.edge(e.src, e.dst, **attrs)

    if scene.legend:  # below (BT) / before (LR) the first layer, so it never sits among the edges
        with dot.subgraph(name="cluster_legend") as s:
            s.attr(label="legend", labelloc="b" if scene.rankdir == "BT" else "t", fontsize="10", color="#cccccc",
                   style="rounded")
            s.node("_legend", label=_legend(scene), shape="plaintext", style="", fontsize="9")
        if order:
            dot.edge("_legend", axis[order[0]], style="invis")
    return dot
