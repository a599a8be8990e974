"""Integrated gradients of the metric with respect to the input tokens (Sundararajan et al. 2017).

Embedding space: the token embeddings move on a straight line from the *corrupted* prompt's
(the baseline) to the clean prompt's, ``x(a) = x_corr + a (x_clean - x_corr)``, with position
embeddings unchanged (clean and corrupted prompts have the same length).  A token's
attribution is ``(x_clean - x_corr) . mean_a dM/dx(a)`` summed over the embedding dimension,
the path integral taken by the midpoint rule with ``n_steps`` points.  Completeness: per
example the attributions sum to ``M(clean) - M(corrupted)`` up to the quadrature error, which
is reported (``completeness_error``) rather than hidden; more steps shrink it (O(1/n^2)).
Positions where clean and corrupted tokens agree get exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuitgraph.characterise.activation_patching import last_logits
from circuitgraph.data.dataset import TaskData
from circuitgraph.evaluate.metrics import get_metric
from circuitgraph.model.loading import CircuitModel


@dataclass
class IGResult:
    """Integrated-gradients attributions of the metric to input tokens,
    with the completeness error that says how far to trust them."""

    attributions: torch.Tensor  # [N, P] per token (0 past each example's length)
    metric_clean: torch.Tensor  # [N]
    metric_corrupted: torch.Tensor  # [N]
    completeness_error: torch.Tensor  # [N] sum(attributions) - (clean - corrupted)
    n_steps: int
    metric: str
    dims: tuple[str, str] = ("example", "position")


def integrated_gradients(model: CircuitModel, data: TaskData, metric: str = "logit_diff", n_steps: int = 32,
                         max_batch: int = 128) -> IGResult:
    """Per-token IG attributions of the per-example metric, baseline = corrupted embeddings."""
    model.check_padding(data)
    fn = get_metric(metric)
    dev = model.device
    embed = model.weights.embed  # the input node's output (token embedding, positions and scaling as the model adds them)
    N = len(data)
    ex = max(1, min(N, max_batch))
    attr, m_clean, m_corr = [], [], []
    alphas = (torch.arange(n_steps, dtype=model.weights.W_U.dtype, device=dev) + 0.5) / n_steps
    for a in range(0, N, ex):
        part = data.slice(a, min(N, a + ex))
        B, P = part.clean.shape
        clean, last = part.clean.to(dev), part.last.to(dev)
        with torch.no_grad():
            x1, x0 = embed(clean), embed(part.corrupted.to(dev))
        pd = part.to(dev)
        with torch.no_grad():
            cl = last_logits(model, clean, last)
            m_clean.append(fn(cl, pd, cl).cpu())
            m_corr.append(fn(last_logits(model, part.corrupted.to(dev), last), pd, cl).cpu())
        grad_sum = torch.zeros_like(x1)
        per = max(1, max_batch // B)
        for s0 in range(0, n_steps, per):
            al = alphas[s0:s0 + per]
            k = len(al)
            x = (x0[None] + al[:, None, None, None] * (x1 - x0)[None]).reshape(k * B, P, -1).requires_grad_(True)
            with torch.enable_grad():
                logits = last_logits(model, clean.repeat(k, 1), last.repeat(k), [("hook_embed", lambda act, hook, x=x: x)])
                m = fn(logits.view(k, B, -1), pd, cl).sum()
                (g,) = torch.autograd.grad(m, x)
            grad_sum += g.view(k, B, P, -1).sum(0)
        attr.append(((x1 - x0) * grad_sum / n_steps).sum(-1).detach().cpu())
    A = torch.zeros(N, data.clean.shape[1])
    row = 0
    for t in attr:
        A[row:row + len(t), :t.shape[1]] = t
        row += len(t)
    mc, mk = torch.cat(m_clean).float(), torch.cat(m_corr).float()
    return IGResult(A, mc, mk, A.sum(1) - (mc - mk), n_steps, metric)


def plot_attributions(result: IGResult, data: TaskData, path, tokenizer=None, examples: int = 6, title: str | None = None):
    """Example x position heatmap of attributions, clean tokens on the cells."""
    from circuitgraph.plots import heatmap, new_figure, save

    n = min(examples, len(data))
    P = int(data.lengths[:n].max())
    vals = result.attributions[:n, :P].clone()
    for i in range(n):
        vals[i, int(data.lengths[i]):] = float("nan")
    fig, (ax,) = new_figure(n, P, cell=0.55)
    rows = [f"ex {i}: Δ{float(result.metric_clean[i] - result.metric_corrupted[i]):+.2f}" for i in range(n)]
    heatmap(fig, ax, vals, rows, [str(p) for p in range(P)], title=title or
            f"integrated gradients of {result.metric} (baseline: corrupted, {result.n_steps} steps)",
            xlabel="position" + ("  (bold: token differs from the corrupted prompt)" if tokenizer is not None else ""),
            cbar_label="attribution", annotate=False)
    if tokenizer is not None:
        for i in range(n):
            for p in range(int(data.lengths[i])):
                tok = tokenizer.decode([int(data.clean[i, p])]).strip()[:6]
                ax.text(p, i, tok, ha="center", va="center", fontsize=6 if P > 20 else 7,
                        fontweight="bold" if data.clean[i, p] != data.corrupted[i, p] else "normal")
    return save(fig, path)


__all__ = ["IGResult", "integrated_gradients", "plot_attributions"]
