"""The shared figure helpers, kept importable under their earlier name; they live in :mod:`circuitgraph.plots`
(below every package, so that evaluation's figures need nothing from characterisation)."""

from circuitgraph.plots import heatmap, new_figure, save, token_labels

__all__ = ["heatmap", "new_figure", "save", "token_labels"]
