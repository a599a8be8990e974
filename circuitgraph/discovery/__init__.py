"""Automated circuit discovery: ACDC, EAP, EAP-IG (inputs / activations) and exact edge effects.

Every method returns :class:`EdgeScores`; selection (top-n, threshold, greedy) turns them into a
:class:`~circuitgraph.spec.CircuitSpec` that keeps every score.
"""

from __future__ import annotations

import time

from circuitgraph.evaluate.evaluator import Evaluator
from circuitgraph.discovery.acdc import acdc, exact_scores
from circuitgraph.discovery.eap import attribute
from circuitgraph.discovery.curves import MIB_FRACTIONS, FaithfulnessCurve, faithfulness_curve, roc_auc
from circuitgraph.discovery.edge_scores import EdgeScores, prune_dangling
from circuitgraph.discovery.selection import DEFAULT_LEVEL, Selection, SelectionError, smallest_faithful

METHODS = ("acdc", "eap", "eap-ig", "eap-ig-activations", "exact")


def discover(ev: Evaluator, method: str, *, steps: int = 5, tau: float = 0.01, progress: bool = True) -> EdgeScores:
    """Score every edge with ``method`` (see :data:`METHODS`)."""
    t = time.perf_counter()
    if method == "acdc":
        out = acdc(ev, tau, progress=progress)
    elif method == "exact":
        out = exact_scores(ev, progress=progress)
    elif method in ("eap", "eap-ig", "eap-ig-activations"):
        out = attribute(ev, method, steps=steps, progress=progress)
    else:
        raise ValueError(f"unknown discovery method '{method}'; expected one of {', '.join(METHODS)}")
    out.meta["seconds"] = time.perf_counter() - t
    return out


__all__ = ["DEFAULT_LEVEL", "METHODS", "MIB_FRACTIONS", "EdgeScores", "FaithfulnessCurve", "Selection", "SelectionError",
           "acdc", "attribute", "discover", "exact_scores", "faithfulness_curve", "prune_dangling", "roc_auc",
           "smallest_faithful"]
