"""``circuitgraph mib-export``: a discovered circuit as the submission layout MIB's circuit track
accepts; ``circuitgraph mib-data``: an MIB task dataset as our JSONL rows, checked for a model."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from circuitgraph.cli.checks import CLIError, check_output, check_output_dir, positive_int


def register_cli(subparsers) -> None:
    """Add ``circuitgraph mib-export`` and ``circuitgraph mib-data``."""
    from circuitgraph.data.mib import TASKS
    from circuitgraph.spec.mib_submission import LAYOUTS, MODELS, RANKINGS, SIGNS

    p = subparsers.add_parser(
        "mib-export", help="write scored circuits as a submission to MIB's circuit-localization track",
        description="Writes OUTDIR/METHOD/<task>_<model>/importances.json (every edge's score; MIB ranks them "
                    "itself, signed for CPR and by |score| for CMD), or with --layout circuits nine top-n circuits "
                    "(0.1%..50% of the edges, pruned) per ranking in OUTDIR/METHOD/abs-False|abs-True/<task>_<model>/. "
                    "Upload OUTDIR/METHOD; MIB wants at least two models and two tasks.")
    p.add_argument("spec", nargs="+", help="scored circuit spec(s): the output of circuitgraph discover (ours or --format mib)")
    p.add_argument("--task", help=f"MIB task ({', '.join(TASKS)}); default: the spec's own task field")
    p.add_argument("--model-name", help=f"MIB model ({', '.join(MODELS)}, or its hub name); default: the spec's own model field")
    p.add_argument("--method", help="the method folder's name (default: <method>_<ablation>_edge from the spec, as MIB's "
                                    "run_attribution.py names it, else circuitgraph)")
    p.add_argument("--layout", choices=LAYOUTS, default="importances",
                   help="importances: one file of every edge's score (default); circuits: nine circuits per ranking")
    p.add_argument("--ranking", choices=RANKINGS, default="both",
                   help="--layout circuits: which ranking's circuits (both: abs-False/ for CPR and abs-True/ for CMD; "
                        "one ranking alone is written without the abs- folder and MIB reports it as both)")
    p.add_argument("--sign", choices=SIGNS, default="loss",
                   help="sign of the written scores. loss (default): change of the loss (minus the metric) when the edge "
                        "is ablated, positive for edges the task needs, as MIB's run_attribution.py writes and as its signed "
                        "(CPR) ranking expects; ours: change of the metric, negative for needed edges")
    p.add_argument("--input-sign", choices=SIGNS,
                   help="sign of the input's scores when it is an MIB JSON file that does not say (our spec files carry ours)")
    p.add_argument("-o", "--output", required=True, type=Path, help="the submission folder (OUTDIR)")
    p.set_defaults(func=cmd_mib_export)

    p = subparsers.add_parser(
        "mib-data", help="convert an MIB circuit-track dataset (mib-bench/*) to our JSONL rows, checked for a model",
        description="Pairs each clean prompt with one counterfactual exactly as MIB's own loader (HFEAPDataset) does, "
                    "drops the rows it drops for this model's tokenizer, and writes "
                    "{clean, corrupted, answer, wrong, mib_row} lines.  MIB's evaluation puts a BOS token first: "
                    "use --prepend-bos with these rows to match it.")
    p.add_argument("--task", required=True, help=f"MIB task: {', '.join(TASKS)}")
    p.add_argument("--input", help="a .parquet/.jsonl/.json file in the hub dataset's schema, or a hub name "
                                   "(default: the task's mib-bench dataset, which needs `pip install datasets` and the network)")
    p.add_argument("--counterfactual", help="the counterfactual that gives the corrupted prompt (default: MIB's for the task)")
    p.add_argument("--split", default="train", help="hub split (default train, as run_attribution.py; its evaluation uses validation/test)")
    p.add_argument("-n", type=positive_int, help="keep the first N rows after MIB's filters (run_attribution.py takes 100)")
    p.add_argument("--model", required=True, help="the model whose tokenizer decides MIB's filters and checks the rows")
    p.add_argument("-o", "--output", required=True, type=Path)
    p.set_defaults(func=cmd_mib_data)


_ABLATIONS = {"corrupted": "patching", "mean": "mean", "zero": "zero"}  # ours -> run_attribution.py's --ablation


def _method_name(spec) -> str:
    method = spec.metadata.get("method")
    if not isinstance(method, str) or not method:
        return "circuitgraph"
    ablation = _ABLATIONS.get(spec.metadata.get("ablation"), spec.metadata.get("ablation"))
    return f"{method}_{ablation}_edge" if isinstance(ablation, str) and ablation else method


def cmd_mib_export(args) -> int:
    """``circuitgraph mib-export``: write a spec's scores as an MIB circuit-track submission folder."""
    from circuitgraph.data.mib import TASKS
    from circuitgraph.spec.circuit_spec import CircuitSpec
    from circuitgraph.spec.mib_submission import (MODELS, check_spec, folder_name, spec_task_model, submission_pairs,
                                                  write_submission)

    check_output_dir(args.output)
    plans, seen = [], {}
    for path in args.spec:
        spec = CircuitSpec.load(path)
        own_task, own_model = spec_task_model(spec)
        task, model = args.task or own_task, args.model_name or own_model
        if not task:
            raise CLIError(f"spec '{path}' names no task; give --task ({', '.join(TASKS)})")
        if not model:
            raise CLIError(f"spec '{path}' names no model; give --model-name ({', '.join(MODELS)})")
        task, model, _, _ = check_spec(spec, task, model, args.input_sign, str(path))  # all checked before any is written
        method = args.method or _method_name(spec)
        key = (method, task, model)
        if key in seen:
            raise CLIError(f"specs '{seen[key]}' and '{path}' both go to {method}/{folder_name(task, model)}; "
                           f"give each its own --task/--model-name or --method")
        seen[key] = path
        plans.append((path, spec, task, model, method))
    for path, spec, task, model, method in plans:
        files = write_submission(spec, args.output, task, model, method=method, layout=args.layout, ranking=args.ranking,
                                 sign=args.sign, input_sign=args.input_sign, source=str(path))
        where = files[0].parent if len(files) == 1 else args.output / method
        print(f"wrote {len(files)} file(s) for {task} on {model} ({args.sign} sign) under {where}")
    for method in sorted({m for *_, m in plans}):
        pairs = submission_pairs(args.output / method)
        tasks, models = {t for t, _ in pairs}, {m for _, m in pairs}
        if len(tasks) < 2 or len(models) < 2:
            print(f"circuitgraph: warning: {args.output / method} holds {len(tasks)} task(s) and {len(models)} model(s); "
                  f"MIB accepts a submission with at least 2 of each", file=sys.stderr)
    return 0


