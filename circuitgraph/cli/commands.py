"""The ``circuitgraph`` command line.  Errors go to stderr, one line, exit status 2, no traceback;
inputs, the device and output paths are checked before any model is loaded (see ``checks``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

from circuitgraph.cli.checks import (CLIError, check_device, check_output, finite_float, fraction, non_negative_float,
                                     positive_int)
from circuitgraph.cli.common import ABLATIONS, DISTRIBUTED_COMMANDS, METRICS, add_model_args, load_model_and_data
from circuitgraph.errors import CircuitWarning
from circuitgraph.evaluate import distributed as dist

def _number(v, se: bool = False) -> str:
    if v is None:
        return "n/a" if se else "undefined"
    return f"{v:.4f}"


def _note(message: str) -> None:
    print(f"circuitgraph: warning: {message}", file=sys.stderr)


def cmd_evaluate(args) -> int:
    """``circuitgraph evaluate``: faithfulness and necessity of a
    spec on a dataset (``--holdout``: also on held-out rows)."""
    from circuitgraph.cli.holdout import print_holdout, read_holdout, split as split_holdout
    from circuitgraph.evaluate.evaluator import Evaluator
    from circuitgraph.evaluate.holdout import compare
    from circuitgraph.spec.circuit_spec import CircuitSpec

    spec = CircuitSpec.load(args.spec).require_selection(f"spec '{args.spec}'")
    holdout = read_holdout(args) if args.holdout is not None else None
    model, data = load_model_and_data(args)
    spec.resolve(model.graph)  # a name the model lacks fails before any run
    if holdout is not None:
        data, held, source = split_holdout(args, model, data, spec, holdout)
    comparison = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # score.warnings holds ours; they are printed below
        kw = dict(metric=args.metric, ablation=args.ablation, batch_size=args.batch_size, progress=not args.json,
                  memory_budget_mb=args.memory_budget)
        score = Evaluator(model, data, **kw).evaluate(spec)
        if holdout is not None:
            comparison = compare(score, Evaluator(model, held, **kw).evaluate(spec), source)
    if args.json:
        for w in score.warnings:
            _note(w)
        out = score.to_dict() | ({"holdout": comparison.to_dict()} if comparison else {})
        print(json.dumps(out, indent=2, allow_nan=False))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{spec.name or args.spec} on {args.model} ({score.n_examples} examples, {args.ablation} ablation)")
    t.add_column("quantity"), t.add_column("value", justify="right"), t.add_column("± s.e.", justify="right")
    t.add_row(f"clean {score.metric}", _number(score.clean_metric), _number(score.clean_metric_se, True))
    t.add_row(f"ablated {score.metric}", _number(score.corrupted_metric), _number(score.corrupted_metric_se, True))
    t.add_row(f"circuit {score.metric}", _number(score.circuit_metric), _number(score.circuit_metric_se, True))
    t.add_row("faithfulness (sufficiency)", _number(score.faithfulness), _number(score.faithfulness_se, True))
    t.add_row("necessity", _number(score.necessity), _number(score.necessity_se, True))
    t.add_row("edges", f"{score.n_edges} / {score.n_edges_total}", "")
    console = Console()
    console.print(t)
    if score.se_reason:
        print(f"s.e. n/a: {score.se_reason}")
    for w in score.warnings:
        print(f"warning: {w}")  # one line, however narrow the terminal
    if comparison is not None:
        print_holdout(comparison)
    return 0


def _select(args, ev, scores, total: int):
    """(mask, description, rule) of the edges to keep, refusing selections that keep nothing; the rule, with its
    size fixed here, is what bootstrap resamples are cut with."""
    from dataclasses import replace

    from circuitgraph.discovery.selection import SizeRule, check_selection, smallest_faithful

    if args.method == "acdc" and args.threshold is None and args.top_n is None:
        rule, how = SizeRule("own"), f"ACDC tau={args.tau:g}"
        if not bool(scores.in_circuit.any()):
            raise CLIError(f"ACDC kept no edge at --tau {args.tau:g}; lower --tau or give --top-n")
    elif args.threshold is not None:
        rule, how = SizeRule("threshold", args.threshold), f"|score| >= {args.threshold:g}"
    elif args.top_n is not None:
        if args.top_n > total:
            raise CLIError(f"--top-n {args.top_n} is more than the model's {total} "
                           f"{'edge x position units' if scores.spans else 'edges'}")
        rule, how = SizeRule("top_n", args.top_n, args.greedy), f"{'greedy ' if args.greedy else ''}top {args.top_n}"
    else:
        sel = smallest_faithful(ev, scores, level=args.target_faithfulness, greedy=args.greedy)
        rule, how = SizeRule("top_n", sel.n_requested, args.greedy, prune=True, ranking=sel.ranking), sel.how
    check_selection(replace(rule, prune=False).mask(scores), how, scores)
    rule = replace(rule, prune=rule.prune or args.prune)
    mask = rule.mask(scores)
    if not bool(mask.any()):
        raise CLIError(f"the selection ({how}) has no edge left on an input -> logits path after --prune; "
                       f"keep more edges or drop --prune")
    return mask, how, rule


def cmd_discover(args) -> int:
    """``circuitgraph discover``: score every edge with a method,
    select a circuit and write it as a spec (or MIB JSON)."""
    from circuitgraph.cli.stability import check_bootstrap_args, run_bootstrap, summary_line
    from circuitgraph.discovery import discover
    from circuitgraph.discovery.stability import STABLE_FRACTION
    from circuitgraph.evaluate.evaluator import Evaluator

    if args.threshold is not None and args.top_n is not None:
        raise CLIError("give --threshold or --top-n, not both")
    for bad, why in ((args.greedy, "--greedy grows whole edges; select by --top-n or --threshold"),
                     (args.format == "mib", "MIB's circuit JSON (--format mib) has no positions; use --format spec")):
        if args.by_position and bad:
            raise CLIError(f"--by-position: {why}")
    check_bootstrap_args(args)
    check_output(args.output)
    if args.curve:
        from circuitgraph.cli.curve import FIGURE_SUFFIXES

        check_output(args.curve, "--curve", suffixes=FIGURE_SUFFIXES + (".json",))
    model, data = load_model_and_data(args)
    metric = args.metric or ("kl" if args.method == "acdc" else "logit_diff")
    if args.by_position:
        from circuitgraph.discovery import spans_of

        try:
            spans_of(data)
        except ValueError as e:
            raise CLIError(f"--by-position: {e}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = Evaluator(model, data, metric=metric, ablation=args.ablation, batch_size=args.batch_size,
                       progress=not args.json, memory_budget_mb=args.memory_budget)
        scores = discover(ev, args.method, steps=args.steps, tau=args.tau, progress=not args.json,
                          ig_points=args.ig_points, keep_deltas=args.keep_deltas, by_position=args.by_position)
        mask, how, rule = _select(args, ev, scores, scores.n_units)
        stab = None
        if args.bootstrap:
            stab, mask, how = run_bootstrap(args, ev, rule, mask, how, curve=bool(args.curve))
        spec = scores.to_spec(mask, model=args.model, selection=how)
        if stab is not None:
            stab.annotate(spec)
        spec.name = f"{args.method} circuit"
        spec.model = args.model
        result = ev.evaluate(spec)
        if result.faithfulness is not None:
            spec.metadata["faithfulness"] = result.faithfulness  # figures of this spec show it in their title
        curve = None
        if args.curve:
            from circuitgraph.discovery.curves import faithfulness_curve

            curve = faithfulness_curve(ev, scores)
            if stab is not None:
                stab.attach_bands(curve)
    if not dist.is_main():
        return 0
    if curve is not None:
        from circuitgraph.cli.curve import write_curve

        curve.meta.update(model=args.model, method=args.method)
        write_curve(curve, args.curve, title=f"{args.method} on {args.model}")
    if args.format == "mib":
        Path(args.output).write_text(json.dumps(spec.to_mib(model.graph)) + "\n")
    else:
        spec.to_json(args.output)
    summary = {"method": args.method, "selection": how, "n_edges": len(spec.edges), "n_edges_total": model.graph.n_edges,
               "seconds": round(scores.meta["seconds"], 3), "faithfulness": result.faithfulness,
               "faithfulness_undefined": result.undefined_reason, "output": str(args.output),
               "model": model.name, "quantization": model.quantization}
    if scores.spans:
        units = [{"edge": e, "span": s, "score": v} for e, s, v in scores.units(mask)]
        summary.update(spans=scores.spans, n_units=len(units), n_units_total=scores.n_units, units=units)
    if curve is not None:
        summary.update(cpr=curve.cpr, cmd=curve.cmd, curve=str(args.curve))
    if stab is not None:
        summary["bootstrap"] = stab.to_dict(args.stability_threshold or STABLE_FRACTION)
    if args.json:
        print(json.dumps(summary, allow_nan=False))
        return 0
    faith = f"faithfulness {result.faithfulness:.3f}" if result.faithfulness is not None else "faithfulness undefined"
    print(f"{args.method}: {summary['n_edges']} of {summary['n_edges_total']} edges ({how}); {faith}; "
          f"{summary['seconds']:.1f}s; wrote {args.output}")
    if curve is not None:
        fmt = lambda v: "undefined" if v is None else f"{v:.3f}"
        print(f"faithfulness curves (MIB's rules): CPR {fmt(curve.cpr)}, CMD {fmt(curve.cmd)}; wrote {args.curve}")
    if stab is not None:
        print(summary_line(stab, args.stability_threshold))
    if result.undefined_reason:
        _note(f"faithfulness is undefined: {result.undefined_reason}")
    return 0


def cmd_make_data(args) -> int:
    """``circuitgraph make-data``: a seeded dataset of a named task,
    checked against the model's tokenizer before it is written."""
    from circuitgraph.data.dataset import read_jsonl, tokenize
    from circuitgraph.data.tasks import make_data, write_jsonl
    from circuitgraph.model.loading import load_model

    check_output(args.output)
    if args.n < 1:
        raise CLIError(f"-n must be at least 1, got {args.n}")
    from circuitgraph.data.tasks import OPTIONS, get_task

    get_task(args.task)  # an unknown task fails before the model loads
    options = {k: getattr(args, k) for k in OPTIONS if getattr(args, k, None) is not None}
    model = load_model(args.model)
    rows = make_data(args.task, model.tokenizer, args.n, seed=args.seed, **options)
    write_jsonl(rows, args.output)
    tokenize(read_jsonl(args.output), model, source=str(args.output))  # checked for this model
    print(f"wrote {len(rows)} {args.task} examples for {args.model} to {args.output}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (usage is one ``--help`` away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _task_options(p: argparse.ArgumentParser) -> None:
    """The generators' own options (word lists, lengths), so the advice in their errors can be followed."""
    from circuitgraph.data.tasks import OPTIONS
    from circuitgraph.data.tasks.ioi import CORRUPTIONS

    for name, (tasks, kind, text) in OPTIONS.items():
        flag, help_ = f"--{name.replace('_', '-')}", f"{', '.join(tasks)}: {text}"
        if kind == "words":
            p.add_argument(flag, dest=name, nargs="+", metavar="WORD", help=help_)
        elif kind == "int":
            p.add_argument(flag, dest=name, type=int, help=help_)
        elif kind == "choice":
            p.add_argument(flag, dest=name, choices=CORRUPTIONS, help=help_)
        else:
            p.add_argument(flag, dest=name, help=help_)


def build_parser() -> argparse.ArgumentParser:
    """The ``circuitgraph`` argument parser with every subcommand registered."""
    from circuitgraph.cli.holdout import add_holdout_arg
    from circuitgraph.cli.stability import add_bootstrap_args
    from circuitgraph.discovery import IG_POINTS, METHODS

    parser = _Parser(prog="circuitgraph", description="Test, discover and characterise transformer circuits.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("evaluate", help="faithfulness and necessity of a circuit spec")
    add_model_args(p, budget=True)
    p.add_argument("--spec", required=True, help="circuit spec JSON (ours or EAP-IG/MIB), or a shipped spec by name (ioi_gpt2)")
    p.add_argument("--ablation", choices=ABLATIONS, default="corrupted")
    p.add_argument("--metric", choices=METRICS, default="logit_diff")
    p.add_argument("--json", action="store_true", help="print one JSON object (undefined numbers are null)")
    add_holdout_arg(p)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("discover", help="find a circuit automatically (ACDC, EAP, EAP-IG, exact)")
    add_model_args(p, budget=True)
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--threshold", type=non_negative_float, help="keep edges with |score| >= T")
    p.add_argument("--top-n", type=positive_int,
                   help="keep the N best edges (default: the smallest N whose faithfulness reaches "
                        "--target-faithfulness; ACDC: its own decision)")
    p.add_argument("--target-faithfulness", type=finite_float, default=0.8,
                   help="faithfulness the default selection must reach (default 0.8)")
    p.add_argument("--greedy", action="store_true", help="grow the top-n circuit from the logits (EAP-IG's greedy)")
    p.add_argument("--prune", action="store_true", help="drop edges not on an input -> logits path")
    p.add_argument("--steps", type=positive_int, default=5, help="integrated-gradient steps (eap-ig*)")
    p.add_argument("--ig-points", choices=IG_POINTS, default="right",
                   help="IG step points: right = k/n for k=1..n (ours, ends at clean); left = k=0..n-1 "
                        "(the EAP-IG repo's EAP-IG-inputs, as run by MIB)")
    p.add_argument("--keep-deltas", type=fraction,
                   help="eap*: fraction of the layers whose heads' noising deltas stay in memory; the others are "
                        "recomputed when folded (1: fastest, 0: least memory; the same scores; default 0.5)")
    p.add_argument("--tau", type=non_negative_float, default=0.01, help="ACDC threshold")
    p.add_argument("--metric", choices=METRICS, help="default: kl for acdc, else logit_diff")
    p.add_argument("--ablation", choices=ABLATIONS, default="corrupted")
    p.add_argument("--format", choices=["spec", "mib"], default="spec")
    p.add_argument("--curve", default=None, metavar="FILE",
                   help="also write the faithfulness curves under MIB's rules (CPR, CMD): a figure (.png, .pdf, .svg) or "
                        "JSON (.json), as `circuitgraph curve` does")
    p.add_argument("--by-position", action="store_true",
                   help="score each edge at each position the dataset names and at every other token ('rest'); "
                        "selection counts edge x position units and the spec's edges carry positions")
    add_bootstrap_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-o", "--output", required=True, type=Path)
    p.set_defaults(func=cmd_discover)
    p = sub.add_parser("make-data", help="write a task dataset (ioi, greater-than, induction, docstring, tracr)")
    p.add_argument("task", help="ioi, greater-than, induction, docstring or tracr (the bundled tracr-* models)")
    p.add_argument("--model", required=True, help="the model whose tokenizer the data is made and checked for")
    p.add_argument("-n", type=positive_int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, type=Path)
    _task_options(p)
    p.set_defaults(func=cmd_make_data)
    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


def _extra_commands() -> list:
    """Every subcommand defined in its own module of this package (evaluate, discover and make-data are above)."""
    from circuitgraph.cli.demo import register_cli as demo
    from circuitgraph.cli.explore import register_cli as explore
    from circuitgraph.cli.path_patch import register_cli as path_patch
    from circuitgraph.cli.curve import register_cli as curve
    from circuitgraph.cli.mib_export import register_cli as mib_export
    from circuitgraph.cli.render import register_cli as render

    return [render, path_patch, demo, explore, curve, mib_export]


_EXTRA_COMMANDS: list = _extra_commands()


def error_message(e: BaseException) -> str:
    """One line for any exception: ours carry a full message; others get their type and first line."""
    import torch

    if isinstance(e, KeyError):
        return str(e).strip("'\"")
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8"
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror or type(e).__name__}: '{e.filename}'"
    if isinstance(e, RecursionError):
        return "input nested too deeply"
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return "out of memory; try a smaller --batch-size, fewer examples or another --device"
    first = next((line for line in str(e).splitlines() if line.strip()), "")
    ours = isinstance(e, (ValueError, OSError, CLIError, TypeError)) or type(e).__module__.startswith("circuitgraph")
    if ours and first:
        return first
    return f"{type(e).__name__}: {first or 'no message'} (unexpected; set CIRCUITGRAPH_DEBUG=1 to see where, and please report it)"


def _show_warning(message, category, filename, lineno, file=None, line=None):
    _note(str(message).splitlines()[0] if str(message) else category.__name__)


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
        device = check_device(getattr(args, "device", "cpu"))
    except CLIError as e:
        print(f"circuitgraph {args.command}: error: {e}", file=sys.stderr)
        return 2
    try:
        dist.init(device)
    except Exception as e:  # noqa: BLE001 -- one line, no traceback
        print(f"circuitgraph {args.command}: error: could not join the torch.distributed group "
              f"(MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}): "
              f"{error_message(e)}", file=sys.stderr)
        return 2
    try:
        if dist.is_main():
            return _run(args)
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            return _run(args)  # errors are reported once, by rank 0
    finally:
        dist.close()


def _run(args) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # other libraries' warnings are not the user's business here
        warnings.simplefilter("always", CircuitWarning)
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except KeyboardInterrupt:
            print(f"circuitgraph {args.command}: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 -- the command line's promise: no traceback
            if os.environ.get("CIRCUITGRAPH_DEBUG"):
                raise
            print(f"circuitgraph {args.command}: error: {error_message(e)}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
