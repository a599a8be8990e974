"""``circuitgraph render``: a circuit spec as a figure."""

from __future__ import annotations

from circuitgraph.render.figure import check_figure_path, render
from circuitgraph.spec.circuit_spec import CircuitSpec


def register_cli(subparsers) -> None:
    """Add ``circuitgraph render SPEC -o OUT.{svg,png,pdf,dot}``."""
    p = subparsers.add_parser("render", help="draw a circuit spec (ours or EAP-IG/MIB JSON) as SVG, PNG, PDF or DOT")
    p.add_argument("spec", help="circuit spec JSON (ours or EAP-IG/MIB), or a shipped spec's name (induction_toy)")
    p.add_argument("-o", "--output", required=True, help="figure file: .svg, .png, .pdf or .dot")
    p.add_argument("--collapse-groups", action="store_true", help="draw each group of the spec as one node")
    p.add_argument("--min-score", type=float, default=None, help="hide edges with |score| below this")
    p.add_argument("--rankdir", choices=["BT", "LR"], default="BT", help="layers bottom-to-top (BT) or left-to-right (LR)")
    p.add_argument("--title", default=None)
    p.set_defaults(func=cmd_render)


def cmd_render(args) -> int:
    """``circuitgraph render``: draw a spec as a circuit diagram (SVG, PNG, PDF or DOT)."""
    check_figure_path(args.output)  # fail before loading anything
    spec = CircuitSpec.load(args.spec)
    render(spec, path=args.output, rankdir=args.rankdir, collapse_groups=args.collapse_groups,
           min_score=args.min_score, title=args.title)
    print(f"wrote {args.output}")
    return 0
