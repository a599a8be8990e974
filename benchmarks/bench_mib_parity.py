"""circuitgraph's faithfulness curves against MIB's own ``evaluate_area_under_curve``, point by point.

One random-init GPT-2-small-shaped model (seeded) and one batch of random clean/corrupted token
pairs of one length are written to a scratch folder (``bench_peers._make_case``); the answer and
the wrong token of each pair are then the clean and the corrupted run's top tokens at the last
position, so that the clean and ablated logit differences are far apart (a random label pair
would leave faithfulness dividing by noise).  One set of edge scores is handed to both sides:

* circuitgraph (this environment): ``faithfulness_curve(Evaluator(model, data, metric="logit_diff",
  ablation="corrupted"), scores)`` on the HF model;
* MIB (the peers' environment, ``bench_peers``' recipe): ``MIB_circuit_track/evaluation.py::
  evaluate_area_under_curve(model, graph, dataloader, metric, absolute=False)`` and
  ``absolute=True`` on the same weights as a TransformerLens ``HookedTransformer``, with the
  EAP-IG graph's scores set to MINUS ours (MIB's scores attribute the loss, ours the metric).
  A third MIB run keeps our sign (``absolute=False``): the wrong end of the ranking, which
  circuitgraph reproduces on the negated scores.

Compared: faithfulness at every fraction (ratio of means on both sides), the edge count MIB records
(``weighted_edge_count`` after ``apply_topn(..., prune=True)``) against our ``n_edges_counted``,
the edges of the circuit actually evaluated (``evaluate_graph`` prunes again) against our
``n_edges``, CPR (MIB's ``area_under`` of the ``absolute=False`` run against our ``cpr``) and CMD
(MIB's ``area_from_1`` of the ``absolute=True`` run against our ``cmd``).

Settings that have to match (and do, in this script):

* intervention: MIB's ``'patching'`` (the corrupted run's activations) is our ``ablation="corrupted"``;
* metric: MIB's ``metrics.get_metric("logit_diff", task)`` with ``mean=False, loss=False`` (what its
  ``run_evaluation.py`` passes), i.e. per example logit[answer] - logit[wrong] at the last position;
  ours is ``metric="logit_diff"`` with one answer and one wrong token.  Both sides average per-example
  values before dividing: faithfulness = (mean circuit - mean ablated) / (mean clean - mean ablated);
* BOS: none.  MIB's ``tokenize_plus`` prepends one to strings; our prompts are token ids (the model has
  no tokenizer), so ``eap.evaluate.tokenize_plus`` is replaced by one that passes the ids through with
  an all-ones attention mask, and ``TaskData(prepend_bos=False)`` on our side;
* weights: the HookedTransformer is built unprocessed (``bench_peers._hooked_transformer``:
  ``fold_ln``, ``center_writing_weights``, ``center_unembed``, ``fold_value_biases`` and
  ``refactor_factored_attn_matrices`` off; ``use_attn_result``, ``use_split_qkv_input``,
  ``use_hook_mlp_in`` on, as MIB's ``load_model`` sets them).  MIB's ``from_pretrained`` would fold and
  centre, which leaves patching's logit differences unchanged up to rounding;
* dtype: float32 on both sides (``--dtype float64`` for both);
* scores: float32-exact values (EAP-IG's score matrix is float32), with distinct magnitudes for
  ``--scores random`` (no ties in either ranking, the sharpest test).  ``--scores eap`` uses our EAP
  scores rounded to float32 and reports how many tie;
* EAP-IG: the copy MIB ships (``MIB_CIRCUIT_TRACK/EAP-IG/src``; cisnlp/MIB-circuit-track c18eb53 keeps it
  as a plain folder, its ``.gitmodules`` pins no commit), whose ``graph.py``, ``evaluate.py`` and ``utils.py``
  are hannamw/EAP-IG 7af394a's (same git blobs; only ``attribute.py`` differs).  Its ``prune`` stops as
  soon as the nodes it computes equal the nodes already set, and ``apply_topn`` sets them from the
  unpruned edges first, so the count MIB records comes after one pruning pass.  hannamw/EAP-IG 795f560
  (bench_peers' recipe) prunes to the fixed point inside ``apply_topn`` too, so there the recorded count
  is the evaluated circuit's: ``--also-eap-ig installed`` shows those counts beside ours (no evaluation).

Result (``benchmarks/results/bench_mib_parity.md``): every point, count and area agrees; the faithfulness
differences are float32 rounding (about 1e-7; 2e-16 with ``--dtype float64`` on the tiny shape).  MIB's
evaluation is the slow side (TransformerLens with split q/k/v inputs and per-head results: about 13 min
per curve on 2 busy cores at the GPT-2 small shape; the tiny shape takes about a minute in all).

Recipe: the peers' environment of ``bench_peers.py`` (only ``torch``, ``transformer-lens``, ``datasets<4``,
``pyarrow<18``, ``matplotlib`` and EAP-IG are needed) and a copy of cisnlp/MIB-circuit-track with its
EAP-IG folder, e.g. ``git clone --recursive https://github.com/cisnlp/MIB-circuit-track /tmp/MIB-circuit-track``
(``--mib`` or ``MIB_CIRCUIT_TRACK``; imported by path, never installed)::

    python benchmarks/bench_mib_parity.py --also-eap-ig installed   # GPT-2 small shape, B16 x S16
    python benchmarks/bench_mib_parity.py --shape tiny              # smoke test

Writes ``benchmarks/results/bench_mib_parity.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_peers import RESULTS, SHAPES, _hooked_transformer, _make_case, _peers_python  # noqa: E402

DEFAULT_MIB = "/tmp/MIB-circuit-track"
FAITH_TOL, AREA_TOL = 1e-4, 1e-3
EAP_FILES = ("graph.py", "evaluate.py", "utils.py")
MIB_FILES = ("MIB_circuit_track/evaluation.py", "MIB_circuit_track/metrics.py")
KNOWN_GRAPH_PY = {  # git blob of eap/graph.py -> where that copy comes from
    "b1e27af9a83605f2d7e60a9c9b22f183d92705fa": "hannamw/EAP-IG 7af394a, the copy cisnlp/MIB-circuit-track c18eb53 ships",
    "2e5c079f3fc34b13a900c9e6c78c509868e386c1": "hannamw/EAP-IG 795f560 (prune runs to the fixed point)",
}


def mib_path(arg: str | None = None) -> Path | None:
    """The MIB circuit-track source: ``--mib``, ``$MIB_CIRCUIT_TRACK`` or /tmp/MIB-circuit-track."""
    for cand in (arg, os.environ.get("MIB_CIRCUIT_TRACK"), DEFAULT_MIB):
        if cand and (Path(cand) / "MIB_circuit_track" / "evaluation.py").exists():
            return Path(cand)
    return None


def git_blob(path: Path) -> str:
    """``git hash-object`` of a file: which commit's copy it is can be looked up in the repository."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ----- the case and the scores (this environment) ------------------------------------------------
