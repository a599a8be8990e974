"""What a circuit figure shows, decided once for every drawing backend (graphviz, matplotlib).

A :class:`Scene` is the figure without geometry: layered ranks, nodes with fills and labels, edges
with colours and widths, and the legend.  The rules that keep figures honest live here:

- scored edges: width = |score| (square-root scale onto [0.5, 4], so small scores stay visible)
  and colour = sign (purple positive, red negative), the port drawn as the arrowhead (q filled
  triangle, k open arrow, v bar); unscored edges: colour = port (q blue, k green, v orange);
- verified-weak edges (measured effect < tolerance) are dotted grey whatever their score;
- node fill = the node's group (its role; a group keeps its colour in every figure) or, for
  ungrouped nodes, a grey that darkens with the layer; heads are sorted by index within a layer;
- token positions go onto the node (``@END``) when all its drawn edges share them, else on the
  edge; the legend explains ``@``;
- collapsed groups sit on the row of their last member's layer and say which layers they span;
- thresholding never leaves dangling nodes: edges cut off from the input or the logits go too;
- the title carries the faithfulness when the spec records it (``metadata["faithfulness"]``).
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field

from circuitgraph.graph.computational_graph import Graph
from circuitgraph.spec.circuit_spec import CircuitSpec

PORT_COLORS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#ff7f0e", None: "#666666"}
PORT_NAMES = {"q": "query (q)", "k": "key (k)", "v": "value (v)", None: "MLP / logits input"}
SIGN_COLORS = {1: "#5e3c99", -1: "#c51b1b"}  # purple / red: apart from the port colours
ARROWHEADS = {"q": "normal", "k": "vee", "v": "tee", None: "normal"}  # graphviz names; matplotlib maps them
WEAK_COLOR = "#b5b5b5"
# ColorBrewer Set3 without its grey (kept for ungrouped nodes): light fills keep black labels readable.
PALETTE = ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5",
           "#bc80bd", "#ccebc5", "#ffed6f"]
# The roles papers name most often keep one colour everywhere; other groups hash their name.
ROLE_COLORS = {"name movers": "#fb8072", "negative name movers": "#bebada", "backup name movers": "#fccde5",
               "S-inhibition": "#80b1d3", "induction": "#b3de69", "duplicate token": "#ffffb3",
               "previous token": "#8dd3c7", "mlp": "#fdb462", "MLPs": "#fdb462"}
IO_FILL = "#d9d9d9"

_HEAD = re.compile(r"^a(\d+)\.h(\d+)$")
_MLP = re.compile(r"^m(\d+)$")


@dataclass
class Node:
    """One drawn box: a node or a group, with its label, rank and colours."""

    id: str
    label: str
    sub: str | None  # second line: group name, member summary, positions
    kind: str  # input, logits, head, mlp, group
    rank: tuple[int, int]
    fill: str
    tooltip: str = ""


@dataclass
class Edge:
    """One drawn arrow, standing for one edge or the edges merged into a group's arrow."""

    src: str
    dst: str
    port: str | None
    score: float | None  # signed sum of the scores drawn as this edge
    magnitude: float | None  # sum of |score|, drives the width
    positions: set[str] | None  # None = every position
    names: list[str] = field(default_factory=list)
    weak: bool = False
    color: str = ""
    width: float = 1.0
    alpha: float = 1.0
    label: str | None = None

    @property
    def style(self) -> str:
        """Dotted for weak edges, solid otherwise."""
        return "dotted" if self.weak else "solid"

    @property
    def arrowhead(self) -> str:
        """The arrowhead that shows the destination port (q, k, v or none)."""
        return ARROWHEADS[self.port]

    @property
    def tooltip(self) -> str:
        """The edge's name and score, or how many edges the arrow merges and their total |score|."""
        if len(self.names) == 1:
            return self.names[0] + ("" if self.score is None else f"  score {self.score:.4g}")
        return f"{len(self.names)} edges" + ("" if self.magnitude is None else f", sum |score| {self.magnitude:.4g}")


