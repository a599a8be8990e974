"""Path patching (Wang et al. 2022) in the edge semantics of docs/engine.md.

Patching the path from a set of senders to a set of receivers, everything else frozen, is one
circuit: *every edge except the sender->receiver edges*, under corrupted ablation.  The receivers
then read the senders' corrupted outputs, every other input (theirs and everyone else's) stays
clean, and the change propagates freely downstream of the receivers -- exactly Wang et al.'s
three-step procedure, in one patched run.  Nothing before the receivers' layer differs from the
clean run, so each sender set resumes from the clean run paused there
(:meth:`~circuitgraph.evaluate.evaluator.Evaluator.values_without`), several stacked on the
engine's batch axis.

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
from circuitgraph.graph import GraphError, NodeRef
from circuitgraph.model.loading import CircuitModel
from circuitgraph.evaluate.evaluator import Evaluator, bootstrap_se, normalised, zero_gap

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
    undefined_reason: str | None = None  # clean and corrupted metrics equal within noise: effects mean nothing
    @property
    def receiver(self) -> str:
        """The receivers as one comma-separated name, for titles and tables."""
        return ",".join(self.receivers)

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` senders with the largest absolute effect."""
        return sorted(self.senders.items(), key=lambda kv: -abs(kv[1]) if math.isfinite(kv[1]) else 0)[:k]

    def to_dict(self) -> dict:
        """JSON-ready: the tensors are left out (their values are in ``senders``), NaN becomes None."""
        d = {k: v for k, v in asdict(self).items() if k not in ("heads", "mlps", "dims")}
        for key in ("senders", "senders_se"):
            d[key] = {n: (v if math.isfinite(v) else None) for n, v in d[key].items()}
        return {"receiver": self.receiver, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}}

    def to_json(self, **kw) -> str:
        """The result as one JSON object; undefined numbers are ``null`` (never NaN)."""
        return json.dumps(self.to_dict(), allow_nan=False, **kw)


# ----- names --------------------------------------------------------------------------------
def receiver_index(graph, name: str) -> int:
    """Destination index of a receiver, or a ValueError naming it and saying what a receiver is."""
    name = name.strip()
    if name in graph.destination_index:
        return graph.destination_index[name]
    what = "a receiver is a head's input port ('a1.h2<q>', '<k>' or '<v>'), an MLP ('m1') or 'logits'"
    try:
        ref = graph.ref(name, where="receiver")
    except GraphError as e:
        reason = str(e).split("': ", 1)[-1]
        if "unknown port" in reason:
            raise ValueError(f"receiver '{name}' is not a destination of this model ({reason}); {what}") from None
        raise ValueError(f"receiver '{name}': {reason}; {what}") from None
    if ref.kind == "input":
        raise ValueError(f"receiver '{name}': 'input' reads nothing; {what}")
    if ref.is_head and ref.port is None:
        raise ValueError(f"receiver '{name}': a head receiver needs a port: '{name}<q>', '{name}<k>' or '{name}<v>'")
    raise ValueError(f"receiver '{name}' is not a destination of this model; {what}")


def sender_index(graph, name: str) -> int:
    """Source index of a sender, or a ValueError naming it and saying what a sender is."""
    name = name.strip()
    graph.check_node(name, where="sender")
    if name == "logits":
        raise ValueError("sender 'logits': the logits write nothing; a sender is 'input', a head ('a0.h1') or an MLP ('m0')")
    return graph.source_index[name]


def check_upstream(graph, senders: list[int], dst: list[int], receivers: list[str]) -> None:
    """Every sender must feed at least one receiver: a sender downstream (or level) has no path to patch."""
    for s in senders:
        if not bool(graph.legal[s, dst].any()):
            raise ValueError(f"sender '{graph.sources[s]}' is not upstream of receiver(s) {', '.join(receivers)}: "
                             f"a head in layer L reads input, heads and MLPs of layers < L; m{{L}} also reads the heads of layer L")


def as_list(x) -> list[str]:
    """Comma-separated names (or a list of them) as a list of stripped names."""
    if isinstance(x, str):
        return [p for p in (s.strip() for s in x.split(",")) if p]
    return list(x)


# ----- patching -----------------------------------------------------------------------------
def _evaluator(model, data, metric, batch_size, evaluator, memory_budget_mb=None):
    if evaluator is not None:
        return evaluator
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Evaluator(model, data, metric=metric, ablation="corrupted", batch_size=batch_size, progress=False,
                         memory_budget_mb=memory_budget_mb)