def make_case(folder: Path, shape: str, batch: int, seq: int, seed: int = 0) -> dict:
    """``bench_peers._make_case``'s model and token pairs; answer / wrong = the clean / corrupted run's
    top token at the last position (the corrupted run's second one where both agree)."""
    import torch
    from transformers import GPT2LMHeadModel

    _make_case(folder, shape, batch, seq, seed)
    case = torch.load(folder / "batch.pt")
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        clean = hf(case["clean"]).logits[:, -1]
        corrupted = hf(case["corrupted"]).logits[:, -1]
    answer = clean.argmax(-1)
    top2 = corrupted.topk(2, -1).indices
    wrong = torch.where(top2[:, 0] == answer, top2[:, 1], top2[:, 0])
    case["answer"], case["wrong"] = answer, wrong
    torch.save(case, folder / "batch.pt")
    return case


def _circuit_model(folder: Path, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    from circuitgraph.model.loading import CircuitModel

    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=getattr(torch, dtype))
    for p in hf.parameters():
        p.requires_grad_(False)
    return CircuitModel(hf, None, name="random-gpt2")


def _evaluator(folder: Path, dtype: str):
    import torch

    from circuitgraph.data.dataset import TaskData
    from circuitgraph.evaluate.evaluator import Evaluator

    case = torch.load(folder / "batch.pt")
    N, P = case["clean"].shape
    data = TaskData(case["clean"], case["corrupted"], torch.full((N,), P), case["answer"][:, None],
                    case["wrong"][:, None], {}, prepend_bos=False)
    return Evaluator(_circuit_model(folder, dtype), data, metric="logit_diff", ablation="corrupted", batch_size=N,
                     progress=False)


