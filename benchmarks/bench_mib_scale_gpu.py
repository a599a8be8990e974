"""MIB's scale on a GPU: EAP-IG and the MIB faithfulness curve on a Llama-3.1-8B-shaped model in bfloat16.

One random-init model with Llama-3.1-8B's sizes (32 layers, 32 query heads, 8 KV heads, d_model 4096,
d_mlp 14336, vocabulary 128256, head_dim 128, rope_theta 500000 with the real config's llama3
rope_scaling, RMSNorm eps 1e-5, untied embeddings), built straight on the device in ``--dtype``.  Its graph
has 1,057 source nodes and 1,592,881 edges, the size of MIB's Llama-3.1-8B graph.  Stages, each timed
(CUDA synchronised) with its peak memory (``torch.cuda.max_memory_allocated``, reset at the start of each
stage; on a CPU the peak resident set size):

* ``load``: the random init on the device (``LlamaForCausalLM`` from the config) and ``CircuitModel``
  (graph, weights, patching engine);
* ``data``: IOI prompts from ``circuitgraph.data.tasks.make_data("ioi", ...)`` tokenized with the bundled
  ``toy-ioi`` word-level tokenizer (offline; its ids all lie inside the model's vocabulary), with the
  task's named positions (IO, S1, S1+1, S2, END).  A random-init model has no IOI behaviour, so with
  ``--labels top`` (default) the answer and the wrong token of each example are the clean and the corrupted
  run's top next tokens (the corrupted run's second where both agree), as ``bench_mib_parity`` and the
  tests' ``signal_rows`` do, so the clean and ablated logit differences lie far apart; ``--labels ioi``
  keeps the task's names;
* ``baselines``: the ``Evaluator`` (metric ``logit_diff``, ablation ``corrupted`` = MIB's ``patching``):
  the clean and corrupted runs it keeps, and the exactness guard against the HF forward;
* ``attribution``: ``discover(ev, "eap-ig", steps=5, ig_points="left")`` -- IG over the input embeddings
  with the EAP-IG repository's step points (k = 0..4 of 5, what MIB ran), as ``circuitgraph discover
  --method eap-ig --ig-points left`` calls it;
* ``curve``: ``faithfulness_curve(ev, scores, rules="mib")`` -- MIB's 10 fractions, both rankings, every
  top-n circuit pruned; CPR from the signed ranking, CMD from the |score| ranking.  The scores are rounded
  to float32 first (MIB's graph holds float32), so both curves below rank the same values.

Reference (optional, ``--reference-python PY``): MIB's own ``evaluate_area_under_curve`` on the same
weights and scores, in its own environment, the way ``bench_mib_parity.py`` runs it (same settings: MIB
scores = minus ours, ``absolute=False`` for CPR and ``absolute=True`` for CMD, intervention
``'patching'``, ``get_metric("logit_diff", "ioi")`` with ``mean=False, loss=False``, no BOS, token ids
passed through ``tokenize_plus`` with the real attention mask and lengths, the same mini-batches; its
helpers are imported from there).  The weights are saved to ``--scratch`` (16 GB at the full shape) and
our model is freed; the worker loads them into a ``HookedTransformer`` (unprocessed: no folding or
centring; ``use_attn_result``, ``use_split_qkv_input``, ``use_hook_mlp_in`` and
``ungroup_grouped_query_attention`` on, as MIB's ``load_model`` sets them; NTK-by-parts rope as
TransformerLens configures Llama-3.1-8B) in the same dtype on the same device.  Reported: each point's
faithfulness on both sides and their difference, the edges counted and evaluated, CPR and CMD, and the
worker's load time, curve times and peak memory.  In bfloat16 the two sides round differently (our metric
is taken in fp32, MIB's on the bf16 logits), so the differences are rounding of that size, not exact.

Usage (one H100 or larger; about 16 GB of weights, then EAP-IG and the curve's patched passes)::

    python benchmarks/bench_mib_scale_gpu.py                          # Llama-3.1-8B shape, bf16, cuda, 32 IOI examples
    python benchmarks/bench_mib_scale_gpu.py --reference-python benchmarks/.peers-venv/bin/python \\
        --mib-circuit-track /tmp/MIB-circuit-track                    # + MIB's evaluate_area_under_curve
    python benchmarks/bench_mib_scale_gpu.py --device cpu --dtype float32 --layers 2 --d-model 256 \\
        --n-examples 4 --out-name bench_mib_scale_gpu_cpu_smoke      # smoke test of the script (CPU, seconds)

Size flags (``--layers``, ``--heads``, ``--kv-heads``, ``--d-model``, ``--d-mlp``, ``--head-dim``, ``--vocab``)
shrink the shape for such smoke runs; the title and ``full_llama_31_8b_shape`` in the results say whether
a run had the full shape.  The reference environment is ``bench_peers.py``'s (torch, transformer-lens 2.x,
safetensors, transformers; EAP-IG is imported by path), with a CUDA build of torch for a GPU run: its EAP-IG package is MIB's copy under
``DIR/EAP-IG/src`` unless ``--eap-ig`` names another folder holding ``eap/`` (or ``installed``).  With
about 1.6M edges, float32 scores tie (exact zeros, e.g. the input's edges into the last layer when the
last token is the same in both prompts, and chance collisions); the two sides' ``topk`` may break a tie
that straddles a cut differently, so the counts are compared rather than assumed equal.
Writes ``benchmarks/results/<--out-name>.{json,md}`` (default ``bench_mib_scale_gpu``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_mib_parity import (AREA_TOL, EAP_FILES, FAITH_TOL, KNOWN_GRAPH_PY, MIB_FILES, RANKINGS_MIB,  # noqa: E402
                              git_blob, mib_path)
from bench_peers import RESULTS, _rss_mib  # noqa: E402

ROOT = HERE.parent
DEFAULT_NAME = "bench_mib_scale_gpu"
# Llama-3.1-8B's config.json, as far as it shapes the computation (the weights are random)
LLAMA_31_8B = dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096,
                   intermediate_size=14336, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192},
                   max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
                   attention_bias=False, mlp_bias=False, initializer_range=0.02, bos_token_id=128000, eos_token_id=128001)
MIB_RANKINGS = {k: RANKINGS_MIB[k] for k in ("signed", "absolute")}  # (sign given to our scores, absolute)
GIB = 2**30


def log(msg: str) -> None:
    print(f"[bench_mib_scale_gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----- measuring ---------------------------------------------------------------------------------
class Stage:
    """Wall time (device synchronised) and peak memory of one stage: on CUDA ``max_memory_allocated``
    (reset on entry), on a CPU the peak resident set size (``VmHWM``, reset on entry where the kernel allows)."""

    def __init__(self, name: str, device, record: dict):
        self.name, self.device, self.record = name, device, record

    def _sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        import torch

        log(f"{self.name} ...")
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            self.start = _rss_mib("VmRSS") * 2**20
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if exc[0] is not None:
            return False
        self._sync()
        seconds = time.perf_counter() - self.t0
        if self.device.type == "cuda":
            peak, end = torch.cuda.max_memory_allocated(self.device), torch.cuda.memory_allocated(self.device)
            kind = "cuda max_memory_allocated"
        else:
            peak, end, kind = _rss_mib("VmHWM") * 2**20, _rss_mib("VmRSS") * 2**20, "peak RSS"
        self.record[self.name] = {"seconds": round(seconds, 3), "peak_gib": round(peak / GIB, 3),
                                  "start_gib": round(self.start / GIB, 3), "end_gib": round(end / GIB, 3),
                                  "peak_above_start_gib": round((peak - self.start) / GIB, 3), "memory": kind}
        log(f"{self.name}: {seconds:.1f} s, peak {peak / GIB:.2f} GiB")
        return False


def machine_info(device) -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(p.total_memory / GIB, 2),
                    cuda=torch.version.cuda, capability=f"{p.major}.{p.minor}")
    return info


def versions() -> dict:
    import importlib.metadata as md

    import torch
    import transformers

    try:
        cg = md.version("circuitgraph")
    except md.PackageNotFoundError:
        cg = "?"
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:  # no git on this machine
        commit = ""
    return {"circuitgraph": cg, "git_commit": commit or None, "torch": torch.__version__, "transformers": transformers.__version__}


# ----- our side ----------------------------------------------------------------------------------
def model_shape(args) -> dict:
    """The LlamaConfig keyword arguments: Llama-3.1-8B's, with the size overrides given."""
    shape = dict(LLAMA_31_8B, rope_scaling=dict(LLAMA_31_8B["rope_scaling"]))
    for key, arg in (("num_hidden_layers", "layers"), ("num_attention_heads", "heads"), ("num_key_value_heads", "kv_heads"),
                     ("hidden_size", "d_model"), ("intermediate_size", "d_mlp"), ("vocab_size", "vocab"), ("head_dim", "head_dim")):
        if getattr(args, arg) is not None:
            shape[key] = getattr(args, arg)
    if args.head_dim is None and (args.d_model is not None or args.heads is not None):
        shape["head_dim"] = shape["hidden_size"] // shape["num_attention_heads"]
    if shape["num_attention_heads"] % shape["num_key_value_heads"]:
        raise SystemExit(f"--heads {shape['num_attention_heads']} is not a multiple of --kv-heads {shape['num_key_value_heads']}")
    return shape


