"""Greater-than and docstring on SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized): can the tasks be made, are they solved?

For each task: ``circuitgraph make-data TASK --model M`` (run as the command, so a refusal is
recorded as the exact error line it prints); where the data is made, the clean and corrupted
task metric (``logit_diff``: logit(answer) - logit(wrong) at the last token) with standard errors,
the clean top-1 accuracy and the answer's probability; where the model solves the task,
``circuitgraph discover --method eap-ig --top-n N --curve curve.json`` on a small dataset, whose
faithfulness curves under MIB's rules give CPR and CMD.  For greater-than the tokenizer's digit
handling is shown too.

Writes studies/results/smollm2_other_tasks.{json,md}.  About 10 minutes on 2 shared CPU cores.

    python studies/smollm2_other_tasks.py [--model smollm2-135m-q4]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "studies" / "results"
TASKS = ("greater-than", "docstring")


def cli(*args: str, threads: int) -> tuple[int, str, str, float]:
    """Run ``circuitgraph ARGS`` in a child process: (exit status, stdout, stderr, seconds).

    Its stderr (progress bars, the error line) is shown as it comes and kept."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "circuitgraph", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    err = []
    for chunk in iter(lambda: p.stderr.read(64), ""):
        err.append(chunk)
        sys.stderr.write(chunk)
        sys.stderr.flush()
    out = p.stdout.read()
    p.wait()
    return p.returncode, out, "".join(err), time.perf_counter() - t0


