"""Circuit figures with graphviz: one rank per layer, nodes coloured by group, q/k/v edges coloured.

``dot`` lays out layered graphs natively (a rank per layer keeps the model's depth readable), its
SVG can be parsed by tests, and the returned :class:`graphviz.Digraph` displays inline in Jupyter
through its own ``_repr_mimebundle_`` (needs the ``dot`` program, like every image format here).

Edge styles:

- colour = the destination port: q blue, k green, v orange, MLP / logits inputs grey;
- width = |score| (explicit edge scores, else ``spec.edge_scores``) on a square-root scale mapped
  to [0.5, 4] so that small scores stay visible next to large ones; unscored edges are thin;
- dashed = negative score;
- dotted light grey = an edge whose *verified* effect (``verified={edge_name: effect}``, e.g. the
  measured drop in faithfulness when it is removed) is negative or negligible (< ``verified_tol``):
  the circuit claims it, the measurement does not support it;
- a label (``END``, ``S2,END``) = the token positions the edge is restricted to.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import graphviz

from circuitgraph.graph.computational_graph import Graph
from circuitgraph.spec.circuit_spec import CircuitSpec

FORMATS = (".svg", ".png", ".pdf", ".dot")
RANKDIRS = ("BT", "TB", "LR", "RL")
PORT_COLORS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#ff7f0e", None: "#666666"}
PORT_NAMES = {"q": "query (q)", "k": "key (k)", "v": "value (v)", None: "MLP / logits input"}
WEAK_COLOR = "#b5b5b5"
# ColorBrewer Set3 without its grey (kept for ungrouped nodes): light fills keep black labels readable.
PALETTE = ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5",
           "#bc80bd", "#ccebc5", "#ffed6f"]
UNGROUPED = {"head": "#ffffff", "mlp": "#eeeeee", "io": "#d9d9d9"}
FONT = "Helvetica"

_HEAD = re.compile(r"^a(\d+)\.h(\d+)$")
_MLP = re.compile(r"^m(\d+)$")


@dataclass
class _Edge:
    """One drawn edge (or several merged ones when groups are collapsed)."""

    src: str
    dst: str
    port: str | None
    score: float | None  # signed sum
    magnitude: float | None  # sum of |score|, drives the width
    positions: set[str] | None  # None = every position
    names: list[str] = field(default_factory=list)
    weak: bool = False


def infer_graph(spec: CircuitSpec) -> Graph:
    """The graph a spec was written for: MIB's ``cfg`` when present, else the largest layer/head named."""
    cfg = spec.metadata.get("mib_cfg")
    if isinstance(cfg, dict) and "n_layers" in cfg and "n_heads" in cfg:
        return Graph(int(cfg["n_layers"]), int(cfg["n_heads"]), bool(cfg.get("parallel_attn_mlp", False)))
    names = set(spec.all_nodes())
    names |= {c.src for c in spec.connections} | {c.dst for c in spec.connections}
    for edge in [e.edge for e in spec.edges] + list(spec.edge_scores):
        names |= {part.split("<")[0].strip() for part in edge.split("->")}
    n_layers, n_heads = 1, 1
    for n in names:
        if m := _HEAD.match(n):
            n_layers, n_heads = max(n_layers, int(m[1]) + 1), max(n_heads, int(m[2]) + 1)
        elif m := _MLP.match(n):
            n_layers = max(n_layers, int(m[1]) + 1)
    return Graph(n_layers, n_heads, bool(spec.metadata.get("parallel_attn_mlp", False)))


def _check_path(path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"cannot write '{path}': unknown figure format '{path.suffix or '(no suffix)'}'; "
                         f"use one of {', '.join(FORMATS)}")
    return path


def _circuit_edges(spec: CircuitSpec, graph: Graph, min_score, verified, verified_tol) -> list[_Edge]:
    scores = {k: v for k, v in spec.edge_scores.items() if v is not None}
    scores.update({e.edge: e.score for e in spec.edges if e.score is not None})
    out = []
    for (s, d), positions in spec.resolve(graph).edges.items():
        src, dst = graph.sources[s], graph.destinations[d]
        name = f"{src}->{dst}"
        score = scores.get(name)
        if min_score is not None and score is not None and abs(score) < min_score:
            continue
        port = dst[dst.index("<") + 1:-1] if "<" in dst else None
        weak = verified is not None and name in verified and verified[name] < verified_tol
        out.append(_Edge(src, graph.node_of(dst), port, score, None if score is None else abs(score),
                         None if positions is None else set(positions), [name], weak))
    return out


