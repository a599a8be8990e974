"""The run-time exactness guard: the engine's clean logits against the HF model's own forward.

Every architecture feature the engine models is tested, but a config can carry one nobody
anticipated.  Comparing once per model and prompt length, on the real batch, turns any such
feature into a clear error instead of a silently wrong number.  It costs one HF forward on the
first batch (per new prompt length), next to the dozens of patched passes of any study.

In bfloat16 and float16 both forwards round, each its own way: on a real checkpoint the two can
differ by more than either differs from the exact result (Gemma-3, max |logit| 70: engine 2.19 and
HF 2.77 from an fp32 forward, 0.875 from each other).  So when the engine misses HF's own reduced-
precision forward by more than the tolerance, both are judged against an fp32 forward of the same
weights on the worst few rows: the engine passes when its error is within ``REDUCED_FACTOR`` times
HF's own (or within the tolerance itself).  A feature the engine does not model (a dropped sliding
window: tens of times HF's rounding error on the test models) still fails; a correct engine
measures 0.5-2x.  The fp32 forward upcasts each module's weights only while that module runs
(:func:`upcast_on_use`), so it needs one module's weights in fp32 beside the model, not a copy of it.
"""

from __future__ import annotations

import contextlib

import torch


class ExactnessError(RuntimeError):
    """The engine does not reproduce the model's own forward on this input."""


class OverflowInForward(ExactnessError):
    """A reduced-precision forward produced inf/NaN logits: the dtype, not the engine, is the problem."""


# max |engine - HF| allowed, relative to the logits' scale (max |HF logit|, at least 1)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 3e-2, torch.float16: 5e-3}
REDUCED = (torch.bfloat16, torch.float16)
# reduced precision: the engine's error from an fp32 forward may be this many times HF's own
# (correct engines measured at most 2.0x on SmolLM2-135M and 1.8x on the random test models)
REDUCED_FACTOR = 3.0
JUDGED_ROWS = 2  # rows given the fp32 forward: those where engine and HF differ most


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@torch.no_grad()
def check_exact(model, tokens: torch.Tensor, last: torch.Tensor, engine_logits: torch.Tensor | None = None) -> float:
    """Compare the engine's logits at ``last`` with the HF model's; raise :class:`ExactnessError` past tolerance.

    Returns the largest absolute difference from HF's own forward.
    """
    dev = model.device
    tokens, last = tokens.to(dev), last.to(dev)
    if engine_logits is None:
        engine_logits, _ = model.engine.run(tokens, logit_positions=last)
    rows = torch.arange(len(tokens), device=dev)
    hf_logits = model.hf(tokens).logits[rows, last]
    dtype = hf_logits.dtype
    if dtype in REDUCED:
        _refuse_overflow(model, tokens, dtype, hf_logits, engine_logits)
    e, h = engine_logits.float(), hf_logits.float()
    diff = float((e - h).abs().max())
    scale = max(1.0, float(h.abs().max()))
    tol = TOLERANCE.get(dtype, 1e-4) * scale
    if diff <= tol:
        return diff
    if dtype not in REDUCED:
        raise ExactnessError(f"model '{model.name}': the patching engine's clean logits differ from the model's own forward "
                             f"by {diff:.3g} (tolerance {tol:.2g}) on prompts of length {tokens.shape[1]}; {_UNMODELLED}")
    _judge_reduced(model, tokens, last, e, h, diff, tol, _dtype_name(dtype))
    return diff


_UNMODELLED = ("its config has a feature the engine does not model exactly, so no result would be trustworthy "
               "(report it; check_exact=False skips this check at your own risk)")


def _refuse_overflow(model, tokens, dtype, hf_logits, engine_logits) -> None:
    """inf/NaN logits in reduced precision mean activations past the dtype's range; say which dtype to use instead."""
    where = ("the model's own" if not bool(hf_logits.isfinite().all())
             else "the patching engine's" if not bool(engine_logits.isfinite().all()) else None)
    if where is None:
        return
    name = _dtype_name(dtype)
    if dtype == torch.float16:
        advice = "its activations exceed float16's range (65504); load it in bfloat16 or float32 (--dtype bfloat16)"
    else:
        advice = "load it in float32 (--dtype float32)"
    raise OverflowInForward(f"model '{model.name}': {where} {name} forward gives inf/NaN logits on prompts of length "
                            f"{tokens.shape[1]}; {advice}")


