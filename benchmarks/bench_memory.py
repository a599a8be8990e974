"""Memory and time of exact patching and attribution against the plain HF model, per model shape.

For each shape (random init, CPU, 2 threads): the bytes the engine adds to the HF model (tensors
not sharing storage with its parameters), and, each in a fresh process so its peak is its own,
the peak RSS growth and median time of: an HF forward; an HF forward+backward to the input
embeddings (parameters frozen); circuitgraph's plain forward, a patched forward (random circuit,
10% of edges), EAP over every edge and EAP-IG (5 steps).  A memory model fitted to these figures
predicts other shapes (e.g. Llama-3.1-8B).  Writes benchmarks/results/bench_memory.{json,md}.

    python benchmarks/bench_memory.py [--shapes gpt2-small qwen2-0.5b llama-3.2-1b] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # name: (config class, kwargs, batch, tokens)
    "gpt2-small": ("GPT2Config", {}, 16, 16),
    "qwen2-0.5b": ("Qwen2Config", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True), 4, 64),
    "llama-3.2-1b": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True), 4, 64),
}
TASKS = ["hf_forward", "hf_forward_backward", "engine_forward", "patched_10pct", "eap", "eap_keep_all", "eap_keep_none", "eap_ig_5"]


def _model(shape: str):
    import torch
    import transformers

    from circuitgraph.model.loading import CircuitModel

    cls, kw, B, P = SHAPES[shape]
    config = getattr(transformers, cls)(**kw)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    with torch.device("cpu"):
        hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf.requires_grad_(False)
    return hf, CircuitModel(hf, check_exact=False), B, P


def engine_overhead_bytes(model) -> tuple[int, int]:
    """(bytes of HF parameters and buffers, bytes of engine tensors that share no storage with them)."""
    import torch

    hf_ptrs, hf_bytes = set(), 0
    for t in list(model.hf.parameters()) + list(model.hf.buffers()):
        st = t.untyped_storage()
        if st.data_ptr() not in hf_ptrs:
            hf_ptrs.add(st.data_ptr())
            hf_bytes += st.nbytes()
    seen, extra = set(), 0

    def walk(obj, depth=0):
        nonlocal extra
        if depth > 4 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            if st.data_ptr() not in hf_ptrs:
                hf_ptrs.add(st.data_ptr())
                extra += st.nbytes()
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                walk(x, depth + 1)
        elif hasattr(obj, "__dataclass_fields__") or type(obj).__module__.startswith("circuitgraph"):
            for x in vars(obj).values():
                walk(x, depth + 1)

    walk(model.weights)
    walk(model.engine)
    walk(model.graph)
    return hf_bytes, extra


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _measure(shape: str, task: str, repeats: int, queue):
    import torch

    torch.set_num_threads(2)
    hf, model, B, P = _model(shape)
    V = hf.config.vocab_size
    g = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(0, V, (B, P), generator=g), torch.randint(0, V, (B, P), generator=g)
    e, G = model.engine, model.graph
    if task == "hf_forward":
        fn = lambda: hf(clean).logits
    elif task == "hf_forward_backward":
        def fn():  # logits at the last position only, as EAP's metric reads them
            emb = hf.get_input_embeddings()(clean).detach().requires_grad_(True)
            logits = hf(inputs_embeds=emb, logits_to_keep=1).logits[:, -1]
            torch.autograd.grad(logits[:, 0].sum() - logits[:, 1].sum(), emb)
    elif task == "engine_forward":
        fn = lambda: e.run(clean)[0]
    elif task == "patched_10pct":
        with torch.no_grad():
            _, outs = e.run(corrupt, record=True)
            abl = e.make_ablation(outs, "corrupted")
        mask = (torch.rand(len(G.sources), len(G.destinations), generator=g) < 0.1) & G.legal
        plan = e.compile(mask[None])
        fn = lambda: e.patched_run(clean, abl, plan)
    else:
        from circuitgraph.data.dataset import TaskData
        from circuitgraph.discovery import attribute
        from circuitgraph.evaluate.evaluator import Evaluator

        ans = torch.randint(0, V, (B, 1), generator=g)
        data = TaskData(clean, corrupt, torch.full((B,), P), ans, (ans + 1) % V, {})
        ev = Evaluator(model, data, batch_size=B, progress=False)
        keep = {"eap_keep_all": {"keep_deltas": 1.0}, "eap_keep_none": {"keep_deltas": 0.0}}.get(task, {})
        fn = ((lambda: attribute(ev, "eap-ig", steps=5, progress=False)) if task == "eap_ig_5"
              else (lambda: attribute(ev, "eap", progress=False, **keep)))
    ctx = torch.no_grad() if task in ("hf_forward", "engine_forward", "patched_10pct") else torch.enable_grad()
    base = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    with ctx:
        fn()  # warm-up, and the peak
        peak = _status_mb("VmHWM")
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    hf_bytes, extra = engine_overhead_bytes(model)
    queue.put({"median_s": statistics.median(times) if times else None, "peak_growth_mb": peak - base,
               "hf_model_mb": hf_bytes / 2**20, "engine_extra_mb": extra / 2**20})


def memory_model(r: dict) -> list[str]:
    """EAP's extra memory = HF forward+backward activations + the noising deltas it keeps (fp32 rows of
    tokens x d_model: the input, every MLP, and the heads of the first ``KEEP_DELTAS`` of the layers; the
    later heads are recomputed) + one layer's gathered destination gradients (fp32, 3 x heads + 2 rows);
    the Evaluator's cached ablation run adds sources x tokens x d_model in the model's dtype.  Fitted on
    the Qwen2-0.5B shape, applied to Llama-3.1-8B."""
    import math

    from circuitgraph.discovery.eap import KEEP_DELTAS

    cls, kw, B, P = SHAPES["qwen2-0.5b"]
    L, H, D, V, N = kw["num_hidden_layers"], kw["num_attention_heads"], kw["hidden_size"], kw["vocab_size"], B * P
    kept = lambda L, H: 1 + L + H * math.ceil(KEEP_DELTAS * L)
    deltas, grads = kept(L, H) * N * D * 4 / 2**20, (3 * H + 2) * N * D * 4 / 2**20
    hf = r["hf_forward_backward"]["peak_growth_mb"]
    predicted = hf + deltas + grads
    acts_per = (hf - 2 * N * V * 4 / 2**20) / (L * N * D * 4 / 2**20)  # activations in d_model-sized values per token and layer
    out = ["### Memory model", "",
           f"Qwen2-0.5B shape: EAP extra = HF fwd+bwd {hf:.0f} MB + kept deltas {deltas:.0f} MB + one layer's gradients "
           f"{grads:.0f} MB = {predicted:.0f} MB predicted, {r['eap']['peak_growth_mb']:.0f} MB measured; HF's activations "
           f"come to {acts_per:.1f} d_model-sized values per token and layer (logits aside).", ""]
    L8, H8, D8, V8, N8, params = 32, 32, 4096, 128256, 8 * 64, 8.03e9
    S8 = 1 + L8 * (H8 + 1)
    gb = lambda b: b / 2**30
    weights, cache = gb(params * 2), gb(S8 * N8 * D8 * 2)
    acts, deltas8, grads8 = gb(acts_per * L8 * N8 * D8 * 2 + 2 * N8 * V8 * 2), gb(kept(L8, H8) * N8 * D8 * 4), gb((3 * H8 + 2) * N8 * D8 * 4)
    total = weights + cache + acts + deltas8 + grads8
    out += [f"Llama-3.1-8B in bf16, batch 8 x 64 (predicted, no GPU run): weights {weights:.1f} GB + cached ablation run "
            f"{cache:.1f} GB + activations {acts:.1f} GB + kept fp32 deltas {deltas8:.1f} GB + one layer's gradients "
            f"{grads8:.1f} GB = {total:.1f} GB for EAP (one batch); an HF forward+backward needs {weights + acts:.1f} GB. "
            f"Exact patched runs hold at most the cached run plus a delta buffer of the same size in bf16: "
            f"{weights + 2 * cache:.1f} GB."]
    return out


# Peak memory is measured in its own process with glibc's mmap threshold fixed at 1 MiB: freed tensors
# then go back to the system at once, so the peak RSS tracks the peak of live tensors (as a GPU's
# allocated-memory peak does) rather than how the heap happened to fragment (left dynamic, it varied by
# +-60 MB between identical runs).  Time is measured in another process with the default allocator.
MALLOC_ENV = "glibc.malloc.mmap_threshold=1048576"


def _spawn(shape, task, repeats, env: str | None) -> dict:
    if env is None:
        os.environ.pop("GLIBC_TUNABLES", None)
    else:
        os.environ["GLIBC_TUNABLES"] = env  # read by the spawned process at start-up
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_measure, args=(shape, task, repeats, q))
    p.start()
    import queue

    while True:
        try:
            out = q.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"{shape} / {task}: the measuring process died (exit code {p.exitcode})") from None
    p.join()
    return out


def run(shape, task, repeats):
    memory = _spawn(shape, task, 0, MALLOC_ENV)
    timing = _spawn(shape, task, repeats, None)
    return {**memory, "median_s": timing["median_s"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the last run's .json")
    args = ap.parse_args()
    from tqdm import tqdm

    dest = ROOT / "benchmarks" / "results"
    if args.report_only:
        return report(json.loads((dest / "bench_memory.json").read_text()))
    old = dest / "bench_memory.json"
    res = json.loads(old.read_text()) if old.exists() else {}  # shapes not run now keep their last figures
    with tqdm(total=len(args.shapes) * len(args.tasks), desc="memory") as bar:
        for shape in args.shapes:
            res.setdefault(shape, {})  # tasks not run now keep their last figures
            for task in args.tasks:
                res[shape][task] = run(shape, task, args.repeats)
                bar.update(1)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "bench_memory.json").write_text(json.dumps(res, indent=2) + "\n")
    report(res)


def report(res: dict) -> None:
    lines = []
    for shape, r in res.items():
        _, _, B, P = SHAPES[shape]
        fb, fw = r["hf_forward_backward"], r["hf_forward"]
        lines += [f"### {shape} (batch {B} x {P} tokens)", "",
                  f"HF model {r['eap']['hf_model_mb']:.0f} MB; engine adds {r['eap']['engine_extra_mb']:.1f} MB "
                  f"({100 * r['eap']['engine_extra_mb'] / r['eap']['hf_model_mb']:.2f}%)", "",
                  "| run | median s | peak growth MB | time / HF | memory / HF |", "|---|---|---|---|---|"]
        for task, x in r.items():
            ref = fb if task.startswith("eap") or task == "hf_forward_backward" else fw
            mem = f"{x['peak_growth_mb'] / ref['peak_growth_mb']:.2f}"
            lines.append(f"| {task} | {x['median_s']:.3f} | {x['peak_growth_mb']:.0f} | {x['median_s'] / ref['median_s']:.2f} | {mem} |")
        lines.append("")
    lines.append("Ratios: forwards against the HF forward (full logits); EAP / EAP-IG against the HF forward+backward "
                 "to the embeddings with logits at the last position only (what EAP's metric reads). Peak growth is "
                 "the peak RSS during the run (VmHWM, reset before it) above the RSS before it, with the model loaded "
                 "and the Evaluator's cached ablation run made; each in its own process, with glibc's mmap threshold "
                 "fixed at 1 MiB so that freed tensors leave the RSS at once.")
    if "qwen2-0.5b" in res:
        lines += ["", *memory_model(res["qwen2-0.5b"])]
    (ROOT / "benchmarks" / "results" / "bench_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
