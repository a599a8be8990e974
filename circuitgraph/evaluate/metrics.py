"""Task metrics, computed per example from the logits at each example's last position.

Each metric maps ``logits [..., N, vocab]`` (plus the clean logits, for KL) to per-example values
``[..., N]``; scores average them and report their spread.
"""

from __future__ import annotations

from typing import Callable

import torch

from circuitgraph.data.dataset import TaskData


def _gather_mean(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean of ``values[..., n, ids[n, j]]`` over the valid (>= 0) ids of each example."""
    valid = ids >= 0
    picked = values.gather(-1, ids.clamp(min=0).expand(*values.shape[:-1], ids.shape[-1]))
    return (picked * valid).sum(-1) / valid.sum(-1)


def logit_diff(logits, data: TaskData, clean_logits=None):
    """Mean answer logit minus mean wrong logit."""
    return _gather_mean(logits, data.answers) - _gather_mean(logits, data.wrongs)


def prob_diff(logits, data: TaskData, clean_logits=None):
    """Total probability of the answers minus that of the wrong tokens."""
    probs = logits.softmax(-1)
    a, w = data.answers, data.wrongs
    return _gather_mean(probs, a) * (a >= 0).sum(-1) - _gather_mean(probs, w) * (w >= 0).sum(-1)


def kl(logits, data: TaskData, clean_logits=None):
    """KL(clean || patched) of the next-token distributions (0 for the clean run; lower is closer)."""
    logp = logits.log_softmax(-1)
    logq = clean_logits.log_softmax(-1)
    return (logq.exp() * (logq - logp)).sum(-1)


def accuracy(logits, data: TaskData, clean_logits=None):
    """1 where the top token is one of the answers."""
    top = logits.argmax(-1, keepdim=True)
    return ((top == data.answers) & (data.answers >= 0)).any(-1).float()


METRICS: dict[str, Callable] = {"logit_diff": logit_diff, "prob_diff": prob_diff, "kl": kl, "accuracy": accuracy}


def get_metric(name: str) -> Callable:
    """The metric ``name``, computed in fp32 whatever the logits' dtype: a softmax over the vocabulary
    or a difference of two large logits in bf16 keeps about two significant digits."""
    if name not in METRICS:
        raise ValueError(f"unknown metric '{name}'; expected one of {', '.join(METRICS)}")
    fn = METRICS[name]

    def metric(logits, data: TaskData, clean_logits=None):
        return fn(_fp32(logits), data, None if clean_logits is None else _fp32(clean_logits))

    metric.__name__, metric.__doc__ = fn.__name__, fn.__doc__
    return metric


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