def make_scores(folder: Path, kind: str = "random", seed: int = 0, dtype: str = "float32") -> dict:
    """Edge scores in our sign (``scores[source, destination]``), float32-exact, saved for both sides.
    ``random``: a random permutation of the magnitudes 1..n (over 1024) with random signs, so neither
    ranking has a tie; ``eap``: our EAP scores rounded to float32."""
    import torch

    from circuitgraph.discovery.edge_scores import EdgeScores

    if kind == "random":
        from circuitgraph.graph.computational_graph import Graph
        from transformers import GPT2Config

        graph = Graph.from_hf_config(GPT2Config.from_pretrained(folder))
        g = torch.Generator().manual_seed(seed + 1)
        n = graph.n_edges
        mags = (torch.randperm(n, generator=g) + 1).double() / 1024
        signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
        values = torch.full(graph.legal.shape, float("nan"), dtype=torch.float64)
        values[graph.legal] = mags * signs
        scores = EdgeScores(graph, values, "random")
    elif kind == "eap":
        from circuitgraph.discovery import attribute

        scores = attribute(_evaluator(folder, dtype), "eap", progress=False)
        scores = EdgeScores(scores.graph, scores.scores.float().double(), "eap")
    else:
        raise ValueError(f"unknown scores {kind!r}")
    legal = scores.scores[scores.graph.legal]
    ties = {"signed": len(legal) - len(torch.unique(legal)), "absolute": len(legal) - len(torch.unique(legal.abs()))}
    names, vals = zip(*scores.as_dict().items())
    torch.save({"names": list(names), "values": torch.tensor(vals, dtype=torch.float64), "method": scores.method},
               folder / "scores.pt")
    return {"kind": kind, "n_edges": len(names), "ties": ties}


def load_scores(folder: Path):
    import torch

    from circuitgraph.discovery.edge_scores import EdgeScores
    from circuitgraph.graph.computational_graph import Graph
    from transformers import GPT2Config

    saved = torch.load(folder / "scores.pt")
    graph = Graph.from_hf_config(GPT2Config.from_pretrained(folder))
    values = torch.full(graph.legal.shape, float("nan"), dtype=torch.float64)
    idx = torch.tensor([graph.edge_index[e] for e in saved["names"]])
    values[idx[:, 0], idx[:, 1]] = saved["values"]
    return EdgeScores(graph, values, saved["method"])


def run_ours(folder: Path, dtype: str = "float32") -> dict:
    """Our curves: both rankings of the scores, and the signed ranking of the negated scores."""
    from circuitgraph.discovery.curves import faithfulness_curve
    from circuitgraph.discovery.edge_scores import EdgeScores

    scores = load_scores(folder)
    ev = _evaluator(folder, dtype)
    t = time.perf_counter()
    pair = faithfulness_curve(ev, scores)
    negated = faithfulness_curve(ev, EdgeScores(scores.graph, -scores.scores, scores.method + " negated"))
    seconds = time.perf_counter() - t
    return {"seconds": round(seconds, 2), "clean": float(ev.clean_values.mean()), "ablated": float(ev.base_values.mean()),
            "n_edges_total": pair.meta["n_edges_total"], "cpr": pair.cpr, "cmd": pair.cmd,
            "signed": pair.signed.to_dict(), "absolute": pair.absolute.to_dict(), "negated_signed": negated.signed.to_dict()}


# ----- MIB (the peers' environment) --------------------------------------------------------------
RANKINGS_MIB = {"signed": (-1.0, False), "absolute": (-1.0, True), "unflipped_signed": (1.0, False)}  # (sign, absolute)


