"""Colours shared with the static figures, so a group, a sign or a port looks the same on the page and in the paper."""

from __future__ import annotations

from circuitgraph.render.figure import PORT_COLORS
from circuitgraph.spec.circuit_spec import CircuitSpec

try:  # the figures' scene module: sign colours and one colour per group role across figures
    from circuitgraph.render.scene import SIGN_COLORS, group_colors
except ImportError:  # figures without it: their palette, in group order
    from circuitgraph.render.figure import PALETTE

    SIGN_COLORS = {1: "#2166ac", -1: "#b2182b"}

    def group_colors(spec: CircuitSpec) -> dict[str, str]:
        return {g: grp.color or PALETTE[i % len(PALETTE)] for i, (g, grp) in enumerate(spec.groups.items())}


def page_style() -> dict:
    """The colours the page's script draws with."""
    return {"positive": SIGN_COLORS[1], "negative": SIGN_COLORS[-1], "ports": {p: c for p, c in PORT_COLORS.items() if p}}


__all__ = ["group_colors", "page_style"]