def _judge_reduced(model, tokens, last, e, h, diff, tol, dtype_name: str) -> None:
    """Engine and HF both against an fp32 forward of the same weights, on the rows where they differ most."""
    worst = (e - h).abs().amax(-1).topk(min(JUDGED_ROWS, len(e))).indices
    try:
        with upcast_on_use(model.hf):
            ref = model.hf(tokens[worst]).logits[torch.arange(len(worst), device=tokens.device), last[worst]].float()
    except (RuntimeError, torch.OutOfMemoryError) as err:  # an exotic forward that mixes dtypes, or no room
        first = next(iter(str(err).splitlines()), type(err).__name__)
        raise ExactnessError(
            f"model '{model.name}': the patching engine's {dtype_name} logits differ from the model's own {dtype_name} "
            f"forward by {diff:.3g} (tolerance {tol:.2g}) on prompts of length {tokens.shape[1]}, and an fp32 forward "
            f"to tell rounding from a real difference could not run ({first}); load the model in float32") from None
    err_e = float((e[worst] - ref).abs().max())
    err_h = float((h[worst] - ref).abs().max())
    allowed = max(tol, REDUCED_FACTOR * err_h)
    if not err_e <= allowed:
        raise ExactnessError(
            f"model '{model.name}': the patching engine's {dtype_name} logits differ from an fp32 forward of the same "
            f"weights by {err_e:.3g}, the model's own {dtype_name} forward by {err_h:.3g} (allowed {allowed:.2g}: "
            f"{REDUCED_FACTOR:g}x that, at least {tol:.2g}) on prompts of length {tokens.shape[1]}; {_UNMODELLED}")


def _to_fp32(x):
    """Reduced-precision float tensors in ``x`` (nested in tuples, lists, dicts) as fp32; the rest as is."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.dtype in REDUCED else x
    if isinstance(x, (tuple, list)):
        return type(x)(_to_fp32(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_fp32(v) for k, v in x.items()}
    return x


@contextlib.contextmanager
def upcast_on_use(module: torch.nn.Module):
    """Run ``module`` in fp32 without an fp32 copy of it: each submodule's own reduced-precision weights
    and buffers (and inputs) become fp32 just before it runs and its original tensors come back right
    after, so the weights' storage (which the engine shares) is untouched and at most one module's
    weights exist twice at a time."""
    swapped: dict[int, list] = {}

    def own(m):
        return [(store, k) for store in (m._parameters, m._buffers) for k, t in store.items()
                if t is not None and t.dtype in REDUCED]

    def before(m, args, kwargs):
        keep = []
        for store, k in own(m):
            t = store[k]
            if isinstance(t, torch.nn.Parameter):
                keep.append((store, k, t.data))
                t.data = t.data.float()
            else:
                keep.append((store, k, t))
                store[k] = t.float()
        swapped[id(m)] = keep
        return _to_fp32(args), _to_fp32(kwargs)

    def restore(keep):
        for store, k, orig in reversed(keep):
            if isinstance(store[k], torch.nn.Parameter):
                store[k].data = orig
            else:
                store[k] = orig

    def after(m, args, kwargs, out):
        restore(swapped.pop(id(m), []))

    handles = []
    try:
        for m in module.modules():
            if own(m):
                handles.append(m.register_forward_pre_hook(before, with_kwargs=True))
                handles.append(m.register_forward_hook(after, with_kwargs=True, always_call=True))
        yield module
    finally:
        for handle in handles:
            handle.remove()
        for keep in swapped.values():
            restore(keep)
        swapped.clear()


__all__ = ["ExactnessError", "OverflowInForward", "TOLERANCE", "check_exact", "upcast_on_use"]
