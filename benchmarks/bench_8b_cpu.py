"""The Llama-3.1-8B shape in bf16 on a CPU at a small batch: the 8B memory model checked at the real shape.

Without a GPU, bench_memory's 8B figures come from a memory model fitted on the Qwen2-0.5B shape.  This
builds the Llama-3.1-8B shape (random init, bf16, untied embeddings) once, in one process, and for each
run resets the peak RSS (VmHWM) first: an HF forward, an HF forward+backward to the input embeddings
(last-position logits, what EAP's metric reads), EAP over every edge and a patched forward of a random
10% circuit; then times them in rounds that run each in turn.  It then sets the peak growth beside the memory model's prediction for this batch.
Needs about 20 GB of RAM and 5 minutes on 2 cores.  Writes benchmarks/results/bench_8b_cpu.{json,md}.

    python benchmarks/bench_8b_cpu.py [--tokens 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import MALLOC_ENV, SHAPES, _status_mb, engine_overhead_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
              head_dim=128, vocab_size=128256, tie_word_embeddings=False)
MIN_REFERENCE_MB = 64  # below this a memory ratio to the HF run says nothing


def peak_growth(fn) -> float:
    """MB of peak RSS growth over one call (VmHWM reset before it)."""
    base = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return _status_mb("VmHWM") - base


def interleaved_times(fns: dict, rounds: int, warm: bool = True) -> dict:
    """Median seconds of each function over ``rounds`` rounds that call them in turn, so a slow spell of
    the machine touches every run alike and the ratios between them hold (with ``warm``, one pass each
    first, untimed)."""
    if warm:
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def predict(n_tokens: int, qwen: dict) -> dict:
    """bench_memory's memory model (activations per token and layer fitted on the Qwen2-0.5B shape) at
    this batch: MB for the HF forward+backward, EAP and the patched forward above the loaded model."""
    from circuitgraph.discovery.eap import KEEP_DELTAS

    _, kw, B, P = SHAPES["qwen2-0.5b"]
    Lq, Dq, Vq, Nq = kw["num_hidden_layers"], kw["hidden_size"], kw["vocab_size"], B * P
    acts_per = (qwen["hf_forward_backward"]["peak_growth_mb"] - 2 * Nq * Vq * 4 / 2**20) / (Lq * Nq * Dq * 4 / 2**20)
    L, H, D, V, N = CONFIG["num_hidden_layers"], CONFIG["num_attention_heads"], CONFIG["hidden_size"], CONFIG["vocab_size"], n_tokens
    mb = 2**20
    hf = (acts_per * L * N * D * 2 + 2 * N * V * 2) / mb
    kept = (1 + L + H * math.ceil(KEEP_DELTAS * L)) * N * D * 4 / mb
    grads = (3 * H + 2) * N * D * 4 / mb
    sources = 1 + L * (H + 1)
    return {"hf_forward_backward": hf, "eap": hf + kept + grads, "delta_buffer": (sources + 2) * N * D * 2 / mb,
            "ablation_cache": sources * N * D * 2 / mb}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if os.environ.get("GLIBC_TUNABLES") != MALLOC_ENV:  # freed tensors must leave the RSS at once (see bench_memory)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": MALLOC_ENV})
    import torch
    import transformers

    from circuitgraph.data.dataset import TaskData
    from circuitgraph.discovery import attribute
    from circuitgraph.evaluate.evaluator import Evaluator
    from circuitgraph.model.loading import CircuitModel

    torch.set_num_threads(2)
    config = transformers.LlamaConfig(**CONFIG)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    hf.requires_grad_(False)
    model = CircuitModel(hf, check_exact=False)
    built = time.perf_counter() - t0
    e, G, V, P = model.engine, model.graph, CONFIG["vocab_size"], args.tokens
    g = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(0, V, (1, P), generator=g), torch.randint(0, V, (1, P), generator=g)
    ans = torch.randint(0, V, (1, 1), generator=g)
    res = {"tokens": P, "build_s": built, "rounds": args.rounds}

    def hf_forward():
        with torch.no_grad():
            hf(clean).logits

    def fwd_bwd():
        emb = hf.get_input_embeddings()(clean).detach().requires_grad_(True)
        logits = hf(inputs_embeds=emb, logits_to_keep=1).logits[:, -1]
        torch.autograd.grad(logits[:, 0].float().sum() - logits[:, 1].float().sum(), emb)

    ev = Evaluator(model, TaskData(clean, corrupt, torch.full((1,), P), ans, (ans + 1) % V, {}), batch_size=1, progress=False)
    with torch.no_grad():
        _, outs = e.run(corrupt, record=True)
        abl = e.make_ablation(outs, "corrupted")
        plan = e.compile(((torch.rand(len(G.sources), len(G.destinations), generator=g) < 0.1) & G.legal)[None])

    def patched():
        with torch.no_grad():
            e.patched_run(clean, abl, plan)

    runs = {"hf_forward": hf_forward, "hf_forward_backward": fwd_bwd,
            "eap": lambda: attribute(ev, "eap", progress=False), "patched_10pct": patched}
    for task, fn in runs.items():
        res[task] = {"peak_growth_mb": peak_growth(fn)}
    for task, s in interleaved_times(runs, args.rounds).items():
        res[task]["median_s"] = s
    hf_bytes, extra = engine_overhead_bytes(model)
    res["hf_model_mb"], res["engine_extra_mb"] = hf_bytes / 2**20, extra / 2**20
    res["predicted_mb"] = predict(P, json.loads((ROOT / "benchmarks" / "results" / "bench_memory.json").read_text())["qwen2-0.5b"])
    dest = ROOT / "benchmarks" / "results"
    (dest / "bench_8b_cpu.json").write_text(json.dumps(res, indent=2) + "\n")
    pr = res["predicted_mb"]
    lines = [f"Llama-3.1-8B shape (random init, bf16), batch 1 x {P} tokens, CPU, 2 threads, one process, times the "
             f"median of {args.rounds} rounds that run each task in turn; model "
             f"{res['hf_model_mb'] / 1024:.1f} GB (built in {built:.0f} s), engine adds {res['engine_extra_mb']:.1f} MB", "",
             "| run | median s | peak growth MB | predicted MB | time / HF | memory / HF |", "|---|---|---|---|---|---|"]
    for task, ref, p in (("hf_forward", "hf_forward", None), ("hf_forward_backward", "hf_forward_backward", pr["hf_forward_backward"]),
                         ("eap", "hf_forward_backward", pr["eap"]), ("patched_10pct", "hf_forward", None)):
        x, r = res[task], res[ref]
        mem = x["peak_growth_mb"] / r["peak_growth_mb"] if r["peak_growth_mb"] >= MIN_REFERENCE_MB else None
        lines.append(f"| {task} | {x['median_s']:.2f} | {x['peak_growth_mb']:.0f} | {'' if p is None else f'{p:.0f}'} | "
                     f"{x['median_s'] / r['median_s']:.2f} | {'' if mem is None else f'{mem:.2f}'} |")
    lines += ["", f"Predicted by bench_memory's memory model (activations per token and layer fitted on the Qwen2-0.5B "
              f"shape). The cached ablation run, made before the peaks are reset, holds {pr['ablation_cache']:.0f} MB; a "
              f"dense circuit's delta buffer would hold {pr['delta_buffer']:.0f} MB. Memory / HF is left out where the HF "
              f"run grows by under {MIN_REFERENCE_MB} MB (a forward over {P} tokens allocates little beyond its logits)."]
    (dest / "bench_8b_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
