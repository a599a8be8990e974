"""Path patching (Wang et al. 2022) in the edge semantics of DESIGN.md.

Patching the path from a set of senders to a set of receivers, everything else frozen, is one
circuit: *every edge except the sender->receiver edges*, under corrupted ablation.  The receivers
then read the senders' corrupted outputs, every other input (theirs and everyone else's) stays
clean, and the change propagates freely downstream of the receivers -- exactly Wang et al.'s
three-step procedure, in one patched run.  A sweep over many senders stacks their circuits on
the engine's batch axis.

Effects are normalised as ``(M(patched) - M(clean)) / (M(clean) - M(corrupted))``: 0 = no effect,
-1 = the path carries the whole corruption effect (a value below -1 overshoots it; a positive
value means the corrupted path pushes the metric *up*).

Receivers: a head's port (``a1.h2<q>``, ``<k>``, ``<v>``), an MLP (``m1``) or ``logits``.
Senders: ``input``, heads and MLPs upstream of a receiver.  ``positions`` restricts the patch to
named token positions of the *sender outputs* (the sender->receiver edges stay clean elsewhere);
such position-restricted circuits run one sender at a time, as the engine requires.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from circuitgraph.data.dataset import TaskData
from circuitgraph.graph.computational_graph import GraphError
from circuitgraph.model.loading import CircuitModel
from circuitgraph.evaluate.evaluator import Evaluator, _normalised, bootstrap_se
from circuitgraph.spec.circuit_spec import ResolvedCircuit

NORMALISATION = "(M(patched) - M(clean)) / (M(clean) - M(corrupted)); 0 = no effect, -1 = the full corruption effect"


@dataclass
class PathPatchResult:
    """Normalised path-patching effect of each sender on a receiver set (see module docstring)."""

    receivers: list[str]
    metric: str
    n_examples: int
    senders: dict[str, float]  # sender node -> normalised effect
    senders_se: dict[str, float]  # bootstrap standard error of each effect
    heads: torch.Tensor  # [n_layers, n_heads]; NaN where a head is not a sender of the receivers
    mlps: torch.Tensor  # [n_layers]; NaN likewise
    clean_metric: float
    corrupted_metric: float
    positions: list[str] | None = None
    prepend_bos: bool = False
    normalisation: str = NORMALISATION
    dims: tuple[str, str] = ("layer", "head")

    @property
    def receiver(self) -> str:
        return ",".join(self.receivers)

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` senders with the largest absolute effect."""
        return sorted(self.senders.items(), key=lambda kv: -abs(kv[1]) if math.isfinite(kv[1]) else 0)[:k]

    def to_dict(self) -> dict:
        """JSON-ready: the tensors are left out (their values are in ``senders``), NaN becomes None."""
        d = {k: v for k, v in asdict(self).items() if k not in ("heads", "mlps", "dims")}
        for key in ("senders", "senders_se"):
            d[key] = {n: (v if math.isfinite(v) else None) for n, v in d[key].items()}
        return {"receiver": self.receiver, **d}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)


# ----- names --------------------------------------------------------------------------------
def receiver_index(graph, name: str) -> int:
    """Destination index of a receiver, or a ValueError naming it and saying what a receiver is."""
    name = name.strip()
    if name in graph.destination_index:
        return graph.destination_index[name]
    what = "a receiver is a head's input port ('a1.h2<q>', '<k>' or '<v>'), an MLP ('m1') or 'logits'"
    node = graph.node_of(name)
    try:
        graph.check_node(node, where="receiver")
    except GraphError as e:
        reason = str(e).split("': ", 1)[-1]
        raise ValueError(f"receiver '{name}': {reason}; {what}") from None
    if node == "input":
        raise ValueError(f"receiver '{name}': 'input' reads nothing; {what}")
    if node.startswith("a") and "<" not in name:
        raise ValueError(f"receiver '{name}': a head receiver needs a port: '{name}<q>', '{name}<k>' or '{name}<v>'")
    raise ValueError(f"receiver '{name}' is not a destination of this model; {what}")


