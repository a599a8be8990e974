"""How good a ranking of edges is: faithfulness curves with MIB's CPR and CMD, and ROC/AUC
against a reference circuit."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from circuitgraph.evaluate.evaluator import Evaluator
from circuitgraph.discovery.edge_scores import EdgeScores

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass
class FaithfulnessCurve:
    fractions: np.ndarray
    n_edges: np.ndarray
    faithfulness: np.ndarray
    method: str = ""

    @property
    def cpr(self) -> float:
        """Area under the faithfulness curve over the edge fraction (higher is better)."""
        return float(np.trapezoid(self.faithfulness, self.fractions))

    @property
    def cmd(self) -> float:
        """Area between the curve and 1 (lower is better)."""
        return float(np.trapezoid(np.abs(1 - self.faithfulness), self.fractions))

    def to_dict(self) -> dict:
        return {"method": self.method, "fractions": self.fractions.tolist(), "n_edges": self.n_edges.tolist(),
                "faithfulness": self.faithfulness.tolist(), "cpr": self.cpr, "cmd": self.cmd}

    def plot(self, path=None, ax=None, label=None):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(self.fractions * 100, self.faithfulness, marker="o", label=label or f"{self.method} (CPR {self.cpr:.2f}, CMD {self.cmd:.2f})")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("edges in circuit (%)")
        ax.set_ylabel("faithfulness")
        ax.legend(fontsize=8)
        if own:
            fig.tight_layout()
            if path:
                fig.savefig(path, dpi=150)
            plt.close(fig)
        return ax


def faithfulness_curve(ev: Evaluator, scores: EdgeScores, fractions=MIB_FRACTIONS, selection: str = "top_n") -> FaithfulnessCurve:
    """Faithfulness of the top-scoring edges at each circuit size (all sizes in batched runs)."""
    total = scores.graph.n_edges
    sizes = np.array([max(1, int(round(f * total))) for f in fractions])
    select = scores.greedy if selection == "greedy" else scores.top_n
    masks = torch.stack([select(int(n)) for n in sizes])
    faith = ev.normalise(ev.mask_values(masks, desc="faithfulness curve"))
    return FaithfulnessCurve(np.array(fractions, dtype=float), sizes, np.asarray(faith, dtype=float), scores.method)


def roc_auc(scores: EdgeScores, reference: torch.Tensor) -> tuple[float, np.ndarray, np.ndarray]:
    """ROC AUC of |score| at recovering the reference circuit's edges (bool mask), with the curve."""
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
