"""Edge and node effects of a circuit, the way ``Evaluator.edge_effects`` computes them against the
way it did before: each reduced circuit run from the embedding, circuits stacked as the Evaluator
stacked them on a CPU, against each run resumed from the circuit's own run paused at the first layer
its removal changes (one at a time or stacked), and against removal runs that recompute only the
nodes a removal changes (now, :mod:`circuitgraph.engine.node_runs`).

Random-init GPT-2-small shape, MIB's published IOI circuit (756 edges, every position), batch 16 x 16,
CPU, 2 threads, one process; the ways alternate over rounds.  The edges are a sample spread over
the layers (``--edges``), since the full set takes the old way about 6 minutes per round.  Then the
same for path-patching sweeps into ``logits`` and ``a6.h0<q>``: each sender's circuit from the embedding
against the clean run resumed at the receiver's layer.  About 10 minutes.  Writes
benchmarks/results/bench_effects.{json,md}.

    python benchmarks/bench_effects.py [--edges 48] [--rounds 3] [--pp-rounds 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_8b_cpu import interleaved_times  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MIB = ROOT.parent / "shared" / "data" / "mib" / "ioi-eap-ig.json"
B, P = 16, 16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--edges", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pp-rounds", type=int, default=2, help="rounds of the path-patching sweeps")
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
        "resumed from the circuit's run, 16 stacked": lambda: resumed(ev, circuit.mask(), removals, 16),
        "resumed from the circuit's run, one by one": lambda: resumed(ev, circuit.mask(), removals, 1),
        "recomputing the nodes each removal changes (now)": lambda: ev.values_without(circuit.mask(), removals),
    }
    values = {k: fn() for k, fn in ways.items()}  # one untimed pass each, and the check that they agree
    ref = values["from the embedding, one by one"]
    diff = max(float(np.abs(v - ref).max()) for v in values.values())
    med = interleaved_times(ways, args.rounds, warm=False)
    now = med["recomputing the nodes each removal changes (now)"]
    layers = sorted({NodeRef.parse(G.destinations[r[0][1]]).block_layer(G.n_layers) for r in removals})
    res = {"edges": args.edges, "rounds": args.rounds, "batch": [B, P], "circuits_per_pass": ev.circuits_per_pass, "largest_metric_difference": diff, "median_s": med}
    res["path_patching"] = path_patching(ev, args.pp_rounds)
    dest = ROOT / "benchmarks" / "results"
    (dest / "bench_effects.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"Edge effects of {args.edges} edges of MIB's IOI circuit (destinations in layers {layers[0]}-{layers[-1]}), "
             f"random-init GPT-2 small, batch {B} x {P}, CPU, 2 threads, median of {args.rounds} alternating rounds",
             "", "| way | s | s per edge | / now |", "|---|---|---|---|"]
    for k, s in med.items():
        lines.append(f"| {k} | {s:.2f} | {s / args.edges:.3f} | {s / now:.2f} |")
    lines += ["", f"The ways' per-example metrics agree to {diff:.1e}. Runs now go {ev.circuits_per_pass} "
              f"at a time (`circuits_per_pass`) from the embedding."]
    lines += ["", f"Path-patching sweeps (every sender upstream of the receiver, alone), median of {args.pp_rounds} "
              "alternating rounds: before, each sender's circuit (the full graph without its edges into the receiver) ran "
              "from the embedding, 16 stacked; now each resumes from the clean run paused at the receiver's layer, "
              "`trials_per_pass` at a time.", "",
              "| receiver | senders | before s | now s | before / now | largest difference |", "|---|---|---|---|---|---|"]
    for rec, r in res["path_patching"].items():
        lines.append(f"| {rec} | {r['senders']} | {r['before_s']:.2f} | {r['now_s']:.2f} | {r['before_s'] / r['now_s']:.1f} | "
                     f"{r['largest_metric_difference']:.1e} |")
    (dest / "bench_effects.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def resumed(ev, mask, removals, chunk):
    """``values_without`` by resumed full runs (the way before removal runs), ``chunk`` stacked."""
    from circuitgraph.engine.node_runs import NodeRuns

    applies = NodeRuns.applies
    NodeRuns.applies = staticmethod(lambda engine: False)
    try:
        return ev.values_without(mask, removals, chunk)
    finally:
        NodeRuns.applies = staticmethod(applies)


def path_patching(ev, rounds: int) -> dict:
    """Sweep timings, the old way (full runs, 16 stacked) against the product's, per receiver."""
    import numpy as np

    from circuitgraph.evaluate.path_patching import _patched_values

    G, out = ev.graph, {}
    for rec in ("logits", "a6.h0<q>"):
        d = G.destination_index[rec]
        src = [s for s in range(len(G.sources)) if bool(G.legal[s, d])]
        masks = G.legal[None].repeat(len(src), 1, 1)
        for i, s in enumerate(src):
            masks[i, s, d] = False
        ways = {"before": lambda: ev.mask_values(masks, chunk=16), "now": lambda: _patched_values(ev, [[s] for s in src], [d], None)}
        vals = {k: fn() for k, fn in ways.items()}  # the untimed pass
        med = interleaved_times(ways, rounds, warm=False)
        out[rec] = {"senders": len(src), "before_s": med["before"], "now_s": med["now"],
                    "largest_metric_difference": float(np.abs(vals["before"] - vals["now"]).max())}
    return out


if __name__ == "__main__":
    main()
