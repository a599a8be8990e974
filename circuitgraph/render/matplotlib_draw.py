"""A :class:`~circuitgraph.render.scene.Scene` drawn with matplotlib: the fallback without Graphviz.

Same rows (one per layer), same node order, fills, edge colours, widths, arrowheads and legend as the
graphviz drawing; only the placement is simpler (each row centred, nodes evenly spaced, edges as
gentle arcs), so it needs no system program and works on any machine matplotlib runs on.
"""

from __future__ import annotations

from pathlib import Path

from circuitgraph.render.scene import Scene

ARROWSTYLES = {"normal": "-|>", "vee": "->", "tee": "-[, widthB=0.25, lengthB=0.08"}
LEGEND_MARKERS = {"normal": ">", "vee": "$>$", "tee": "|"}
LINESTYLES = {"solid": "-", "dotted": ":"}
CHAR_IN, NODE_H, ROW_GAP, NODE_GAP = 0.075, 0.34, 0.95, 0.18  # inches


def _node_size(n) -> tuple[float, float]:
    chars = max(len(n.label), len(n.sub or ""))
    return max(0.55, CHAR_IN * chars + 0.25), NODE_H + (0.16 if n.sub else 0.0)


def _layout(scene: Scene) -> dict[str, tuple[float, float, float, float]]:
    """Node id -> (x, y, width, height) in inches; rows along y (BT/TB) or x (LR/RL)."""
    rows = [[n for n in scene.nodes if n.rank == r] for r, _ in scene.ranks]
    horizontal = scene.rankdir in ("LR", "RL")
    pos = {}
    row_gap = max((max(_node_size(n)[0] for n in row) for row in rows if row), default=1) + 0.6 if horizontal else ROW_GAP
    for i, row in enumerate(rows):
        sizes = [_node_size(n) for n in row]
        extent = sum((h if horizontal else w) for w, h in sizes) + NODE_GAP * (len(row) - 1)
        at = -extent / 2
        for n, (w, h) in zip(row, sizes):
            along = at + ((h if horizontal else w) / 2)
            at += (h if horizontal else w) + NODE_GAP
            depth = i * row_gap * (-1 if scene.rankdir in ("TB", "RL") else 1)
            pos[n.id] = (depth, -along, w, h) if horizontal else (along, depth, w, h)
    return pos


def draw(scene: Scene, path: str | Path, dpi: int = 150) -> Path:
    """Write the scene as .svg, .png or .pdf (the suffix decides)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Ellipse, FancyArrowPatch, FancyBboxPatch, Patch

    path = Path(path)
    pos = _layout(scene)
    xs = [x + s * w / 2 for x, _, w, _ in pos.values() for s in (-1, 1)] or [0]
    ys = [y + s * h / 2 for _, y, _, h in pos.values() for s in (-1, 1)] or [0]
    label_w = 0.8 if scene.rankdir in ("BT", "TB") else 0.0
    x0, x1, y0, y1 = min(xs) - 0.2 - label_w, max(xs) + 0.2, min(ys) - 0.25, max(ys) + 0.25
    fig = plt.figure(figsize=(max(x1 - x0, 3.0), max(y1 - y0, 1.5)))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(x0, x0 + max(x1 - x0, 3.0))
    ax.set_ylim(y0, y0 + max(y1 - y0, 1.5))
    ax.set_aspect("equal")
    ax.axis("off")

    patches = {}
    for n in scene.nodes:
        x, y, w, h = pos[n.id]
        lw = 1.5 if n.kind in ("input", "logits", "group") else 0.8
        if n.kind == "head":
            p = Ellipse((x, y), w, h, facecolor=n.fill, edgecolor="#444444", lw=lw, zorder=2)
        else:
            style = "round,pad=0,rounding_size=0.08" if n.kind in ("group", "input", "logits") else "square,pad=0"
            p = FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle=style, facecolor=n.fill, edgecolor="#444444",
                               lw=lw, zorder=2)
        ax.add_patch(p)
        patches[n.id] = p
        weight = "bold" if n.kind == "group" else "normal"
        if n.sub:
            ax.text(x, y + 0.07, n.label, ha="center", va="center", fontsize=9, weight=weight, zorder=3)
            ax.text(x, y - 0.1, n.sub, ha="center", va="center", fontsize=7, zorder=3)
        else:
            ax.text(x, y, n.label, ha="center", va="center", fontsize=9, weight=weight, zorder=3)

    if scene.rankdir in ("BT", "TB"):
        for r, label in scene.ranks:
            row = [pos[n.id] for n in scene.nodes if n.rank == r]
            if label and row:
                ax.text(min(x - w / 2 for x, _, w, _ in row) - 0.15, row[0][1], label, ha="right", va="center",
                        fontsize=8, color="#888888")

    rows = {n.id: i for i, (r, _) in enumerate(scene.ranks) for n in scene.nodes if n.rank == r}
    rad = {"q": 0.12, "k": -0.12, "v": 0.24, None: 0.0}
    for e in scene.edges:
        (xa, ya, _, _), (xb, yb, _, _) = pos[e.src], pos[e.dst]
        arrow = FancyArrowPatch((xa, ya), (xb, yb), patchA=patches[e.src], patchB=patches[e.dst],
                                arrowstyle=ARROWSTYLES[e.arrowhead], mutation_scale=6 + 2 * e.width,
                                connectionstyle=f"arc3,rad={rad[e.port]}", lw=e.width * 0.75, color=e.color,
                                alpha=e.alpha, linestyle=LINESTYLES[e.style], zorder=1)
        ax.add_patch(arrow)
        if e.label:
            t = 0.5 if abs(rows[e.src] - rows[e.dst]) <= 1 else 0.25  # off the rows in between
            ax.text(xa + t * (xb - xa), ya + t * (yb - ya), e.label, fontsize=6, color=e.color, ha="center", va="center",
                    zorder=4, bbox=dict(facecolor="white", edgecolor="none", pad=0.5, alpha=0.8))

    if scene.title:
        ax.set_title(scene.title, fontsize=12)
    if scene.legend:
        handles = []
        for it in scene.legend:
            if it.kind == "group":
                handles.append(Patch(facecolor=it.color, edgecolor="#444444", label=it.text))
            elif it.kind == "edge":
                handles.append(Line2D([], [], color=it.color, lw=2, linestyle=LINESTYLES[it.style], label=it.text,
                                      marker=LEGEND_MARKERS.get(it.arrowhead), markersize=7))
            else:
                handles.append(Line2D([], [], linestyle="none", label=it.text))
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8,
                  title="legend", title_fontsize=8, frameon=True, edgecolor="#cccccc")
    fig.savefig(path, format=path.suffix.lower()[1:], dpi=dpi, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path
