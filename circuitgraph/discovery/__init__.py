"""Automated circuit discovery: ACDC, EAP, EAP-IG (inputs / activations) and exact edge effects.

Every method returns :class:`EdgeScores`; selection (top-n, threshold, greedy) turns them into a
:class:`~circuitgraph.spec.CircuitSpec` that keeps every score; :func:`bootstrap` repeats both on resampled
rows to say how often each edge is kept.
"""

from __future__ import annotations

import time

from circuitgraph.evaluate import distributed as dist
from circuitgraph.evaluate.evaluator import Evaluator
from circuitgraph.discovery.acdc import acdc, acdc_by_position, exact_scores
from circuitgraph.discovery.eap import IG_POINTS, KEEP_DELTAS, attribute, ig_alphas
from circuitgraph.discovery.curves import MIB_FRACTIONS, FaithfulnessCurve, faithfulness_curve, roc_auc
from circuitgraph.discovery.edge_scores import EdgeScores, prune_dangling, spans_of
from circuitgraph.discovery.selection import DEFAULT_LEVEL, Selection, SelectionError, smallest_faithful
from circuitgraph.discovery.stability import STABLE_FRACTION, Stability, bootstrap

METHODS = ("acdc", "eap", "eap-ig", "eap-ig-activations", "exact")


def discover(ev: Evaluator, method: str, *, steps: int = 5, tau: float = 0.01, progress: bool = True,
             ig_points: str = "right", keep_deltas: float | None = None, by_position: bool = False) -> EdgeScores:
    """Score every edge with ``method`` (see :data:`METHODS`); ``ig_points`` places EAP-IG's steps
    (see :func:`~circuitgraph.discovery.eap.ig_alphas`) and ``keep_deltas`` trades EAP's memory for time
    (see :func:`~circuitgraph.discovery.eap.attribute`).  Under ``torch.distributed`` the ranks share
    the examples and all return the same scores; only rank 0 shows progress.  ``by_position`` scores edge x
    span units (see :class:`EdgeScores`; ACDC then keeps or removes each unit)."""
    t = time.perf_counter()
    progress = progress and (not ev.distributed or dist.is_main())
    if method == "acdc":
        out = acdc_by_position(ev, tau, progress=progress) if by_position else acdc(ev, tau, progress=progress)
    elif method == "exact":
        out = exact_scores(ev, progress=progress, by_position=by_position)
    elif method in ("eap", "eap-ig", "eap-ig-activations"):
        out = attribute(ev, method, steps=steps, progress=progress, ig_points=ig_points,
                        keep_deltas=KEEP_DELTAS if keep_deltas is None else keep_deltas, by_position=by_position)
    else:
        raise ValueError(f"unknown discovery method '{method}'; expected one of {', '.join(METHODS)}")
    out.meta["seconds"] = time.perf_counter() - t
    return out


__all__ = ["DEFAULT_LEVEL", "IG_POINTS", "KEEP_DELTAS", "METHODS", "MIB_FRACTIONS", "EdgeScores", "FaithfulnessCurve", "Selection",
           "SelectionError", "STABLE_FRACTION", "Stability", "acdc", "acdc_by_position", "attribute", "bootstrap", "discover", "exact_scores", "faithfulness_curve", "ig_alphas",
           "prune_dangling", "roc_auc", "smallest_faithful", "spans_of"]
