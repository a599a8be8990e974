"""Shared figure helpers: labelled heatmaps written as PNG with matplotlib's Agg canvas.

``matplotlib.figure.Figure`` is used directly (not pyplot), so nothing here touches global
backend state or leaks open figures in long sessions.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure


def token_labels(tokenizer, ids, marks=None) -> list[str]:
    """Readable labels ``"3 ␣word"`` for token ids (index, token; a leading space shown as ␣).

    ``marks`` (bool per position) appends ``*``, e.g. where the corrupted prompt differs.
    """
    ids = [int(i) for i in ids]
    out = []
    for i, t in enumerate(ids):
        s = tokenizer.decode([t]) if tokenizer is not None else str(t)
        s = s.replace("\n", "\\n").replace(" ", "␣") or "''"
        if len(s) > 12:
            s = s[:11] + "…"
        out.append(f"{i} {s}" + ("*" if marks is not None and marks[i] else ""))
    return out


def new_figure(n_rows: int, n_cols: int, panels: int = 1, cell: float = 0.42, min_w: float = 4.0,
               min_h: float = 3.0, vertical: bool = False) -> tuple[Figure, list]:
    """A figure with ``panels`` axes (side by side, or stacked when ``vertical``) sized for ``n_rows x n_cols`` cells each."""
    w = min(max(min_w, cell * n_cols + 2.2), 16.0)
    h = min(max(min_h, cell * n_rows + 1.8), 14.0)
    size = (w, h * panels) if vertical else (w * panels, h)
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0] if vertical else fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def heatmap(fig: Figure, ax, values, row_labels=None, col_labels=None, *, diverging: bool = True,
            title: str | None = None, xlabel: str | None = None, ylabel: str | None = None,
            cbar_label: str | None = None, annotate: bool | None = None, vmax: float | None = None,
            vmin: float | None = None,
            cmap: str | None = None, origin_lower: bool = False):
    """Draw ``values [R, C]`` (NaN cells in grey) with labels, colourbar and optional annotations.

    Diverging maps are centred at 0 with symmetric limits, so white always means "no effect".
    """
    v = values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, dtype=float)
    R, C = v.shape
    finite = v[np.isfinite(v)]
    cm = colormaps[cmap or ("RdBu_r" if diverging else "viridis")].with_extremes(bad="#dddddd")
    if diverging:
        lim = vmax if vmax is not None else (float(np.abs(finite).max()) if finite.size else 1.0)
        lim = lim if lim > 0 else 1.0
        norm = TwoSlopeNorm(0.0, -lim, lim)
    else:
        lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
        hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
        norm = Normalize(lo, hi if hi > lo else lo + 1)
    im = ax.imshow(np.ma.masked_invalid(v), cmap=cm, norm=norm, aspect="auto", interpolation="nearest",
                   origin="lower" if origin_lower else "upper")
    cb = fig.colorbar(im, ax=ax, shrink=0.9)
    if cbar_label:
        cb.set_label(cbar_label)
    if col_labels is not None:
        ax.set_xticks(range(C), col_labels, rotation=90 if max(map(len, map(str, col_labels)), default=0) > 3 else 0,
                      fontsize=_font(C))
    if row_labels is not None:
        ax.set_yticks(range(R), row_labels, fontsize=_font(R))
    if annotate is None:
        annotate = R * C <= 160
    if annotate:
        for r in range(R):
            for c in range(C):
                if math.isfinite(v[r, c]):
                    shade = abs(norm(v[r, c]) - 0.5) > 0.3 if diverging else norm(v[r, c]) < 0.5
                    ax.text(c, r, _fmt(v[r, c]), ha="center", va="center", fontsize=_font(max(R, C)) - 1,
                            color="white" if shade else "black")
    if title:
        ncols = ax.get_subplotspec().get_geometry()[1] if ax.get_subplotspec() is not None else 1
        chars = max(32, int(fig.get_figwidth() / ncols * 11))
        ax.set_title("\n".join(textwrap.fill(line, chars) for line in title.split("\n")), fontsize=10)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    return im


def _font(n: int) -> int:
    return 9 if n <= 12 else 8 if n <= 24 else 6 if n <= 48 else 4


def _fmt(x: float) -> str:
    if abs(x) < 0.005:
        return "0"
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}"


def save(fig: Figure, path, dpi: int = 150) -> Path:
    """Write the figure (format from the suffix, PNG recommended) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
