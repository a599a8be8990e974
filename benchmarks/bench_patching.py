"""Cost of one patched forward vs plain forwards, on a random-init GPT-2-small-shaped model.

Batch 16 x 16 tokens, CPU, 2 threads.  The circuit is MIB's published IOI circuit (756 edges).
Each measurement runs in a fresh process so that its peak memory (max RSS above the loaded
model) is its own.  Writes benchmarks/results/bench_patching.json and .md.

    python benchmarks/bench_patching.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = ROOT.parent / "shared" / "data" / "mib" / "ioi-eap-ig.json"
B, P = 16, 16


def _setup(device="cpu"):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from circuitgraph.model.loading import CircuitModel
    from circuitgraph.spec.circuit_spec import CircuitSpec

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = GPT2Config()
    config._attn_implementation = "eager"
    model = CircuitModel(GPT2LMHeadModel(config).eval().to(device))
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50257, (B, P), generator=g).to(device)
    corrupt = torch.randint(0, 50257, (B, P), generator=g).to(device)
    spec = CircuitSpec.load(MIB) if MIB.exists() else None
    return torch, model, clean, corrupt, spec


def _circuit_masks(torch, model, spec, n, kind="removals"):
    """The IOI circuit, then n-1 variants: the circuit minus one edge each (as in edge-effect
    scoring and ACDC), or random circuits of the same size (the worst case for batching)."""
    G = model.graph
    first = spec.resolve(G).mask() if spec is not None else (torch.rand(len(G.sources), len(G.destinations)) < 0.02) & G.legal
    out = [first]
    gen = torch.Generator().manual_seed(1)
    pool = torch.nonzero(first if kind == "removals" else G.legal)
    for _ in range(n - 1):
        pick = pool[torch.randperm(len(pool), generator=gen)[: 1 if kind == "removals" else int(first.sum())]]
        m = first.clone() if kind == "removals" else torch.zeros_like(first)
        m[pick[:, 0], pick[:, 1]] = kind != "removals"
        out.append(m)
    return torch.stack(out)


def _measure(task: str, repeats: int, queue, device="cpu"):
    torch, model, clean, corrupt, spec = _setup(device)
    cuda = device != "cpu"
    e = model.engine
    with torch.no_grad():
        _, outs = e.run(corrupt, record=True)
        abl = e.make_ablation(outs, "corrupted")
        last = torch.full((B,), P - 1, device=device)
        if task == "hf":
            from transformers import GPT2LMHeadModel

            hf = GPT2LMHeadModel(model.config).eval().to(device)
            fn = lambda: hf(clean).logits
        elif task == "bridge":
            bridge = model.bridge
            fn = lambda: bridge(clean)
        elif task == "engine_plain":
            fn = lambda: e.run(clean)[0]
        elif task == "patched":
            plan = e.compile(_circuit_masks(torch, model, spec, 1).to(device))
            fn = lambda: e.patched_run(clean, abl, plan)
        elif task == "patched_last":
            plan = e.compile(_circuit_masks(torch, model, spec, 1).to(device))
            fn = lambda: e.patched_run(clean, abl, plan, logit_positions=last)
        elif task.startswith("patched_8_"):
            masks = _circuit_masks(torch, model, spec, 8, "random" if "random" in task else "removals").to(device)
            if task.endswith("_batched"):
                plan = e.compile(masks)
                fn = lambda: e.patched_run(clean, abl, plan, logit_positions=last)
            else:
                plans = [e.compile(m[None]) for m in masks]
                fn = lambda: [e.patched_run(clean, abl, p, logit_positions=last) for p in plans]
        else:
            raise ValueError(task)
        fn()  # warm-up
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
        peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss / 1024
    queue.put({"task": task, "median_s": statistics.median(times), "min_s": min(times),
               "peak_rss_mb": peak_mb, "rss_growth_mb": None if cuda else (rss - base) / 1024})


def run(task, repeats, device="cpu"):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_measure, args=(task, repeats, q, device))
    p.start()
    out = q.get()
    p.join()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (peak memory is then CUDA's, in MB)")
    ap.add_argument("--no-bridge", action="store_true", help="skip the TransformerBridge timing")
    args = ap.parse_args()
    tasks = ["hf", "bridge", "engine_plain", "patched", "patched_last", "patched_8_removals_batched",
             "patched_8_removals_separate", "patched_8_random_batched", "patched_8_random_separate"]
    if args.no_bridge:
        tasks.remove("bridge")
    res = {t: run(t, args.repeats, args.device) for t in tasks}
    hf = res["hf"]["median_s"]
    ratios = {
        "patched_vs_hf": res["patched"]["median_s"] / hf,
        "patched_last_position_vs_hf": res["patched_last"]["median_s"] / hf,
        **({} if args.no_bridge else {"patched_vs_bridge": res["patched"]["median_s"] / res["bridge"]["median_s"],
                                      "bridge_vs_hf": res["bridge"]["median_s"] / hf}),
        "8_removals_batched_vs_separate": res["patched_8_removals_batched"]["median_s"] / res["patched_8_removals_separate"]["median_s"],
        "8_random_batched_vs_separate": res["patched_8_random_batched"]["median_s"] / res["patched_8_random_separate"]["median_s"],
    }
    out = {"shape": {"model": "GPT-2 small (random init)", "batch": B, "tokens": P, "threads": 2, "device": args.device,
                     "circuit": "MIB IOI (EAP-IG), 756 edges"}, "results": res, "ratios": ratios}
    dest = ROOT / "benchmarks" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    (dest / f"bench_patching{suffix}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["| run | median s | peak RSS MB |", "|---|---|---|"]
    lines += [f"| {t} | {r['median_s']:.3f} | {r['peak_rss_mb']:.0f} |" for t, r in res.items()]
    lines += ["", *(f"- {k}: {v:.2f}x" for k, v in ratios.items())]
    (dest / f"bench_patching{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