def _mib_worker(folder: Path, mib: Path, eap_ig: str, dtype: str, counts_only: bool = False) -> dict:
    """In the peers' environment: MIB's ``evaluate_area_under_curve`` for each ranking (``RANKINGS_MIB``),
    each one added to ``mib.partial.json`` as it finishes.  ``counts_only``: no model, only the edge counts its loop
    records (``apply_topn(int(pct * n), absolute, prune=True)`` then ``weighted_edge_count``) and those
    ``evaluate_graph``'s ``prune`` leaves."""
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

    eap_dir = Path(eap.__file__).parent
    out = {"torch": torch.__version__, "transformer_lens": __import__("importlib.metadata").metadata.version("transformer-lens"),
           "eap_ig": str(eap_dir), "eap_ig_blobs": {f: git_blob(eap_dir / f) for f in EAP_FILES},
           "mib_blobs": {f: git_blob(mib / f) for f in MIB_FILES}}
    saved = torch.load(folder / "scores.pt")
    tl = _hooked_transformer(folder)

    def scored_graph(sign: float) -> Graph:
        graph = Graph.from_model(tl)
        missing = set(saved["names"]) ^ set(graph.edges)
        assert not missing, f"edge names differ: {sorted(missing)[:5]}"
        for name, v in zip(saved["names"], saved["values"].tolist()):
            graph.edges[name].score = sign * v
        return graph

    if counts_only:
        fractions = evaluate_area_under_curve_fractions(E)
        for key, (sign, absolute) in RANKINGS_MIB.items():
            graph = scored_graph(sign)
            counted, evaluated = [], []
            for pct in fractions:
                graph.apply_topn(int(pct * len(graph.edges)), absolute, prune=True)
                counted.append(graph.weighted_edge_count())
                graph.prune()
                evaluated.append(int(graph.count_included_edges()))
            out[key] = {"weighted_edge_counts": counted, "edges_evaluated": evaluated, "n_scored_items": len(graph.edges)}
        return out

    def tokenize_plus(model, tokens, max_length=None):  # it tokenizes strings (with BOS); ours are token ids
        return tokens, torch.ones_like(tokens), torch.full((len(tokens),), tokens.shape[1]), tokens.shape[1]

    EV.tokenize_plus = tokenize_plus
    case = torch.load(folder / "batch.pt")
    if dtype != "float32":
        tl.to(getattr(torch, dtype))
        tl.cfg.dtype = getattr(torch, dtype)
    loader = [(case["clean"], case["corrupted"], torch.stack([case["answer"], case["wrong"]], 1))]
    metric = partial(get_metric("logit_diff", "ioi"), mean=False, loss=False)  # as run_evaluation.py passes it

    calls: list[dict] = []
    original = EV.evaluate_graph

    def recorded(model, graph, *a, **k):  # the circuit evaluate_graph actually ran (it prunes in place)
        res = original(model, graph, *a, **k)
        calls.append({"edges_evaluated": int(graph.count_included_edges()), "metric": float(res.mean())})
        return res

    E.evaluate_graph = recorded
    out["clean"] = float(EV.evaluate_baseline(tl, loader, metric, quiet=True).mean())
    for key, (sign, absolute) in RANKINGS_MIB.items():
        graph = scored_graph(sign)
        calls.clear()
        t = time.perf_counter()
        counts, area_under, area_from_1, average, faith = E.evaluate_area_under_curve(
            tl, graph, loader, metric, quiet=True, absolute=absolute, intervention="patching")
        out[key] = {"seconds": round(time.perf_counter() - t, 2), "weighted_edge_counts": counts, "area_under": area_under,
                    "area_from_1": area_from_1, "average": average, "faithfulness": faith, "ablated": calls[0]["metric"],
                    "edges_evaluated": [c["edges_evaluated"] for c in calls[1:]], "n_scored_items": len(graph.edges)}
        (folder / "mib.partial.json").write_text(json.dumps(out))
    return out


def evaluate_area_under_curve_fractions(E) -> tuple:
    """The ``percentages`` default of MIB's ``evaluate_area_under_curve``."""
    import inspect

    return inspect.signature(E.evaluate_area_under_curve).parameters["percentages"].default