def cpu_seconds() -> float:
    """CPU time of this process and of the commands it ran (every thread)."""
    import resource

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def error_line(stderr: str) -> str:
    """The CLI's one-line error (``circuitgraph CMD: error: ...``), else the last line of stderr."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errs = [ln for ln in lines if re.match(r"circuitgraph [\w-]+: error:", ln)]
    return (errs or lines or ["(no output)"])[-1]


def digit_tokens(tokenizer) -> dict:
    """How the tokenizer cuts years and two-digit strings (what greater-than needs)."""
    def pieces(s):
        ids = tokenizer(s, add_special_tokens=False)["input_ids"]
        return [tokenizer.decode([i]) for i in ids]

    vocab = tokenizer.get_vocab()
    two = [f"{y:02d}" for y in range(100)]
    single_two = [w for w in two if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]
    multi_digit = sorted(t for t in vocab if re.fullmatch(r"(Ġ|▁)?[0-9]{2,}", t))
    return {"' 1732'": pieces(" 1732"), "' 17'": pieces(" 17"), "'32'": pieces("32"),
            "prompt": pieces("The war lasted from the year 1732 to the year 17"),
            "two_digit_strings_single_token": len(single_two), "vocab_tokens_of_two_or_more_digits": len(multi_digit)}


def solved_check(model, data) -> dict:
    """Clean vs corrupted logit difference (Evaluator, bootstrap s.e.), clean top-1 accuracy and P(answer)."""
    from circuitgraph import Evaluator
    from circuitgraph.characterise.activation_patching import last_logits

    ev = Evaluator(model, data, progress=False)
    clean, corr = ev.clean_values, ev.base_values
    sem = lambda x: float(np.std(x, ddof=1) / math.sqrt(len(x)))
    with torch.no_grad():
        logits = last_logits(model, data.clean, data.last).float()
    probs = torch.softmax(logits, -1)
    ans = data.answers[:, 0].to(logits.device)
    p_ans = probs.gather(-1, ans[:, None])[:, 0].cpu().numpy()
    top1 = (logits.argmax(-1) == ans).float().cpu().numpy()
    gap = clean - corr
    return {"clean_logit_diff": float(clean.mean()), "clean_logit_diff_se": sem(clean),
            "corrupted_logit_diff": float(corr.mean()), "corrupted_logit_diff_se": sem(corr),
            "gap": float(gap.mean()), "gap_se": sem(gap),
            "clean_answer_beats_wrong": float((clean > 0).mean()),
            "clean_top1_accuracy": float(top1.mean()), "clean_p_answer": float(p_ans.mean()),
            "solved": bool(clean.mean() > 2 * sem(clean) and gap.mean() > 2 * sem(gap))}


def markdown(r: dict) -> str:
    f = lambda x, nd=3: "undefined" if x is None else f"{x:.{nd}f}"
    lines = [f"# Greater-than and docstring on SmolLM2-135M-Instruct ({r['model']})", "",
             f"Made by `studies/smollm2_other_tasks.py --model {r['model']}` in {r['runtime_s']:.0f} s "
             f"({r['cpu_s']:.0f} s of CPU time, the commands it ran included) on {r['threads']} CPU threads of a shared "
             f"machine (load average at the start {r['load_average']}); quantization: "
             f"{r['quantization']}.", ""]
    for name, t in r["tasks"].items():
        lines += [f"## {name}", "", f"`{t['make_data']['command']}` exit status {t['make_data']['exit_status']} "
                  f"({t['make_data']['seconds']:.0f} s).", ""]
        if t["make_data"]["exit_status"] != 0:
            lines += ["Error line:", "", "```", t["make_data"]["error_line"], "```", ""]
        if "why" in t:
            lines += [t["why"], ""]
        if "tokens" in t:
            tk = t["tokens"]
            lines += ["| text | tokens |", "|---|---|"]
            for k in ("' 1732'", "' 17'", "'32'", "prompt"):
                lines.append(f"| {k if k != 'prompt' else 'The war lasted from the year 1732 to the year 17'} | "
                             f"{' · '.join(repr(x) for x in tk[k])} |")
            lines += ["", f"Two-digit strings '00'..'99' that are one token: {tk['two_digit_strings_single_token']} of 100; "
                      f"vocabulary entries of two or more digits: {tk['vocab_tokens_of_two_or_more_digits']}.", ""]
        if "solved" in t:
            s = t["solved"]
            lines += [f"{t['n']} examples (seed 0). Metric `logit_diff` at the last token: {t['metric_meaning']}", "",
                      "| | value |", "|---|---|",
                      f"| clean logit diff | {s['clean_logit_diff']:.3f} ± {s['clean_logit_diff_se']:.3f} |",
                      f"| corrupted logit diff | {s['corrupted_logit_diff']:.3f} ± {s['corrupted_logit_diff_se']:.3f} |",
                      f"| clean - corrupted (paired) | {s['gap']:.3f} ± {s['gap_se']:.3f} |",
                      f"| clean: answer above wrong | {s['clean_answer_beats_wrong']:.0%} |",
                      f"| clean: answer is the top token | {s['clean_top1_accuracy']:.0%} |",
                      f"| clean: P(answer) | {s['clean_p_answer']:.3f} |", "",
                      f"Solved: **{'yes' if s['solved'] else 'no'}** (clean logit diff above 0 and above the corrupted one, "
                      "each by more than 2 s.e.).", ""]
        if "discover" in t:
            d = t["discover"]
            lines += [f"`{d['command']}` exit status {d['exit_status']} ({d['seconds']:.0f} s)."]
            if d["exit_status"] != 0:
                lines += ["", "```", d["error_line"], "```", ""]
            else:
                lines += ["", f"Top-{d['summary']['n_edges']} circuit: faithfulness {f(d['summary'].get('faithfulness'))}. "
                          f"Faithfulness curves under MIB's rules ({d['n_edges_total']} edges): **CPR {f(d['cpr'])}, "
                          f"CMD {f(d['cmd'])}**.", "",
                          "| fraction | edges (signed ranking, after pruning) | faithfulness | edges (abs ranking, after pruning) | faithfulness |",
                          "|---|---|---|---|---|"]
                for a, b in zip(d["points"]["signed"], d["points"]["abs"]):
                    pm = lambda q: f(q["faithfulness"]) + (f" ± {q['faithfulness_se']:.3f}" if q["faithfulness_se"] is not None else "")
                    lines.append(f"| {a['fraction']} | {a['n_edges_pruned']} | {pm(a)} | {b['n_edges_pruned']} | {pm(b)} |")
                lines.append("")
                if d.get("top_edges"):
                    lines += ["Best-scored edges (EAP-IG score = estimated change of the logit difference when the "
                              "edge alone is ablated):", ""]
                    lines += [f"- `{e}` {s:+.3f}" for e, s in d["top_edges"]] + [""]
    lines += ["## Verdicts", ""] + [f"- **{k}**: {t['verdict']}" for k, t in r["tasks"].items()]
    lines += ["", "## Runtime", "", "| step | s |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in r["timings_s"].items()]
    if r["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def curve_points(curve: dict) -> dict:
    """The two rankings' points from the curve JSON (``curve --json``, ``discover --curve x.json``)."""
    out = {}
    for key, name in (("signed", "signed"), ("abs", "absolute")):
        out[key] = [{"fraction": p["fraction"], "n_edges_requested": p["edges_requested"],
                     "n_edges_pruned": p["edges_evaluated"], "faithfulness": p["faithfulness"],
                     "faithfulness_se": p["faithfulness_se"]} for p in curve[name]["points"]]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-q4")
    p.add_argument("-n", type=int, default=32, help="examples for the clean/corrupted check")
    p.add_argument("--n-discover", type=int, default=8, help="examples for EAP-IG and its curves")
    p.add_argument("--steps", type=int, default=5, help="EAP-IG integration steps")
    p.add_argument("--top-n", type=int, default=300, help="edges in the discovered circuit")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT, help="folder for the results (default studies/results)")
    args = p.parse_args(argv)

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    from circuitgraph import load_dataset, load_model

    t0 = time.perf_counter()
    timings, notes = {}, []
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())

    def step(name, msg=""):
        timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 1)
        print(f"[{time.perf_counter() - t0:6.0f} s] {name}: {timings[name]:.0f} s{'  ' + msg if msg else ''}", flush=True)

    model = load_model(args.model)
    step("load model")
    tasks: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in TASKS:
            t: dict = {}
            data_file = Path(tmp) / f"{task}.jsonl"
            cmd = ["make-data", task, "--model", args.model, "-n", str(args.n), "-o", str(data_file)]
            rc, out, err, sec = cli(*cmd, threads=args.threads)
            t["make_data"] = {"command": "circuitgraph " + " ".join(cmd[:-1] + [f"{task}.jsonl"]), "exit_status": rc,
                              "seconds": round(sec, 1), "error_line": error_line(err) if rc else None}
            step(f"{task}: make-data", f"exit {rc}" + (f": {t['make_data']['error_line']}" if rc else ""))
            if task == "greater-than":
                t["tokens"] = digit_tokens(model.tokenizer)
                t["why"] = (
                    "Greater-than (Hanna et al. 2023) reads a year as a century token and a two-digit token (GPT-2: ' 1732' = "
                    "' 17' + '32'); the answer is the next two-digit token and the metric sums the probabilities of the "
                    "two-digit tokens above the start year. SmolLM2's BPE vocabulary has no token of two or more digits "
                    "(not even a space-prefixed digit: a space before a number is its own token ' '), so ' 1732' is five "
                    "tokens ' ' '1' '7' '3' '2', ' 17' is three and every '00'..'99' is two: there is no single-token "
                    "answer set to compare, and no word list or century option changes that. A digit-level variant (the "
                    "tens digit after '... the year 17') would be a different task, not greater-than as defined.")
            if rc != 0:
                t["verdict"] = f"cannot be made for this tokenizer: {t['make_data']['error_line']}"
                tasks[task] = t
                continue
            data = load_dataset(str(data_file), model)
            t["n"] = len(data)
            t["example"] = json.loads(data_file.read_text().splitlines()[0])
            t["metric_meaning"] = {
                "docstring": ("logit of the def's next undocumented argument name (the answer, e.g. ' count') minus the "
                              "logit of the corrupted def's argument in that place (wrong); the corrupted prompt renames "
                              "the def's arguments and keeps the docstring, so the answer can no longer be read off the def."),
            }.get(task, "logit(answer) - logit(wrong) at the last token")
            t["solved"] = solved_check(model, data)
            s = t["solved"]
            step(f"{task}: clean vs corrupted", f"clean {s['clean_logit_diff']:.2f} ± {s['clean_logit_diff_se']:.2f}, "
                 f"corrupted {s['corrupted_logit_diff']:.2f} ± {s['corrupted_logit_diff_se']:.2f}, "
                 f"top-1 {s['clean_top1_accuracy']:.0%}")
            if not s["solved"]:
                t["verdict"] = (f"made, but not solved: clean logit diff {s['clean_logit_diff']:.2f} ± "
                                f"{s['clean_logit_diff_se']:.2f} vs corrupted {s['corrupted_logit_diff']:.2f}")
                tasks[task] = t
                continue
            small = Path(tmp) / f"{task}_small.jsonl"
            small.write_text("\n".join(data_file.read_text().splitlines()[: args.n_discover]) + "\n")
            found, curve_file = Path(tmp) / f"{task}_eap_ig.json", Path(tmp) / f"{task}_curve.json"
            dcmd = ["discover", "--model", args.model, "--data", str(small), "--method", "eap-ig", "--steps",
                    str(args.steps), "--top-n", str(args.top_n), "--curve", str(curve_file), "-o", str(found)]
            print(f"    circuitgraph {' '.join(dcmd)}", flush=True)
            rc, out, err, sec = cli(*dcmd, threads=args.threads)
            shown = ["discover", "--model", args.model, "--data", f"{task}_small.jsonl ({args.n_discover} examples)",
                     "--method", "eap-ig", "--steps", str(args.steps), "--top-n", str(args.top_n), "--curve",
                     "curve.json", "-o", "found.json"]
            d = {"command": "circuitgraph " + " ".join(shown), "exit_status": rc, "seconds": round(sec, 1),
                 "n_examples": args.n_discover}
            if rc != 0:
                d["error_line"] = error_line(err)
                t["verdict"] = f"solved (clean logit diff {s['clean_logit_diff']:.2f}); discover failed: {d['error_line']}"
            else:
                spec = json.loads(found.read_text())
                curve = json.loads(curve_file.read_text())
                d["summary"] = {"printed": out.strip(), "n_edges": len(spec.get("edges", [])),
                                "faithfulness": spec.get("metadata", {}).get("faithfulness")}
                d["cpr"], d["cmd"] = curve.get("cpr"), curve.get("cmd")
                d["n_edges_total"] = model.graph.n_edges
                d["points"] = curve_points(curve)
                sc = [(e["edge"], e["score"]) for e in spec.get("edges", []) if e.get("score") is not None]
                d["top_edges"] = sorted(sc, key=lambda kv: -abs(kv[1]))[:12]
                t["verdict"] = (f"made and solved (clean logit diff {s['clean_logit_diff']:.2f} ± {s['clean_logit_diff_se']:.2f} "
                                f"vs corrupted {s['corrupted_logit_diff']:.2f} ± {s['corrupted_logit_diff_se']:.2f}); "
                                f"EAP-IG on {args.n_discover} examples: CPR {d['cpr']:.3f}, CMD {d['cmd']:.3f}")
            t["discover"] = d
            step(f"{task}: discover eap-ig + curve", t["verdict"])
            tasks[task] = t
    r = {"model": args.model, "quantization": getattr(model, "quantization", None), "threads": args.threads,
         "load_average": load, "tasks": tasks, "timings_s": timings, "notes": notes,
         "runtime_s": round(time.perf_counter() - t0, 1), "cpu_s": round(cpu_seconds(), 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "smollm2_other_tasks.json").write_text(json.dumps(r, indent=1, allow_nan=False) + "\n")
    (args.out / "smollm2_other_tasks.md").write_text(markdown(r))
    print(f"wrote {args.out / 'smollm2_other_tasks.json'} and .md in {r['runtime_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
