"""Choosing how many edges to keep when the user does not say: the smallest top-n whose
faithfulness reaches a stated level.

A fixed fraction (say 1% of the edges) can keep one edge of a small model, with faithfulness 0:
a circuit that explains nothing.  Here each candidate is the top-n of a ranking, pruned as MIB
prunes it (edges that cannot carry signal from the input to the logits removed), and the size is
found by bisection on a log scale between 0 and every edge, until the smallest size reaching the
level is known to within ``ratio`` (default 15%).  The bisection looks at the first ``search_rows``
examples only; the size it finds is then confirmed on every example, and grown by ``ratio`` until
it reaches the level there too.  On SmolLM2-135M (123,211 edges) that is about ten patched runs of
a few examples and one or two of all, where sizes 1, 2, 4, ... on every example took three times as
long as the attribution (``studies/smollm2_ioi_discovery.py``).  Faithfulness need not grow
monotonically with size, so the result is "the smallest size found", which the description says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from circuitgraph.discovery.curves import RANKINGS, ranked_top_n, selection_values
from circuitgraph.discovery.edge_scores import EdgeScores, mib_prune
from circuitgraph.evaluate.evaluator import Evaluator

DEFAULT_LEVEL = 0.8
DEFAULT_RANKING = "absolute"
SEARCH_ROWS = 16
RATIO = 1.15


class SelectionError(ValueError):
    """A selection that cannot give a circuit (empty, undefined, or out of range)."""


@dataclass
class Selection:
    """A chosen circuit (its edge mask) with its size, faithfulness and the one-line account of how it was chosen."""

    mask: torch.Tensor
    n_edges: int  # edges kept (after pruning)
    faithfulness: float  # on every example
    how: str  # one line, printed by the command line and kept in the spec's metadata
    n_requested: int = 0  # the top-n before pruning
    missed: int = 0  # the largest top-n tried that missed the level (on the rows the bisection looked at)


def smallest_faithful(ev: Evaluator, scores: EdgeScores, level: float = DEFAULT_LEVEL, greedy: bool = False,
                      ranking: str = DEFAULT_RANKING, search_rows: int = SEARCH_ROWS, ratio: float = RATIO) -> Selection:
    """The smallest pruned top-n (or greedy top-n) circuit whose faithfulness reaches ``level`` (module docstring)."""
    if ev.undefined_reason:
        raise SelectionError(f"no default circuit size can be chosen: {ev.undefined_reason}; give --top-n or --threshold")
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}")
    graph, total = scores.graph, scores.n_units

    def circuit(n: int) -> torch.Tensor:
        chosen = scores.greedy(n, absolute=ranking == "absolute") if greedy else ranked_top_n(scores, n, ranking)
        return mib_prune(graph, chosen)

    def faithfulness(on: Evaluator, n: int, cache: dict) -> float:
        if n not in cache:
            mask = circuit(n)
            value = on.normalise(selection_values(on, scores, [mask], "choosing the circuit size"))[0] if mask.any() else 0.0
            cache[n] = float(value) if math.isfinite(value) else -math.inf
        return cache[n]

    look = ev.first_rows(search_rows) if len(ev.data) >= 2 * search_rows else ev
    if look is not ev and look.undefined_reason:  # too few rows to tell clean from ablated: look at all of them
        look = ev
    seen: dict[int, float] = {}
    lo, hi = 0, total  # faithfulness below the level at lo (nothing kept), reached at hi (everything kept)
    while hi > max(lo * ratio, lo + 1):
        mid = min(hi - 1, max(lo + 1, round(math.sqrt(max(lo, 1) * hi))))
        if faithfulness(look, mid, seen) >= level:
            hi = mid
        else:
            lo = mid
    confirmed: dict[int, float] = seen if look is ev else {}
    while faithfulness(ev, hi, confirmed) < level and hi < total:
        hi = min(total, max(hi + 1, math.ceil(hi * ratio)))
    f = faithfulness(ev, hi, confirmed)
    if f < level:  # only when even the full graph misses the level, e.g. a non-finite metric
        raise SelectionError(f"no circuit size reaches faithfulness {level:g} (every edge gives {f:.3g}); "
                             f"give --top-n or --threshold")
    mask = circuit(hi)
    kind = "greedy top" if greedy else f"top ({ranking} ranking)"
    where = (f"bisection on the first {len(look.data)} examples, confirmed on all {len(ev.data)}" if look is not ev
             else f"bisection on all {len(ev.data)} examples")
    tried = len(seen) + (0 if confirmed is seen else len(confirmed))
    units = "edge x position units" if scores.spans else "edges"
    how = (f"{kind} {hi}, pruned to {int(mask.sum())} {units}: the smallest size found reaching faithfulness >= {level:g} "
           f"({where}; top {lo} misses it; {tried} sizes tried; faithfulness {f:.3f})")
    return Selection(mask, int(mask.sum()), f, how, hi, lo)


@dataclass(frozen=True)
class SizeRule:
    """How a set of scores becomes a circuit once its size is fixed: ``top_n`` (``greedy``: grown from the
    logits), ``threshold`` (|score| >= value) or ``own`` (the method's own decision: ACDC), then pruned as MIB
    prunes when ``prune``.  The default selection is ``top_n`` of the size :func:`smallest_faithful` found,
    pruned; bootstrap resamples apply the full data's rule unchanged, so their circuits differ only by the data."""

    kind: str
    value: float = 0
    greedy: bool = False
    prune: bool = False

    def mask(self, scores: EdgeScores) -> torch.Tensor:
        """The edges (units) this rule keeps of ``scores``, pruned when the rule says so."""
        if self.kind == "own":
            mask = scores.in_circuit
        elif self.kind == "threshold":
            mask = scores.threshold(self.value)
        elif self.kind == "top_n":
            mask = scores.greedy(int(self.value)) if self.greedy else scores.top_n(int(self.value))
        else:
            raise ValueError(f"unknown size rule '{self.kind}'; expected top_n, threshold or own")
        return mib_prune(scores.graph, mask) if self.prune else mask


def check_selection(mask: torch.Tensor, how: str, scores: EdgeScores) -> torch.Tensor:
    """Refuse a selection that keeps no edge, saying what would keep some."""
    if bool(mask.any()):
        return mask
    largest = float(torch.nan_to_num(scores.scores.abs(), nan=0.0).max())
    raise SelectionError(f"the selection ({how}) keeps no edge; the largest |score| is {largest:.3g}")


__all__ = ["DEFAULT_LEVEL", "DEFAULT_RANKING", "Selection", "SelectionError", "SizeRule", "check_selection", "smallest_faithful"]
