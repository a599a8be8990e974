"""``circuitgraph explore``: write a study's explorer page."""

from __future__ import annotations


def register_cli(subparsers) -> None:
    """Add ``circuitgraph explore --model M --data F --spec S [--compare S2] -o OUT.html``."""
    from circuitgraph.cli.checks import non_negative_int, positive_int
    from circuitgraph.cli.common import ABLATIONS, METRICS, add_model_args

    p = subparsers.add_parser("explore", help="write an interactive HTML page of a circuit study (opens offline in a browser)")
    add_model_args(p, budget=True)
    p.add_argument("--spec", required=True, help="circuit spec JSON (ours or EAP-IG/MIB), e.g. the hypothesis")
    p.add_argument("--compare", default=None, help="a second circuit spec (e.g. a discovered one), shown overlaid or side by side")
    p.add_argument("-o", "--output", required=True, help="the page, .html")
    p.add_argument("--metric", choices=METRICS, default="logit_diff")
    p.add_argument("--ablation", choices=ABLATIONS, default="corrupted")
    p.add_argument("--examples", type=positive_int, default=8, help="dataset rows the page's example picker offers (the first ones)")
    p.add_argument("--top-edges", type=non_negative_int, default=1000,
                   help="scored edges outside the circuits to embed, best |score| first")
    p.add_argument("--effect-rows", type=positive_int, default=16,
                   help="node and edge effects are measured on this many rows (the first ones): one patched run per "
                        "removal and row is the page's largest cost")
    p.add_argument("--title", default=None)
    p.set_defaults(func=cmd_explore)


def cmd_explore(args) -> int:
    """``circuitgraph explore``: write the interactive study page of one or more specs on a model and dataset."""
    import warnings

    from circuitgraph.cli.checks import check_output
    from circuitgraph.cli.common import load_model_and_data
    from circuitgraph.evaluate.evaluator import Evaluator
    from circuitgraph.explore.study import Study
    from circuitgraph.explore.study_data import Limits
    from circuitgraph.spec.circuit_spec import CircuitSpec

    check_output(args.output, suffixes=(".html", ".htm"))  # before anything loads
    spec = CircuitSpec.load(args.spec)
    other = CircuitSpec.load(args.compare) if args.compare else None
    model, data = load_model_and_data(args)
    for s in (spec, other):
        if s is not None:
            s.resolve(model.graph)  # a name the model lacks fails before any run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scores' own warnings are shown on the page
        ev = Evaluator(model, data, metric=args.metric, ablation=args.ablation, batch_size=args.batch_size, progress=True,
                       memory_budget_mb=args.memory_budget)
        study = Study.collect(model, data, spec, other, evaluator=ev, title=args.title, model_name=args.model,
                              limits=Limits(examples=args.examples, top_edges=args.top_edges,
                                            effect_rows=args.effect_rows))
    path = study.to_html(args.output)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB); open it in a browser")
    return 0
