"""Two revisions of circuitgraph side by side: the same tasks, alternated, in one invocation.

Machines here are noisy, so a figure measured last week is no baseline.  This checks out each
revision into a temporary worktree and times every task in a fresh process per revision and
round, alternating which revision goes first; the ratio of medians is what to report.  Tasks (random-init
GPT-2-small shape, batch 16 x 16 tokens, 2 threads): a plain engine forward, a patched forward of
MIB's IOI circuit and of random circuits at several densities (full logits), and EAP over all
edges.  Writes benchmarks/results/bench_revisions.{json,md}; with ``--shape`` (one of
``bench_memory.py``'s, at its batch) bench_revisions_SHAPE.{json,md}, MIB's GPT-2 circuit left out.

    python benchmarks/bench_revisions.py OLD_REV [NEW_REV=working tree] [--rounds 3] [--shape S] [--tasks T ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_memory import SHAPES  # noqa: E402  (one list of model shapes for the benchmarks)

MIB = ROOT.parent / "shared" / "data" / "mib" / "ioi-eap-ig.json"
DEFAULT_SHAPE = "gpt2-small"
TASKS = ["hf_forward", "engine_plain", "patched_ioi", "patched_1pct", "patched_10pct", "patched_30pct", "patched_50pct",
         "patched_70pct", "patched_90pct", "eap",
         "hf_forward_last", "patched_ioi_last", "patched_10pct_last", "patched_50pct_last"]


def worker(tasks: list[str], repeats: int, shape: str) -> None:
    print(json.dumps({t: _time_task(t, repeats, shape) for t in tasks}))


_MODEL = {}


def _time_task(task: str, repeats: int, shape: str) -> float:
    import torch
    import transformers

    from circuitgraph.data.dataset import TaskData
    from circuitgraph.evaluate.evaluator import Evaluator
    from circuitgraph.model.loading import CircuitModel
    from circuitgraph.spec.circuit_spec import CircuitSpec

    torch.set_num_threads(2)
    cls, kw, B, P = SHAPES[shape]
    if not _MODEL:
        torch.manual_seed(0)
        config = getattr(transformers, cls)(**kw)
        config._attn_implementation = "eager"
        _MODEL["hf"] = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf = _MODEL["hf"]
    V = hf.config.vocab_size
    model = CircuitModel(hf)
    if hasattr(model, "check_exact"):
        model.check_exact = False  # timed separately: the guard runs once per study, not per pass
    e, G = model.engine, model.graph
    g = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(0, V, (B, P), generator=g), torch.randint(0, V, (B, P), generator=g)
    with torch.no_grad():
        _, outs = e.run(corrupt, record=True)
        abl = e.make_ablation(outs, "corrupted")
        last = torch.full((B,), P - 1)
        if task == "hf_forward":
            fn = lambda: hf(clean).logits
        elif task == "hf_forward_last":  # logits at the last position only
            fn = lambda: hf(clean, logits_to_keep=1).logits
        elif task == "engine_plain":
            fn = lambda: e.run(clean)[0]
        elif task.startswith("patched_"):
            if task.startswith("patched_ioi"):
                mask = CircuitSpec.load(MIB).resolve(G).mask()
            else:
                density = int(task.split("_")[1][:-3]) / 100
                mask = (torch.rand(len(G.sources), len(G.destinations), generator=torch.Generator().manual_seed(1)) < density) & G.legal
            plan = e.compile(mask[None])
            positions = last if task.endswith("_last") else None
            fn = lambda: e.patched_run(clean, abl, plan, logit_positions=positions)
        elif task == "eap":
            from circuitgraph.discovery import attribute

            ans = torch.randint(0, V, (B, 1), generator=g)
            data = TaskData(clean, corrupt, torch.full((B,), P), ans, (ans + 1) % V, {})
            ev = Evaluator(model, data, batch_size=B, progress=False)
            fn = lambda: attribute(ev, "eap", progress=False)
        else:
            raise ValueError(task)
    ctx = torch.enable_grad() if task == "eap" else torch.no_grad()
    with ctx:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(src: Path, repeats: int, shape: str, tasks: list[str]) -> dict[str, float]:
    """All tasks in one fresh process of the revision at ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src), "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, "--worker", ",".join(tasks), "--repeats", str(repeats), "--shape", shape],
                         env=env, capture_output=True, text=True, check=True, cwd=src)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old", nargs="?")
    ap.add_argument("new", nargs="?", default=None, help="a revision; default: the working tree")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shape", default=DEFAULT_SHAPE, choices=list(SHAPES))
    ap.add_argument("--tasks", nargs="+", choices=TASKS, help="default: all (MIB's IOI circuit only on GPT-2 small)")
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker.split(","), args.repeats, args.shape)
    tasks = args.tasks or [t for t in TASKS if args.shape == DEFAULT_SHAPE or "_ioi" not in t]
    if "hf_forward" not in tasks:
        tasks = ["hf_forward"] + tasks  # the ratios' baseline
    if any(t.endswith("_last") for t in tasks) and "hf_forward_last" not in tasks:
        tasks.append("hf_forward_last")
    from tqdm import tqdm

    short = lambda rev: subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True,
                                       capture_output=True, text=True).stdout.strip()
    args.old, args.new = short(args.old), (None if args.new is None else short(args.new))  # results name commits
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for label, rev in (("old", args.old), ("new", args.new)):
            if rev is None:
                trees[label] = ROOT
                continue
            path = Path(tmp) / label
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True, capture_output=True)
            trees[label] = path
        times = {t: {"old": [], "new": []} for t in tasks}
        try:
            with tqdm(total=args.rounds * 2, desc="revisions") as bar:
                for r in range(args.rounds):
                    for label in (("old", "new") if r % 2 == 0 else ("new", "old")):
                        for task, t in run(trees[label], args.repeats, args.shape, tasks).items():
                            times[task][label].append(t)
                        bar.update(1)
        finally:
            for label, rev in (("old", args.old), ("new", args.new)):
                if rev is not None:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees[label])], capture_output=True)
    res = {t: {k: statistics.median(v) for k, v in d.items()} for t, d in times.items()}
    hf_of = lambda t: "hf_forward_last" if t.endswith("_last") else "hf_forward"
    B, P = SHAPES[args.shape][2:]
    out = {"old": args.old, "new": args.new or "working tree", "shape": f"{args.shape} (random init), batch {B} x {P}, 2 threads",
           "median_s": res, "new_over_old": {t: d["new"] / d["old"] for t, d in res.items()},
           "over_hf_forward": {lab: {t: d[lab] / res[hf_of(t)][lab] for t, d in res.items()} for lab in ("old", "new")}}
    dest = ROOT / "benchmarks" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    stem = "bench_revisions" if args.shape == DEFAULT_SHAPE else f"bench_revisions_{args.shape}"
    (dest / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"old = {out['old']}, new = {out['new']}; {out['shape']}; medians of {args.rounds} alternating rounds; "
             "tasks ending in _last compute logits at the last position only, and are compared with an HF forward doing the same", "",
             "| task | old s | new s | new / old | old / HF fwd | new / HF fwd |", "|---|---|---|---|---|---|"]
    for t, d in res.items():
        lines.append(f"| {t} | {d['old']:.3f} | {d['new']:.3f} | {d['new'] / d['old']:.2f} | "
                     f"{out['over_hf_forward']['old'][t]:.2f} | {out['over_hf_forward']['new'][t]:.2f} |")
    (dest / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
