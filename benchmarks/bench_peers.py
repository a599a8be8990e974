"""circuitgraph side by side with auto-circuit and the EAP-IG repository, in one invocation.

One random-init GPT-2-small-shaped model (seeded) and one batch of random clean/corrupted token
pairs are written to a scratch folder; each tool then runs in its own process -- circuitgraph in
this environment, the peers in their own virtual environment, outside our dependencies -- and
reports its edge scores, time and extra memory.  Scores are compared edge by edge (same names:
``input``, ``a{L}.h{H}``, ``m{L}``, ``<q>/<k>/<v>``, ``logits``).

What runs (B x S from the flags, fp32, ``--threads`` CPU threads, all prompts one length):

* EAP, every edge: circuitgraph ``attribute(ev, "eap")``; auto-circuit
  ``mask_gradient_prune_scores(mask_val=0, grad_function="logit", answer_function="avg_diff")``
  (its scores are minus ours: it differentiates a loss, minus the logit difference); the EAP-IG
  repository's ``attribute(..., method="EAP")``.
* EAP-IG over the inputs, ``--steps`` points: circuitgraph with ``ig_points="left"`` (the
  repository's points, k = 0..n-1) against the repository's ``EAP-IG-inputs``.  auto-circuit has
  no input-embedding IG (its ``integrated_grad_samples`` interpolates every edge's mask at once,
  a different quantity), so it gets no EAP-IG column.
* plain HF forward and forward+backward (to the activations, parameters frozen) for scale.

Time is the fastest of up to three calls (repeated while a call takes under 20 s; the same rule
for every tool) after a warm-up call on two examples; memory is the peak resident set
size during the call minus the resident size before it, after freed memory is handed back to the
system (``malloc_trim``) and the peak is reset (``/proc/self/clear_refs``).  The machine's load
average is recorded beside the times: on a shared machine the times scale with it, the memory and
the scores do not.

Recipes (the peers' own environment; the script looks for ``benchmarks/.peers-venv`` or
``--peers-python``)::

    python3 -m venv benchmarks/.peers-venv
    benchmarks/.peers-venv/bin/pip install torch==2.13.0          # CPU wheel; any torch >= 2.2 works
    benchmarks/.peers-venv/bin/pip install auto-circuit==1.0.1 "transformer-lens>=2.15,<3" \\
        "datasets<4" "pyarrow<18" "matplotlib<3.11"               # TL 3+ drops HookedTransformer
    git clone https://github.com/hannamw/EAP-IG /tmp/EAP-IG       # not on PyPI; tested at 795f560
    benchmarks/.peers-venv/bin/pip install --no-deps /tmp/EAP-IG
    python benchmarks/bench_peers.py                             # this environment: circuitgraph

Adaptations the peers need here, both in :func:`_eap_ig_repo` and nothing else: the EAP-IG
repository allocates its score matrix with ``device='cuda'`` (mapped to the CPU when there is no
GPU) and tokenizes strings with the model's tokenizer (our random model has none, so its
``tokenize_plus`` receives the token tensors).  A peer that is missing is skipped with the reason.
Writes ``benchmarks/results/bench_peers.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SHAPES = {  # GPT-2 small; "tiny" is a smoke test of the script itself
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024),
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, vocab_size=500, n_positions=64),
}


# ----- measuring ---------------------------------------------------------------------------------
def _rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(fn, warm=None, repeats: int = 3, repeat_below_s: float = 20.0) -> tuple[object, dict]:
    """``fn()``'s result, wall time (fastest call) and peak extra resident memory (MiB, largest)."""
    if warm is not None:
        warm()
    out, best = _measure_once(fn)
    for _ in range(repeats - 1):
        if best["seconds"] >= repeat_below_s:
            break
        out, m = _measure_once(fn)
        best = {"seconds": min(best["seconds"], m["seconds"]), "extra_mib": max(best["extra_mib"], m["extra_mib"])}
    return out, best


def _measure_once(fn) -> tuple[object, dict]:
    import gc

    gc.collect()
    try:  # freed heap memory stays resident otherwise, and the call would reuse it unseen
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    except OSError:
        pass
    before = _rss_mib()
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    return out, {"seconds": round(seconds, 3), "extra_mib": round(_rss_mib("VmHWM") - before, 1)}


