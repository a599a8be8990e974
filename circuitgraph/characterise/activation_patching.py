"""Activation patching sweeps on the engine's forward (TransformerLens hook names), in both named directions.

- ``direction="denoising"``: run the *corrupted* prompt and patch in one *clean* activation.
  Score ``(M(patched) - M(corrupted)) / (M(clean) - M(corrupted))``: 0 = no change,
  1 = the activation alone restores the clean behaviour.
- ``direction="noising"``: run the *clean* prompt and patch in one *corrupted* activation.
  Score ``(M(clean) - M(patched)) / (M(clean) - M(corrupted))``: 0 = no change,
  1 = the activation alone carries the full corruption.

Both are ratios of dataset means (as everywhere in circuitgraph).  Components:
``resid_pre`` / ``attn_out`` / ``mlp_out`` by layer x position, ``heads`` (a head's output ``z``
at every position) by layer x head, and ``heads_by_position`` by layer x head x position.  Many
cells are patched at once by stacking copies of the batch, one cell per copy.  Positions are
token indices; they line up across examples only when the dataset is position-aligned (the
labels come from the first example).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from circuitgraph.data.dataset import TaskData
from circuitgraph.evaluate.metrics import get_metric
from circuitgraph.model.loading import CircuitModel

DIRECTIONS = ("denoising", "noising")
HOOKS = {"resid_pre": "blocks.{L}.hook_resid_pre", "attn_out": "blocks.{L}.hook_attn_out",
         "mlp_out": "blocks.{L}.hook_mlp_out", "heads": "blocks.{L}.attn.hook_z",
         "heads_by_position": "blocks.{L}.attn.hook_z"}


@dataclass
class PatchingResult:
    """Normalised activation-patching scores with labelled axes (see module docstring)."""

    component: str
    direction: str
    metric: str
    values: torch.Tensor  # [n_layers, n_positions] | [n_layers, n_heads] | [n_layers, n_heads, n_positions]
    dims: tuple[str, ...]
    position_labels: list[str]
    clean_metric: float
    corrupted_metric: float
    n_examples: int
    raw: torch.Tensor | None = field(default=None, repr=False)  # mean patched metric, same shape as values


# ----- running the engine with hooks -----------------------------------------------------------
def last_logits(model: CircuitModel, tokens: torch.Tensor, last: torch.Tensor, fwd_hooks=()) -> torch.Tensor:
    """Logits ``[B, vocab]`` at each row's ``last`` position, running the engine's forward with ``fwd_hooks``."""
    return model.run_with_hooks(tokens, fwd_hooks, logit_positions=last.to(model.device))


def _cells(component: str, L: int, H: int, P: int) -> tuple[list[tuple[int | None, int | None]], tuple]:
    """(head, position) cells patched per layer, and the result's shape after the layer axis."""
    if component in ("resid_pre", "attn_out", "mlp_out"):
        return [(None, p) for p in range(P)], (P,)
    if component == "heads":
        return [(h, None) for h in range(H)], (H,)
    return [(h, p) for h in range(H) for p in range(P)], (H, P)


