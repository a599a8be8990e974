"""``discover --bootstrap B [--by-template] [--stability-threshold [PI]] [--seed S]``: how sure we are of each edge."""

from __future__ import annotations

from circuitgraph.cli.checks import CLIError, positive_int


def add_bootstrap_args(p) -> None:
    """Add ``--bootstrap B``, ``--stability-threshold [PI]`` and ``--seed S`` to ``discover``."""
    from circuitgraph.discovery.stability import STABLE_FRACTION

    p.add_argument("--bootstrap", type=positive_int, default=None, metavar="B",
                   help="also score B resamples of the rows (drawn with replacement; B=1: the rows themselves), each cut "
                        "with this run's selection rule and size, and give every edge its inclusion frequency, the mean "
                        "pairwise Jaccard of the resampled circuits and, with --curve, a 95%% band on each curve point")
    p.add_argument("--by-template", action="store_true",
                   help="resample whole templates instead of rows (rows name theirs in a \"template\" field, as make-data writes it)")
    p.add_argument("--stability-threshold", type=_fraction, nargs="?", const=STABLE_FRACTION, default=None, metavar="PI",
                   help=f"with --bootstrap: write the stability-selected circuit, the units kept in at least PI of the "
                        f"resamples (default {STABLE_FRACTION:g}), instead of this run's selection")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples (default 0)")


def _fraction(text: str) -> float:
    import argparse

    from circuitgraph.cli.checks import finite_float

    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction of the resamples in (0, 1], got {text!r}")
    return value


def check_bootstrap_args(args) -> None:
    """Refusals that need no model: flags that only mean something with --bootstrap."""
    if args.bootstrap is None:
        for flag, given in (("--by-template", args.by_template), ("--stability-threshold", args.stability_threshold is not None)):
            if given:
                raise CLIError(f"{flag} needs --bootstrap B")
        return
    if args.format == "mib":
        raise CLIError("--bootstrap: MIB's circuit JSON (--format mib) has no field for inclusion frequencies; use --format spec")


def run_bootstrap(args, ev, rule, mask, how: str, curve: bool):
    """``(stability, mask, how)``: the resamples' frequencies and, with --stability-threshold, the stable circuit."""
    from circuitgraph.discovery.stability import bootstrap

    groups = None
    if args.by_template:
        groups = ev.data.templates()
        if len(set(groups)) < 2:
            raise CLIError(f"--by-template: every row names the same template ({groups[0]!r}); resampling templates needs "
                           f"at least two, or drop --by-template to resample rows")
    stab = bootstrap(ev, args.method, rule, args.bootstrap, seed=args.seed, curve=curve, progress=not args.json,
                     steps=args.steps, tau=args.tau, ig_points=args.ig_points, keep_deltas=args.keep_deltas,
                     by_position=args.by_position, groups=groups)
    if args.stability_threshold is None:
        return stab, mask, how
    pi = args.stability_threshold
    stable = stab.stable(pi)
    if not bool(stable.any()):
        top = max((f for _, _, f in stab.units()), default=0.0)
        raise CLIError(f"--stability-threshold {pi:g} keeps no unit: the most frequent one is in {top:.3g} of the "
                       f"{args.bootstrap} resamples; lower the threshold")
    units = "edge x position units" if stab.spans else "edges"
    return stab, stable, f"stability selection: the {int(stable.sum())} {units} in >= {pi:g} of {args.bootstrap} resamples of {how}"


def summary_line(stab, threshold: float | None) -> str:
    """One line for the terminal: resamples, mean pairwise Jaccard and how many units reach the stability threshold."""
    from circuitgraph.discovery.stability import STABLE_FRACTION

    pi = STABLE_FRACTION if threshold is None else threshold
    j = "undefined" if stab.jaccard is None else f"{stab.jaccard:.3f}"
    return (f"bootstrap: {stab.n_resamples} resamples of the {stab.resample}; mean pairwise Jaccard {j}; "
            f"{int(stab.stable(pi).sum())} units in >= {pi:g} of them")
