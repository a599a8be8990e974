"""``circuitgraph curve``: the faithfulness curves of a scored circuit under MIB's rules (CPR, CMD, every point)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from circuitgraph.cli.checks import CLIError, check_output
from circuitgraph.cli.common import ABLATIONS, METRICS, add_model_args, load_model_and_data

FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


def register_cli(subparsers) -> None:
    """Add ``circuitgraph curve --model M --data FILE --scores SPEC [--json] [-o FIG]``."""
    from circuitgraph.discovery.curves import RULES
    from circuitgraph.discovery.edge_scores import SCORE_SIGNS

    p = subparsers.add_parser("curve", help="faithfulness curves, CPR and CMD of scored edges (MIB's rules)")
    add_model_args(p, budget=True)
    p.add_argument("--scores", required=True,
                   help="a discovered circuit with every edge's score (discover's spec JSON, or EAP-IG/MIB JSON)")
    p.add_argument("--score-sign", choices=SCORE_SIGNS, default=None,
                   help="what the file's scores are: metric = change of the metric when the edge is ablated (ours, and "
                        "MIB's published circuit files); loss = minus that (MIB's run_attribution.py). Default: "
                        "what the file says, else metric (stated on stderr for MIB JSON)")
    p.add_argument("--rules", choices=RULES, default="mib",
                   help="mib (default): MIB's sizes, rankings and pruning; unpruned-rounded: circuitgraph's earlier "
                        "convention (round(f*n) edges, no pruning, CPR and CMD both from |score|)")
    p.add_argument("--ablation", choices=ABLATIONS, default="corrupted")
    p.add_argument("--metric", choices=METRICS, default="logit_diff")
    p.add_argument("--json", action="store_true", help="print one JSON object (undefined numbers are null)")
    p.add_argument("-o", "--output", default=None, help="draw both rankings' curves (.png, .pdf or .svg)")
    p.set_defaults(func=cmd_curve)


def read_scores(path: str, graph, sign: str | None):
    """``(EdgeScores, sign used)`` from a scored spec file; the sign of a MIB file is said, never guessed silently."""
    from circuitgraph.discovery.edge_scores import EdgeScores
    from circuitgraph.spec.circuit_spec import CircuitSpec

    spec = CircuitSpec.load(path)
    stated = spec.metadata.get("score_sign") or spec.metadata.get("mib_extra", {}).get("score_sign")
    if sign is None:
        sign = stated or "metric"
        if stated is None and "mib_cfg" in spec.metadata:
            print(f"circuitgraph: note: reading the scores of MIB JSON '{path}' as changes of the metric (the sign of "
                  f"MIB's published circuit files); give --score-sign loss for files from MIB's run_attribution.py",
                  file=sys.stderr)
    elif stated is not None and stated != sign:
        raise CLIError(f"--score-sign {sign}, but '{path}' says its scores are '{stated}'")
    return EdgeScores.from_spec(spec, graph, sign=sign, where=f"'{path}'"), sign


def write_curve(pair, path: str | Path, title: str | None = None) -> None:
    """A figure of both curves (by suffix), or their JSON (``.json``)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(pair.to_dict(), indent=2, allow_nan=False) + "\n")
    else:
        pair.plot(path, title=title)


def print_curve(pair, title: str) -> None:
    """The points of both rankings and the two areas, as tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    num = lambda v, f="{:.4f}": "undefined" if v is None or v != v else f.format(v)
    for curve in (pair.signed, pair.absolute):
        t = Table(title=f"{title}: {curve.ranking} ranking")
        for col in ("edges %", "requested", "counted (MIB)", "evaluated", "faithfulness", "± s.e."):
            t.add_column(col, justify="right")
        for p in curve.points():
            t.add_row(f"{100 * p['fraction']:g}", str(p["edges_requested"]), str(p["edges_counted"]),
                      str(p["edges_evaluated"]), num(p["faithfulness"]), num(p["faithfulness_se"]))
        console.print(t)
    how = "signed ranking" if pair.signed.rules == "mib" else "|score| ranking"
    print(f"CPR {num(pair.cpr)} (area under faithfulness, {how}); CMD {num(pair.cmd)} (area under |1 - faithfulness|, "
          f"|score| ranking); {pair.signed.rules} rules")
    if pair.undefined_reason:
        print(f"faithfulness is undefined: {pair.undefined_reason}")


def cmd_curve(args) -> int:
    """``circuitgraph curve``: a spec's faithfulness curves under MIB's rules, as a figure or JSON."""
    from circuitgraph.discovery.curves import faithfulness_curve
    from circuitgraph.evaluate.evaluator import Evaluator

    if args.output:
        check_output(args.output, suffixes=FIGURE_SUFFIXES)
    model, data = load_model_and_data(args)
    scores, sign = read_scores(args.scores, model.graph, args.score_sign)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = Evaluator(model, data, metric=args.metric, ablation=args.ablation, batch_size=args.batch_size,
                       progress=not args.json, memory_budget_mb=args.memory_budget)
        pair = faithfulness_curve(ev, scores, rules=args.rules)
    pair.meta.update(model=args.model, scores=str(args.scores), score_sign=sign)
    if args.output:
        write_curve(pair, args.output, title=f"{Path(args.scores).name} on {args.model}")
    if args.json:
        print(json.dumps(pair.to_dict(), allow_nan=False))
        return 0
    print_curve(pair, f"{Path(args.scores).name} on {args.model} ({len(data)} examples, {args.ablation} ablation)")
    if args.output:
        print(f"wrote {args.output}")
    return 0
