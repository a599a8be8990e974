"""The ``circuitgraph`` command line.  Errors go to stderr, one line, exit status 2, no traceback."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

from circuitgraph.evaluate import distributed as dist

DTYPES = ("float32", "bfloat16", "float16")
# commands that split their examples over torch.distributed ranks; the others run on rank 0 only
DISTRIBUTED_COMMANDS = ("evaluate", "discover", "path-patch")


class CLIError(Exception):
    pass


def _load(args, need_data: bool = True):
    import torch

    from circuitgraph.data.dataset import load_dataset
    from circuitgraph.model.loading import load_model

    dtype = getattr(torch, getattr(args, "dtype", "float32"))
    model = load_model(args.model, device=dist.device_for(getattr(args, "device", "cpu")), dtype=dtype,
                       check_exact=not getattr(args, "no_exactness_check", False))
    data = None
    if need_data:
        data = load_dataset(args.data, model.tokenizer, prepend_bos=args.prepend_bos, vocab_size=model.weights.W_U.shape[0])
    return model, data


def cmd_evaluate(args) -> int:
    from circuitgraph.evaluate.evaluator import Evaluator
    from circuitgraph.spec.circuit_spec import CircuitSpec

    spec = CircuitSpec.load(args.spec)
    model, data = _load(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = Evaluator(model, data, metric=args.metric, ablation=args.ablation, batch_size=args.batch_size,
                       progress=not args.json)
        score = ev.evaluate(spec)
    if args.json:
        print(json.dumps(score.to_dict(), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{spec.name or args.spec} on {args.model} ({score.n_examples} examples, {args.ablation} ablation)")
    t.add_column("quantity"), t.add_column("value", justify="right"), t.add_column("± s.e.", justify="right")
    t.add_row(f"clean {score.metric}", f"{score.clean_metric:.4f}", f"{score.clean_metric_se:.4f}")
    t.add_row(f"ablated {score.metric}", f"{score.corrupted_metric:.4f}", f"{score.corrupted_metric_se:.4f}")
    t.add_row(f"circuit {score.metric}", f"{score.circuit_metric:.4f}", f"{score.circuit_metric_se:.4f}")
    t.add_row("faithfulness (sufficiency)", f"{score.faithfulness:.4f}", f"{score.faithfulness_se:.4f}")
    t.add_row("necessity", f"{score.necessity:.4f}", f"{score.necessity_se:.4f}")
    t.add_row("edges", f"{score.n_edges} / {score.n_edges_total}", "")
    console = Console()
    console.print(t)
    for w in score.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    return 0


def cmd_discover(args) -> int:
    from circuitgraph.discovery import discover
    from circuitgraph.evaluate.evaluator import Evaluator

    if args.threshold is not None and args.top_n is not None:
        raise CLIError("give --threshold or --top-n, not both")
    model, data = _load(args)
    metric = args.metric or ("kl" if args.method == "acdc" else "logit_diff")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = Evaluator(model, data, metric=metric, ablation=args.ablation, batch_size=args.batch_size)
        scores = discover(ev, args.method, steps=args.steps, tau=args.tau, ig_points=args.ig_points)
        if args.method == "acdc" and args.threshold is None and args.top_n is None:
            mask, how = scores.in_circuit, f"ACDC tau={args.tau:g}"
        elif args.threshold is not None:
            mask, how = scores.threshold(args.threshold), f"|score| >= {args.threshold:g}"
        else:
            n = args.top_n if args.top_n is not None else max(1, model.graph.n_edges // 100)
            mask, how = (scores.greedy(n) if args.greedy else scores.top_n(n)), f"top {n}{' (greedy)' if args.greedy else ''}"
        spec = scores.to_spec(mask, prune=args.prune, model=args.model, selection=how)
        spec.name = f"{args.method} circuit"
        spec.model = args.model
        result = ev.evaluate(spec) if len(spec.edges) else None
    if not dist.is_main():
        return 0
    if args.format == "mib":
        Path(args.output).write_text(json.dumps(spec.to_mib(model.graph)) + "\n")
    else:
        spec.to_json(args.output)
    summary = {"method": args.method, "selection": how, "n_edges": len(spec.edges), "n_edges_total": model.graph.n_edges,
               "seconds": round(scores.meta["seconds"], 3), "faithfulness": result.faithfulness if result else None,
               "output": str(args.output)}
    print(json.dumps(summary) if args.json else
          f"{args.method}: {summary['n_edges']} of {summary['n_edges_total']} edges ({how}), faithfulness "
          f"{summary['faithfulness']:.3f} in {summary['seconds']:.1f}s; wrote {args.output}" if result else
          f"{args.method}: no edge selected ({how}); wrote {args.output}")
    return 0


def cmd_make_data(args) -> int:
    from circuitgraph.model.loading import load_model
    from circuitgraph.data.tasks import make_data, write_jsonl

    if args.n < 1:
        raise CLIError(f"-n must be at least 1, got {args.n}")
    model = load_model(args.model)
    rows = make_data(args.task, model.tokenizer, args.n, seed=args.seed)
    write_jsonl(rows, args.output)
    from circuitgraph.data.dataset import read_jsonl, tokenize

    tokenize(read_jsonl(args.output), model.tokenizer, source=str(args.output))  # checked for this model
    print(f"wrote {len(rows)} {args.task} examples for {args.model} to {args.output}")
    return 0


def _common(p: argparse.ArgumentParser, data: bool = True):
    p.add_argument("--model", required=True, help="hub name, local HuggingFace directory or bundled model name")
    if data:
        p.add_argument("--data", required=True, help="JSONL dataset (clean, corrupted, answer, wrong[, positions])")
        p.add_argument("--prepend-bos", action="store_true", help="put the BOS token first (TransformerLens habit)")
        p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (under torchrun, cuda means each rank's own GPU)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weights and activations; metrics and score sums accumulate in fp32 either way")
    p.add_argument("--no-exactness-check", action="store_true",
                   help="skip comparing the engine's clean logits with the model's own forward on the first batch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuitgraph", description="Test, discover and characterise transformer circuits.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("evaluate", help="faithfulness and necessity of a circuit spec")
    _common(p)
    p.add_argument("--spec", required=True, help="circuit spec JSON (ours or EAP-IG/MIB)")
    p.add_argument("--ablation", choices=["corrupted", "mean", "zero"], default="corrupted")
    p.add_argument("--metric", choices=["logit_diff", "prob_diff", "kl", "accuracy"], default="logit_diff")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("discover", help="find a circuit automatically (ACDC, EAP, EAP-IG, exact)")
    _common(p)
    p.add_argument("--method", required=True, choices=["acdc", "eap", "eap-ig", "eap-ig-activations", "exact"])
    p.add_argument("--threshold", type=float, help="keep edges with |score| >= T")
    p.add_argument("--top-n", type=int, help="keep the N best edges (default: 1%% of the edges; ACDC: its own decision)")
    p.add_argument("--greedy", action="store_true", help="grow the top-n circuit from the logits (EAP-IG's greedy)")
    p.add_argument("--prune", action="store_true", help="drop edges not on an input -> logits path")
    p.add_argument("--steps", type=int, default=5, help="integrated-gradient steps (eap-ig*)")
    p.add_argument("--ig-points", choices=["right", "left"], default="right",
                   help="IG step points: right = k/n for k=1..n (ours, ends at clean); left = k=0..n-1 "
                        "(the EAP-IG repo's EAP-IG-inputs, as run by MIB)")
    p.add_argument("--tau", type=float, default=0.01, help="ACDC threshold")
    p.add_argument("--metric", choices=["logit_diff", "prob_diff", "kl", "accuracy"], help="default: kl for acdc, else logit_diff")
    p.add_argument("--ablation", choices=["corrupted", "mean", "zero"], default="corrupted")
    p.add_argument("--format", choices=["spec", "mib"], default="spec")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-o", "--output", required=True, type=Path)
    p.set_defaults(func=cmd_discover)
    p = sub.add_parser("make-data", help="write a task dataset (ioi, greater-than, induction, docstring)")
    p.add_argument("task", help="ioi, greater-than, induction or docstring")
    p.add_argument("--model", required=True, help="the model whose tokenizer the data is made and checked for")
    p.add_argument("-n", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, type=Path)
    p.set_defaults(func=cmd_make_data)
    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


def _extra_commands() -> list:
    from circuitgraph.cli.demo import register_cli as demo
    from circuitgraph.evaluate.path_patching import register_cli as path_patch
    from circuitgraph.render.figure import register_cli as render

    return [render, path_patch, demo]


_EXTRA_COMMANDS: list = _extra_commands()


def main(argv: list[str] | None = None) -> int:
    """Run one command.  Under ``torchrun`` the evaluation commands split their examples over the
    ranks (see :mod:`circuitgraph.evaluate.distributed`); only rank 0 prints and writes."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not dist.launched():
        return _run(args)
    if args.command not in DISTRIBUTED_COMMANDS:
        return _run(args) if os.environ.get("RANK", "0") == "0" else 0
    try:
        dist.init(getattr(args, "device", "cpu"))
    except (RuntimeError, ValueError) as e:
        print(f"circuitgraph {args.command}: error: could not join the torch.distributed group "
              f"(MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}): "
              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    try:
        if dist.is_main():
            return _run(args)
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            return _run(args)  # errors are reported once, by rank 0
    finally:
        dist.close()


def _run(args) -> int:
    try:
        return args.func(args)
    except (ValueError, OSError, KeyError, CLIError) as e:
        msg = str(e).strip("'\"") if isinstance(e, KeyError) else str(e)
        print(f"circuitgraph {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