def run_mib(folder: Path, python: str, mib: Path, eap_ig: str = "mib", dtype: str = "float32", threads: int = 2,
            timeout: float | None = None, counts_only: bool = False) -> dict:
    """MIB's curves in the peers' environment (a separate process); ``eap_ig``: ``mib`` (the copy MIB
    ships), ``installed`` (the peers' environment's) or a folder holding the ``eap`` package."""
    src = str(mib / "EAP-IG" / "src") if eap_ig == "mib" else eap_ig
    if src != "installed" and not (Path(src) / "eap" / "graph.py").exists():
        raise FileNotFoundError(f"no EAP-IG package under {src} (eap/graph.py)")
    cmd = [python, __file__, "--worker", "--folder", str(folder), "--mib", str(mib), "--eap-ig", src, "--dtype", dtype,
           "--threads", str(threads)] + (["--counts-only"] if counts_only else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ""})
    if p.returncode != 0:
        raise RuntimeError("MIB worker failed:\n" + p.stderr[-3000:])
    return json.loads((folder / "mib.json").read_text())


# ----- comparison --------------------------------------------------------------------------------
def compare(ours: dict, mib: dict) -> dict:
    """Point by point: ours[signed] vs MIB abs=False, ours[absolute] vs MIB abs=True, ours on the negated
    scores vs MIB with our sign; CPR and CMD as MIB reports them."""
    import numpy as np

    rows = {}
    for label, o, m in (("signed", ours["signed"], mib["signed"]), ("absolute", ours["absolute"], mib["absolute"]),
                        ("unflipped", ours["negated_signed"], mib["unflipped_signed"])):
        pts = o["points"]
        fo = np.array([p["faithfulness"] for p in pts], dtype=float)
        fm = np.array(m["faithfulness"], dtype=float)
        rows[label] = {
            "points": [{"fraction": p["fraction"], "edges_requested": p["edges_requested"],
                        "edges_counted_ours": p["edges_counted"], "edges_counted_mib": c,
                        "edges_evaluated_ours": p["edges_evaluated"], "edges_evaluated_mib": e,
                        "faithfulness_ours": p["faithfulness"], "faithfulness_mib": f, "abs_diff": abs(p["faithfulness"] - f)}
                       for p, c, e, f in zip(pts, m["weighted_edge_counts"], m["edges_evaluated"], m["faithfulness"])],
            "max_abs_diff": float(np.abs(fo - fm).max()),
            "counted_equal": [p["edges_counted"] for p in pts] == [int(c) for c in m["weighted_edge_counts"]],
            "evaluated_equal": [p["edges_evaluated"] for p in pts] == m["edges_evaluated"],
            "area_under": {"ours": o["area_under"], "mib": m["area_under"]},
            "area_from_1": {"ours": o["area_from_1"], "mib": m["area_from_1"]},
        }
    signed_vs_unflipped = float(np.abs(np.array([p["faithfulness"] for p in ours["signed"]["points"]])
                                       - np.array(mib["unflipped_signed"]["faithfulness"])).max())
    cpr = {"ours": ours["cpr"], "mib": mib["signed"]["area_under"]}
    cmd = {"ours": ours["cmd"], "mib": mib["absolute"]["area_from_1"]}
    checks = {
        "faithfulness_within_1e-4": all(rows[k]["max_abs_diff"] <= FAITH_TOL for k in rows),
        "edges_counted_exact": all(rows[k]["counted_equal"] for k in rows),
        "edges_evaluated_exact": all(rows[k]["evaluated_equal"] for k in rows),
        "n_edges_total_equal": ours["n_edges_total"] == mib["signed"]["n_scored_items"],
        "cpr_within_1e-3": abs(cpr["ours"] - cpr["mib"]) <= AREA_TOL,
        "cmd_within_1e-3": abs(cmd["ours"] - cmd["mib"]) <= AREA_TOL,
    }
    return {"rankings": rows, "cpr": cpr, "cmd": cmd, "checks": checks, "all_pass": all(checks.values()),
            "clean": {"ours": ours["clean"], "mib": mib["clean"]},
            "ablated": {"ours": ours["ablated"], "mib": mib["signed"]["ablated"]},
            "max_abs_diff_signed_vs_mib_unflipped": signed_vs_unflipped}


