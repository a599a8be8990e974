"""Direct logit attribution: each node's direct share of the clean logit difference.

The final norm is linear once its scale is fixed, so with the clean run's scale ``s`` at the
last position (and centring, for LayerNorm) the logit difference splits exactly into

    logit_diff = sum_nodes ((c - mean c) / s * w) . (u_answer - u_wrong)  +  bias terms,

``c`` a node's output there, ``w`` the final norm's weight, ``u`` unembedding rows (means over
several answers / wrongs, as the logit_diff metric takes them).  ``bias`` collects the attention
output biases, the final norm's bias and the unembedding bias; the parts add up to the metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuitgraph.data.dataset import TaskData
from circuitgraph.evaluate.metrics import logit_diff
from circuitgraph.model.loading import CircuitModel


@dataclass
class DLAResult:
    """Direct logit attribution: each node's share of the mean
    clean logit difference, read through the final norm's scale."""

    heads: torch.Tensor  # [n_layers, n_heads], mean over examples
    mlps: torch.Tensor  # [n_layers]
    input: float
    bias: float
    logit_diff: float  # mean clean logit difference = heads.sum() + mlps.sum() + input + bias
    per_example: torch.Tensor  # [N, n_sources] direct contribution of every source node
    sources: list[str]
    dims: tuple[str, str] = ("layer", "head")


def _direction(W_U: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean unembedding row of the valid (>= 0) ids of each example: ``[N, D]``."""
    valid = (ids >= 0).to(W_U.dtype)
    return (W_U[ids.clamp(min=0)] * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)


def final_norm_scale(model: CircuitModel, resid: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The final norm's scale ``[..., 1]`` for ``resid``, and whether it centres (LayerNorm)."""
    ln = model.weights.ln_final
    if ln.kind == "identity":
        return torch.ones_like(resid[..., :1]), False
    centre = ln.kind == "layer"
    x = resid - resid.mean(-1, keepdim=True) if centre else resid
    return torch.sqrt(x.pow(2).mean(-1, keepdim=True) + ln.eps), centre


def linear_decode(model: CircuitModel, component: torch.Tensor, scale: torch.Tensor, centre: bool) -> torch.Tensor:
    """What ``component [..., D]`` adds to the logits through the final norm frozen at ``scale`` (no biases)."""
    ln = model.weights.ln_final
    c = component - component.mean(-1, keepdim=True) if centre else component
    return (c / scale * ln.weight) @ model.weights.W_U.T


@torch.no_grad()
def direct_logit_attribution(model: CircuitModel, data: TaskData, batch_size: int = 32) -> DLAResult:
    """Per-node direct contributions to the clean logit difference (see module docstring)."""
    model.check_padding(data)
    e, G, w = model.engine, model.graph, model.weights
    dev = model.device
    rows, totals = [], []
    for a in range(0, len(data), batch_size):
        part = data.slice(a, min(len(data), a + batch_size))
        idx = torch.arange(len(part), device=dev)
        last = part.last.to(dev)
        logits, outs = e.run(part.clean.to(dev), record=True)
        final = e.make_ablation(outs, "clean").resid[-1][idx, last]  # [B, D], biases included
        scale, centre = final_norm_scale(model, final)
        du = _direction(w.W_U, part.answers.to(dev)) - _direction(w.W_U, part.wrongs.to(dev))  # [B, D]
        srcs = torch.cat([o[:, idx, last] for o in outs])  # [S, B, D]
        c = srcs - srcs.mean(-1, keepdim=True) if centre else srcs
        rows.append(((c / scale * w.ln_final.weight) * du).sum(-1).T.cpu())  # [B, S]
        totals.append(logit_diff(w.unembed(final), part.to(dev)).cpu())
    per = torch.cat(rows)
    total = torch.cat(totals)
    L, H = G.n_layers, G.n_heads
    mean = per.mean(0)
    heads = torch.stack([mean[G.head_source(l, 0):G.head_source(l, 0) + H] for l in range(L)])
    mlps = torch.stack([mean[G.mlp_source(l)] for l in range(L)])
    return DLAResult(heads, mlps, float(mean[0]), float(total.mean() - mean.sum()), float(total.mean()), per,
                     list(G.sources))


def plot_dla(result: DLAResult, path, title: str | None = None):
    """Layer x head heatmap of direct logit attribution, MLPs in the last column."""
    from circuitgraph.plots import heatmap, new_figure, save

    L, H = result.heads.shape
    fig, (ax,) = new_figure(L, H + 1)
    heatmap(fig, ax, torch.cat([result.heads, result.mlps[:, None]], 1), [f"L{l}" for l in range(L)],
            [f"h{h}" for h in range(H)] + ["mlp"], title=title or f"direct logit attribution (logit diff {result.logit_diff:.2f}; "
            f"input {result.input:+.2f}, biases {result.bias:+.2f})", xlabel="head", ylabel="layer",
            cbar_label="direct effect on logit diff", origin_lower=True)
    ax.axvline(H - 0.5, color="black", lw=1.2)
    return save(fig, path)


__all__ = ["DLAResult", "direct_logit_attribution", "final_norm_scale", "linear_decode", "plot_dla"]
