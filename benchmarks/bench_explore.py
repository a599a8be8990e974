"""``circuitgraph explore`` on a real model: the whole command, and seconds per stage, now against a
baseline revision of the package, on the same command in the same session.

The baseline is the package as committed at ``--baseline`` (unpacked with ``git archive`` into a
temporary folder and put first on ``PYTHONPATH``); "now" is this working tree.  Each run is one
``circuitgraph explore`` process; the runs alternate over ``--rounds``.  Stages are timed by wrapping
the functions the page's data comes from (inclusive wall and CPU seconds, nested stages under their
callers); CPU seconds are all threads of the process, the steadier figure on a shared machine.
The pages' embedded data are then compared number by number: every number the baseline page
shows must be on the new page with the same value.  Run by hand (about 10 minutes on 2 cores):

    python benchmarks/bench_explore.py --baseline f777d4d [--model /tmp/smollm2 --data /tmp/explore_ioi.jsonl
        --spec /tmp/eap300.json] [--rounds 1] [--name smollm2]

Writes benchmarks/results/bench_explore_{name}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (module, attribute, stage): the functions a page's data comes from; absent ones (another revision) are skipped
STAGES = [
    ("circuitgraph.cli.common", "load_model_and_data", "load model and data"),
    ("circuitgraph.evaluate.evaluator", "Evaluator.__init__", "clean and corrupted runs"),
    ("circuitgraph.evaluate.evaluator", "Evaluator.evaluate", "circuit score"),
    ("circuitgraph.evaluate.evaluator", "Evaluator.effects", "node and edge effects"),
    ("circuitgraph.evaluate.evaluator", "Evaluator.node_effects", "node effects"),
    ("circuitgraph.evaluate.evaluator", "Evaluator.edge_effects", "edge effects"),
    ("circuitgraph.evaluate.evaluator", "Evaluator.circuit_values", "circuit runs"),
    ("circuitgraph.evaluate.evaluator", "Evaluator.metric_values", "circuit runs"),
    ("circuitgraph.evaluate.evaluator", "Evaluator.values_without", "resumed removal runs"),
    ("circuitgraph.characterise.heads", "head_scores", "head-type scores"),
    ("circuitgraph.characterise.heads", "detection_scores", "detection patterns"),
    ("circuitgraph.characterise.heads", "detection_scores_of", "detection patterns"),
    ("circuitgraph.characterise.qkov", "copying_scores", "OV copying scores"),
    ("circuitgraph.characterise.dla", "direct_logit_attribution", "direct logit attribution"),
    ("circuitgraph.characterise.neurons", "top_neurons", "top neurons"),
    ("circuitgraph.characterise.neurons", "neuron_activations_of", "top neurons"),
    ("circuitgraph.characterise.integrated_gradients", "integrated_gradients", "integrated gradients"),
    ("circuitgraph.characterise.logit_lens", "logit_lens", "logit lens"),
    ("circuitgraph.characterise.heads", "attention_patterns", "attention patterns"),
    ("circuitgraph.characterise.heads", "all_patterns", "attention patterns"),
    ("circuitgraph.explore.study_data", "_examples", "per-example data"),
    ("circuitgraph.explore.study", "html_page", "write the page"),
]

RUNNER = r'''
import importlib, json, resource, sys, time
out, stages, argv = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
times, stack = {}, []

def wrap(fn, label):
    def timed(*a, **k):
        stack.append(label)
        key = " > ".join(dict.fromkeys(stack))  # a stage calling itself (or its alias) counts once
        t, c = time.perf_counter(), time.process_time()
        try:
            return fn(*a, **k)
        finally:
            stack.pop()
            if label not in stack:  # an alias called inside itself: the outer call counts
                rec = times.setdefault(key, [0.0, 0.0, 0])
                rec[0] += time.perf_counter() - t; rec[1] += time.process_time() - c; rec[2] += 1
    return timed

for mod, attr, label in stages:
    m = importlib.import_module(mod)
    *owner, name = attr.split(".")
    obj = getattr(m, owner[0], None) if owner else m
    if obj is not None and hasattr(obj, name):
        setattr(obj, name, wrap(getattr(obj, name), label))

import circuitgraph
from circuitgraph.cli.commands import main
t, c = time.perf_counter(), time.process_time()
rc = main(argv)
wall, cpu = time.perf_counter() - t, time.process_time() - c
json.dump({"rc": rc, "wall_s": wall, "cpu_s": cpu, "package": circuitgraph.__file__,
           "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "stages": {k: {"wall_s": v[0], "cpu_s": v[1], "calls": v[2]} for k, v in times.items()}}, open(out, "w"), indent=1)
'''


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def unpack(rev: str, dest: Path) -> str:
    """The package as committed at ``rev``, under ``dest``; returns the full commit hash."""
    commit = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    archive = dest / "pkg.tar"
    subprocess.run(["git", "archive", "-o", str(archive), commit, "circuitgraph"], cwd=ROOT, check=True)
    with tarfile.open(archive) as t:
        t.extractall(dest)
    return commit


def run_once(pythonpath: str, args, page: Path, out: Path) -> dict:
    cmd = [sys.executable, "-c", RUNNER, str(out), json.dumps(STAGES), "explore", "--model", args.model, "--data", args.data,
           "--spec", args.spec, "-o", str(page), *args.extra]
    env = {**os.environ, "PYTHONPATH": pythonpath + os.pathsep + os.environ.get("PYTHONPATH", "")}
    before = load_average()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out.parent)  # not the checkout: it would come first on sys.path
    if p.returncode != 0:
        sys.exit(f"bench_explore: the run failed:\n{p.stderr[-3000:]}")
    res = json.loads(out.read_text())
    res["load_average_before"], res["load_average_after"] = before, load_average()
    res["page_mb"] = page.stat().st_size / 1e6
    return res


def page_data(path: Path) -> dict:
    blob = re.search(r'<script type="application/json" id="study-data">(.*?)</script>', path.read_text(), re.S).group(1)
    return json.loads(blob)


def compare(old, new, path="", out=None) -> dict:
    """Every number (and string) of ``old`` at the same place in ``new``: counts and the places that differ."""
    out = out if out is not None else {"compared": 0, "differ": [], "missing": []}
    if isinstance(old, dict):
        for k, v in old.items():
            if not isinstance(new, dict) or k not in new:
                out["missing"].append(f"{path}/{k}")
            else:
                compare(v, new[k], f"{path}/{k}", out)
    elif isinstance(old, list):
        if not isinstance(new, list) or len(new) != len(old):
            out["differ"].append(f"{path} (length {len(old)} -> {len(new) if isinstance(new, list) else type(new).__name__})")
        else:
            for i, (a, b) in enumerate(zip(old, new)):
                compare(a, b, f"{path}/{i}", out)
    else:
        out["compared"] += 1
        if old != new:
            out["differ"].append(f"{path}: {old!r} -> {new!r}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", required=True, help="git revision of the package to compare with")
    ap.add_argument("--model", default="/tmp/smollm2")
    ap.add_argument("--data", default="/tmp/explore_ioi.jsonl")
    ap.add_argument("--spec", default="/tmp/eap300.json")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--name", default="smollm2")
    ap.add_argument("--versions", default="before,now", help="which to run: before,now (both), before or now")
    ap.add_argument("extra", nargs="*", help="more explore flags (after --)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-explore-") as tmp:
        tmp = Path(tmp)
        (tmp / "base").mkdir()
        commit = unpack(args.baseline, tmp / "base")
        shutil.copytree(ROOT / "circuitgraph", tmp / "now" / "circuitgraph", ignore=shutil.ignore_patterns("__pycache__"))
        versions = {"before": str(tmp / "base"), "now": str(tmp / "now")}  # both frozen now: edits made meanwhile do not leak in
        versions = {k: v for k, v in versions.items() if k in args.versions.split(",")}
        runs = {k: [] for k in versions}
        for r in range(args.rounds):
            for k, pp in versions.items():
                res = run_once(pp, args, tmp / f"{k}.html", tmp / f"{k}-{r}.json")
                print(f"round {r + 1}, {k}: {res['wall_s']:.1f} s wall, {res['cpu_s']:.1f} s CPU, load {res['load_average_before']}",
                      file=sys.stderr)
                runs[k].append(res)
        both = len(versions) == 2
        check = compare(page_data(tmp / "before.html"), page_data(tmp / "now.html")) if both else None
    for k, v in versions.items():
        assert runs[k][0]["package"].startswith(v), f"{k}: imported {runs[k][0]['package']}, not the copy under {v}"
    res = {"command": f"circuitgraph explore --model {args.model} --data {args.data} --spec {args.spec} -o study.html "
                      + " ".join(args.extra),
           "baseline": commit, "rounds": args.rounds, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
           "runs": runs, "page_check": {**check, "differ": check["differ"][:200], "n_differ": len(check["differ"])} if check else None}
    dest = ROOT / "benchmarks" / "results"
    (dest / f"bench_explore_{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (dest / f"bench_explore_{args.name}.md").write_text(report(res) + "\n")
    print(report(res))


def report(res: dict) -> str:
    med = lambda k, f: statistics.median(r[f] for r in res["runs"][k])
    lines = [f"`{res['command'].strip()}`, {res['cpus']} CPU cores shared with other jobs, before = {res['baseline'][:10]}, "
             f"{res['rounds']} round(s) alternating (medians).", "",
             "| | wall s | CPU s | load average (1, 5, 15 min) at the start | page MB |", "|---|---|---|---|---|"]
    for k in res["runs"]:
        loads = "; ".join(str(r["load_average_before"]) for r in res["runs"][k])
        lines.append(f"| {k} | {med(k, 'wall_s'):.1f} | {med(k, 'cpu_s'):.1f} | {loads} | {res['runs'][k][0]['page_mb']:.2f} |")
    lines += ["", "Seconds per stage (inclusive; `a > b`: b called inside a), first round:", "",
              "| stage | before wall | before CPU | calls | now wall | now CPU | calls |", "|---|---|---|---|---|---|---|"]
    none = {"stages": {}}
    b, n = (res["runs"].get(k, [none])[0]["stages"] for k in ("before", "now"))
    cell = lambda d, k: (f"{d[k]['wall_s']:.1f} | {d[k]['cpu_s']:.1f} | {d[k]['calls']}" if k in d else "– | – | –")
    for k in list(dict.fromkeys([*b, *n])):
        lines.append(f"| {k} | {cell(b, k)} | {cell(n, k)} |")
    c = res["page_check"]
    if c is None:
        return "\n".join(lines)
    lines += ["", f"Page data: {c['compared']} numbers and strings of the baseline page compared with the new page; "
              f"{c['n_differ']} differ, {len(c['missing'])} missing."]
    lines += [f"- {d}" for d in c["differ"][:40]] + [f"- missing: {m}" for m in c["missing"][:20]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