# ----- workers (one process each) ----------------------------------------------------------------
def _load_case(folder: Path):
    import torch

    return torch.load(folder / "batch.pt")


def _circuitgraph(folder: Path, steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from circuitgraph.data.dataset import TaskData
    from circuitgraph.discovery import attribute
    from circuitgraph.evaluate.evaluator import Evaluator
    from circuitgraph.model.loading import CircuitModel

    case = _load_case(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    for p in hf.parameters():
        p.requires_grad_(False)
    model = CircuitModel(hf, None, name="random-gpt2")
    N, P = case["clean"].shape

    def data(n):
        return TaskData(case["clean"][:n], case["corrupted"][:n], torch.full((n,), P), case["answer"][:n, None],
                        case["wrong"][:n, None], {})

    def ev(n):
        return Evaluator(model, data(n), batch_size=N, progress=False)

    full, small = ev(N), ev(2)
    out = {"timings": {}, "scores": {}}
    eap, out["timings"]["eap"] = measure(lambda: attribute(full, "eap", progress=False),
                                         lambda: attribute(small, "eap", progress=False))
    out["scores"]["eap"] = eap.as_dict()
    ig, out["timings"]["eap-ig"] = measure(lambda: attribute(full, "eap-ig", steps=steps, ig_points="left", progress=False),
                                           lambda: attribute(small, "eap-ig", steps=1, progress=False))
    out["scores"]["eap-ig"] = ig.as_dict()
    right = attribute(full, "eap-ig", steps=steps, progress=False)
    out["scores"]["eap-ig-right"] = right.as_dict()

    tokens = case["clean"]

    def fwd():
        with torch.no_grad():
            return hf(tokens).logits

    def fwd_bwd():
        emb = hf.transformer.wte(tokens).detach().requires_grad_(True)
        logits = hf(inputs_embeds=emb).logits[:, -1]
        (logits.gather(1, case["answer"][:, None]) - logits.gather(1, case["wrong"][:, None])).sum().backward()

    _, out["timings"]["hf-forward"] = measure(fwd, fwd)
    _, out["timings"]["hf-forward-backward"] = measure(fwd_bwd, fwd_bwd)
    return out


def _hooked_transformer(folder: Path, frozen: bool = True):
    """The same weights as a TransformerLens ``HookedTransformer``, unprocessed (no folding or
    centring, which would change what a head's output is).  ``frozen=False`` leaves the parameters
    trainable, as the EAP-IG repository needs for EAP (it back-propagates from the metric without
    any input that requires a gradient)."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(folder)
    c = hf.config
    cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head,
                                  n_heads=c.n_head, d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, act_fn="gelu_new",
                                  normalization_type="LN", eps=c.layer_norm_epsilon, default_prepend_bos=False)
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
    tl.cfg.use_attn_result = tl.cfg.use_split_qkv_input = tl.cfg.use_hook_mlp_in = True
    tl.setup()
    tl.eval()
    for p in tl.parameters():
        p.requires_grad_(not frozen)
    return tl


def _auto_circuit(folder: Path, steps: int) -> dict:
    import torch
    from auto_circuit.data import PromptDataLoader, PromptDataset
    from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores
    from auto_circuit.utils.graph_utils import patchable_model

    case = _load_case(folder)
    N = case["clean"].shape[0]
    tl = _hooked_transformer(folder)
    model = patchable_model(tl, factorized=True, slice_output="last_seq", separate_qkv=True, device=torch.device("cpu"))

    def loader(n):
        ds = PromptDataset(case["clean"][:n], case["corrupted"][:n], [a[None] for a in case["answer"][:n]],
                           [w[None] for w in case["wrong"][:n]])
        return PromptDataLoader(ds, seq_len=None, diverge_idx=0, batch_size=n, shuffle=False)

    def run(dl):
        return mask_gradient_prune_scores(model, dl, None, grad_function="logit", answer_function="avg_diff", mask_val=0.0)

    full, small = loader(N), loader(2)
    scores, timing = measure(lambda: run(full), lambda: run(small))
    out = {}
    for e in model.edges:
        out[_ours(e.src.name) + "->" + _ours(e.dest.name)] = -float(e.prune_score(scores))  # loss = -logit diff
    return {"timings": {"eap": timing}, "scores": {"eap": out}}


def _ours(name: str) -> str:
    """auto-circuit node name -> ours ("A3.7.Q" -> "a3.h7<q>", "MLP 2" -> "m2", "Resid End" -> "logits")."""
    if name == "Resid Start":
        return "input"
    if name == "Resid End":
        return "logits"
    if name.startswith("MLP "):
        return "m" + name[4:]
    parts = name[1:].split(".")
    return f"a{parts[0]}.h{parts[1]}" + (f"<{parts[2].lower()}>" if len(parts) > 2 else "")


def _eap_ig_repo(folder: Path, steps: int) -> dict:
    import torch

    if not torch.cuda.is_available():  # the repository allocates its score matrix on 'cuda'
        zeros = torch.zeros

        def cpu_zeros(*a, device=None, **k):
            return zeros(*a, device="cpu" if str(device).startswith("cuda") else device, **k)

        torch.zeros = cpu_zeros
    import eap.attribute as A
    from eap.graph import Graph

    def tokenize_plus(model, tokens, max_length=None):  # it tokenizes strings; ours are token ids
        return tokens, torch.ones_like(tokens), torch.full((len(tokens),), tokens.shape[1]), tokens.shape[1]

    A.tokenize_plus = tokenize_plus
    case = _load_case(folder)
    N = case["clean"].shape[0]
    tl = _hooked_transformer(folder, frozen=False)

    def metric(logits, clean_logits, input_lengths, label):  # summed, so the repository's mean is ours
        last = logits[torch.arange(len(logits)), input_lengths - 1]
        return (last.gather(1, label[:, :1]) - last.gather(1, label[:, 1:2])).sum()

    def loader(n):
        return [(case["clean"][:n], case["corrupted"][:n], torch.stack([case["answer"][:n], case["wrong"][:n]], 1))]

    def run(n, method, ig_steps=None):
        graph = Graph.from_model(tl)
        A.attribute(tl, graph, loader(n), metric, method=method, ig_steps=ig_steps, quiet=True)
        return {name: float(e.score) for name, e in graph.edges.items()}

    out = {"timings": {}, "scores": {}}
    out["scores"]["eap"], out["timings"]["eap"] = measure(lambda: run(N, "EAP"), lambda: run(2, "EAP"))
    out["scores"]["eap-ig"], out["timings"]["eap-ig"] = measure(lambda: run(N, "EAP-IG-inputs", steps),
                                                                lambda: run(2, "EAP-IG-inputs", 1))
    return out


WORKERS = {"circuitgraph": _circuitgraph, "auto-circuit": _auto_circuit, "eap-ig-repo": _eap_ig_repo}


def _worker(name: str, folder: Path, steps: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    res = WORKERS[name](folder, steps)
    import importlib.metadata as md

    pkg = {"circuitgraph": "circuitgraph", "auto-circuit": "auto-circuit", "eap-ig-repo": "eap"}[name]
    res["version"] = md.version(pkg)
    res["torch"] = torch.__version__
    (folder / f"{name}.json").write_text(json.dumps(res))


# ----- driver --------------------------------------------------------------------------------------
def _make_case(folder: Path, shape: str, batch: int, seq: int, seed: int = 0) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(**SHAPES[shape])
    GPT2LMHeadModel(cfg).save_pretrained(folder, safe_serialization=True)
    g = torch.Generator().manual_seed(seed)
    V = cfg.vocab_size
    torch.save({"clean": torch.randint(0, V, (batch, seq), generator=g),
                "corrupted": torch.randint(0, V, (batch, seq), generator=g),
                "answer": torch.randint(0, V, (batch,), generator=g),
                "wrong": torch.randint(0, V, (batch,), generator=g)}, folder / "batch.pt")


def _compare(ours: dict[str, float], theirs: dict[str, float]) -> dict:
    import numpy as np

    names = [k for k in ours if k in theirs and ours[k] is not None]
    a, b = np.array([ours[k] for k in names]), np.array([theirs[k] for k in names])
    top = lambda v: set(np.array(names)[np.argsort(-np.abs(v))[:100]])
    return {"n_edges": len(names), "n_edges_ours": len(ours), "n_edges_theirs": len(theirs),
            "pearson": float(np.corrcoef(a, b)[0, 1]), "max_abs_diff": float(np.abs(a - b).max()),
            "max_abs_score": float(np.abs(a).max()), "top100_overlap": len(top(a) & top(b))}


def _peers_python(arg: str | None) -> str | None:
    for cand in (arg, os.environ.get("PEERS_PYTHON"), str(HERE / ".peers-venv" / "bin" / "python")):
        if cand and Path(cand).exists():
            return cand
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="gpt2-small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="EAP-IG steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers-python", help="python of the peers' virtual environment (default: benchmarks/.peers-venv)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per tool")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_peers")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker(args.worker, args.folder, args.steps, args.threads)

    peers = _peers_python(args.peers_python)
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _make_case(folder, args.shape, args.batch, args.seq)
        runs, skipped = {}, {}
        for name in WORKERS:
            python = sys.executable if name == "circuitgraph" else peers
            if python is None:
                skipped[name] = "no peers environment (see the recipes in this script's docstring)"
                continue
            cmd = [python, __file__, "--worker", name, "--folder", str(folder), "--steps", str(args.steps),
                   "--threads", str(args.threads)]
            print(f"running {name} ...", flush=True)
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                   env={**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": ""})
            except subprocess.TimeoutExpired:
                skipped[name] = f"did not finish within {args.timeout} s"
                continue
            if p.returncode != 0:
                skipped[name] = "failed: " + (p.stderr.strip().splitlines() or ["?"])[-1]
                continue
            runs[name] = json.loads((folder / f"{name}.json").read_text())
            load.append(os.getloadavg()[0])
    ours = runs.get("circuitgraph")
    comparisons = {}
    if ours:
        comparisons["eap-ig: right vs left points (ours)"] = _compare(ours["scores"]["eap-ig"], ours["scores"]["eap-ig-right"])
        for name, r in runs.items():
            if name != "circuitgraph":
                for method, scores in r["scores"].items():
                    comparisons[f"{method}: circuitgraph vs {name}"] = _compare(ours["scores"][method], scores)
    result = {"command": "python benchmarks/bench_peers.py " + " ".join(sys.argv[1:]), "shape": args.shape,
              "batch": args.batch, "seq": args.seq, "steps": args.steps, "threads": args.threads, "dtype": "float32",
              "cpu_count": os.cpu_count(), "load_average_1min": [round(x, 2) for x in load],
              "versions": {n: {"version": r["version"], "torch": r["torch"]} for n, r in runs.items()},
              "timings": {n: r["timings"] for n, r in runs.items()}, "comparisons": comparisons, "skipped": skipped}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))


def _markdown(r: dict) -> str:
    lines = [f"# circuitgraph vs peers: random {r['shape']}, B{r['batch']} x S{r['seq']}, {r['dtype']}, "
             f"{r['threads']} CPU threads", "", f"`{r['command']}`", "",
             f"Load average (1 min) before the run and after each tool: {r['load_average_1min']} on {r['cpu_count']} "
             "cores; times scale with it, memory and scores do not.", ""]
    tools = list(r["timings"])
    lines += ["| | " + " | ".join(f"{t} {r['versions'][t]['version']}" for t in tools) + " |",
              "|---|" + "---|" * len(tools)]
    rows = sorted({k for t in tools for k in r["timings"][t]}, key=["eap", "eap-ig", "hf-forward", "hf-forward-backward"].index)
    for k in rows:
        label = {"eap": "EAP, every edge", "eap-ig": f"EAP-IG inputs, {r['steps']} steps (left points)",
                 "hf-forward": "plain HF forward", "hf-forward-backward": "plain HF forward+backward"}[k]
        cells = []
        for t in tools:
            m = r["timings"][t].get(k)
            cells.append(f"{m['seconds']:.2f} s, +{m['extra_mib']:.0f} MiB" if m else "—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| scores | edges compared | Pearson | max abs diff | max abs score | top-100 overlap |", "|---|---|---|---|---|---|"]
    for name, c in r["comparisons"].items():
        lines.append(f"| {name} | {c['n_edges']} | {c['pearson']:.7f} | {c['max_abs_diff']:.2e} | {c['max_abs_score']:.3g} | "
                     f"{c['top100_overlap']} |")
    for name, why in r["skipped"].items():
        lines.append(f"\n{name}: skipped ({why})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
