"""Edge and node effects of a circuit, the way ``Evaluator.edge_effects`` computes them against the
way it did before: each reduced circuit run from the embedding, circuits stacked as the Evaluator
stacked them on a CPU, against each run resumed from the circuit's own run paused at the first layer
its removal changes (one at a time, as now, or stacked).

Random-init GPT-2-small shape, MIB's published IOI circuit (756 edges, every position), batch 16 x 16,
CPU, 2 threads, one process; the ways alternate over rounds.  The edges are a sample spread over
the layers (``--edges``), since the full set takes the old way about 6 minutes per round.  Writes
benchmarks/results/bench_effects.{json,md}.

    python benchmarks/bench_effects.py [--edges 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = ROOT.parent / "shared" / "data" / "mib" / "ioi-eap-ig.json"
B, P = 16, 16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--edges", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from circuitgraph.data.dataset import TaskData
    from circuitgraph.evaluate.evaluator import Evaluator
    from circuitgraph.graph.nodes import NodeRef
    from circuitgraph.model.loading import CircuitModel
    from circuitgraph.spec.circuit_spec import CircuitSpec

    if not MIB.exists():
        sys.exit(f"bench_effects: needs MIB's IOI circuit at {MIB}")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = GPT2Config()
    config._attn_implementation = "eager"
    model = CircuitModel(GPT2LMHeadModel(config).eval())
    G, V = model.graph, config.vocab_size
    g = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(0, V, (B, P), generator=g), torch.randint(0, V, (B, P), generator=g)
    ans = torch.randint(0, V, (B, 1), generator=g)
    ev = Evaluator(model, TaskData(clean, corrupt, torch.full((B,), P), ans, (ans + 1) % V, {}), batch_size=B, progress=False)
    circuit = ev.resolve(CircuitSpec.load(MIB))
    edges = sorted(circuit.edges, key=lambda k: NodeRef.parse(G.destinations[k[1]]).block_layer(G.n_layers))
    step = len(edges) / args.edges
    removals = [[edges[int(i * step)]] for i in range(args.edges)]
    stacked_before = 16  # what circuits_per_pass gave this shape on a CPU before
    ways = {
        "from the embedding, 16 stacked (before)": lambda: ev.metric_values([circuit.without(r) for r in removals], chunk=stacked_before),
        "from the embedding, one by one": lambda: ev.metric_values([circuit.without(r) for r in removals], chunk=1),
        "resumed from the circuit's run, 16 stacked": lambda: ev._resumed_values(circuit, removals, 16, ""),
        "resumed from the circuit's run (now)": lambda: ev._resumed_values(circuit, removals, None, ""),
    }
    values = {k: fn() for k, fn in ways.items()}  # one untimed pass each, and the check that they agree
    ref = values["from the embedding, one by one"]
    diff = max(float(np.abs(v - ref).max()) for v in values.values())
    times = {k: [] for k in ways}
    for _ in range(args.rounds):
        for k, fn in ways.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    now = med["resumed from the circuit's run (now)"]
    layers = sorted({NodeRef.parse(G.destinations[r[0][1]]).block_layer(G.n_layers) for r in removals})
    res = {"edges": args.edges, "rounds": args.rounds, "batch": [B, P], "circuits_per_pass": ev.circuits_per_pass, "largest_metric_difference": diff, "median_s": med}
    dest = ROOT / "benchmarks" / "results"
    (dest / "bench_effects.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"Edge effects of {args.edges} edges of MIB's IOI circuit (destinations in layers {layers[0]}-{layers[-1]}), "
             f"random-init GPT-2 small, batch {B} x {P}, CPU, 2 threads, median of {args.rounds} alternating rounds",
             "", "| way | s | s per edge | / now |", "|---|---|---|---|"]
    for k, s in med.items():
        lines.append(f"| {k} | {s:.2f} | {s / args.edges:.3f} | {s / now:.2f} |")
    lines += ["", f"The ways' per-example metrics agree to {diff:.1e}. Runs now go {ev.circuits_per_pass} "
              f"at a time (`circuits_per_pass`), resumed or not."]
    (dest / "bench_effects.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
