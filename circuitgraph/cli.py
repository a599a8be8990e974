"""The ``circuitgraph`` command line.  Errors go to stderr, one line, exit status 2, no traceback."""

from __future__ import annotations

import argparse
import json
import sys
import warnings


class CLIError(Exception):
    pass


def _load(args, need_data: bool = True):
    from .data import load_dataset
    from .model import load_model

    model = load_model(args.model, device=getattr(args, "device", "cpu"))
    data = None
    if need_data:
        data = load_dataset(args.data, model.tokenizer, prepend_bos=args.prepend_bos, vocab_size=model.weights.W_U.shape[0])
    return model, data


def cmd_evaluate(args) -> int:
    from .scores import Evaluator
    from .spec import CircuitSpec

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


def _common(p: argparse.ArgumentParser, data: bool = True):
    p.add_argument("--model", required=True, help="hub name, local HuggingFace directory or bundled model name")
    if data:
        p.add_argument("--data", required=True, help="JSONL dataset (clean, corrupted, answer, wrong[, positions])")
        p.add_argument("--prepend-bos", action="store_true", help="put the BOS token first (TransformerLens habit)")
        p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")


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
    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


def _extra_commands() -> list:
    from .render import register_cli as render

    return [render]


_EXTRA_COMMANDS: list = _extra_commands()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, KeyError, CLIError) as e:
        msg = str(e).strip("'\"") if isinstance(e, KeyError) else str(e)
        print(f"circuitgraph {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