@dataclass
class LegendItem:
    """One legend entry: a group's colour, a port's arrowhead or a note."""

    kind: str  # group, edge, note
    text: str
    color: str = ""
    arrowhead: str = ""  # set on the port entries of scored figures
    style: str = "solid"


@dataclass
class Scene:
    """Everything a figure shows, independent of the drawing back end (Graphviz or matplotlib)."""

    title: str | None
    ranks: list[tuple[tuple[int, int], str]]  # bottom (input) to top (logits), with their labels
    nodes: list[Node]
    edges: list[Edge]
    legend: list[LegendItem]
    rankdir: str = "BT"


def rank_of(node: str, graph: Graph) -> tuple[int, int] | None:
    """(layer, 0) for heads, (layer, 1) for MLPs of sequential models; input below, logits above."""
    if node == "input":
        return (-1, 0)
    if node == "logits":
        return (graph.n_layers, 0)
    if m := _HEAD.match(node):
        return (int(m[1]), 0)
    if m := _MLP.match(node):
        return (int(m[1]), 0 if graph.parallel_attn_mlp else 1)
    return None


def rank_label(rank: tuple[int, int], graph: Graph) -> str:
    """``layer L`` or ``MLP L`` for a rank inside the model; empty for input and logits."""
    layer, sub = rank
    if layer < 0 or layer >= graph.n_layers:
        return ""
    return f"MLP {layer}" if sub else f"layer {layer}"


def group_colors(spec: CircuitSpec) -> dict[str, str]:
    """A colour per group, the same in every figure: the spec's own, a role's, else by name hash."""
    fixed = {g: grp.color or ROLE_COLORS.get(g) for g, grp in spec.groups.items()}
    used = {c for c in fixed.values() if c}
    colors = {}
    for g in spec.groups:
        c = fixed[g]
        if c is None:
            start = zlib.crc32(g.encode()) % len(PALETTE)
            free = [PALETTE[(start + i) % len(PALETTE)] for i in range(len(PALETTE))]
            c = next((p for p in free if p not in used), free[0])
            used.add(c)
        colors[g] = c
    return colors


def layer_fill(layer: int, n_layers: int) -> str:
    """Ungrouped heads and MLPs: white in layer 0 to mid-grey in the last layer."""
    t = 0 if n_layers <= 1 else layer / (n_layers - 1)
    v = round(255 - 75 * t)
    return f"#{v:02x}{v:02x}{v:02x}"


def width(magnitude: float | None, hi: float) -> float:
    """Square-root scale from 0 to the largest |score| onto [0.5, 4]: small scores stay visible."""
    if magnitude is None:
        return 1.0
    return 2.0 if hi <= 0 else 0.5 + 3.5 * math.sqrt(magnitude / hi)


def _circuit_edges(spec, graph, verified, verified_tol) -> list[Edge]:
    scores = {k: v for k, v in spec.edge_scores.items() if v is not None}
    scores.update({e.edge: e.score for e in spec.edges if e.score is not None})
    out = []
    for (s, d), positions in spec.resolve(graph).edges.items():
        src, dst = graph.sources[s], graph.destinations[d]
        name = f"{src}->{dst}"
        score = scores.get(name)
        port = dst[dst.index("<") + 1:-1] if "<" in dst else None
        weak = verified is not None and name in verified and verified[name] < verified_tol
        out.append(Edge(src, graph.node_of(dst), port, score, None if score is None else abs(score),
                        None if positions is None else set(positions), [name], weak))
    return out


def _drop_dangling(edges: list[Edge]) -> list[Edge]:
    """Keep the edges on some input -> logits path of the drawn edges."""
    while True:
        has_in = {e.dst for e in edges} | {"input"}
        has_out = {e.src for e in edges} | {"logits"}
        kept = [e for e in edges if e.src in has_in and e.dst in has_out]
        if len(kept) == len(edges):
            return kept
        edges = kept


