"""Wall time and forward/backward counts of each discovery method, and ACDC against the naive
one-edge-at-a-time algorithm (identical output checked), on a random-init GPT-2-small-shaped
model (16 examples x 16 tokens) and on the bundled toy-induction model.  CPU, 2 threads.
Writes benchmarks/results/bench_discovery.json and .md.

    python benchmarks/bench_discovery.py [--acdc-edges 200]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from circuitgraph.data.dataset import Example, tokenize
from circuitgraph.discovery import acdc, attribute
from circuitgraph.discovery.acdc import damage
from circuitgraph.evaluate.evaluator import Evaluator

ROOT = Path(__file__).resolve().parents[1]


def naive_acdc(ev, tau, max_edges):
    """The reference: every trial is one full patched run of one circuit."""
    G = ev.graph
    current, visited, runs = G.legal.clone(), 0, 0
    cur = ev.mask_values(current[None]).mean()
    for d in reversed(range(len(G.destinations))):
        for s in reversed(range(int(G.n_upstream[d]))):
            if visited >= max_edges:
                return current, runs
            if not current[s, d]:
                continue
            visited += 1
            trial = current.clone()
            trial[s, d] = False
            value = ev.mask_values(trial[None]).mean()
            runs += 1
            if damage(ev.metric_name, cur, value) < tau:
                current, cur = trial, value
    return current, runs


def timed(fn, repeats=1):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def gpt2_setup(**shape):
    from transformers import GPT2Config

    from circuitgraph.model.loading import from_config

    model = from_config(GPT2Config(**shape), seed=0)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50257, (16, 16), generator=g)
    corrupt = torch.randint(0, 50257, (16, 16), generator=g)
    from circuitgraph.data.dataset import TaskData

    data = TaskData(clean, corrupt, torch.full((16,), 16), torch.randint(0, 50257, (16, 1), generator=g),
                    torch.randint(0, 50257, (16, 1), generator=g), {})
    return model, data


def toy_setup():
    from circuitgraph.model.loading import load_model
    from circuitgraph.data.tasks import make_data

    model = load_model("toy-induction")
    rows = make_data("induction", model.tokenizer, 32, seed=1)
    return model, tokenize([Example(**r) for r in rows], model.tokenizer)


def bench(name, model, data, acdc_edges, tau):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(model.config).eval()
    with torch.no_grad():
        _, t_hf = timed(lambda: hf(data.clean), repeats=3)
    ev = Evaluator(model, data, batch_size=len(data), progress=False)
    out = {"model": name, "examples": len(data), "tokens": data.clean.shape[1], "edges": model.graph.n_edges,
           "hf_forward_s": t_hf}
    eap, t_eap = timed(lambda: attribute(ev, "eap", progress=False), repeats=2)
    out["eap_s"], out["eap_vs_hf"] = t_eap, t_eap / t_hf
    out["eap_passes"] = {"forward": 2, "backward": eap.meta["n_backward"]}
    steps = 5
    ig, t_ig = timed(lambda: attribute(ev, "eap-ig", steps=steps, progress=False))
    out.update(eap_ig_steps=steps, eap_ig_s=t_ig, eap_ig_vs_hf=t_ig / t_hf, eap_ig_vs_steps_x_eap=t_ig / (steps * t_eap),
               eap_ig_passes={"forward": 2 + steps, "backward": ig.meta["n_backward"]})
    iga, t_iga = timed(lambda: attribute(ev, "eap-ig-activations", steps=steps, progress=False))
    out.update(eap_ig_activations_s=t_iga, eap_ig_activations_passes={"backward": iga.meta["n_backward"]})
    kl = Evaluator(model, data, metric="kl", batch_size=len(data), progress=False)
    fast, t_fast = timed(lambda: acdc(kl, tau, progress=False, max_edges=acdc_edges), repeats=2)  # the first warms up
    (slow, slow_runs), t_slow = timed(lambda: naive_acdc(kl, tau, acdc_edges or model.graph.n_edges))
    out.update(acdc_tau=tau, acdc_edges_visited=acdc_edges or model.graph.n_edges, acdc_s=t_fast, acdc_naive_s=t_slow,
               acdc_speedup=t_slow / t_fast, acdc_identical=bool(torch.equal(fast.in_circuit, slow)),
               acdc_trial_circuits=fast.meta["n_trials"], acdc_naive_runs=slow_runs,
               acdc_skipped_dead=fast.meta["skipped_dead"], acdc_edges_kept=int(fast.in_circuit.sum()))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--acdc-edges", type=int, default=300, help="edges ACDC visits on GPT-2 small (the naive run is slow)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    results = [bench("toy-induction", *toy_setup(), acdc_edges=None, tau=0.005)]
    results.append(bench("gpt2 4 layers x 4 heads, d=256 (random init)", *gpt2_setup(n_layer=4, n_head=4, n_embd=256),
                         acdc_edges=None, tau=0.001))
    results.append(bench("gpt2-small (random init)", *gpt2_setup(), acdc_edges=args.acdc_edges, tau=0.001))
    dest = ROOT / "benchmarks" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "bench_discovery.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| model | HF fwd s | EAP s (x HF) | EAP-IG-5 s (x HF; / 5xEAP) | EAP-IG-act-5 s | ACDC s | naive ACDC s | speed-up | identical |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['hf_forward_s']:.3f} | {r['eap_s']:.3f} ({r['eap_vs_hf']:.1f}x) | "
                     f"{r['eap_ig_s']:.3f} ({r['eap_ig_vs_hf']:.1f}x; {r['eap_ig_vs_steps_x_eap']:.2f}) | {r['eap_ig_activations_s']:.2f} | "
                     f"{r['acdc_s']:.2f} | {r['acdc_naive_s']:.2f} | {r['acdc_speedup']:.1f}x | {r['acdc_identical']} |")
    (dest / "bench_discovery.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
