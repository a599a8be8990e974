"""How sure we are of each edge: bootstrap resamples of the rows, each scored and cut as the plain run is.

Resample ``b`` draws the rows with replacement (or whole groups of rows, e.g. templates, when the caller
names them), scores them with the same method and cuts the scores with the full data's
:class:`~circuitgraph.discovery.selection.SizeRule` (its size chosen once, on every row).  From the ``B``
circuits come each unit's *inclusion frequency* (the fraction of resamples whose circuit holds it), the
mean pairwise Jaccard similarity of the circuits, and, when asked, a percentile band over resamples on
each point of the faithfulness curve (each resample's curve on its own rows).

``B = 1`` is the identity, not a random draw: its one "resample" is the data itself, so every frequency
is 0 or 1 and the circuit is exactly the plain run's.  For ``B >= 2`` every resample is a random draw
(seeded), so the plain run is not counted among them.

The *stability-selected* circuit keeps the units found in at least a fraction ``pi`` of the resamples
(default :data:`STABLE_FRACTION` = 0.5, a majority vote: its size stays near the plain circuit's, so the
two can be compared at about the same size; Meinshausen and Buehlmann's error bound needs 0.6-0.9).

Under ``torch.distributed`` each rank takes its share of every resample's examples, as a plain run
does (resamples are not split over ranks); every rank draws the same rows from the same seed.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from circuitgraph.discovery.curves import RANKINGS, CurvePair
from circuitgraph.discovery.edge_scores import EdgeScores, mib_prune
from circuitgraph.discovery.selection import SizeRule
from circuitgraph.evaluate.evaluator import Evaluator

STABLE_FRACTION = 0.5
BAND_LEVEL = 0.95


def resample_rows(n_rows: int, n_resamples: int, seed: int = 0, groups: list | None = None) -> list[list[int]]:
    """Row indices of each resample: the identity when ``n_resamples == 1``; else ``n_rows`` rows drawn
    with replacement, or (``groups``: one label per row) as many groups as there are, drawn with
    replacement, each bringing all its rows."""
    if n_resamples < 1:
        raise ValueError(f"the number of bootstrap resamples must be at least 1, got {n_resamples}")
    if n_resamples == 1:
        return [list(range(n_rows))]
    rng = np.random.default_rng(seed)
    if groups is None:
        return [rng.integers(0, n_rows, n_rows).tolist() for _ in range(n_resamples)]
    if len(groups) != n_rows:
        raise ValueError(f"{len(groups)} group labels for {n_rows} rows; give one per row")
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    if len(members) < 2:
        raise ValueError(f"resampling groups needs at least two groups; the rows name {len(members)}")
    names = list(members)
    return [[i for k in rng.integers(0, len(names), len(names)) for i in members[names[k]]] for _ in range(n_resamples)]


def jaccard(masks: list[torch.Tensor]) -> tuple[float | None, str | None]:
    """Mean Jaccard similarity |A & B| / |A | B| over every pair of circuits, or ``(None, why)``: one circuit,
    or only pairs of empty ones (0 / 0; such pairs are left out of the mean)."""
    if len(masks) < 2:
        return None, "one resample: no pair of circuits to compare"
    flat = [m.flatten() for m in masks]
    values = []
    for a, b in itertools.combinations(flat, 2):
        union = int((a | b).sum())
        if union:
            values.append(int((a & b).sum()) / union)
    if not values:
        return None, "every resample's circuit is empty"
    return float(np.mean(values)), None


@dataclass
class CurveBand:
    """Percentile interval over resamples of each point of one ranking's faithfulness curve."""

    ranking: str
    fractions: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n_resamples: int  # resamples whose curve was defined at the point (the fewest over points)

    def to_dict(self) -> dict:
        """The band as plain JSON types (non-finite bounds as ``None``)."""
        fin = lambda v: None if not math.isfinite(v) else float(v)
        return {"ranking": self.ranking, "level": BAND_LEVEL, "n_resamples": self.n_resamples,
                "points": [{"fraction": float(f), "low": fin(lo), "high": fin(hi)}
                           for f, lo, hi in zip(self.fractions, self.low, self.high)]}


def curve_bands(curves: list[CurvePair]) -> tuple[dict[str, CurveBand] | None, str | None]:
    """Each ranking's band (:data:`BAND_LEVEL` percentile interval) from the resamples' curves, or ``(None, why)``
    when fewer than two resamples have a defined curve."""
    defined = [c for c in curves if c.undefined_reason is None]
    if len(defined) < 2:
        why = "one resample" if len(curves) < 2 else f"faithfulness is undefined on all but {len(defined)} of the resamples"
        return None, f"no band: {why}"
    tail = 100 * (1 - BAND_LEVEL) / 2
    out = {}
    for r in RANKINGS:
        f = np.stack([getattr(c, r).faithfulness for c in defined])
        ok = np.isfinite(f)
        with np.errstate(all="ignore"):
            lo = np.array([np.percentile(col[m], tail) if m.sum() >= 2 else np.nan for col, m in zip(f.T, ok.T)])
            hi = np.array([np.percentile(col[m], 100 - tail) if m.sum() >= 2 else np.nan for col, m in zip(f.T, ok.T)])
        out[r] = CurveBand(r, getattr(defined[0], r).fractions, lo, hi, int(ok.sum(0).min()))
    return out, None


