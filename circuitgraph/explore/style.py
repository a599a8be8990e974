"""Colours shared with the static figures, so a group, a sign or a port looks the same on the page and in the paper."""

from __future__ import annotations

from circuitgraph.render.scene import PORT_COLORS, SIGN_COLORS, group_colors


def page_style() -> dict:
    """The colours the page's script draws with."""
    return {"positive": SIGN_COLORS[1], "negative": SIGN_COLORS[-1], "ports": {p: c for p, c in PORT_COLORS.items() if p}}


__all__ = ["group_colors", "page_style"]
