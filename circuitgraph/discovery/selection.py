"""Choosing how many edges to keep when the user does not say: the smallest top-n whose
faithfulness reaches a stated level on the faithfulness curve.

A fixed fraction (say 1% of the edges) can keep one edge of a small model, with faithfulness 0:
a circuit that explains nothing.  Here the sizes 1, 2, 4, ... are scored together in batched runs;
between the last size below the level and the first at or above it, evenly spaced sizes are
scored again (up to three rounds), and the smallest size that reaches the level is kept.
Faithfulness need not grow monotonically with size, so this is "the smallest size tried", which
the description says.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from circuitgraph.discovery.edge_scores import EdgeScores
from circuitgraph.evaluate.evaluator import Evaluator

DEFAULT_LEVEL = 0.8


class SelectionError(ValueError):
    """A selection that cannot give a circuit (empty, undefined, or out of range)."""


@dataclass
class Selection:
    mask: torch.Tensor
    n_edges: int
    faithfulness: float
    how: str  # one line, printed by the command line and kept in the spec's metadata


def smallest_faithful(ev: Evaluator, scores: EdgeScores, level: float = DEFAULT_LEVEL, greedy: bool = False,
                      rounds: int = 3, per_round: int = 8) -> Selection:
    """The smallest top-n (or greedy top-n) circuit whose faithfulness reaches ``level``."""
    if ev.undefined_reason:
        raise SelectionError(f"no default circuit size can be chosen: {ev.undefined_reason}; give --top-n or --threshold")
    total = scores.graph.n_edges
    select = scores.greedy if greedy else scores.top_n
    tried: dict[int, float] = {}

    def score(sizes):
        sizes = [n for n in dict.fromkeys(sizes) if n not in tried]
        if sizes:
            faith = ev.normalise(ev.mask_values(torch.stack([select(n) for n in sizes]), desc="choosing the circuit size"))
            tried.update(zip(sizes, np.asarray(faith, dtype=float).tolist()))

    grid = sorted({min(2 ** k, total) for k in range(int(np.ceil(np.log2(total))) + 1)} | {total})
    score(grid)
    for _ in range(rounds):
        reached = [n for n in sorted(tried) if tried[n] >= level]
        if not reached:
            break
        hi = reached[0]
        lo = max([n for n in tried if n < hi], default=0)
        if hi - lo <= 1:
            break
        step = max(1, (hi - lo) // (per_round + 1))
        score(range(lo + step, hi, step))
    reached = [n for n in sorted(tried) if tried[n] >= level]
    kind = "greedy top" if greedy else "top"
    if not reached:  # only when even the full graph misses the level, e.g. a non-finite metric
        best = max(tried, key=lambda n: tried[n] if np.isfinite(tried[n]) else -np.inf)
        raise SelectionError(f"no circuit size reaches faithfulness {level:g} (the best, {kind} {best}, has "
                             f"{tried[best]:.3g}); give --top-n or --threshold")
    n = reached[0]
    how = (f"{kind} {n}: the smallest size reaching faithfulness >= {level:g} on the faithfulness curve "
           f"({len(tried)} sizes tried; faithfulness {tried[n]:.3f})")
    return Selection(select(n), n, tried[n], how)


def check_selection(mask: torch.Tensor, how: str, scores: EdgeScores) -> torch.Tensor:
    """Refuse a selection that keeps no edge, saying what would keep some."""
    if bool(mask.any()):
        return mask
    largest = float(torch.nan_to_num(scores.scores.abs(), nan=0.0).max())
    raise SelectionError(f"the selection ({how}) keeps no edge; the largest |score| is {largest:.3g}")


__all__ = ["DEFAULT_LEVEL", "Selection", "SelectionError", "check_selection", "smallest_faithful"]