def _collapse(edges: list[_Edge], owner: dict[str, str]) -> list[_Edge]:
    """Merge edges between collapsed groups: one per (src, dst, port); edges inside a group are dropped."""
    merged: dict[tuple, _Edge] = {}
    for e in edges:
        src, dst = owner.get(e.src, e.src), owner.get(e.dst, e.dst)
        if src == dst:
            continue
        key = (src, dst, e.port)
        if key not in merged:
            merged[key] = _Edge(src, dst, e.port, e.score, e.magnitude, e.positions, list(e.names), e.weak)
            continue
        m = merged[key]
        if e.score is not None:
            m.score = (m.score or 0.0) + e.score
            m.magnitude = (m.magnitude or 0.0) + e.magnitude
        m.positions = None if m.positions is None or e.positions is None else m.positions | e.positions
        m.names.append(e.names[0])
        m.weak = m.weak and e.weak
    return list(merged.values())


def _rank(node: str, graph: Graph) -> tuple[int, int] | None:
    """Rank of a node: (layer, 0) for heads, (layer, 1) for MLPs of sequential models."""
    if node == "input":
        return (-1, 0)
    if node == "logits":
        return (graph.n_layers, 0)
    if m := _HEAD.match(node):
        return (int(m[1]), 0)
    if m := _MLP.match(node):
        return (int(m[1]), 0 if graph.parallel_attn_mlp else 1)
    return None  # a collapsed group: dot places it from its edges


def _rank_label(rank: tuple[int, int], graph: Graph) -> str:
    layer, sub = rank
    if layer < 0 or layer >= graph.n_layers:
        return ""
    return f"MLP {layer}" if sub else f"layer {layer}"


def _width(magnitude, hi) -> float:
    """Square-root scale from 0 to the largest |score| onto [0.5, 4]: small scores stay visible."""
    if magnitude is None:
        return 1.0
    return 2.0 if hi <= 0 else 0.5 + 3.5 * math.sqrt(magnitude / hi)


def _legend(groups: dict[str, str], ports: set, negative: bool, verified: bool, scored: bool) -> str:
    """An HTML table: group colours on the left, edge styles on the right."""
    left = [f'<TD BGCOLOR="{c}" BORDER="1" WIDTH="18"> </TD><TD ALIGN="LEFT">{html.escape(g)}</TD>'
            for g, c in groups.items()]
    right = [f'<TD><FONT COLOR="{PORT_COLORS[p]}"><B>&#8212;&#8212;</B></FONT></TD><TD ALIGN="LEFT">{PORT_NAMES[p]}</TD>'
             for p in ("q", "k", "v", None) if p in ports]
    if negative:
        right.append('<TD><B>- - -</B></TD><TD ALIGN="LEFT">negative score</TD>')
    if verified:
        right.append(f'<TD><FONT COLOR="{WEAK_COLOR}"><B>&#183;&#183;&#183;&#183;</B></FONT></TD>'
                     f'<TD ALIGN="LEFT">verified effect &lt; tolerance</TD>')
    if scored:
        right.append('<TD></TD><TD ALIGN="LEFT">width: |score|</TD>')
    n = max(len(left), len(right))
    blank = "<TD></TD><TD></TD>"
    rows = [f"<TR>{left[i] if i < len(left) else blank}<TD WIDTH=\"12\"></TD>{right[i] if i < len(right) else blank}</TR>"
            for i in range(n)]
    return f'<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="3">{"".join(rows)}</TABLE>>'