def build_model(shape: dict, dtype, device, seed: int, check_exact: bool, stages: dict):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from circuitgraph.model.loading import CircuitModel

    config = LlamaConfig(**shape, architectures=["LlamaForCausalLM"])
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    with Stage("load", device, stages) as st:
        t = time.perf_counter()
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
        hf.eval().requires_grad_(False)
        if next(hf.parameters()).device.type != device.type:  # built elsewhere despite the device context
            hf.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        init_s = time.perf_counter() - t
        model = CircuitModel(hf, None, name="random Llama-3.1-8B shape", check_exact=check_exact)
    stages["load"].update(init_s=round(init_s, 3), circuit_model_s=round(stages["load"]["seconds"] - init_s, 3))
    n_params = sum(p.numel() for p in hf.parameters())
    return model, {"n_params": n_params, "weights_gib": round(sum(p.numel() * p.element_size() for p in hf.parameters()) / GIB, 3)}


def make_dataset(model, n: int, seed: int, labels: str, batch_size: int):
    """IOI prompts (``make_data``, bundled toy-ioi tokenizer) and, with ``labels == "top"``, the clean and
    corrupted runs' top next tokens as answer and wrong token."""
    import dataclasses

    import torch
    from transformers import AutoTokenizer

    from circuitgraph.data.dataset import load_dataset
    from circuitgraph.data.tasks import make_data

    tok = AutoTokenizer.from_pretrained(ROOT / "circuitgraph" / "bundled" / "toy-ioi")
    if len(tok) > model.config.vocab_size:
        raise SystemExit(f"--vocab {model.config.vocab_size} is smaller than the toy-ioi tokenizer's {len(tok)} ids")
    rows = make_data("ioi", tok, n, seed=seed)
    data = load_dataset(rows, tok)
    info = {"source": "circuitgraph.data.tasks.make_data('ioi', toy-ioi tokenizer)", "labels": labels, "seed": seed,
            "prepend_bos": False, "lengths": sorted(set(data.lengths.tolist())), "positions": sorted(data.positions)}
    if labels == "top":
        answers, wrongs = [], []
        with torch.no_grad():
            for a in range(0, n, batch_size):
                b = min(a + batch_size, n)
                P = int(data.lengths[a:b].max())
                last = (data.lengths[a:b] - 1).to(model.device)
                i = torch.arange(b - a, device=model.device)
                clean = model.hf(data.clean[a:b, :P].to(model.device)).logits[i, last].float()
                corrupt = model.hf(data.corrupted[a:b, :P].to(model.device)).logits[i, last].float()
                ans = clean.argmax(-1)
                top2 = corrupt.topk(2, -1).indices
                answers.append(ans.cpu())
                wrongs.append(torch.where(top2[:, 0] == ans, top2[:, 1], top2[:, 0]).cpu())
        data = dataclasses.replace(data, answers=torch.cat(answers)[:, None], wrongs=torch.cat(wrongs)[:, None])
    return data, info