def compare_counts(ours: dict, mib: dict) -> dict:
    """Edge counts only: what MIB records and what it evaluates, against ours, per ranking."""
    out = {}
    for label, o, m in (("signed", ours["signed"], mib["signed"]), ("absolute", ours["absolute"], mib["absolute"]),
                        ("unflipped", ours["negated_signed"], mib["unflipped_signed"])):
        pts = o["points"]
        out[label] = {"counted_ours": [p["edges_counted"] for p in pts], "counted_mib": [int(c) for c in m["weighted_edge_counts"]],
                      "evaluated_ours": [p["edges_evaluated"] for p in pts], "evaluated_mib": m["edges_evaluated"]}
        out[label]["counted_equal"] = out[label]["counted_ours"] == out[label]["counted_mib"]
        out[label]["evaluated_equal"] = out[label]["evaluated_ours"] == out[label]["evaluated_mib"]
    return out


# ----- driver ------------------------------------------------------------------------------------
def run(shape: str = "gpt2-small", batch: int = 16, seq: int = 16, seed: int = 0, scores: str = "random",
        dtype: str = "float32", threads: int = 2, peers_python: str | None = None, mib: str | None = None,
        eap_ig: str = "mib", extra_eap_ig: tuple[str, ...] = (), timeout: float | None = None) -> dict:
    """The whole comparison in a scratch folder; raises where the peers' environment or MIB is missing."""
    import torch

    python, mib_dir = _peers_python(peers_python), mib_path(mib)
    if python is None:
        raise FileNotFoundError("no peers environment (PEERS_PYTHON or benchmarks/.peers-venv; see bench_peers.py)")
    if mib_dir is None:
        raise FileNotFoundError(f"no MIB circuit-track source (--mib, MIB_CIRCUIT_TRACK or {DEFAULT_MIB})")
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_case(folder, shape, batch, seq, seed)
        score_info = make_scores(folder, scores, seed, dtype)
        ours = run_ours(folder, dtype)
        t = time.perf_counter()
        mib_res = run_mib(folder, python, mib_dir, eap_ig, dtype, threads, timeout)
        mib_seconds = round(time.perf_counter() - t, 2)
        variants = {}
        for other in extra_eap_ig:  # the edge counts another EAP-IG's apply_topn / prune give (no evaluation)
            r = run_mib(folder, python, mib_dir, other, dtype, threads, timeout, counts_only=True)
            variants[other] = {"eap_ig": r["eap_ig"], "eap_ig_blobs": r["eap_ig_blobs"], **compare_counts(ours, r)}
    import circuitgraph

    return {"command": _command() if sys.argv[0].endswith("bench_mib_parity.py") else None,
            "shape": shape, "batch": batch, "seq": seq, "seed": seed, "dtype": dtype, "threads": threads,
            "scores": score_info, "metric": "logit_diff", "ablation": "corrupted (MIB: patching)", "prepend_bos": False,
            "versions": {"circuitgraph": getattr(circuitgraph, "__version__", "?"), "torch_ours": torch.__version__,
                         "torch_peers": mib_res["torch"], "transformer_lens": mib_res["transformer_lens"],
                         "eap_ig": mib_res["eap_ig"], "eap_ig_blobs": mib_res["eap_ig_blobs"],
                         "mib_blobs": mib_res["mib_blobs"]},
            "seconds": {"ours": ours["seconds"], "mib_process": mib_seconds,
                        **{f"mib_{k}": mib_res[k]["seconds"] for k in ("signed", "absolute", "unflipped_signed")}},
            "ours": ours, "mib": {k: v for k, v in mib_res.items() if k not in ("torch", "transformer_lens")},
            "comparison": compare(ours, mib_res), "eap_ig_variants": variants}