@dataclass
class Stability:
    """What ``B`` bootstrap resamples say about each unit (edge, or edge x span) of a discovered circuit."""

    graph: object
    counts: torch.Tensor  # resamples whose circuit holds each unit: [sources, destinations(, spans)]
    edge_counts: torch.Tensor  # resamples whose circuit holds each edge at any span: [sources, destinations]
    n_resamples: int
    resample: str  # "identity", "rows" or "groups"
    rule: SizeRule
    sizes: list[int]  # units in each resample's circuit
    jaccard: float | None
    jaccard_reason: str | None = None
    spans: list[str] | None = None
    seed: int = 0
    bands: dict[str, CurveBand] | None = None
    band_reason: str | None = None

    @property
    def frequency(self) -> torch.Tensor:
        """Each unit's inclusion frequency, shaped like :attr:`EdgeScores.scores` (NaN where no edge)."""
        legal = self.graph.legal if self.spans is None else self.graph.legal[..., None]
        return (self.counts.double() / self.n_resamples).masked_fill(~legal, float("nan"))

    def stable(self, fraction: float = STABLE_FRACTION) -> torch.Tensor:
        """Bool mask of the units kept in at least ``fraction`` of the resamples (pruned as the rule prunes)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"the stability threshold is a fraction of the resamples in (0, 1], got {fraction}")
        mask = torch.nan_to_num(self.frequency, nan=0.0) >= fraction - 1e-12
        return mib_prune(self.graph, mask) if self.rule.prune else mask

    def units(self) -> list[tuple[str, str | None, float]]:
        """``(edge, span, frequency)`` of every unit found in some resample, most frequent first."""
        scores = EdgeScores(self.graph, self.frequency, "frequency", spans=self.spans)
        found = torch.nan_to_num(self.frequency, nan=0.0) > 0
        return sorted(scores.units(found), key=lambda u: -u[2])

    def edge_frequency(self) -> dict[str, float]:
        """Per edge (at any span), the fraction of resamples whose circuit holds it; edges never held are left out."""
        g, B = self.graph, self.n_resamples
        return {name: int(self.edge_counts[g.edge_index[name]]) / B for name in g.edges if self.edge_counts[g.edge_index[name]]}

    def annotate(self, spec) -> None:
        """Write the frequencies into a spec (``edge_frequency``, by position also ``position_frequency``) and
        what produced them into its metadata."""
        spec.edge_frequency = self.edge_frequency()
        if self.spans is not None:
            per: dict[str, dict[str, float]] = {}
            for edge, span, f in self.units():
                per.setdefault(edge, {})[span] = f
            spec.position_frequency = {e: per[e] for e in spec.edge_frequency if e in per}
        spec.metadata["bootstrap"] = {"n_resamples": self.n_resamples, "resample": self.resample, "seed": self.seed,
                                      "jaccard": self.jaccard, "stable_fraction_default": STABLE_FRACTION}

    def attach_bands(self, pair: CurvePair) -> None:
        """Put the resamples' bands on the full data's curves (their points and figure then show them)."""
        for r, band in (self.bands or {}).items():
            curve = getattr(pair, r)
            curve.band_low, curve.band_high = band.low, band.high
        pair.meta["bootstrap_band"] = {"level": BAND_LEVEL, "n_resamples": self.n_resamples, "undefined": self.band_reason}

    def to_dict(self, fraction: float = STABLE_FRACTION) -> dict:
        """JSON-ready summary: every unit's frequency, Jaccard, the stable circuit's size and the curve bands."""
        out = {"n_resamples": self.n_resamples, "resample": self.resample, "seed": self.seed,
               "sizes": self.sizes, "jaccard": self.jaccard, "jaccard_undefined": self.jaccard_reason,
               "stability_threshold": fraction, "n_stable_units": int(self.stable(fraction).sum()),
               "units": [{"edge": e, **({"span": s} if self.spans is not None else {}), "frequency": f}
                         for e, s, f in self.units()]}
        if self.bands is not None or self.band_reason is not None:
            out["band"] = None if self.bands is None else {r: b.to_dict() for r, b in self.bands.items()}
            out["band_undefined"] = self.band_reason
        return out


def bootstrap(ev: Evaluator, method: str, rule: SizeRule, n_resamples: int, *, seed: int = 0, groups: list | None = None,
              curve: bool = False, progress: bool = True, **discover_kw) -> Stability:
    """Score ``n_resamples`` resamples of ``ev``'s rows with ``discover(.., method, **discover_kw)``, cut each
    with ``rule`` and count how often each unit is kept (module docstring); ``curve`` adds the band on the
    faithfulness curves.  ``groups`` (one label per row) resamples whole groups instead of rows."""
    from circuitgraph.discovery import discover
    from circuitgraph.discovery.curves import faithfulness_curve

    draws = resample_rows(len(ev.data), n_resamples, seed, groups)
    counts, masks, curves, spans = None, [], [], None
    for idx in tqdm(draws, desc="bootstrap resamples", leave=False, disable=not progress or n_resamples < 2):
        sub = ev if n_resamples == 1 else ev.on_rows(idx)
        sub.progress = sub.progress and n_resamples == 1  # one bar, over the resamples
        scores = discover(sub, method, progress=False, **discover_kw)
        mask = rule.mask(scores)
        spans = scores.spans
        counts = mask.long() if counts is None else counts + mask.long()
        masks.append(mask)
        if curve:
            curves.append(faithfulness_curve(sub, scores))
    j, why = jaccard(masks)
    edge_counts = counts if spans is None else torch.stack([m.any(-1) for m in masks]).long().sum(0)
    out = Stability(ev.graph, counts, edge_counts, n_resamples, "identity" if n_resamples == 1 else "groups" if groups else "rows",
                    rule, [int(m.sum()) for m in masks], j, why, spans, seed)
    if curve:
        out.bands, out.band_reason = curve_bands(curves)
    return out


__all__ = ["BAND_LEVEL", "STABLE_FRACTION", "CurveBand", "Stability", "bootstrap", "curve_bands", "jaccard", "resample_rows"]
