"""Circuit figures: graphviz's layered layout when ``dot`` is installed, matplotlib otherwise.

What a figure shows (colours, widths, labels, legend) is decided once in
:mod:`circuitgraph.render.scene`; :mod:`~circuitgraph.render.graphviz_draw` and
:mod:`~circuitgraph.render.matplotlib_draw` only place it.  Graphviz stays the first choice (``dot``
lays out layered graphs natively and its SVG can be parsed by tests); without it, a new user's
laptop or a cluster node still gets its SVG/PNG/PDF from matplotlib, with one line saying that
installing Graphviz gives the full-quality layout.  The returned :class:`CircuitDigraph` displays
inline in Jupyter either way.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

import graphviz

from circuitgraph.graph.computational_graph import Graph
from circuitgraph.render import graphviz_draw, matplotlib_draw
from circuitgraph.render.scene import PORT_COLORS, SIGN_COLORS, WEAK_COLOR, Scene, build_scene
from circuitgraph.spec.circuit_spec import CircuitSpec

FORMATS = (".svg", ".png", ".pdf", ".dot")
RANKDIRS = ("BT", "TB", "LR", "RL")
FALLBACK_NOTE = ("circuitgraph: graphviz's 'dot' program was not found, so figures are drawn with matplotlib; "
                 "install Graphviz (apt-get install graphviz, brew install graphviz or conda install graphviz) "
                 "for the full-quality layout")

_HEAD = re.compile(r"^a(\d+)\.h(\d+)$")
_MLP = re.compile(r"^m(\d+)$")
_noted = False


class CircuitDigraph(graphviz.Digraph):
    """A graphviz ``Digraph`` that remembers its scene, so it can be drawn without ``dot`` too."""

    scene: Scene | None = None

    def _repr_mimebundle_(self, include=None, exclude=None, **kwargs):
        if has_dot():
            return super()._repr_mimebundle_(include, exclude, **kwargs)
        _note_fallback()
        with tempfile.TemporaryDirectory() as tmp:
            svg = matplotlib_draw.draw(self.scene, Path(tmp) / "figure.svg")
            return {"image/svg+xml": svg.read_text()}


def has_dot() -> bool:
    """Is graphviz's ``dot`` program on the PATH?"""
    return shutil.which("dot") is not None


def _note_fallback() -> None:
    global _noted
    if not _noted:
        print(FALLBACK_NOTE, file=sys.stderr)
        _noted = True


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


def check_figure_path(path) -> Path:
    """``path`` as a Path if its suffix is a format we can write, else a ValueError listing them."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"cannot write '{path}': unknown figure format '{path.suffix or '(no suffix)'}'; "
                         f"use one of {', '.join(FORMATS)}")
    return path


def render(spec: CircuitSpec, graph: Graph | None = None, path: str | Path | None = None, *, rankdir: str = "BT",
           collapse_groups: bool | list[str] = False, min_score: float | None = None,
           verified: dict[str, float] | None = None, verified_tol: float = 1e-3, title: str | None = None,
           legend: bool = True) -> CircuitDigraph:
    """Draw a circuit spec; write it to ``path`` (.svg, .png, .pdf or .dot) when given.

    ``graph`` defaults to :func:`infer_graph`.  Only nodes with drawn edges, plus the members of
    named groups, appear.  ``collapse_groups`` (True or a list of group names) draws each group as
    one node; ``min_score`` hides edges with |score| below it (unscored edges stay) and the edges
    this leaves dangling; ``verified`` maps edge names to measured effects, and edges whose effect is
    below ``verified_tol`` (negative or negligible) are drawn dotted grey.  The title gains the
    faithfulness when ``spec.metadata["faithfulness"]`` records it.  See
    :mod:`circuitgraph.render.scene` for what each style means.
    """
    if path is not None:
        path = check_figure_path(path)
    if rankdir not in RANKDIRS:
        raise ValueError(f"rankdir must be one of {', '.join(RANKDIRS)}, got '{rankdir}'")
    scene = build_scene(spec, graph or infer_graph(spec), rankdir=rankdir, collapse_groups=collapse_groups,
                        min_score=min_score, verified=verified, verified_tol=verified_tol, title=title, legend=legend)
    dot = graphviz_draw.to_digraph(scene, name=spec.name or "circuit", digraph_class=CircuitDigraph)
    dot.scene = scene
    if path is not None:
        write(dot, path)
    return dot


def write(dot: graphviz.Digraph, path: str | Path) -> Path:
    """Write the figure; the format comes from the suffix (.dot writes the DOT source).

    Without graphviz's ``dot`` program a figure from :func:`render` is drawn with matplotlib instead.
    """
    path = check_figure_path(path)
    if path.suffix.lower() == ".dot":
        path.write_text(dot.source)
        return path
    if has_dot():
        try:
            path.write_bytes(dot.pipe(format=path.suffix.lower()[1:]))
            return path
        except graphviz.ExecutableNotFound:
            pass
    scene = getattr(dot, "scene", None)
    if scene is None:
        raise OSError("graphviz's 'dot' program is not installed (e.g. 'apt-get install graphviz' or "
                      "'conda install graphviz'); a .dot file can still be written")
    _note_fallback()
    return matplotlib_draw.draw(scene, path)


__all__ = ["FORMATS", "PORT_COLORS", "SIGN_COLORS", "WEAK_COLOR", "CircuitDigraph", "check_figure_path", "has_dot",
           "infer_graph", "render", "write"]
