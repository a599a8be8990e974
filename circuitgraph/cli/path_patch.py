"""``circuitgraph path-patch``: path patching from every head and MLP to one or more receivers."""

from __future__ import annotations

import math

from circuitgraph.cli.checks import check_output
from circuitgraph.cli.common import METRICS, add_model_args, load_model_and_data
from circuitgraph.evaluate.path_patching import (NORMALISATION, as_list, check_upstream, path_patch_sweep, plot_path_patching,
                                                 receiver_index, sender_index)


def register_cli(subparsers) -> None:
    """Add ``circuitgraph path-patch --model M --data FILE --receiver 'a1.h2<k>' [--json] [-o FIG.png]``."""
    p = subparsers.add_parser("path-patch", help="path patching from every head and MLP to a receiver")
    add_model_args(p, budget=True)
    p.add_argument("--receiver", required=True, action="append",
                   help="head port 'a1.h2<k>', MLP 'm1' or 'logits' (repeat or comma-separate for several)")
    p.add_argument("--senders", default=None, help="comma-separated sender nodes (default: every node upstream)")
    p.add_argument("--positions", default=None, help="comma-separated named positions: patch sender outputs only there")
    p.add_argument("--metric", choices=METRICS, default="logit_diff")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-o", "--output", default=None, help="write the layer x head heatmap (PNG)")
    p.set_defaults(func=cmd_path_patch)


def cmd_path_patch(args) -> int:
    """``circuitgraph path-patch``: each sender's effect on the receivers, as a table, JSON or a heatmap."""
    receivers = [r for part in args.receiver for r in as_list(part)]
    if args.output:
        check_output(args.output, suffixes=(".png", ".pdf", ".svg", ".jpg", ".jpeg"))
    model, data = load_model_and_data(args)
    for r in receivers:  # fail on a bad name before any model run
        receiver_index(model.graph, r)
    if args.senders:
        check_upstream(model.graph, [sender_index(model.graph, s) for s in as_list(args.senders)],
                        [receiver_index(model.graph, r) for r in receivers], receivers)
    positions = as_list(args.positions) if args.positions else None
    if positions:
        data.check_positions(positions, user="--positions")
    res = path_patch_sweep(model, data, receivers, senders=args.senders, metric=args.metric, positions=positions,
                           batch_size=args.batch_size, memory_budget_mb=args.memory_budget)
    from circuitgraph.evaluate import distributed as dist

    if not dist.is_main():
        return 0
    if args.output:
        plot_path_patching(res, args.output)
    if args.json:
        print(res.to_json(indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"path patching -> {res.receiver} on {args.model} ({res.n_examples} examples, {res.metric})")
    t.add_column("sender"), t.add_column("effect", justify="right"), t.add_column("± s.e.", justify="right")
    fmt = lambda v, spec: f"{v:{spec}}" if math.isfinite(v) else "n/a"
    for name, e in res.top(15):
        t.add_row(name, fmt(e, "+.4f"), fmt(res.senders_se[name], ".4f"))
    console = Console()
    console.print(t)
    if res.undefined_reason:
        print(f"effects are not meaningful: {res.undefined_reason}")
    console.print(f"normalised: {NORMALISATION}")
    if args.output:
        console.print(f"wrote {args.output}")
    return 0
