"""The run-time exactness guard: the engine's clean logits against the HF model's own forward.

Every architecture feature the engine models is tested, but a config can carry one nobody
anticipated.  Comparing once per model and prompt length, on the real batch, turns any such
feature into a clear error instead of a silently wrong number.  It costs one HF forward on the
first batch (per new prompt length), next to the dozens of patched passes of any study.
"""

from __future__ import annotations

import torch


class ExactnessError(RuntimeError):
    """The engine does not reproduce the model's own forward on this input."""


# max |engine - HF| allowed, relative to the logits' scale (max |HF logit|, at least 1)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@torch.no_grad()
def check_exact(model, tokens: torch.Tensor, last: torch.Tensor, engine_logits: torch.Tensor | None = None) -> float:
    """Compare the engine's logits at ``last`` with the HF model's; raise :class:`ExactnessError` past tolerance.

    Returns the largest absolute difference.
    """
    dev = model.device
    tokens, last = tokens.to(dev), last.to(dev)
    if engine_logits is None:
        engine_logits, _ = model.engine.run(tokens, logit_positions=last)
    hf_logits = model.hf(tokens).logits[torch.arange(len(tokens), device=dev), last]
    diff = float((engine_logits.float() - hf_logits.float()).abs().max())
    scale = max(1.0, float(hf_logits.float().abs().max()))
    tol = TOLERANCE.get(hf_logits.dtype, 1e-4) * scale
    if not diff <= tol:
        raise ExactnessError(
            f"model '{model.name}': the patching engine's clean logits differ from the model's own forward by {diff:.3g} "
            f"(tolerance {tol:.2g}) on prompts of length {tokens.shape[1]}; its config has a feature the engine does not "
            "model exactly, so no result would be trustworthy (report it; check_exact=False skips this check at your own risk)")
    return diff