def _patched_values(ev: Evaluator, sender_sets: list[list[int]], dst: list[int], positions: list[str] | None) -> np.ndarray:
    """Per-example metric ``[n_sets, N]`` with each set's sender->receiver edges patched (at ``positions``
    only, when given): the full graph's (the clean) run, resumed at the receivers' layer for each set."""
    legal = ev.graph.legal
    removals = [[(s, d) for s in ss for d in dst if legal[s, d]] for ss in sender_sets]
    return ev.values_without(legal, removals, chunk=ev.trials_per_pass, positions=positions)


def path_patch(model: CircuitModel, data: TaskData, senders, receivers, metric: str = "logit_diff",
               positions: list[str] | None = None, batch_size: int = 32, evaluator: Evaluator | None = None,
               memory_budget_mb: float | None = None) -> float:
    """Normalised effect of patching the paths from all ``senders`` (together) to all ``receivers``."""
    G = model.graph
    dst = [receiver_index(G, r) for r in as_list(receivers)]
    src = [sender_index(G, s) for s in as_list(senders)]
    if not src:
        raise ValueError("no senders given")
    check_upstream(G, src, dst, as_list(receivers))
    ev = _evaluator(model, data, metric, batch_size, evaluator, memory_budget_mb)
    vals = _patched_values(ev, [src], dst, positions)
    if zero_gap(ev.clean_values, ev.base_values):
        raise ValueError(f"the path-patching effect is undefined: {ev.undefined_reason}")
    return float(ev.normalise(vals)[0] - 1.0)


def path_patch_sweep(model: CircuitModel, data: TaskData, receivers, senders=None, metric: str = "logit_diff",
                     positions: list[str] | None = None, batch_size: int = 32,
                     evaluator: Evaluator | None = None, memory_budget_mb: float | None = None) -> PathPatchResult:
    """Path patching from each sender alone (default: every node upstream of a receiver) to ``receivers``;
    ``memory_budget_mb`` caps what a pass holds as :class:`Evaluator`'s does (the senders' circuits
    stacked in one pass, then the batch)."""
    G = model.graph
    rec = as_list(receivers)
    dst = [receiver_index(G, r) for r in rec]
    if senders is None:
        src = [s for s in range(len(G.sources)) if bool(G.legal[s, dst].any())]
    else:
        src = [sender_index(G, s) for s in as_list(senders)]
        check_upstream(G, src, dst, rec)
    if not src:
        raise ValueError(f"receiver(s) {rec} read only from nothing upstream; no senders to sweep")
    ev = _evaluator(model, data, metric, batch_size, evaluator, memory_budget_mb)
    if positions:
        ev.data.check_positions(positions, user="the path patching (positions)")
    vals = _patched_values(ev, [[s] for s in src], dst, positions)
    clean, base = ev.clean_values, ev.base_values
    eff = ev.normalise(vals) - 1.0
    L, H = G.n_layers, G.n_heads
    heads, mlps = torch.full((L, H), float("nan")), torch.full((L,), float("nan"))
    out, se = {}, {}
    for s, e, row in zip(src, eff, vals):
        name = G.sources[s]
        out[name] = float(e)
        se[name] = bootstrap_se(lambda m, c, b: normalised(m, c, b) - 1.0, row, clean, base)
        ref = NodeRef.parse(name)
        if ref.is_head:
            heads[ref.layer, ref.head] = float(e)
        elif ref.is_mlp:
            mlps[ref.layer] = float(e)
    undefined = ev.undefined_reason
    if undefined:
        import warnings

        from circuitgraph.errors import CircuitWarning

        warnings.warn(f"path-patching effects are not meaningful: {undefined}", CircuitWarning, stacklevel=2)
        if zero_gap(clean, base):  # 0/0: no number at all (None in JSON), not a rounding-noise ratio
            out = {k: float("nan") for k in out}
            se = {k: float("nan") for k in se}
            heads.fill_(float("nan")), mlps.fill_(float("nan"))
    return PathPatchResult(rec, ev.metric_name, len(data), out, se, heads, mlps, float(clean.mean()), float(base.mean()),
                           list(positions) if positions else None, data.prepend_bos, undefined_reason=undefined)


# ----- figure -------------------------------------------------------------------------------
def plot_path_patching(result: PathPatchResult, path, title: str | None = None):
    """Layer x head heatmap of the effects (MLPs in the last column), diverging, centred at 0."""
    from circuitgraph.plots import heatmap, new_figure, save

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


__all__ = ["NORMALISATION", "PathPatchResult", "as_list", "check_upstream", "path_patch", "path_patch_sweep",
           "plot_path_patching", "receiver_index", "sender_index"]