def render(spec: CircuitSpec, graph: Graph | None = None, path: str | Path | None = None, *, rankdir: str = "BT",
           collapse_groups: bool | list[str] = False, min_score: float | None = None,
           verified: dict[str, float] | None = None, verified_tol: float = 1e-3, title: str | None = None,
           legend: bool = True) -> graphviz.Digraph:
    """Draw a circuit spec; write it to ``path`` (.svg, .png, .pdf or .dot) when given.

    ``graph`` defaults to :func:`infer_graph`.  Only nodes with drawn edges, plus the members of
    named groups, appear.  ``collapse_groups`` (True or a list of group names) draws each group as
    one node; ``min_score`` hides edges with |score| below it (unscored edges stay); ``verified``
    maps edge names to measured effects, and edges whose effect is below ``verified_tol`` (negative
    or negligible) are drawn dotted grey.  See the module docstring for the edge styles.
    """
    if path is not None:
        path = _check_path(path)
    if rankdir not in RANKDIRS:
        raise ValueError(f"rankdir must be one of {', '.join(RANKDIRS)}, got '{rankdir}'")
    graph = graph or infer_graph(spec)
    collapse = list(spec.groups) if collapse_groups is True else list(collapse_groups or [])
    if unknown := [g for g in collapse if g not in spec.groups]:
        raise ValueError(f"collapse_groups: unknown group(s) {', '.join(unknown)}; the spec has {', '.join(spec.groups) or 'none'}")

    colors = {g: grp.color or PALETTE[i % len(PALETTE)] for i, (g, grp) in enumerate(spec.groups.items())}
    group_ids = {g: f"group_{i}" for i, g in enumerate(spec.groups) if g in collapse}
    owner = {n: group_ids[g] for g in collapse for n in spec.groups[g].nodes}

    edges = _circuit_edges(spec, graph, min_score, verified, verified_tol)
    if collapse:
        edges = _collapse(edges, owner)
    shown = {n for e in edges for n in (e.src, e.dst)}
    shown |= {owner.get(n, n) for n in spec.all_nodes() if spec.group_of(n)}

    dot = graphviz.Digraph(name=spec.name or "circuit")
    dot.attr(rankdir=rankdir, ranksep="0.4", nodesep="0.18", bgcolor="white", fontname=FONT, newrank="true")
    if title or spec.name:
        dot.attr(label=title or spec.name, labelloc="t", fontsize="16")
    dot.attr("node", fontname=FONT, fontsize="10", style="filled", color="#444444", margin="0.06,0.03", height="0.3")
    dot.attr("edge", fontname=FONT, fontsize="8", arrowsize="0.5")

    # One rank=same subgraph per layer (heads; the MLP above them), chained by an invisible axis so
    # layers keep their order even where no circuit edge connects them.
    ranks: dict[tuple[int, int], list[str]] = {}
    for n in shown:
        if (r := _rank(n, graph)) is not None:
            ranks.setdefault(r, []).append(n)
    spans = {g: [r for n in spec.groups[g].nodes if (r := _rank(n, graph)) is not None] for g in group_ids}
    for r in (r for span in spans.values() if span for r in (min(span), max(span))):
        ranks.setdefault(r, [])  # the layers a collapsed group spans keep their axis label
    order = sorted(ranks)
    axis = {r: f"_axis{i}" for i, r in enumerate(order)}
    for r in order:
        with dot.subgraph(name=f"rank_{r[0] + 1}_{r[1]}") as s:
            s.attr(rank="same")
            s.node(axis[r], label=_rank_label(r, graph), shape="plaintext", style="", fontcolor="#888888")
            for n in sorted(ranks[r], key=_sort_key):
                s.node(n, **_node_style(n, spec, colors))
    for a, b in zip(order, order[1:]):
        dot.edge(axis[a], axis[b], style="invis", weight="100")
    for g, gid in group_ids.items():
        members = spec.groups[g].nodes
        what = ", ".join(p for p in (_plural(sum(bool(_HEAD.match(n)) for n in members), "head"),
                                      _plural(sum(bool(_MLP.match(n)) for n in members), "MLP")) if p)
        if span := spans[g]:  # between its first and last member's layer; dot picks where, from the edges
            first, last = min(span), max(span)
            what += f", L{first[0]}" + (f"-{last[0]}" if last[0] != first[0] else "")
            dot.edge(axis[first], gid, style="invis", minlen="0")
            dot.edge(gid, axis[last], style="invis", minlen="0")
        dot.node(gid, label=f"<<B>{html.escape(g)}</B><BR/><FONT POINT-SIZE=\"9\">{what}</FONT>>", shape="box",
                 style="rounded,filled", fillcolor=colors[g], penwidth="1.5", tooltip=", ".join(members))

    hi = max((e.magnitude for e in edges if e.magnitude is not None), default=0.0)
    for e in sorted(edges, key=lambda e: e.magnitude or 0.0):  # strongest drawn last, on top
        width = _width(e.magnitude, hi)
        alpha = "ff" if e.magnitude is None or hi <= 0 else f"{int(128 + 127 * (width - 0.5) / 3.5):02x}"
        attrs = {"color": WEAK_COLOR if e.weak else PORT_COLORS[e.port] + alpha, "penwidth": f"{width:.2f}",
                 "tooltip": _edge_tooltip(e)}
        if e.weak:
            attrs["style"] = "dotted"
        elif e.score is not None and e.score < 0:
            attrs["style"] = "dashed"
        if e.positions:
            attrs.update(label=",".join(sorted(e.positions)), fontcolor=PORT_COLORS[e.port])
        dot.edge(e.src, e.dst, **attrs)

    if legend:  # below (BT) / before (LR) the first layer, so it never sits among the edges
        used = {g: colors[g] for g in spec.groups if any(owner.get(n, n) in shown for n in spec.groups[g].nodes)}
        negative = any(e.score is not None and e.score < 0 and not e.weak for e in edges)
        with dot.subgraph(name="cluster_legend") as s:
            s.attr(label="legend", labelloc="b" if rankdir == "BT" else "t", fontsize="10", color="#cccccc", style="rounded")
            s.node("_legend", label=_legend(used, {e.port for e in edges}, negative, verified is not None, hi > 0),
                   shape="plaintext", style="", fontsize="9")
        if order:
            dot.edge("_legend", axis[order[0]], style="invis")
    if path is not None:
        write(dot, path)
    return dot