def float32_exact(scores):
    """The scores rounded to float32 (what MIB's graph holds), with the ties of each ranking counted."""
    import torch

    from circuitgraph.discovery.edge_scores import EdgeScores

    out = EdgeScores(scores.graph, scores.scores.float().double(), scores.method, dict(scores.meta))
    legal = out.scores[out.graph.legal]
    ties = {"signed": len(legal) - len(torch.unique(legal)), "absolute": len(legal) - len(torch.unique(legal.abs()))}
    return out, ties


# ----- MIB's side (the reference environment) ----------------------------------------------------
def _hooked_llama(folder: Path, case: dict):
    """The saved weights as an unprocessed TransformerLens ``HookedTransformer`` with MIB's settings."""
    import torch
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    s, dtype = case["shape"], getattr(torch, case["dtype"])
    with torch.device("meta"):
        hf = LlamaForCausalLM(LlamaConfig(**s))
    state = {}
    for f in sorted((folder / "weights").glob("*.safetensors")):
        state.update(load_file(f))
    hf.load_state_dict(state, assign=True, strict=True)
    rs = s["rope_scaling"]
    cfg = HookedTransformerConfig(
        d_model=s["hidden_size"], d_head=s["head_dim"], n_heads=s["num_attention_heads"], d_mlp=s["intermediate_size"],
        n_layers=s["num_hidden_layers"], n_ctx=2048, eps=s["rms_norm_eps"], d_vocab=s["vocab_size"], act_fn="silu",
        n_key_value_heads=s["num_key_value_heads"], normalization_type="RMS", positional_embedding_type="rotary",
        rotary_adjacent_pairs=False, rotary_dim=s["head_dim"], final_rms=True, gated_mlp=True, rotary_base=s["rope_theta"],
        use_NTK_by_parts_rope=True, NTK_by_parts_low_freq_factor=rs["low_freq_factor"],
        NTK_by_parts_high_freq_factor=rs["high_freq_factor"], NTK_by_parts_factor=rs["factor"],
        NTK_original_ctx_len=rs["original_max_position_embeddings"], original_architecture="LlamaForCausalLM",
        default_prepend_bos=False, dtype=dtype, device=case["device"], init_weights=False)  # the saved weights replace them
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
    del hf, state
    tl.cfg.use_attn_result = tl.cfg.use_split_qkv_input = tl.cfg.use_hook_mlp_in = True
    tl.cfg.ungroup_grouped_query_attention = True
    tl.setup()
    tl.eval()
    for p in tl.parameters():
        p.requires_grad_(False)
    return tl