def sender_index(graph, name: str) -> int:
    name = name.strip()
    graph.check_node(name, where="sender")
    if name == "logits":
        raise ValueError("sender 'logits': the logits write nothing; a sender is 'input', a head ('a0.h1') or an MLP ('m0')")
    return graph.source_index[name]


def _as_list(x) -> list[str]:
    if isinstance(x, str):
        return [p for p in (s.strip() for s in x.split(",")) if p]
    return list(x)


# ----- patching -----------------------------------------------------------------------------
def _evaluator(model, data, metric, batch_size, evaluator):
    if evaluator is not None:
        return evaluator
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Evaluator(model, data, metric=metric, ablation="corrupted", batch_size=batch_size, progress=False)


def _patched_values(ev: Evaluator, sender_sets: list[list[int]], dst: list[int], positions: list[str] | None) -> np.ndarray:
    """Per-example metric ``[n_sets, N]`` with each set's sender->receiver edges patched."""
    legal = ev.graph.legal
    if not positions:
        masks = legal.clone()[None].repeat(len(sender_sets), 1, 1)
        for i, ss in enumerate(sender_sets):
            for s in ss:
                masks[i, s, dst] = False
        return ev.mask_values(masks)
    # the complement of "these edges at these positions" keeps them everywhere else: position-restricted
    circuits = [ResolvedCircuit(ev.graph, {(s, d): list(positions) for s in ss for d in dst if legal[s, d]})
                for ss in sender_sets]
    return ev.metric_values([ev.resolve(c) for c in circuits], complement=True)


def path_patch(model: CircuitModel, data: TaskData, senders, receivers, metric: str = "logit_diff",
               positions: list[str] | None = None, batch_size: int = 32, evaluator: Evaluator | None = None) -> float:
    """Normalised effect of patching the paths from all ``senders`` (together) to all ``receivers``."""
    G = model.graph
    dst = [receiver_index(G, r) for r in _as_list(receivers)]
    src = [sender_index(G, s) for s in _as_list(senders)]
    if not bool(G.legal[src][:, dst].any()):
        raise ValueError(f"no edge goes from {_as_list(senders)} to {_as_list(receivers)}: senders must be upstream of the receivers")
    ev = _evaluator(model, data, metric, batch_size, evaluator)
    vals = _patched_values(ev, [src], dst, positions)
    return float(ev.normalise(vals)[0] - 1.0)


def path_patch_sweep(model: CircuitModel, data: TaskData, receivers, senders=None, metric: str = "logit_diff",
                     positions: list[str] | None = None, batch_size: int = 32,
                     evaluator: Evaluator | None = None) -> PathPatchResult:
    """Path patching from each sender alone (default: every node upstream of a receiver) to ``receivers``."""
    G = model.graph
    rec = _as_list(receivers)
    dst = [receiver_index(G, r) for r in rec]
    if senders is None:
        src = [s for s in range(len(G.sources)) if bool(G.legal[s, dst].any())]
    else:
        src = [sender_index(G, s) for s in _as_list(senders)]
    if not src:
        raise ValueError(f"receiver(s) {rec} read only from nothing upstream; no senders to sweep")
    ev = _evaluator(model, data, metric, batch_size, evaluator)
    if positions:
        missing = [p for p in positions if p not in data.positions]
        if missing:
            raise ValueError(f"position(s) {missing} are not named in the dataset (it names: {', '.join(sorted(data.positions)) or 'none'})")
    vals = _patched_values(ev, [[s] for s in src], dst, positions)
    clean, base = ev.clean_values, ev.base_values
    eff = ev.normalise(vals) - 1.0
    L, H = G.n_layers, G.n_heads
    heads, mlps = torch.full((L, H), float("nan")), torch.full((L,), float("nan"))
    out, se = {}, {}
    for s, e, row in zip(src, eff, vals):
        name = G.sources[s]
        out[name] = float(e)
        se[name] = bootstrap_se(lambda m, c, b: _normalised(m, c, b) - 1.0, row, clean, base)
        if name.startswith("a"):
            layer, head = map(int, name[1:].split(".h"))
            heads[layer, head] = float(e)
        elif name.startswith("m"):
            mlps[int(name[1:])] = float(e)
    return PathPatchResult(rec, ev.metric_name, len(data), out, se, heads, mlps, float(clean.mean()), float(base.mean()),
                           list(positions) if positions else None, data.prepend_bos)


