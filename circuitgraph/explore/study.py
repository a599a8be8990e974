"""A circuit study: one or two circuits on a model and dataset, with what characterises them, as one HTML page."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from circuitgraph.data.dataset import TaskData
from circuitgraph.explore.study_data import Limits, collect
from circuitgraph.explore.page import html_page
from circuitgraph.model.loading import CircuitModel
from circuitgraph.spec.circuit_spec import CircuitSpec


@dataclass
class Study:
    """The data of an explorer page (plain JSON types); build it with :meth:`collect`."""

    data: dict

    @classmethod
    def collect(cls, model: CircuitModel, data: TaskData, spec: CircuitSpec, discovered: CircuitSpec | None = None, *,
                evaluator=None, limits: Limits | None = None, title: str | None = None, model_name: str | None = None,
                progress: bool = False, edge_effects: list | None = None) -> "Study":
        """Score ``spec`` (and ``discovered``, to compare a hypothesis with what a method found) on ``data``
        and characterise their nodes on the first ``limits.examples`` rows.  ``evaluator`` (an
        :class:`~circuitgraph.evaluate.Evaluator` on ``data``) sets the metric and ablation and reuses its runs;
        ``edge_effects`` hands over per-circuit results of its ``edge_effects`` already computed."""
        circuits = [spec] + ([discovered] if discovered is not None else [])
        return cls(collect(model, data, circuits, evaluator=evaluator, limits=limits, title=title,
                           model_name=model_name, progress=progress, edge_effects=edge_effects))

    def to_html(self, path: str | Path) -> Path:
        """Write the self-contained page (no server, no network access when viewed)."""
        path = Path(path)
        if path.suffix.lower() not in (".html", ".htm"):
            raise ValueError(f"cannot write '{path}': an explorer page is HTML; give a path ending in .html")
        path.write_text(html_page(self.data), encoding="utf-8")
        return path


__all__ = ["Study"]