def _collapse(edges: list[Edge], owner: dict[str, str]) -> list[Edge]:
    """Merge edges between collapsed groups: one per (src, dst, port); edges inside a group are dropped."""
    merged: dict[tuple, Edge] = {}
    for e in edges:
        src, dst = owner.get(e.src, e.src), owner.get(e.dst, e.dst)
        if src == dst:
            continue
        key = (src, dst, e.port)
        if key not in merged:
            merged[key] = Edge(src, dst, e.port, e.score, e.magnitude, e.positions, list(e.names), e.weak)
            continue
        m = merged[key]
        if e.score is not None:
            m.score = (m.score or 0.0) + e.score
            m.magnitude = (m.magnitude or 0.0) + e.magnitude
        m.positions = None if m.positions is None or e.positions is None else m.positions | e.positions
        m.names.append(e.names[0])
        m.weak = m.weak and e.weak
    return list(merged.values())


def _sort_key(node: Node):
    m = _HEAD.match(node.id)
    return (0, int(m[2])) if m else (1, node.id)


def _plural(n: int, word: str) -> str:
    return "" if n == 0 else f"{n} {word}{'s' if n != 1 else ''}"


def _positions(ps) -> str:
    return ",".join(sorted(ps))


def build_scene(spec: CircuitSpec, graph: Graph, *, rankdir: str = "BT", collapse_groups=False,
                min_score: float | None = None, verified: dict[str, float] | None = None,
                verified_tol: float = 1e-3, title: str | None = None, legend: bool = True) -> Scene:
    """The figure of ``spec`` on ``graph``; see the module docstring for what each style means."""
    collapse = list(spec.groups) if collapse_groups is True else list(collapse_groups or [])
    if unknown := [g for g in collapse if g not in spec.groups]:
        raise ValueError(f"collapse_groups: unknown group(s) {', '.join(unknown)}; the spec has "
                         f"{', '.join(spec.groups) or 'none'}")
    colors = group_colors(spec)
    group_ids = {g: f"group_{i}" for i, g in enumerate(spec.groups) if g in collapse}
    owner = {n: group_ids[g] for g in collapse for n in spec.groups[g].nodes}

    edges = _circuit_edges(spec, graph, verified, verified_tol)
    hidden = dangling = 0
    if min_score is not None:
        kept = [e for e in edges if e.magnitude is None or e.magnitude >= min_score]
        hidden = len(edges) - len(kept)
        edges = _drop_dangling(kept) if hidden else kept
        dangling = len(kept) - len(edges)
    if collapse:
        edges = _collapse(edges, owner)
    shown = {n for e in edges for n in (e.src, e.dst)}
    if not hidden:  # a hypothesis shows its named members even where no edge reaches them
        shown |= {owner.get(n, n) for n in spec.all_nodes() if spec.group_of(n)}

    # Nodes: positions go onto the node when every edge it sends shares them.
    out_pos: dict[str, list] = {}
    for e in edges:
        out_pos.setdefault(e.src, []).append(None if e.positions is None else frozenset(e.positions))
    on_node = {n: ps[0] for n, ps in out_pos.items() if ps[0] and all(p == ps[0] for p in ps)}
    nodes = []
    for n in shown:
        if n in group_ids.values():
            continue
        group = spec.group_of(n)
        sub = " ".join(x for x in (group, f"@{_positions(on_node[n])}" if n in on_node else None) if x) or None
        kind = n if n in ("input", "logits") else "mlp" if _MLP.match(n) else "head"
        r = rank_of(n, graph)
        fill = colors[group] if group else IO_FILL if kind in ("input", "logits") else layer_fill(r[0], graph.n_layers)
        nodes.append(Node(n, n, sub, kind, r, fill, tooltip=n))
    for g, gid in group_ids.items():
        if gid not in shown:
            continue
        members = spec.groups[g].nodes
        spans = [r for m in members if (r := rank_of(m, graph)) is not None]
        what = ", ".join(p for p in (_plural(sum(bool(_HEAD.match(m)) for m in members), "head"),
                                      _plural(sum(bool(_MLP.match(m)) for m in members), "MLP")) if p)
        if spans:
            lo, hi_ = min(spans)[0], max(spans)[0]
            what += f", L{lo}" + (f"-{hi_}" if hi_ != lo else "")
        if gid in on_node:
            what += f" @{_positions(on_node[gid])}"
        nodes.append(Node(gid, g, what, "group", max(spans) if spans else (0, 0), colors[g], tooltip=", ".join(members)))
    nodes.sort(key=lambda n: (n.rank, _sort_key(n)))

    # Edge styles.
    hi = max((e.magnitude for e in edges if e.magnitude is not None), default=0.0)
    scored = hi > 0
    for e in edges:
        e.width = width(e.magnitude, hi)
        e.alpha = 1.0 if e.magnitude is None or not scored else 0.5 + 0.5 * (e.width - 0.5) / 3.5
        if e.weak:
            e.color = WEAK_COLOR
        elif scored and e.score is not None:
            e.color = SIGN_COLORS[1 if e.score >= 0 else -1]
        else:
            e.color = PORT_COLORS[e.port]
        if e.positions and e.src not in on_node:
            e.label = _positions(e.positions)
    edges.sort(key=lambda e: e.magnitude or 0.0)  # strongest drawn last, on top

    ranks = sorted({n.rank for n in nodes})
    full_title = title if title is not None else spec.name
    faith = spec.metadata.get("faithfulness")
    if isinstance(faith, (int, float)) and math.isfinite(faith) and (full_title is None or "faithfulness" not in full_title):
        full_title = f"{full_title or 'circuit'} (faithfulness {faith:.2f})"

    items: list[LegendItem] = []
    if legend:
        items += [LegendItem("group", g, colors[g]) for g in spec.groups
                  if any(owner.get(m, m) in shown for m in spec.groups[g].nodes)]
        if any(n.kind in ("head", "mlp") and not spec.group_of(n.id) for n in nodes):
            items.append(LegendItem("group", "ungrouped (darker: later layer)", layer_fill(graph.n_layers - 1, graph.n_layers)))
        signed = [e for e in edges if scored and e.score is not None and not e.weak]
        for sign, text in ((1, "score > 0"), (-1, "score < 0")):
            if any((e.score >= 0) == (sign > 0) for e in signed):
                items.append(LegendItem("edge", text, SIGN_COLORS[sign]))
        by_port = {e.port for e in edges if not e.weak and e not in signed}
        unscored = " (unscored)" if signed else ""
        items += [LegendItem("edge", PORT_NAMES[p] + unscored, PORT_COLORS[p]) for p in ("q", "k", "v", None) if p in by_port]
        if signed:  # colour shows the sign, so the arrowhead shows the port
            ports = {e.port for e in signed}
            items += [LegendItem("edge", f"into {PORT_NAMES[p]}", "#333333", ARROWHEADS[p]) for p in ("q", "k", "v") if p in ports]
            items.append(LegendItem("note", "width: |score|"))
        if any(e.weak for e in edges):
            items.append(LegendItem("edge", f"measured effect < {verified_tol:g}", WEAK_COLOR, style="dotted"))
        if any(e.positions for e in edges):
            items.append(LegendItem("note", "@P / edge label P: patched at token position(s) P only"))
        if hidden:
            items.append(LegendItem("note", f"hidden: {hidden} edges with |score| < {min_score:.3g}"
                                            + (f", {dangling} left dangling" if dangling else "")))
    return Scene(full_title, [(r, rank_label(r, graph)) for r in ranks], nodes, edges, items, rankdir)
