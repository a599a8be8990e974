"""Choosing how many edges to keep when the user does not say: the smallest top-n whose
faithfulness reaches a stated level, under whichever ranking of the scores gets there first.

A fixed fraction (say 1% of the edges) can keep one edge of a small model, with faithfulness 0:
a circuit that explains nothing.  Here each candidate is the top-n of a ranking, pruned as MIB
prunes it (edges that cannot carry signal from the input to the logits removed), and the size is
found by bisection on a log scale between 0 and every edge, until the smallest size reaching the
level is known to within ``ratio`` (default 15%).  Both rankings MIB's curves use are searched side
by side -- signed (the edges whose ablation lowers the metric most first) and |score| -- and a ranking
stops as soon as the other has reached the level at a size it has already missed: on SmolLM2-135M IOI,
EAP-IG's signed ranking reaches faithfulness 0.8 at 1% of the edges where its |score| ranking needs
about 20%, while EAP's signed ranking carries nothing below the whole model
(``studies/smollm2_ioi_discovery.py``).  The bisection looks at the first ``search_rows`` examples only;
the size it finds is then confirmed on every example, and grown by ``ratio`` until it reaches the level
there too.  Faithfulness need not grow monotonically with size, so the result is "the smallest size
found", which the description says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from circuitgraph.discovery.curves import RANKINGS, ranked_top_n, selection_values
from circuitgraph.discovery.edge_scores import EdgeScores, mib_prune
from circuitgraph.evaluate.evaluator import Evaluator

DEFAULT_LEVEL = 0.8
SEARCH_ROWS = 16  # the bisection looks at these rows; its answer is confirmed (and grown) on every row (12 rows misled it on SmolLM2 IOI: 19 sizes tried instead of 14)
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
    ranking: str = "absolute"  # the ranking the top-n is of


def smallest_faithful(ev: Evaluator, scores: EdgeScores, level: float = DEFAULT_LEVEL, greedy: bool = False,
                      ranking: str | None = None, search_rows: int = SEARCH_ROWS, ratio: float = RATIO) -> Selection:
    """The smallest pruned top-n (or greedy top-n) circuit whose faithfulness reaches ``level`` (module docstring),
    under ``ranking`` (``signed`` or ``absolute``), or under either (None: both searched, the smaller size wins)."""
    if ev.undefined_reason:
        raise SelectionError(f"no default circuit size can be chosen: {ev.undefined_reason}; give --top-n or --threshold")
    if ranking is not None and ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}")
    total = scores.n_units

    def circuit(n: int, rk: str) -> torch.Tensor:
        return SizeRule("top_n", n, greedy, prune=True, ranking=rk).mask(scores)

    def faithfulness(on: Evaluator, n: int, rk: str, cache: dict) -> float:
        if (n, rk) not in cache:
            mask = circuit(n, rk)
            value = on.normalise(selection_values(on, scores, [mask], "choosing the circuit size"))[0] if mask.any() else 0.0
            cache[n, rk] = float(value) if math.isfinite(value) else -math.inf
        return cache[n, rk]

    look = ev.first_rows(search_rows) if len(ev.data) >= 2 * search_rows else ev
    if look is not ev and look.undefined_reason:  # too few rows to tell clean from ablated: look at all of them
        look = ev
    seen: dict = {}
    # per ranking: faithfulness below the level at lo (nothing kept), reached at hi (everything kept)
    bracket = {rk: [0, total] for rk in ([ranking] if ranking else RANKINGS)}
    narrow = lambda rk: bracket[rk][1] <= max(bracket[rk][0] * ratio, bracket[rk][0] + 1)
    active = [rk for rk in bracket if not narrow(rk)]
    while active:
        for rk in list(active):
            lo, hi = bracket[rk]
            mid = min(hi - 1, max(lo + 1, round(math.sqrt(max(lo, 1) * hi))))
            bracket[rk][faithfulness(look, mid, rk, seen) >= level] = mid  # hi when reached, else lo
        best = min(hi for _, hi in bracket.values())
        # a ranking is done when its bracket is narrow, or when it missed the level at a size another reached
        active = [rk for rk in active if not narrow(rk) and bracket[rk][0] < best]
    rk = min(bracket, key=lambda r: (bracket[r][1], RANKINGS.index(r)))
    lo, hi = bracket[rk]
    confirmed: dict = seen if look is ev else {}
    while faithfulness(ev, hi, rk, confirmed) < level and hi < total:
        hi = min(total, max(hi + 1, math.ceil(hi * ratio)))
    f = faithfulness(ev, hi, rk, confirmed)
    if f < level:  # only when even the full graph misses the level, e.g. a non-finite metric
        raise SelectionError(f"no circuit size reaches faithfulness {level:g} (every edge gives {f:.3g}); "
                             f"give --top-n or --threshold")
    mask = circuit(hi, rk)
    kind = f"greedy top ({rk} ranking)" if greedy else f"top ({rk} ranking)"
    where = (f"bisection on the first {len(look.data)} examples, confirmed on all {len(ev.data)}" if look is not ev
             else f"bisection on all {len(ev.data)} examples")
    others = "; ".join(f"{r} ranking: top {bracket[r][0]} misses it" + ("" if bracket[r][1] == total else f", top {bracket[r][1]} reaches it")
                       for r in bracket if r != rk)
    tried = len(seen) + (0 if confirmed is seen else len(confirmed))
    units = "edge x position units" if scores.spans else "edges"
    how = (f"{kind} {hi}, pruned to {int(mask.sum())} {units}: the smallest size found reaching faithfulness >= {level:g} "
           f"({where}; top {lo} misses it; {others + '; ' if others else ''}{tried} sizes tried; faithfulness {f:.3f})")
    return Selection(mask, int(mask.sum()), f, how, hi, lo, rk)


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
    ranking: str = "absolute"  # top_n: of which ranking (the default selection's may be signed)

    def mask(self, scores: EdgeScores) -> torch.Tensor:
        """The edges (units) this rule keeps of ``scores``, pruned when the rule says so."""
        if self.kind == "own":
            mask = scores.in_circuit
        elif self.kind == "threshold":
            mask = scores.threshold(self.value)
        elif self.kind == "top_n":
            n, absolute = int(self.value), self.ranking == "absolute"
            mask = scores.greedy(n, absolute=absolute) if self.greedy else ranked_top_n(scores, n, self.ranking)
        else:
            raise ValueError(f"unknown size rule '{self.kind}'; expected top_n, threshold or own")
        return mib_prune(scores.graph, mask) if self.prune else mask


def check_selection(mask: torch.Tensor, how: str, scores: EdgeScores) -> torch.Tensor:
    """Refuse a selection that keeps no edge, saying what would keep some."""
    if bool(mask.any()):
        return mask
    largest = float(torch.nan_to_num(scores.scores.abs(), nan=0.0).max())
    raise SelectionError(f"the selection ({how}) keeps no edge; the largest |score| is {largest:.3g}")


__all__ = ["DEFAULT_LEVEL", "Selection", "SelectionError", "SizeRule", "check_selection", "smallest_faithful"]
