"""How good a ranking of edges is: faithfulness curves with CPR and CMD as MIB computes them,
and ROC/AUC against a reference circuit.

MIB's circuit track (``MIB_circuit_track/evaluation.py::evaluate_area_under_curve`` with the
EAP-IG ``Graph.apply_topn`` / ``prune`` it calls, and ``scripts/print_results.py``) fixes:

* sizes ``int(f * n_edges)`` (floor; 0 edges is the ablated model) at the fractions
  ``MIB_FRACTIONS``;
* two rankings: CPR comes from the *signed* one, CMD from the *absolute* one.  MIB's scores are
  attributions of the loss (minus the metric), ours estimate the change of the metric when an
  edge is ablated, so MIB's descending signed order is our ascending one: the edges whose
  removal lowers the metric most come first;
* every top-n circuit is pruned before it is evaluated (:func:`mib_prune`), and the edge count
  MIB records is taken after ``apply_topn``'s single pruning pass (:func:`mib_prune` with
  ``passes=1``), while ``evaluate_graph`` prunes again until nothing changes;
* CPR is the trapezoid area under f over the nominal fractions, CMD the area under |1 - f|.

``benchmarks/bench_mib_parity.py`` runs the same scores through MIB's own function.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from circuitgraph.discovery.edge_scores import EdgeScores, mib_prune
from circuitgraph.evaluate.evaluator import Evaluator, bootstrap_se, normalised

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
RULES = ("mib", "unpruned-rounded")
RANKINGS = ("signed", "absolute")


def mib_sizes(fractions, n_edges: int) -> list[int]:
    """MIB's circuit sizes: ``int(f * n_edges)``, the same float product and floor as its loop."""
    return [int(f * n_edges) for f in fractions]


def ranked_top_n(scores: EdgeScores, n: int, ranking: str) -> torch.Tensor:
    """The ``n`` first edges (or edge x span units) of a ranking (``n = 0``: no edge).  ``signed`` puts the most negative of
    our scores first, i.e. MIB's descending order of loss attributions; ``absolute`` sorts |score|."""
    if n == 0:
        return torch.zeros_like(scores.graph.legal)
    vals = scores.scores.abs() if ranking == "absolute" else -scores.scores
    flat = torch.nan_to_num(vals, nan=-float("inf")).flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.topk(min(n, scores.n_units)).indices] = True
    return mask.view_as(scores.scores)