def _mib_worker(folder: Path, mib: Path, eap_ig: str) -> dict:
    """In the reference environment: MIB's ``evaluate_area_under_curve`` for the signed ranking (CPR) and the
    |score| ranking (CMD), as ``bench_mib_parity._mib_worker`` runs it; with load time, curve times and peak memory."""
    import warnings
    from functools import partial

    import torch

    warnings.filterwarnings("ignore")  # its metric re-wraps the label tensor with torch.tensor(...)
    if eap_ig != "installed":
        sys.path.insert(0, eap_ig)
    sys.path.insert(0, str(mib))
    import eap
    import eap.evaluate as EV
    from eap.graph import Graph

    import MIB_circuit_track.evaluation as E
    from MIB_circuit_track.metrics import get_metric

    case = json.loads((folder / "case.json").read_text())
    device = torch.device(case["device"])
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    eap_dir = Path(eap.__file__).parent
    out = {"torch": torch.__version__, "transformer_lens": __import__("importlib.metadata").metadata.version("transformer-lens"),
           "eap_ig": str(eap_dir), "eap_ig_blobs": {f: git_blob(eap_dir / f) for f in EAP_FILES},
           "mib_blobs": {f: git_blob(mib / f) for f in MIB_FILES}, "seconds": {}}
    t = time.perf_counter()
    tl = _hooked_llama(folder, case)
    sync()
    out["seconds"]["load_model"] = round(time.perf_counter() - t, 3)
    out["weights_gib"] = round(torch.cuda.memory_allocated(device) / GIB, 3) if cuda else None
    t = time.perf_counter()
    saved = torch.load(folder / "scores.pt")
    graph = Graph.from_model(tl)
    missing = set(saved["names"]) ^ set(graph.edges)
    assert not missing, f"edge names differ: {sorted(missing)[:5]}"
    index = torch.tensor([graph.edges[name].matrix_index for name in saved["names"]])
    out["seconds"]["graph"] = round(time.perf_counter() - t, 3)

    batch = torch.load(folder / "batch.pt")
    lengths_of: dict[int, torch.Tensor] = {}
    loader = []
    N, bs = len(batch["clean"]), case["batch_size"]
    for a in range(0, N, bs):
        b = min(a + bs, N)
        lengths = batch["lengths"][a:b]
        P = int(lengths.max())
        clean, corrupted = batch["clean"][a:b, :P].contiguous(), batch["corrupted"][a:b, :P].contiguous()
        lengths_of[id(clean)] = lengths_of[id(corrupted)] = lengths
        loader.append((clean, corrupted, torch.stack([batch["answer"][a:b], batch["wrong"][a:b]], 1)))

    def tokenize_plus(model, tokens, max_length=None):  # it tokenizes strings (with BOS); ours are right-padded token ids
        lengths = lengths_of[id(tokens)]
        mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
        return tokens.to(device), mask.to(device), lengths.to(device), tokens.shape[1]

    EV.tokenize_plus = tokenize_plus
    metric = partial(get_metric("logit_diff", "ioi"), mean=False, loss=False)  # as run_evaluation.py passes it
    calls: list[dict] = []
    original = EV.evaluate_graph

    def recorded(model, graph, *a, **k):  # the circuit evaluate_graph actually ran (it prunes in place)
        res = original(model, graph, *a, **k)
        calls.append({"edges_evaluated": int(graph.count_included_edges()), "metric": float(res.mean())})
        return res

    E.evaluate_graph = recorded
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    out["clean"] = float(EV.evaluate_baseline(tl, loader, metric, quiet=True).mean())
    for key, (sign, absolute) in MIB_RANKINGS.items():
        graph.scores[index[:, 0], index[:, 1]] = sign * saved["values"].float()
        calls.clear()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        t = time.perf_counter()
        counts, area_under, area_from_1, average, faith = E.evaluate_area_under_curve(
            tl, graph, loader, metric, quiet=False, absolute=absolute, intervention="patching")
        sync()
        out[key] = {"seconds": round(time.perf_counter() - t, 3), "weighted_edge_counts": [int(c) for c in counts],
                    "area_under": area_under, "area_from_1": area_from_1, "average": average, "faithfulness": faith,
                    "ablated": calls[0]["metric"], "edges_evaluated": [c["edges_evaluated"] for c in calls[1:]],
                    "n_scored_items": len(graph.edges),
                    "peak_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3) if cuda else None}
        (folder / "mib.partial.json").write_text(json.dumps(out))
    return out


def run_reference(folder: Path, python: str, mib: Path, eap_ig: str, timeout: float | None) -> dict:
    cmd = [python, __file__, "--worker", "--folder", str(folder), "--mib-circuit-track", str(mib), "--eap-ig", eap_ig]
    log(f"MIB's evaluate_area_under_curve in {python} ...")
    t = time.perf_counter()
    p = subprocess.run(cmd, timeout=timeout, env={**os.environ, "PYTHONPATH": ""})  # its progress shows as it runs
    if p.returncode != 0:
        raise RuntimeError(f"the MIB worker failed (exit {p.returncode}); its output is above")
    res = json.loads((folder / "mib.json").read_text())
    res["seconds"]["process"] = round(time.perf_counter() - t, 3)
    return res


def compare(ours: dict, mib: dict, dtype: str) -> dict:
    """Point by point, ours[signed] vs MIB absolute=False and ours[absolute] vs MIB absolute=True."""
    rows = {}
    for k in MIB_RANKINGS:
        pts, m = ours[k]["points"], mib[k]
        points = [{"fraction": p["fraction"], "edges_requested": p["edges_requested"],
                   "edges_counted_ours": p["edges_counted"], "edges_counted_mib": c,
                   "edges_evaluated_ours": p["edges_evaluated"], "edges_evaluated_mib": e,
                   "faithfulness_ours": p["faithfulness"], "faithfulness_mib": f,
                   "diff": None if p["faithfulness"] is None else p["faithfulness"] - f}
                  for p, c, e, f in zip(pts, m["weighted_edge_counts"], m["edges_evaluated"], m["faithfulness"])]
        diffs = [abs(p["diff"]) for p in points if p["diff"] is not None]
        rows[k] = {"points": points, "max_abs_diff": max(diffs) if diffs else None,
                   "counted_equal": [p["edges_counted_ours"] for p in points] == [p["edges_counted_mib"] for p in points],
                   "evaluated_equal": [p["edges_evaluated_ours"] for p in points] == [p["edges_evaluated_mib"] for p in points]}
    out = {"rankings": rows, "cpr": {"ours": ours["cpr"], "mib": mib["signed"]["area_under"]},
           "cmd": {"ours": ours["cmd"], "mib": mib["absolute"]["area_from_1"]},
           "clean": {"ours": ours["clean"], "mib": mib["clean"]}, "ablated": {"ours": ours["ablated"], "mib": mib["signed"]["ablated"]},
           "n_edges_total_equal": ours["n_edges_total"] == mib["signed"]["n_scored_items"]}
    if dtype in ("float32", "float64"):  # bench_mib_parity's tolerances; in bf16/fp16 the sides round differently
        out["checks"] = {"faithfulness_within_1e-4": all(r["max_abs_diff"] is not None and r["max_abs_diff"] <= FAITH_TOL
                                                          for r in rows.values()),
                         "edges_counted_exact": all(r["counted_equal"] for r in rows.values()),
                         "edges_evaluated_exact": all(r["evaluated_equal"] for r in rows.values()),
                         "n_edges_total_equal": out["n_edges_total_equal"],
                         "cpr_within_1e-3": out["cpr"]["ours"] is not None and abs(out["cpr"]["ours"] - out["cpr"]["mib"]) <= AREA_TOL,
                         "cmd_within_1e-3": out["cmd"]["ours"] is not None and abs(out["cmd"]["ours"] - out["cmd"]["mib"]) <= AREA_TOL}
        out["all_pass"] = all(out["checks"].values())
    return out


# ----- driver ------------------------------------------------------------------------------------
def run(args) -> dict:
    import torch

    from circuitgraph.discovery import discover
    from circuitgraph.discovery.curves import faithfulness_curve
    from circuitgraph.evaluate.evaluator import Evaluator

    reference = None
    if args.reference_python:  # checked before the model is built
        mib = mib_path(args.mib_circuit_track)
        if not Path(args.reference_python).exists():
            raise SystemExit(f"--reference-python {args.reference_python} does not exist")
        if mib is None:
            raise SystemExit("no MIB circuit-track source: --mib-circuit-track DIR (holding MIB_circuit_track/evaluation.py), "
                             "MIB_CIRCUIT_TRACK or /tmp/MIB-circuit-track")
        eap_ig = str(mib / "EAP-IG" / "src") if args.eap_ig == "mib" else args.eap_ig
        if eap_ig != "installed" and not (Path(eap_ig) / "eap" / "graph.py").exists():
            raise SystemExit(f"no EAP-IG package under {eap_ig} (eap/graph.py); --eap-ig names the folder holding eap/")
        reference = (args.reference_python, mib, eap_ig)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU (use --device cpu for the smoke test)")
    shape = model_shape(args)
    result = {"command": " ".join(["python benchmarks/bench_mib_scale_gpu.py", *sys.argv[1:]]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(device),
              "versions": versions(), "device": str(device), "dtype": args.dtype, "shape": shape,
              "full_llama_31_8b_shape": all(shape[k] == LLAMA_31_8B[k] for k in LLAMA_31_8B), "stages": {}}
    stages = result["stages"]
    model, result["model"] = build_model(shape, dtype, device, args.seed, not args.no_exactness_check, stages)
    G = model.graph
    result["model"].update(n_nodes=len(G.nodes) if hasattr(G, "nodes") else None, n_sources=len(G.sources),
                           n_destinations=len(G.destinations), n_edges=G.n_edges)
    log(f"model: {result['model']['n_params'] / 1e9:.2f}B parameters, {G.n_edges:,} edges, {args.dtype} on {device}")

    with Stage("data", device, stages):
        data, result["dataset"] = make_dataset(model, args.n_examples, args.seed, args.labels, args.batch_size)
    result["n_examples"] = len(data)
    with Stage("baselines", device, stages):
        ev = Evaluator(model, data, metric="logit_diff", ablation="corrupted", batch_size=args.batch_size, progress=True)
    result["batch_size"] = {"requested": args.batch_size, "used": ev.batch_size, "circuits_per_pass": ev.circuits_per_pass}
    result["metric"] = {"name": "logit_diff", "ablation": "corrupted (MIB: patching)",
                        "clean": float(ev.clean_values.mean()), "ablated": float(ev.base_values.mean())}

    with Stage("attribution", device, stages):
        scores = discover(ev, "eap-ig", steps=args.steps, ig_points="left", progress=True)
    result["attribution"] = {"method": "eap-ig", "steps": args.steps, "ig_points": "left",
                             "n_backward": scores.meta.get("n_backward"), "seconds_reported": round(scores.meta["seconds"], 3)}
    scores, ties = float32_exact(scores)
    result["scores"] = {"rounded_to": "float32", "n_edges": G.n_edges, "ties": ties,
                        "min": float(scores.scores[G.legal].min()), "max": float(scores.scores[G.legal].max())}

    with Stage("curve", device, stages):
        pair = faithfulness_curve(ev, scores, rules="mib")
    curve = pair.to_dict()
    result["curve"] = curve
    result["cpr"], result["cmd"] = pair.cpr, pair.cmd
    log(f"CPR {pair.cpr}, CMD {pair.cmd}")

    if reference is not None:
        python, mib, eap_ig = reference
        scratch = Path(tempfile.mkdtemp(prefix="bench-mib-scale-", dir=args.scratch))
        log(f"reference: saving the weights to {scratch}")
        t = time.perf_counter()
        model.hf.save_pretrained(scratch / "weights", safe_serialization=True)
        names, vals = zip(*scores.as_dict().items())
        torch.save({"names": list(names), "values": torch.tensor(vals, dtype=torch.float64)}, scratch / "scores.pt")
        torch.save({"clean": data.clean, "corrupted": data.corrupted, "lengths": data.lengths,
                    "answer": data.answers[:, 0], "wrong": data.wrongs[:, 0]}, scratch / "batch.pt")
        (scratch / "case.json").write_text(json.dumps({"shape": shape, "dtype": args.dtype, "device": str(device),
                                                       "batch_size": ev.batch_size}))
        save_s = time.perf_counter() - t
        del ev, model, scores, pair  # the worker needs the device to itself
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            mib_res = run_reference(scratch, python, mib, eap_ig, args.reference_timeout)
        finally:
            if not args.keep_scratch:
                import shutil

                shutil.rmtree(scratch, ignore_errors=True)
        mib_res["seconds"]["save_weights"] = round(save_s, 3)
        ours = {"signed": curve["signed"], "absolute": curve["absolute"], "cpr": curve["cpr"], "cmd": curve["cmd"],
                "clean": result["metric"]["clean"], "ablated": result["metric"]["ablated"], "n_edges_total": curve["n_edges_total"]}
        result["reference"] = {"python": python, "mib": str(mib), **{k: v for k, v in mib_res.items() if k not in ("signed", "absolute")},
                               "mib_runs": {k: mib_res[k] for k in MIB_RANKINGS}, "comparison": compare(ours, mib_res, args.dtype)}
    else:
        result["reference"] = None
    return result


def _f(v, fmt=".4f") -> str:
    return "—" if v is None else format(v, fmt)


def markdown(r: dict) -> str:
    m, s, st = r["machine"], r["shape"], r["stages"]
    where = m.get("gpu", f"CPU ({m['cpu']}, {m['cpu_count']} cores)")
    title = "Llama-3.1-8B shape" if r["full_llama_31_8b_shape"] else "Llama-3.1-8B-style shape (reduced sizes: a smoke run)"
    lines = [f"# MIB's scale: EAP-IG and the MIB faithfulness curve, random {title}, {r['dtype']} on {r['device']}", "",
             f"`{r['command']}`", "",
             f"{r['date']} on {m['host']}: {where}; torch {r['versions']['torch']}, transformers "
             f"{r['versions']['transformers']}, circuitgraph {r['versions']['circuitgraph']} ({r['versions']['git_commit']}).", "",
             f"Model: {s['num_hidden_layers']} layers, {s['num_attention_heads']} heads ({s['num_key_value_heads']} KV), "
             f"d_model {s['hidden_size']}, d_mlp {s['intermediate_size']}, head_dim {s['head_dim']}, vocabulary {s['vocab_size']}, "
             f"rope_theta {s['rope_theta']:g} ({s['rope_scaling']['rope_type']} scaling); {r['model']['n_params'] / 1e9:.3f}B parameters, "
             f"{r['model']['weights_gib']:.2f} GiB of weights; graph {r['model']['n_sources']:,} sources, "
             f"{r['model']['n_edges']:,} edges.", "",
             f"Data: {r['n_examples']} examples from {r['dataset']['source']}, labels '{r['dataset']['labels']}', prompt lengths "
             f"{r['dataset']['lengths']}, no BOS; batch {r['batch_size']['used']} (asked {r['batch_size']['requested']}), "
             f"{r['batch_size']['circuits_per_pass']} circuits per patched pass. Metric logit_diff, ablation corrupted; clean "
             f"{r['metric']['clean']:.4f}, ablated {r['metric']['ablated']:.4f}.", "",
             f"Attribution: EAP-IG (inputs), {r['attribution']['steps']} steps, ig_points 'left' (the EAP-IG repository's); "
             f"{r['attribution']['n_backward']} backward passes. Scores rounded to float32; ties: signed "
             f"{r['scores']['ties']['signed']}, absolute {r['scores']['ties']['absolute']}.", "",
             "| stage | seconds | peak GiB | peak above stage start GiB |", "|---|---|---|---|"]
    for name, x in st.items():
        extra = f" (init {x['init_s']:.1f} s, CircuitModel {x['circuit_model_s']:.1f} s)" if name == "load" else ""
        lines.append(f"| {name}{extra} | {x['seconds']:.2f} | {x['peak_gib']:.2f} | {x['peak_above_start_gib']:.2f} |")
    kind = next(iter(st.values()))["memory"]
    lines += ["", f"Memory: {kind}, reset at each stage's start.", "",
              f"**CPR {_f(r['cpr'])}, CMD {_f(r['cmd'])}** (MIB's rules: 10 fractions, top-n pruned; CPR from the signed "
              "ranking, CMD from |score|)." + (f" Undefined: {r['curve']['undefined_reason']}" if r["curve"].get("undefined_reason") else ""),
              "", "| fraction | requested | signed: counted | evaluated | faithfulness | abs: counted | evaluated | faithfulness |",
              "|---|---|---|---|---|---|---|---|"]
    for ps, pa in zip(r["curve"]["signed"]["points"], r["curve"]["absolute"]["points"]):
        lines.append(f"| {ps['fraction']:g} | {ps['edges_requested']} | {ps['edges_counted']} | {ps['edges_evaluated']} | "
                     f"{_f(ps['faithfulness'])} | {pa['edges_counted']} | {pa['edges_evaluated']} | {_f(pa['faithfulness'])} |")
    ref = r["reference"]
    if ref is None:
        lines += ["", "MIB reference: not run (`--reference-python PY --mib-circuit-track DIR`)."]
    else:
        c = ref["comparison"]
        origin = KNOWN_GRAPH_PY.get(ref["eap_ig_blobs"]["graph.py"], "unknown graph.py")
        lines += ["", f"## MIB's evaluate_area_under_curve on the same weights and scores", "",
                  f"Reference: torch {ref['torch']}, transformer-lens {ref['transformer_lens']}, EAP-IG from `{ref['eap_ig']}` "
                  f"({origin}). Worker seconds: {ref['seconds']}; each curve (seconds, peak GiB): "
                  + ", ".join(f"{k} {ref['mib_runs'][k]['seconds']:.1f} s, {_f(ref['mib_runs'][k]['peak_gib'], '.2f')}"
                              for k in MIB_RANKINGS) + ".", ""]
        if "checks" in c:
            lines += [f"All checks pass: **{c['all_pass']}** — " + ", ".join(f"{k}: {v}" for k, v in c["checks"].items()), ""]
        lines += ["| | circuitgraph | MIB | diff |", "|---|---|---|---|"]
        for label, key in (("CPR", "cpr"), ("CMD", "cmd"), ("clean logit diff", "clean"), ("ablated logit diff", "ablated")):
            o, mm = c[key]["ours"], c[key]["mib"]
            lines.append(f"| {label} | {_f(o, '.6f')} | {_f(mm, '.6f')} | {_f(None if o is None else o - mm, '.1e')} |")
        for k, row in c["rankings"].items():
            lines += ["", f"{k} ranking: max |faithfulness diff| {_f(row['max_abs_diff'], '.2e')}; counted equal "
                      f"{row['counted_equal']}, evaluated equal {row['evaluated_equal']}", "",
                      "| fraction | counted ours | counted MIB | evaluated ours | evaluated MIB | faithfulness ours | MIB | diff |",
                      "|---|---|---|---|---|---|---|---|"]
            for p in row["points"]:
                lines.append(f"| {p['fraction']:g} | {p['edges_counted_ours']} | {p['edges_counted_mib']} | {p['edges_evaluated_ours']} | "
                             f"{p['edges_evaluated_mib']} | {_f(p['faithfulness_ours'], '.6f')} | {p['faithfulness_mib']:.6f} | "
                             f"{_f(p['diff'], '.1e')} |")
        if r["dtype"] not in ("float32", "float64"):
            lines += ["", f"In {r['dtype']} the two forwards round differently (and MIB takes the logit difference on "
                      f"{r['dtype']} logits, circuitgraph in fp32), so the differences are rounding, not a bound."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-examples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32, help="examples per batch (the evaluator may lower it to fit memory)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--layers", type=int, default=None, help="default 32 (Llama-3.1-8B)")
    ap.add_argument("--heads", type=int, default=None, help="default 32")
    ap.add_argument("--kv-heads", type=int, default=None, help="default 8")
    ap.add_argument("--d-model", type=int, default=None, help="default 4096")
    ap.add_argument("--d-mlp", type=int, default=None, help="default 14336")
    ap.add_argument("--head-dim", type=int, default=None, help="default d_model / heads (128)")
    ap.add_argument("--vocab", type=int, default=None, help="default 128256")
    ap.add_argument("--steps", type=int, default=5, help="EAP-IG steps (MIB: 5)")
    ap.add_argument("--labels", choices=["top", "ioi"], default="top",
                    help="answer / wrong token: the clean / corrupted run's top token (default) or the IOI names")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-exactness-check", action="store_true", help="skip the engine-vs-HF guard")
    ap.add_argument("--reference-python", help="python of the environment with transformer-lens and EAP-IG: runs MIB's curve too")
    ap.add_argument("--mib-circuit-track", help="MIB circuit-track source (default: MIB_CIRCUIT_TRACK or /tmp/MIB-circuit-track)")
    ap.add_argument("--eap-ig", default="mib", help="'mib' (the copy MIB ships), 'installed', or a folder holding eap/")
    ap.add_argument("--reference-timeout", type=float, help="seconds for the MIB worker (default: no limit)")
    ap.add_argument("--scratch", help="folder for the saved weights (default: the system's temporary folder)")
    ap.add_argument("--keep-scratch", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out-name", default=DEFAULT_NAME, help=f"results file stem under benchmarks/results (default {DEFAULT_NAME})")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = _mib_worker(args.folder, Path(args.mib_circuit_track), args.eap_ig)
        (args.folder / "mib.json").write_text(json.dumps(res))
        return
    result = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / args.out_name
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
