"""``evaluate --holdout FILE|FRACTION``: the circuit's faithfulness on rows it was not found on, beside the rows it was."""

from __future__ import annotations

from circuitgraph.cli.checks import CLIError


def add_holdout_arg(p) -> None:
    """Add ``--holdout FILE|FRACTION`` to a subcommand."""
    p.add_argument("--holdout", default=None, metavar="FILE|FRACTION",
                   help="also score the circuit on held-out rows and flag a drop of faithfulness beyond 2 combined standard "
                        "errors: a JSONL file of other rows (e.g. other templates), or a fraction in (0, 1): the last rows "
                        "of --data, the circuit having been found on the others (the scores above are then on those)")


def read_holdout(args):
    """Before the model loads: a fraction, or the held-out file's rows (checked like --data)."""
    from circuitgraph.data.dataset import read_jsonl

    try:
        fraction = float(args.holdout)
    except ValueError:
        return read_jsonl(args.holdout)
    if not 0 < fraction < 1:
        raise CLIError(f"--holdout {args.holdout}: expected a JSONL file or a fraction in (0, 1)")
    return fraction


def split(args, model, data, spec, holdout):
    """``(found rows, held-out rows, where they came from)``; a fraction is refused when the spec says it was found
    on more rows than are left, since the held-out rows may be among them."""
    from circuitgraph.data.dataset import tokenize
    from circuitgraph.evaluate.holdout import split_rows

    if not isinstance(holdout, float):
        return data, tokenize(holdout, model, prepend_bos=args.prepend_bos, source=str(args.holdout)), str(args.holdout)
    found, held = split_rows(data, holdout)
    seen = spec.metadata.get("n_examples")
    if isinstance(seen, int) and seen > len(found):
        raise CLIError(f"--holdout {args.holdout}: the spec was found on {seen} rows, more than the {len(found)} of --data "
                       f"left after holding out its last {len(held)}, so held-out rows may be among them; give a FILE of "
                       f"other rows, or discover on the first {len(found)} rows")
    return found, held, f"the last {len(held)} rows of {args.data}"


def print_holdout(comparison) -> None:
    """Print the held-out score, its drop from the rows the
    circuit was found on, and the flag line when there is one."""
    num = lambda v, se: "undefined" if v is None else f"{v:.4f}" + ("" if se is None else f" ± {se:.4f}")
    h = comparison.held
    print(f"held out ({comparison.source}, {h.n_examples} rows): faithfulness {num(h.faithfulness, h.faithfulness_se)}, "
          f"necessity {num(h.necessity, h.necessity_se)}; drop from the rows it was found on "
          f"{num(comparison.drop, comparison.drop_se)}")
    if line := comparison.line():
        print(f"warning: {line}")
    elif comparison.reason:
        print(f"no flag: {comparison.reason}")
