"""ACDC (Conmy et al. 2023) and the exact per-edge scorer, on the exact edge-patching engine.

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


class _TrialRunner:
    """Mean metric of many circuits over the dataset, resuming each at a given layer."""

    def __init__(self, ev: Evaluator):
        self.ev, self.engine = ev, ev.engine
        self.n_runs = 0
        self.states = []  # per span: clean prefix states at every layer
        for i in range(ev.n_batches):
            part, abl, _ = ev.batch(i)
            with torch.no_grad():
                _, outs = self.engine.run(part.clean.to(ev.model.device), record=True)
            self.states.append(self.engine.clean_states(outs, abl))

    @torch.no_grad()
    def mean_metric(self, masks: torch.Tensor, layer: int) -> np.ndarray:
        """Mean over the dataset; per-example values are summed over ranks (exactly: each rank fills
        its own columns), so every rank sees the same numbers and takes the same decisions."""
        ev, engine = self.ev, self.engine
        values = np.zeros((masks.shape[0], len(ev.data)))
        plan = engine.compile(masks.to(ev.model.device))
        for i, (a, b) in enumerate(ev._spans()):
            part, abl, clean_logits = ev.batch(i)
            dev = ev.model.device
            logits = engine.patched_run(part.clean.to(dev), abl, plan, logit_positions=part.last.to(dev),
                                        start=self.states[i][layer])
            values[:, a:b] = ev._values(logits, part, clean_logits.expand(masks.shape[0], -1, -1)).numpy()
        self.n_runs += masks.shape[0]
        return ev.reduce(values).mean(-1)


def acdc(ev: Evaluator, tau: float, batch: int | None = None, progress: bool = True, max_edges: int | None = None) -> EdgeScores:
    """Run ACDC with threshold ``tau`` on the evaluator's metric (use ``metric="kl"`` for the paper's
    default).  Scores are each visited edge's damage when it was tried; ``in_circuit`` the result.
    ``max_edges`` stops after visiting that many edges (the rest stay in; for benchmarks)."""
    G, engine = ev.graph, ev.engine
    metric = ev.metric_name
    # speculative batches pay off while the guesses hold; the batch grows after a fully right guess
    # and shrinks to what was decided after a miss (misses are pure loss)
    # (on a CPU, where a circuit costs its full arithmetic, one trial at a time measured fastest)
    max_batch = batch or (8 if ev.model.device.type != "cpu" else 1)
    batch = max_batch
    runner = _TrialRunner(ev)
    current = G.legal.clone()
    cur = float(runner.mean_metric(current[None], len(engine.w.layers))[0])
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
        node, layer = ref.name, ref.block_layer(G.n_layers)
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
            trials = current[None].repeat(len(chunk), 1, 1)
            for j, s in enumerate(chunk):
                if cumulative:
                    trials[j:, s, d] = False
                else:
                    trials[j, s, d] = False
            values = runner.mean_metric(trials, layer)
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
    return EdgeScores(G, scores, "acdc", {"tau": tau, "metric": metric, "n_trials": runner.n_runs,
                                         "skipped_dead": n_dead, "ablation": ev.ablation_kind},
                      in_circuit=current)


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
    batch = batch or ev.trials_per_pass
    runner = _TrialRunner(ev)
    pairs = torch.nonzero(G.legal)
    scores = torch.zeros(len(G.sources), len(G.destinations), dtype=torch.float64)
    clean = float(ev.clean_values.mean())
    layer_of = []
    for _, d in pairs.tolist():
        layer_of.append(NodeRef.parse(G.destinations[d]).block_layer(G.n_layers))
    order = sorted(range(len(pairs)), key=lambda k: layer_of[k])
    groups = [order[i:i + batch] for i in range(0, len(order), batch)]
    for group in tqdm(groups, desc="exact edge effects", leave=False, disable=not progress):
        layer = min(layer_of[k] for k in group)
        masks = G.legal[None].repeat(len(group), 1, 1)
        for j, k in enumerate(group):
            masks[j, pairs[k, 0], pairs[k, 1]] = False
        vals = runner.mean_metric(masks, layer)
        for j, k in enumerate(group):
            scores[pairs[k, 0], pairs[k, 1]] = vals[j] - clean
    return EdgeScores(G, scores, "exact", {"metric": ev.metric_name, "ablation": ev.ablation_kind, "n_trials": runner.n_runs})