def activation_patching(model: CircuitModel, data: TaskData, component: str = "resid_pre",
                        direction: str = "denoising", metric: str = "logit_diff", layers: list[int] | None = None,
                        max_batch: int = 128) -> PatchingResult:
    """Patch each (layer, cell) of ``component`` alone, in ``direction``; cells batched ``max_batch`` rows a run."""
    model.check_padding(data)
    if component not in HOOKS:
        raise ValueError(f"unknown component '{component}'; expected one of {', '.join(HOOKS)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction '{direction}'; expected 'denoising' (corrupted run, clean activation "
                         "patched in) or 'noising' (clean run, corrupted activation patched in)")
    metric_fn = get_metric(metric)
    G = model.graph
    layers = list(range(G.n_layers)) if layers is None else list(layers)
    dev = model.device
    N, P = data.clean.shape
    cells, tail = _cells(component, G.n_layers, G.n_heads, P)
    ex_batch = max(1, min(N, max_batch))
    per_run = max(1, max_batch // ex_batch)
    sums = torch.zeros(len(layers), len(cells), dtype=torch.float64)
    clean_sum = corrupt_sum = 0.0
    for a in range(0, N, ex_batch):
        part = data.slice(a, min(N, a + ex_batch))
        B, last = len(part), part.last.to(dev)
        clean, corrupt = part.clean.to(dev), part.corrupted.to(dev)
        base, source = (corrupt, clean) if direction == "denoising" else (clean, corrupt)
        pd = part.to(dev)
        hooks = [HOOKS[component].format(L=l) for l in layers]
        with torch.no_grad():
            clean_logits = last_logits(model, clean, last)
            corrupt_logits = last_logits(model, corrupt, last)
            clean_sum += float(metric_fn(clean_logits, pd, clean_logits).sum())
            corrupt_sum += float(metric_fn(corrupt_logits, pd, clean_logits).sum())
            _, cache = model.run_with_cache(source, names_filter=lambda n: n in hooks)
            for li, hook in enumerate(hooks):
                src = cache[hook]
                for c0 in range(0, len(cells), per_run):
                    chunk = cells[c0:c0 + per_run]
                    logits = last_logits(model, base.repeat(len(chunk), 1), last.repeat(len(chunk)),
                                         [(hook, _patcher(src, chunk, B))])
                    vals = metric_fn(logits.view(len(chunk), B, -1), pd, clean_logits)  # [k, B]
                    sums[li, c0:c0 + len(chunk)] += vals.double().sum(1).cpu()
    m_clean, m_corrupt = clean_sum / N, corrupt_sum / N
    raw = (sums / N).float().view(len(layers), *tail)
    gap = m_clean - m_corrupt
    norm = (raw - m_corrupt) / gap if direction == "denoising" else (m_clean - raw) / gap
    dims = {"resid_pre": ("layer", "position"), "attn_out": ("layer", "position"), "mlp_out": ("layer", "position"),
            "heads": ("layer", "head"), "heads_by_position": ("layer", "head", "position")}[component]
    return PatchingResult(component, direction, metric, norm, dims, _position_labels(model, data), m_clean, m_corrupt, N, raw)


@torch.no_grad()
def patch_one(model: CircuitModel, data: TaskData, component: str, layer: int, direction: str = "denoising",
              metric: str = "logit_diff", positions=None, head: int | None = None) -> float:
    """Normalised score of one patch: ``component`` at ``layer`` (one ``head`` of ``heads``), at ``positions``
    (a list of indices; ``None`` = every position), all at once."""
    model.check_padding(data)
    if component not in HOOKS or direction not in DIRECTIONS:
        raise ValueError(f"component must be one of {', '.join(HOOKS)} and direction one of {', '.join(DIRECTIONS)}")
    fn, dev = get_metric(metric), model.device
    clean, corrupt, last = data.clean.to(dev), data.corrupted.to(dev), data.last.to(dev)
    pd = data.to(dev)
    base, source = (corrupt, clean) if direction == "denoising" else (clean, corrupt)
    name = HOOKS[component].format(L=layer)
    _, cache = model.run_with_cache(source, names_filter=lambda n: n == name)
    pos = slice(None) if positions is None else torch.as_tensor(positions)

    def patch(act, hook):
        act = act.clone()
        if head is None:
            act[:, pos] = cache[name][:, pos]
        else:
            act[:, pos, head] = cache[name][:, pos, head]
        return act

    cl = last_logits(model, clean, last)
    m_clean = float(fn(cl, pd, cl).mean())
    m_corrupt = float(fn(last_logits(model, corrupt, last), pd, cl).mean())
    m = float(fn(last_logits(model, base, last, [(name, patch)]), pd, cl).mean())
    gap = m_clean - m_corrupt
    return (m - m_corrupt) / gap if direction == "denoising" else (m_clean - m) / gap


def _patcher(src: torch.Tensor, chunk, B: int):
    """Hook writing ``src`` (the other run's activation) into copy ``i`` of the batch at cell ``chunk[i]``."""
    def hook(act, hook):
        act = act.clone()
        for i, (h, p) in enumerate(chunk):
            rows = slice(i * B, (i + 1) * B)
            if h is None:
                act[rows, p] = src[:, p]
            elif p is None:
                act[rows, :, h] = src[:, :, h]
            else:
                act[rows, p, h] = src[:, p, h]
        return act
    return hook


def _position_labels(model, data: TaskData) -> list[str]:
    from circuitgraph.plots import token_labels

    P = data.clean.shape[1]
    ids = data.clean[0, :P].tolist()
    differs = (data.clean[0] != data.corrupted[0]).tolist()
    labels = token_labels(model.tokenizer, ids, marks=differs)
    n0 = int(data.lengths[0])
    return labels[:n0] + [f"{i} ·" for i in range(n0, P)]


def patch_resid(model, data, direction="denoising", metric="logit_diff", **kw) -> PatchingResult:
    """Activation patching of the residual stream before each
    layer, layer x position (see :func:`activation_patching`)."""
    return activation_patching(model, data, "resid_pre", direction, metric, **kw)


def patch_attn_out(model, data, direction="denoising", metric="logit_diff", **kw) -> PatchingResult:
    """Activation patching of each layer's attention output, layer x position (see :func:`activation_patching`)."""
    return activation_patching(model, data, "attn_out", direction, metric, **kw)


def patch_mlp_out(model, data, direction="denoising", metric="logit_diff", **kw) -> PatchingResult:
    """Activation patching of each layer's MLP output, layer x position (see :func:`activation_patching`)."""
    return activation_patching(model, data, "mlp_out", direction, metric, **kw)


def patch_heads(model, data, direction="denoising", metric="logit_diff", per_position: bool = False, **kw) -> PatchingResult:
    """Activation patching of every head's output, layer x head (or per
    position with ``per_position``; see :func:`activation_patching`)."""
    return activation_patching(model, data, "heads_by_position" if per_position else "heads", direction, metric, **kw)


# ----- figures -------------------------------------------------------------------------------------
def plot_patching(results: PatchingResult | list[PatchingResult], path, title: str | None = None):
    """Heatmaps side by side: layer x position with token labels (``*`` = corrupted differs) or layer x head.

    ``heads_by_position`` results are drawn as (layer.head) x position.
    """
    from circuitgraph.plots import heatmap, new_figure, save

    results = [results] if isinstance(results, PatchingResult) else list(results)
    grids = []
    for r in results:
        v = r.values
        L = v.shape[0]
        if r.component == "heads":
            grids.append((v, [f"L{l}" for l in range(L)], [f"h{h}" for h in range(v.shape[1])], "head"))
        elif r.component == "heads_by_position":
            rows = [f"a{l}.h{h}" for l in range(L) for h in range(v.shape[1])]
            grids.append((v.reshape(-1, v.shape[-1]), rows, r.position_labels, "position  (* = corrupted token differs)"))
        else:
            grids.append((v, [f"L{l}" for l in range(L)], r.position_labels, "position  (* = corrupted token differs)"))
    n_rows = max(g[0].shape[0] for g in grids)
    n_cols = max(g[0].shape[1] for g in grids)
    fig, axes = new_figure(n_rows, n_cols, panels=len(grids), vertical=n_cols > 2 * n_rows)
    lim = max(float(np.nanmax(np.abs(g[0].numpy()))) for g in grids) or 1.0
    for ax, r, (v, rows, cols, xl) in zip(axes, results, grids):
        heatmap(fig, ax, v, rows, cols, diverging=True, vmax=lim, xlabel=xl, cbar_label=f"{r.direction} score",
                ylabel="head" if r.component == "heads_by_position" else "layer",
                title=f"{r.component} ({r.direction}, {r.metric})", annotate=v.numel() <= 64)
    if title:
        fig.suptitle(title)
    return save(fig, path)


__all__ = ["DIRECTIONS", "PatchingResult", "activation_patching", "last_logits", "patch_attn_out", "patch_heads",
           "patch_mlp_out", "patch_one", "patch_resid", "plot_patching"]