@dataclass
class FaithfulnessCurve:
    """One ranking's curve: per fraction the edges requested, counted and evaluated, and faithfulness ± s.e.

    ``n_edges_counted`` is what MIB records (``weighted_edge_count`` after ``apply_topn``'s one pruning
    pass); ``n_edges`` is the circuit actually evaluated (pruned until nothing changes)."""

    fractions: np.ndarray
    n_edges: np.ndarray
    faithfulness: np.ndarray
    method: str = ""
    ranking: str = "absolute"
    rules: str = "mib"
    n_requested: np.ndarray | None = None
    n_edges_counted: np.ndarray | None = None
    faithfulness_se: np.ndarray | None = None
    undefined_reason: str | None = None
    band_low: np.ndarray | None = None  # a bootstrap percentile band over resamples (discover --bootstrap)
    band_high: np.ndarray | None = None

    @property
    def area_under(self) -> float | None:
        """Trapezoid area under f over the fractions (MIB's ``area_under``); None when f is undefined."""
        return None if self.undefined_reason else float(np.trapezoid(self.faithfulness, self.fractions))

    @property
    def area_from_1(self) -> float | None:
        """Trapezoid area under |1 - f| (MIB's ``area_from_1``); None when f is undefined."""
        return None if self.undefined_reason else float(np.trapezoid(np.abs(1 - self.faithfulness), self.fractions))

    # one curve's own areas, for callers that draw a single ranking
    cpr = area_under
    cmd = area_from_1

    def points(self) -> list[dict]:
        """One dict per fraction (edge counts, faithfulness, its
        s.e. and band), non-finite values as ``None`` for JSON."""
        cols = {"fraction": self.fractions, "edges_requested": self.n_requested, "edges_counted": self.n_edges_counted,
                "edges_evaluated": self.n_edges, "faithfulness": self.faithfulness, "faithfulness_se": self.faithfulness_se}
        if self.band_low is not None:
            cols.update(band_low=self.band_low, band_high=self.band_high)
        out = []
        for i in range(len(self.fractions)):
            row = {}
            for k, v in cols.items():
                x = None if v is None else v[i].item()
                row[k] = None if (x is None or (isinstance(x, float) and not np.isfinite(x))) else x
            out.append(row)
        return out

    def to_dict(self) -> dict:
        """The curve, its areas and why it is undefined (if it is), as plain JSON types."""
        return {"method": self.method, "ranking": self.ranking, "rules": self.rules, "area_under": self.area_under,
                "area_from_1": self.area_from_1, "undefined_reason": self.undefined_reason, "points": self.points()}

    def plot(self, path=None, ax=None, label=None):
        """Draw faithfulness against the fraction of edges kept, on ``ax`` or a new figure written to ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(5, 3.5))
        x = self.fractions * 100
        line, = ax.plot(x, self.faithfulness, marker="o", label=label or f"{self.method} {self.ranking}")
        if self.faithfulness_se is not None:
            se = np.nan_to_num(self.faithfulness_se)
            ax.fill_between(x, self.faithfulness - se, self.faithfulness + se, color=line.get_color(), alpha=0.2, lw=0)
        if self.band_low is not None:
            for edge in (self.band_low, self.band_high):
                ax.plot(x, edge, color=line.get_color(), lw=0.8, ls=":")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("edges requested (% of the model's)")
        ax.set_ylabel("faithfulness")
        ax.legend(fontsize=8)
        if own:
            fig.tight_layout()
            if path:
                fig.savefig(path, dpi=150)
            plt.close(fig)
        return ax


@dataclass
class CurvePair:
    """Both rankings' curves.  Under MIB's rules ``cpr`` comes from the signed one and ``cmd`` from the
    absolute one (``print_results.py`` keeps the ``abs-False`` runs for CPR, ``abs-True`` for CMD); under
    ``unpruned-rounded`` both come from the absolute one, as circuitgraph computed them before."""

    signed: FaithfulnessCurve
    absolute: FaithfulnessCurve
    meta: dict = field(default_factory=dict)

    @property
    def cpr(self) -> float | None:
        """MIB's CPR: the area under the signed ranking's curve (the absolute one's under ``unpruned-rounded``)."""
        return (self.signed if self.signed.rules == "mib" else self.absolute).area_under

    @property
    def cmd(self) -> float | None:
        """MIB's CMD: the area between the absolute ranking's curve and 1."""
        return self.absolute.area_from_1

    @property
    def undefined_reason(self) -> str | None:
        """Why the curves carry no numbers (clean and ablated metrics equal), or ``None``."""
        return self.signed.undefined_reason

    def to_dict(self) -> dict:
        """Both curves with CPR, CMD and the run's metadata, as plain JSON types."""
        return {"cpr": self.cpr, "cmd": self.cmd, "rules": self.signed.rules, "method": self.signed.method,
                "undefined_reason": self.undefined_reason, **self.meta,
                "signed": self.signed.to_dict(), "absolute": self.absolute.to_dict()}

    def plot(self, path=None, title: str | None = None):
        """Both curves on one axis (signed: CPR's curve, absolute: CMD's)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        fmt = lambda v: "undefined" if v is None else f"{v:.3f}"
        mib = self.signed.rules == "mib"
        self.signed.plot(ax=ax, label="signed ranking" + (f" (CPR {fmt(self.cpr)})" if mib else ""))
        self.absolute.plot(ax=ax, label="|score| ranking (" + ("" if mib else f"CPR {fmt(self.cpr)}, ") + f"CMD {fmt(self.cmd)})")
        if (band := self.meta.get("bootstrap_band")) and self.absolute.band_low is not None:
            ax.plot([], [], color="grey", lw=0.8, ls=":", label=f"{100 * band['level']:g}% band over {band['n_resamples']} bootstrap resamples")
            ax.legend(fontsize=8)
        ax.set_title(title or f"{self.signed.method} faithfulness curves ({self.signed.rules} rules)", fontsize=9)
        fig.tight_layout()
        if path:
            fig.savefig(path, dpi=150)
        plt.close(fig)
        return fig


def faithfulness_curve(ev: Evaluator, scores: EdgeScores, fractions=MIB_FRACTIONS, rules: str = "mib",
                       selection: str = "top_n") -> CurvePair:
    """Faithfulness of the top-ranked edges at each size, under both rankings (all circuits in batched runs).

    ``rules="mib"`` (default) reproduces MIB's circuit track (module docstring).  ``rules="unpruned-rounded"``
    is circuitgraph's earlier convention: sizes ``max(1, round(f * n))``, no pruning.  ``selection="greedy"``
    grows each circuit from the logits instead (ours, not MIB's ``apply_greedy``).  By-position scores rank
    edge x span units: sizes are fractions of all units, and each circuit is evaluated with its positions."""
    if rules not in RULES:
        raise ValueError(f"rules must be one of {', '.join(RULES)}, got {rules!r}")
    if selection not in ("top_n", "greedy"):
        raise ValueError(f"selection must be 'top_n' or 'greedy', got {selection!r}")
    graph, total = scores.graph, scores.n_units
    fractions = np.array(fractions, dtype=float)
    if rules == "mib":
        requested = mib_sizes(fractions.tolist(), total)
    else:
        requested = [max(1, int(round(f * total))) for f in fractions]

    def select(n: int, ranking: str) -> torch.Tensor:
        if selection == "greedy":
            return scores.greedy(n, absolute=ranking == "absolute") if n else torch.zeros_like(scores.scores, dtype=torch.bool)
        if rules != "mib" and ranking == "absolute":
            return scores.top_n(n)
        return ranked_top_n(scores, n, ranking)

    chosen = {r: [select(n, r) for n in requested] for r in RANKINGS}
    counted = {r: [int(m.sum()) for m in chosen[r]] for r in RANKINGS}
    if rules == "mib":
        counted = {r: [int(mib_prune(graph, m, passes=1).sum()) for m in chosen[r]] for r in RANKINGS}
        chosen = {r: [mib_prune(graph, m) for m in chosen[r]] for r in RANKINGS}
    values = selection_values(ev, scores, [m for r in RANKINGS for m in chosen[r]])
    clean, base = ev.clean_values, ev.base_values
    undefined = ev.undefined_reason
    curves = {}
    for k, r in enumerate(RANKINGS):
        v = values[k * len(requested):(k + 1) * len(requested)]
        faith = np.asarray(normalised(v, clean[None], base[None]), dtype=float)
        se = np.array([bootstrap_se(normalised, row, clean, base) for row in v]) if not undefined else None
        curves[r] = FaithfulnessCurve(fractions, np.array([int(m.sum()) for m in chosen[r]]),
                                      np.full(len(requested), np.nan) if undefined else faith, scores.method, r, rules,
                                      np.array(requested), np.array(counted[r]), se, undefined)
    return CurvePair(curves["signed"], curves["absolute"], {"n_edges_total": total, "n_examples": len(ev.data),
                                                            "metric": ev.metric_name, "ablation": ev.ablation_kind})


def selection_values(ev: Evaluator, scores: EdgeScores, masks: list[torch.Tensor], desc: str = "faithfulness curves") -> np.ndarray:
    """Per-example metric ``[C, N]`` of each selection of ``scores``, each distinct circuit run once; an empty
    one is the ablated run.  By position the circuits carry their spans' positions, which every row must name."""
    keys = [m.numpy().tobytes() for m in masks]
    distinct = {k: m for k, m in zip(keys, masks) if bool(m.any())}
    order = list(distinct)
    if scores.spans is not None and order:
        ev.data.check_positions(scores.spans, "the by-position scores")
        run = ev.metric_values([scores.circuit(distinct[k]) for k in order], desc=desc)
    else:
        run = ev.mask_values(torch.stack([distinct[k] for k in order]), desc=desc) if order else None
    by_key = {k: run[i] for i, k in enumerate(order)}
    return np.stack([by_key.get(k, ev.base_values) for k in keys])


def roc_auc(scores: EdgeScores, reference: torch.Tensor) -> tuple[float, np.ndarray, np.ndarray]:
    """ROC AUC of |score| at recovering the reference circuit's edges (bool mask), with the curve."""
    if scores.spans is not None:
        raise ValueError("roc_auc compares edges with a reference circuit; give it scores.summed() of by-position scores")
    legal = scores.graph.legal
    y = reference[legal].numpy().astype(bool)
    s = scores.scores.abs()[legal].numpy()
    if y.all() or not y.any():
        raise ValueError("the reference circuit must contain some, but not all, edges")
    order = np.argsort(-s, kind="stable")
    ys = y[order]
    tpr = np.concatenate([[0], np.cumsum(ys) / ys.sum()])
    fpr = np.concatenate([[0], np.cumsum(~ys) / (~ys).sum()])
    ranks = _average_ranks(s)
    auc = (ranks[y].sum() - y.sum() * (y.sum() + 1) / 2) / (y.sum() * (~y).sum())
    return float(auc), fpr, tpr


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged (Mann-Whitney U)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks
