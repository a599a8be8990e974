"""Named activations of the engine's own forward, to read or replace (characterisation).

Names follow TransformerLens so code and habits carry over: ``hook_embed`` (the input node's
output), ``blocks.{L}.hook_resid_pre``, ``blocks.{L}.attn.hook_pattern`` ``[B, H, P, P]``,
``blocks.{L}.attn.hook_z`` ``[B, P, H, d_head]``, ``blocks.{L}.hook_attn_out``,
``blocks.{L}.mlp.hook_post`` (the neurons: the MLP output projection's input),
``blocks.{L}.hook_mlp_out``, ``blocks.{L}.hook_resid_post``, ``ln_final.hook_in``.
A hook is ``fn(activation, hook)`` returning a replacement or ``None``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class HookPoint:
    """What a hook function receives as ``hook``: the activation's name, as TransformerLens passes it."""

    name: str


class Tap:
    """The hooks of one run, looked up by name; a run without hooks passes ``tap=None``."""

    def __init__(self, hooks: list[tuple[str, Callable]]):
        self.hooks: dict[str, list[Callable]] = {}
        for name, fn in hooks:
            self.hooks.setdefault(name, []).append(fn)

    def wants(self, name: str) -> bool:
        """Whether any hook is registered on ``name`` (a run skips the work for names nobody reads)."""
        return name in self.hooks

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        for fn in self.hooks.get(name, ()):
            out = fn(x, HookPoint(name))
            if out is not None:
                x = out
        return x


@contextmanager
def neuron_hooks(weights, tap: Tap):
    """Route ``blocks.{L}.mlp.hook_post`` through forward pre-hooks on each MLP's output projection."""
    handles = []
    for layer, lw in enumerate(weights.layers):
        name = f"blocks.{layer}.mlp.hook_post"
        if tap.wants(name):
            if lw.mlp_down is None:
                raise ValueError(f"{name}: this model's MLP has no separate output projection to read neurons from")
            handles.append(lw.mlp_down.register_forward_pre_hook(lambda mod, args, name=name: (tap(name, args[0]),) + args[1:]))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def names_matching(weights, names_filter) -> list[str]:
    """The hook names a TransformerLens-style ``names_filter`` selects (``None``, a name, a predicate or a list)."""
    L = len(weights.layers)
    every = ["hook_embed", "ln_final.hook_in"] + [f"blocks.{l}.{n}" for l in range(L) for n in
                                                  ("hook_resid_pre", "attn.hook_pattern", "attn.hook_z", "hook_attn_out",
                                                   "mlp.hook_post", "hook_mlp_out", "hook_resid_post")]
    if names_filter is None:
        return every
    if isinstance(names_filter, str):
        return [n for n in every if n == names_filter]
    if callable(names_filter):
        return [n for n in every if names_filter(n)]
    return [n for n in every if n in set(names_filter)]
