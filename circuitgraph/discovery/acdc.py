"""ACDC (Conmy et al. 2023), also over edge x position units, and the exact per-edge scorer, on the exact
edge-patching engine.

ACDC visits destinations from the logits backwards and, within each, sources from the latest;
it removes an edge when removing it (from the current circuit) worsens the metric by less than
``tau``.  The result equals the one-edge-at-a-time algorithm exactly, but it is computed faster:

* trials resume at the destination's layer: ACDC has not yet touched any edge into an earlier
  layer, so everything before it is the clean run, computed once;
* trials for one destination run as a batch of circuits, speculating that the candidates are all
  kept (or, after a run of removals, all removed); a wrong guess only re-runs what follows it, and
  the batch adapts to how often guesses hold;
* an edge into a node that has no remaining outgoing edge cannot change anything: it is removed
  without a run (when ``tau > 0``, exactly what the slow algorithm would decide).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from circuitgraph.evaluate.evaluator import Evaluator
from circuitgraph.graph import NodeRef
from circuitgraph.discovery.edge_scores import EdgeScores, spans_of

HIGHER_IS_BETTER = {"logit_diff": True, "prob_diff": True, "accuracy": True, "kl": False}


def damage(metric: str, current: float, trial: float) -> float:
    """How much worse the metric gets: increase of KL, decrease of a task metric."""
    return current - trial if HIGHER_IS_BETTER[metric] else trial - current


def acdc(ev: Evaluator, tau: float, batch: int | None = None, progress: bool = True, max_edges: int | None = None) -> EdgeScores:
    """Run ACDC with threshold ``tau`` on the evaluator's metric (use ``metric="kl"`` for the paper's
    default).  Scores are each visited edge's damage when it was tried; ``in_circuit`` the result.
    ``max_edges`` stops after visiting that many edges (the rest stay in; for benchmarks)."""
    G = ev.graph
    metric = ev.metric_name
    # speculative batches pay off while the guesses hold; the batch grows after a fully right guess
    # and shrinks to what was decided after a miss (misses are pure loss)
    # (on a CPU, where a circuit costs its full arithmetic, one trial at a time measured fastest)
    max_batch = batch or (8 if ev.model.device.type != "cpu" else 1)
    batch = max_batch
    current = G.legal.clone()
    n_trials = 0

    def mean_metric(removals: list) -> np.ndarray:
        """Mean metric of the current circuit without each removal, all resumed at the destination's layer
        from the clean run (ACDC has not touched an edge into an earlier layer); summed over ranks."""
        nonlocal n_trials
        n_trials += len(removals)
        return ev.values_without(current, removals, chunk=len(removals)).mean(-1)

    cur = float(mean_metric([[]])[0])
    scores = torch.zeros(len(G.sources), len(G.destinations), dtype=torch.float64)
    node_source = {n: i for i, n in enumerate(G.sources)}
    cumulative = False
    n_dead = 0
    bar = tqdm(total=G.n_edges, desc=f"ACDC tau={tau:g}", leave=False, disable=not progress)
    visited = 0
    for d in reversed(range(len(G.destinations))):
        if max_edges is not None and visited >= max_edges:
            break
        ref = NodeRef.parse(G.destinations[d])
        node = ref.name
        candidates = [s for s in reversed(range(int(G.n_upstream[d]))) if current[s, d]]
        if max_edges is not None:
            candidates = candidates[:max_edges - visited]
        visited += len(candidates)
        if node != "logits" and tau > 0 and not current[node_source[node]].any():
            current[candidates, d] = False  # nothing reads this node: its inputs cannot matter
            n_dead += len(candidates)
            bar.update(len(candidates))
            continue
        i = 0
        while i < len(candidates):
            chunk = candidates[i:i + batch]
            # each trial removes its edge; speculating on removals, also those of the trials before it
            values = mean_metric([[(t, d) for t in chunk[:j + 1]] if cumulative else [(s, d)] for j, s in enumerate(chunk)])
            before, removed, decided = cur, 0, 0
            for j, s in enumerate(chunk):
                dmg = damage(metric, before, float(values[j]))
                scores[s, d] = dmg
                decided += 1
                if dmg < tau:
                    current[s, d] = False
                    removed += 1
                    before = cur = float(values[j])
                    if not cumulative:
                        break  # later trials assumed this edge kept
                elif cumulative:
                    break  # later trials assumed this edge removed
            bar.update(decided)
            cumulative = removed > decided / 2 if decided > 1 else removed == 1
            batch = min(max_batch, 2 * len(chunk)) if decided == len(chunk) else max(1, decided)
            i += decided
    bar.close()
    return EdgeScores(G, scores, "acdc", {"tau": tau, "metric": metric, "n_trials": n_trials,
                                         "skipped_dead": n_dead, "ablation": ev.ablation_kind},
                      in_circuit=current)


def acdc_by_position(ev: Evaluator, tau: float, progress: bool = True, max_units: int | None = None) -> EdgeScores:
    """ACDC over edge x span units (spans: the dataset's named positions and ``rest``, every other token):
    the same visiting order (destinations from the logits back, sources from the latest), each edge's spans
    in turn, a unit removed when ablating the edge at that span's tokens (from the current circuit)
    worsens the metric by less than ``tau``.  One trial at a time, each resumed at the destination's layer
    from the clean run; an edge into a node whose every outgoing unit is gone is removed without a run.
    ``max_units`` stops after visiting that many units (the rest stay in)."""
    G, metric = ev.graph, ev.metric_name
    spans = spans_of(ev.data)
    keep = G.legal[..., None].repeat(1, 1, len(spans))  # [sources, destinations, spans]
    n_trials = 0

    def mean_metric(removal: list, at: list[str] | None) -> float:
        """Mean metric of the current circuit without ``removal`` at the spans ``at`` (everywhere: None)."""
        nonlocal n_trials
        n_trials += 1
        whole = keep.all(-1)
        partial = {(s, d): [spans[j] for j in torch.nonzero(keep[s, d]).flatten().tolist()]
                   for s, d in torch.nonzero(keep.any(-1) & ~whole).tolist()}
        return float(ev.values_without(whole, [removal], positions=at, position_edges=partial).mean())

    cur = mean_metric([], None)
    scores = torch.zeros(keep.shape, dtype=torch.float64)
    node_source = {n: i for i, n in enumerate(G.sources)}
    n_dead, visited = 0, 0
    bar = tqdm(total=G.n_edges * len(spans), desc=f"ACDC by position tau={tau:g}", leave=False, disable=not progress)
    for d in reversed(range(len(G.destinations))):
        node = NodeRef.parse(G.destinations[d]).name
        units = [(s, j) for s in reversed(range(int(G.n_upstream[d]))) for j in range(len(spans)) if keep[s, d, j]]
        if max_units is not None:
            units = units[:max(0, max_units - visited)]
        visited += len(units)
        if node != "logits" and tau > 0 and not keep[node_source[node]].any():
            for s, j in units:  # nothing reads this node: its inputs cannot matter
                keep[s, d, j] = False
            n_dead += len(units)
            bar.update(len(units))
            continue
        for s, j in units:
            value = mean_metric([(s, d)], [spans[j]])
            scores[s, d, j] = dmg = damage(metric, cur, value)
            if dmg < tau:
                keep[s, d, j] = False
                cur = value
            bar.update(1)
    bar.close()
    return EdgeScores(G, scores, "acdc", {"tau": tau, "metric": metric, "n_trials": n_trials, "skipped_dead": n_dead,
                                         "ablation": ev.ablation_kind}, in_circuit=keep, spans=spans)


def exact_scores(ev: Evaluator, batch: int | None = None, progress: bool = True, by_position: bool = False) -> EdgeScores:
    """Each edge's true effect: M(clean run with only that edge ablated) - M(clean), batched.  By position,
    each edge x span's: the edge ablated at that span's tokens only (one patched run per unit and batch)."""
    G = ev.graph
    if by_position:
        spans, pairs = spans_of(ev.data), torch.nonzero(G.legal).tolist()
        scores = torch.zeros(len(G.sources), len(G.destinations), len(spans), dtype=torch.float64)
        clean = float(ev.clean_values.mean())
        for j, span in enumerate(tqdm(spans, desc="exact edge x position effects", leave=False, disable=not progress)):
            vals = ev.values_without(G.legal, [[tuple(sd)] for sd in pairs], positions=[span])
            for (s, d), v in zip(pairs, vals):
                scores[s, d, j] = v.mean() - clean
        return EdgeScores(G, scores, "exact", {"metric": ev.metric_name, "ablation": ev.ablation_kind,
                                               "n_trials": len(pairs) * len(spans)}, spans=spans)
    pairs = [tuple(sd) for sd in torch.nonzero(G.legal).tolist()]
    vals = ev.values_without(G.legal, [[sd] for sd in pairs], chunk=batch or ev.trials_per_pass,
                             desc="exact edge effects")
    scores = torch.zeros(len(G.sources), len(G.destinations), dtype=torch.float64)
    clean = float(ev.clean_values.mean())
    for (s, d), v in zip(pairs, vals):
        scores[s, d] = v.mean() - clean
    return EdgeScores(G, scores, "exact", {"metric": ev.metric_name, "ablation": ev.ablation_kind, "n_trials": len(pairs)})
