"""Metrics and baselines: the clean and all-ablated metric every ratio is normalised by, the normalisation
itself, and when it is undefined.

``faithfulness = (M(circuit) - M(ablated)) / (M(clean) - M(ablated))``; when ``M(clean)`` and ``M(ablated)``
are equal within noise the ratio means nothing and is reported as ``None`` with the reason
(:func:`normalisation_problem`), never as a number.  Spreads are bootstrap standard errors over examples
(the ratio of means has no closed form).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from circuitgraph.data.dataset import TaskData


def bootstrap_se(fn, *arrays: np.ndarray, n: int = 1000, seed: int = 0) -> float:
    """Standard error of ``fn(*arrays)`` by resampling examples (rows) with replacement (NaN for one example)."""
    N = len(arrays[0])
    if N < 2:
        return float("nan")
    idx = np.random.default_rng(seed).integers(0, N, size=(n, N))
    with np.errstate(divide="ignore", invalid="ignore"):
        vals = fn(*(a[idx] for a in arrays))
    return float(np.nanstd(vals, ddof=1))


def normalised(m, clean, base):
    """``(m - base) / (clean - base)`` of the means over examples: 1 = the clean behaviour, 0 = the ablated one."""
    with np.errstate(divide="ignore", invalid="ignore"):  # an undefined normalisation is reported, not printed
        return (m.mean(-1) - base.mean(-1)) / (clean.mean(-1) - base.mean(-1))


def zero_gap(clean: np.ndarray, base: np.ndarray) -> bool:
    """Clean and ablated metrics equal up to float rounding (relative 1e-6): every ratio is 0/0."""
    c, b = float(clean.mean()), float(base.mean())
    return abs(c - b) <= 1e-6 * max(1.0, abs(c), abs(b))


def normalisation_problem(clean: np.ndarray, base: np.ndarray, metric: str) -> str | None:
    """Why ``(M - M_ablated) / (M_clean - M_ablated)`` means nothing on this data, or ``None``.

    Undefined when the clean and ablated metrics are equal (relative 1e-6) or, with two or more
    examples, differ by no more than twice the bootstrap standard error of their difference."""
    c, b = float(clean.mean()), float(base.mean())
    if not (math.isfinite(c) and math.isfinite(b)):
        return f"the clean ({c:.4g}) or ablated ({b:.4g}) {metric} is not finite"
    gap = c - b
    if zero_gap(clean, base):
        return (f"clean and ablated {metric} are equal ({c:.4g}), so faithfulness and necessity divide by zero; "
                f"check that the corrupted prompts change the answer")
    se = bootstrap_se(lambda x, y: x.mean(-1) - y.mean(-1), clean, base)
    if math.isfinite(se) and abs(gap) <= 2 * se:
        return (f"clean ({c:.4g}) and ablated ({b:.4g}) {metric} differ by {gap:.3g}, within twice its standard error "
                f"({se:.2g}), so faithfulness and necessity would divide by noise")
    return None


class Baselines:
    """Per-example metric values of the clean and the all-ablated runs, and the normalisation by them."""

    @torch.no_grad()
    def _mean_outputs(self, ref: TaskData) -> list[torch.Tensor]:
        """Each source's output averaged over ``ref`` (per position when all examples share a length)."""
        aligned = ref.same_length and ref.clean.shape[1] == self.data.clean.shape[1] and self.data.same_length
        P, dev = ref.clean.shape[1], self.model.device
        # sums in fp32 whatever the model's dtype (a bf16 sum of many examples loses digits)
        sums = [torch.zeros(b.stop - b.start, 1, P if aligned else 1, self.engine.D, device=dev)
                for b in self.engine.src_blocks]
        count = torch.zeros(1, P, 1, device=dev) if aligned else torch.zeros((), device=dev)
        dtype = None
        for a, b in self._bar(self._spans(len(ref)), "mean ablation"):
            part = ref.slice(a, b)
            _, outs = self.engine.run(part.corrupted.to(dev), record=True)
            dtype = outs[0].dtype
            valid = (torch.arange(part.clean.shape[1])[None] < part.lengths[:, None]).float().to(outs[0].device)  # [B, P]
            for s, o in zip(sums, outs):
                s += (o.float() * valid[None, :, :, None]).sum((1,) if aligned else (1, 2), keepdim=True)
            count += valid.sum(0, keepdim=True)[..., None] if aligned else valid.sum()
        sums, count = [self.reduce(s) for s in sums], self.reduce(count)
        dtype = dtype or self.engine.w.W_U.dtype
        return [(s / count).to(dtype) for s in sums]

    def _values(self, logits, part, clean_logits):
        return self.metric(logits, part.to(logits.device), clean_logits).double().cpu()

    @torch.no_grad()
    def _baselines(self):
        out = np.zeros((2, len(self.data)))
        for i, (a, b) in enumerate(self._bar(self._spans(), "clean/ablated runs")):
            part, abl, clean_logits = self._batch(i, a, b)
            out[0, a:b] = self._values(clean_logits, part, clean_logits).numpy()
            last = part.last.to(clean_logits.device)
            final = abl.resid[-1].expand(len(part), part.clean.shape[1], -1)
            empty = self.engine.w.unembed(final[torch.arange(len(part)), last])
            out[1, a:b] = self._values(empty, part, clean_logits).numpy()
        out = self.reduce(out)
        return out[0], out[1]

    @property
    def undefined_reason(self) -> str | None:
        """Why normalised scores (faithfulness, necessity, effects) mean nothing on this data, or ``None``."""
        if not hasattr(self, "_undefined"):
            self._undefined = normalisation_problem(self.clean_values, self.base_values, self.metric_name)
        return self._undefined

    def normalise(self, values: np.ndarray) -> np.ndarray:
        """Per-circuit normalised score ``(M - M_ablated) / (M_clean - M_ablated)`` of ``[C, N]`` metric values."""
        return normalised(values, self.clean_values[None], self.base_values[None])