def _plural(n: int, word: str) -> str:
    return "" if n == 0 else f"{n} {word}{'s' if n != 1 else ''}"


def _sort_key(node: str):
    m = _HEAD.match(node)
    return (0, int(m[2])) if m else (1, 0)


def _node_style(node: str, spec: CircuitSpec, colors: dict[str, str]) -> dict[str, str]:
    group = spec.group_of(node)
    sub = f'<BR/><FONT POINT-SIZE="8">{html.escape(group)}</FONT>' if group else ""
    label = f"<{html.escape(node)}{sub}>"
    if node in ("input", "logits"):
        return dict(label=label, shape="house" if node == "input" else "invhouse", fillcolor=colors.get(group, UNGROUPED["io"]),
                    penwidth="1.5")
    if _MLP.match(node):
        return dict(label=label, shape="box", fillcolor=colors.get(group, UNGROUPED["mlp"]))
    return dict(label=label, shape="ellipse", fillcolor=colors.get(group, UNGROUPED["head"]))


def _edge_tooltip(e: _Edge) -> str:
    if len(e.names) == 1:
        return e.names[0] + ("" if e.score is None else f"  score {e.score:.4g}")
    return f"{len(e.names)} edges" + ("" if e.magnitude is None else f", sum |score| {e.magnitude:.4g}")


def write(dot: graphviz.Digraph, path: str | Path) -> Path:
    """Write the figure; the format comes from the suffix (.dot writes the DOT source)."""
    path = _check_path(path)
    if path.suffix.lower() == ".dot":
        path.write_text(dot.source)
        return path
    try:
        data = dot.pipe(format=path.suffix.lower()[1:])
    except graphviz.ExecutableNotFound:
        raise OSError("graphviz's 'dot' program is not installed (e.g. 'apt-get install graphviz' or "
                      "'conda install graphviz'); a .dot file can still be written") from None
    path.write_bytes(data)
    return path


# ----- command line ---------------------------------------------------------------------
def register_cli(subparsers) -> None:
    """Add ``circuitgraph render SPEC -o OUT.{svg,png,pdf,dot}``."""
    p = subparsers.add_parser("render", help="draw a circuit spec (ours or EAP-IG/MIB JSON) as SVG, PNG, PDF or DOT")
    p.add_argument("spec", help="circuit spec JSON (ours or EAP-IG/MIB)")
    p.add_argument("-o", "--output", required=True, help="figure file: .svg, .png, .pdf or .dot")
    p.add_argument("--collapse-groups", action="store_true", help="draw each group of the spec as one node")
    p.add_argument("--min-score", type=float, default=None, help="hide edges with |score| below this")
    p.add_argument("--rankdir", choices=["BT", "LR"], default="BT", help="layers bottom-to-top (BT) or left-to-right (LR)")
    p.add_argument("--title", default=None)
    p.set_defaults(func=_cmd_render)


def _cmd_render(args) -> int:
    _check_path(args.output)  # fail before loading anything
    spec = CircuitSpec.load(args.spec)
    dot = render(spec, path=args.output, rankdir=args.rankdir, collapse_groups=args.collapse_groups,
                 min_score=args.min_score, title=args.title)
    print(f"wrote {args.output}")
    return 0