def cmd_mib_data(args) -> int:
    """``circuitgraph mib-data``: MIB's rows of a task as our
    JSONL, checked against the model before anything is written."""
    from circuitgraph.data.dataset import _example, tokenize
    from circuitgraph.data.mib import TASKS, mib_rows_where, mib_task
    from circuitgraph.data.tasks import write_jsonl
    from circuitgraph.model.loading import load_model

    check_output(args.output)
    task = mib_task(args.task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said once, below: this pass only checks the file before the model loads
        mib_rows_where(args.input, task, args.counterfactual, args.split, n=args.n)
    model = load_model(args.model)
    pairs = mib_rows_where(args.input, task, args.counterfactual, args.split, tokenizer=model, n=args.n)
    examples = [_example(row, where) for where, row in pairs]
    tokenize(examples, model, source=str(args.input or TASKS[task].hub))  # checked for this model before anything is written
    write_jsonl([row for _, row in pairs], args.output)
    cf = args.counterfactual or TASKS[task].counterfactual
    short = f" (asked for {args.n})" if args.n and len(pairs) < args.n else ""
    print(f"wrote {len(pairs)} {task} rows{short} ({cf}) for {args.model} to {args.output}; MIB's evaluation puts a BOS "
          f"token first: add --prepend-bos when you evaluate them")
    return 0