# ----- figure -------------------------------------------------------------------------------
def plot_path_patching(result: PathPatchResult, path, title: str | None = None):
    """Layer x head heatmap of the effects (MLPs in the last column), diverging, centred at 0."""
    from circuitgraph.characterise.plots import heatmap, new_figure, save

    L, H = result.heads.shape
    grid = torch.cat([result.heads, result.mlps[:, None]], dim=1)
    fig, (ax,) = new_figure(L, H + 1, min_w=6.0, min_h=3.6)
    inp = result.senders.get("input")
    pos = f" at {','.join(result.positions)}" if result.positions else ""
    t = title or f"path patching -> {result.receiver}{pos}"
    t += f"\n{result.metric}, {result.n_examples} examples" + (f"; sender 'input': {inp:+.2f}" if inp is not None else "")
    heatmap(fig, ax, grid, [f"L{i}" for i in range(L)], [f"h{h}" for h in range(H)] + ["mlp"], diverging=True,
            title=t, xlabel="head   (grey: not upstream of the receivers)", ylabel="layer",
            cbar_label="effect (-1 = full corruption)", origin_lower=True)
    ax.axvline(H - 0.5, color="black", lw=1.2)
    return save(fig, path)


# ----- command line ---------------------------------------------------------------------------
def register_cli(subparsers) -> None:
    """Add ``circuitgraph path-patch --model M --data FILE --receiver 'a1.h2<k>' [--json] [-o FIG.png]``."""
    from circuitgraph.cli.commands import _common

    p = subparsers.add_parser("path-patch", help="path patching from every head and MLP to a receiver")
    _common(p)
    p.add_argument("--receiver", required=True, action="append",
                   help="head port 'a1.h2<k>', MLP 'm1' or 'logits' (repeat or comma-separate for several)")
    p.add_argument("--senders", default=None, help="comma-separated sender nodes (default: every node upstream)")
    p.add_argument("--positions", default=None, help="comma-separated named positions: patch sender outputs only there")
    p.add_argument("--metric", choices=["logit_diff", "prob_diff", "kl", "accuracy"], default="logit_diff")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-o", "--output", default=None, help="write the layer x head heatmap (PNG)")
    p.set_defaults(func=cmd_path_patch)


def cmd_path_patch(args) -> int:
    from circuitgraph.cli.commands import _load

    receivers = [r for part in args.receiver for r in _as_list(part)]
    model, data = _load(args)
    for r in receivers:  # fail on a bad name before any model run
        receiver_index(model.graph, r)
    positions = _as_list(args.positions) if args.positions else None
    res = path_patch_sweep(model, data, receivers, senders=args.senders, metric=args.metric, positions=positions,
                           batch_size=args.batch_size)
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
    for name, e in res.top(15):
        t.add_row(name, f"{e:+.4f}", f"{res.senders_se[name]:.4f}")
    console = Console()
    console.print(t)
    console.print(f"normalised: {NORMALISATION}")
    if args.output:
        console.print(f"wrote {args.output}")
    return 0


__all__ = ["PathPatchResult", "path_patch", "path_patch_sweep", "plot_path_patching", "receiver_index", "register_cli",
           "cmd_path_patch"]