def _command() -> str:
    """This invocation, without ``--out`` (where the results go does not change them)."""
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip or a == "--out" or a.startswith("--out="):
            skip = a == "--out"
            continue
        args.append(a)
    return " ".join(["python benchmarks/bench_mib_parity.py", *args])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    c = result["comparison"]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(9.5, 6.0), sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    cpr, cmd = c["cpr"], c["cmd"]
    styles = {  # ranking: colour, marker, our line's label, MIB's markers' label
        "signed": ("C0", "o", f"circuitgraph signed ranking (CPR {cpr['ours']:.4f})",
                   f"MIB absolute=False, scores = -ours (CPR {cpr['mib']:.4f})"),
        "absolute": ("C1", "s", f"circuitgraph |score| ranking (CMD {cmd['ours']:.4f})",
                     f"MIB absolute=True (CMD {cmd['mib']:.4f})"),
        "unflipped": ("C2", "^", "circuitgraph signed ranking of -scores",
                      "MIB absolute=False, scores = ours (the wrong end)")}
    for k, (color, marker, ours_label, mib_label) in styles.items():
        pts = c["rankings"][k]["points"]
        x = np.array([p["fraction"] for p in pts]) * 100
        ax.plot(x, [p["faithfulness_ours"] for p in pts], color=color, lw=1.5, ls="-" if k != "unflipped" else "--",
                label=ours_label)
        ax.plot(x, [p["faithfulness_mib"] for p in pts], color=color, marker=marker, ls="none", ms=8, mfc="none", mew=1.5,
                label=mib_label)
        bx.plot(x, np.maximum([p["abs_diff"] for p in pts], 1e-10), color=color, marker=marker, mfc="none", lw=0.8)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_ylabel("faithfulness")
    bx.axhline(FAITH_TOL, color="red", lw=0.8, ls=":", label=f"tolerance {FAITH_TOL:g}")
    bx.set_yscale("log")
    bx.set_ylim(5e-11, 1e-3)
    bx.set_ylabel("|circuitgraph - MIB|\n(1e-10: equal)", fontsize=8)
    bx.set_xlabel("edges requested (% of the model's)")
    bx.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    worst = max(c["rankings"][k]["max_abs_diff"] for k in c["rankings"])
    ax.set_title(f"random {result['shape']}, B{result['batch']} x S{result['seq']}, {result['dtype']}, "
                 f"{result['scores']['kind']} scores: max |diff| {worst:.1e}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="lines: circuitgraph, markers: MIB",
              title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def markdown(r: dict) -> str:
    c = r["comparison"]
    lines = [f"# circuitgraph faithfulness curves vs MIB's evaluate_area_under_curve: random {r['shape']}, "
             f"B{r['batch']} x S{r['seq']}, {r['dtype']}, {r['scores']['kind']} scores", ""]
    if r["command"]:
        lines += [f"`{r['command']}`", ""]
    lines += [f"All checks pass: **{c['all_pass']}** — " + ", ".join(f"{k}: {v}" for k, v in c["checks"].items()), "",
              "| | circuitgraph | MIB | abs diff |", "|---|---|---|---|",
              f"| CPR (signed ranking, area_under) | {c['cpr']['ours']:.6f} | {c['cpr']['mib']:.6f} | "
              f"{abs(c['cpr']['ours'] - c['cpr']['mib']):.1e} |",
              f"| CMD (abs ranking, area_from_1) | {c['cmd']['ours']:.6f} | {c['cmd']['mib']:.6f} | "
              f"{abs(c['cmd']['ours'] - c['cmd']['mib']):.1e} |",
              f"| clean logit diff (mean) | {c['clean']['ours']:.6f} | {c['clean']['mib']:.6f} | "
              f"{abs(c['clean']['ours'] - c['clean']['mib']):.1e} |",
              f"| ablated logit diff (mean) | {c['ablated']['ours']:.6f} | {c['ablated']['mib']:.6f} | "
              f"{abs(c['ablated']['ours'] - c['ablated']['mib']):.1e} |", ""]
    titles = {"signed": "signed ranking: ours vs MIB absolute=False (MIB scores = minus ours)",
              "absolute": "|score| ranking: ours vs MIB absolute=True",
              "unflipped": "MIB absolute=False given OUR sign (the wrong end) vs ours on the negated scores"}
    for k, row in c["rankings"].items():
        lines += [f"## {titles[k]}", "", f"max |faithfulness diff| {row['max_abs_diff']:.2e}; counted edges equal: "
                  f"{row['counted_equal']}; evaluated edges equal: {row['evaluated_equal']}; area_under ours "
                  f"{row['area_under']['ours']:.6f} / MIB {row['area_under']['mib']:.6f}; area_from_1 ours "
                  f"{row['area_from_1']['ours']:.6f} / MIB {row['area_from_1']['mib']:.6f}", "",
                  "| fraction | requested | counted ours | counted MIB | evaluated ours | evaluated MIB | faithfulness ours "
                  "| faithfulness MIB | abs diff |", "|---|---|---|---|---|---|---|---|---|"]
        for p in row["points"]:
            lines.append(f"| {p['fraction']:g} | {p['edges_requested']} | {p['edges_counted_ours']} | "
                         f"{p['edges_counted_mib']:g} | {p['edges_evaluated_ours']} | {p['edges_evaluated_mib']} | "
                         f"{p['faithfulness_ours']:.6f} | {p['faithfulness_mib']:.6f} | {p['abs_diff']:.1e} |")
        lines.append("")
    lines += [f"Our signed curve against MIB given our sign (what an unflipped sign would compare): max |diff| "
              f"{c['max_abs_diff_signed_vs_mib_unflipped']:.3f}.", ""]
    for name, v in r["eap_ig_variants"].items():
        origin = KNOWN_GRAPH_PY.get(v["eap_ig_blobs"]["graph.py"], "unknown graph.py")
        lines += [f"## Edge counts with another EAP-IG: `{v['eap_ig']}` ({name}: {origin}; git blobs {v['eap_ig_blobs']})",
                  "", "No evaluation: its `apply_topn(n, absolute, prune=True)` + `weighted_edge_count()` (counted) and "
                  "a further `prune()` (evaluated) on the same scores.", "",
                  "| ranking | counted equal | counted ours | counted MIB | evaluated equal |", "|---|---|---|---|---|"]
        for k in ("signed", "absolute", "unflipped"):
            x = v[k]
            lines.append(f"| {k} | {x['counted_equal']} | {x['counted_ours']} | {x['counted_mib']} | {x['evaluated_equal']} |")
        lines.append("")
    s, v = r["scores"], r["versions"]
    lines += ["Settings: intervention 'patching' = ablation 'corrupted'; MIB's logit_diff metric (mean=False, "
              "loss=False) = our logit_diff, faithfulness a ratio of means on both sides; no BOS (token ids); "
              "HookedTransformer unprocessed (no fold_ln / centring); "
              f"{r['dtype']} on both sides; scores float32-exact ({s['n_edges']} edges, ties signed "
              f"{s['ties']['signed']}, absolute {s['ties']['absolute']}).", "",
              f"Versions: torch {v['torch_ours']} (ours) / {v['torch_peers']} (peers), transformer-lens "
              f"{v['transformer_lens']}; EAP-IG from `{v['eap_ig']}` ({KNOWN_GRAPH_PY.get(v['eap_ig_blobs']['graph.py'], 'unknown graph.py')}; "
              f"git blobs {v['eap_ig_blobs']}); MIB blobs "
              f"{v['mib_blobs']}.", "",
              f"Seconds: {r['seconds']} ({r['threads']} CPU threads)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="gpt2-small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scores", choices=["random", "eap"], default="random")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers-python", help="python of the peers' environment (default: PEERS_PYTHON or benchmarks/.peers-venv)")
    ap.add_argument("--mib", help=f"MIB circuit-track source (default: MIB_CIRCUIT_TRACK or {DEFAULT_MIB})")
    ap.add_argument("--eap-ig", default="mib", help="'mib' (the copy MIB ships), 'installed', or a folder holding eap/")
    ap.add_argument("--also-eap-ig", nargs="*", default=[],
                    help="further EAP-IG copies ('installed' or a folder) whose apply_topn / prune edge counts are compared too")
    ap.add_argument("--timeout", type=float, help="seconds for each MIB process (default: no limit)")
    ap.add_argument("--counts-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_mib_parity")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        res = _mib_worker(args.folder, Path(args.mib), args.eap_ig, args.dtype, args.counts_only)
        (args.folder / "mib.json").write_text(json.dumps(res))
        return
    result = run(args.shape, args.batch, args.seq, args.seed, args.scores, args.dtype, args.threads, args.peers_python,
                 args.mib, args.eap_ig, tuple(args.also_eap_ig), args.timeout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    plot(result, args.out.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
