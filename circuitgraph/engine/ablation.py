"""What sources output when their edges are ablated, and prefix states for resumed runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass
class Ablation:
    """What a source outputs when its edge is not in the circuit.

    ``outputs[b]`` is ``[k_b, B', P', D]`` per source block (``B'`` is the batch size or 1, ``P'``
    the length or 1), or ``None`` for zero ablation; ``resid`` holds the all-ablated residual at
    each destination block, biases included.
    """

    outputs: list[torch.Tensor] | None
    resid: list[torch.Tensor]
    qkv_cache: dict = field(default_factory=dict)  # per layer: q, k, v of the all-ablated residual


@dataclass
class PrefixState:
    """A patched run paused at the start of ``layer`` (one circuit): what later layers need to resume.

    Changing edges into layer ``layer`` or later cannot change anything before it, so trials that
    differ only there (ACDC) resume from here instead of re-running the model from the embedding.
    """

    layer: int
    resid: torch.Tensor  # [B, P, D] patched residual at the start of the layer
    deltas: list[torch.Tensor]  # per source block before the layer: patched - ablated, all rows

    @cached_property
    def flat(self) -> torch.Tensor:
        """All sources' deltas before the layer, ``[n_sources_before, B, P, D]`` in source order."""
        return torch.cat(self.deltas)


def ablation_rows(pieces: list[tuple[Ablation, torch.Tensor]], length: int) -> Ablation:
    """One ablation of the chosen rows ``[(ablation, rows of its batch)]`` of per-example ablations (a
    corrupted run's), cut to their first ``length`` positions: with causal attention nothing at a position
    depends on later ones, and bidirectional models have prompts of one length.  Lets an evaluator on some
    rows of another reuse the other's runs."""
    pick = lambda t, rows, dim: t.index_select(dim, rows.to(t.device)).narrow(dim + 1, 0, length)
    outputs = [torch.cat([pick(a.outputs[b], rows, 1) for a, rows in pieces], 1) for b in range(len(pieces[0][0].outputs))]
    resid = [torch.cat([pick(a.resid[k], rows, 0) for a, rows in pieces]) for k in range(len(pieces[0][0].resid))]
    return Ablation(outputs, resid)


def _attn_bias(layer) -> torch.Tensor | int:
    return layer.attn.b_O if layer.attn.b_O is not None and layer.post_attn is None else 0


def residual_walk(weights, outputs: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """The residual each destination block reads (a layer's heads, its MLP, ..., the logits) when every
    source outputs ``outputs`` (per source block, as a recorded run returns them; ``None``: zeros), the
    attention output biases included: the one residual walk behind ablations and prefix states."""
    parallel = weights.info.parallel_attn_mlp
    if outputs is None:
        blocks = [None] * (1 + 2 * len(weights.layers))
        cur = torch.zeros(1, 1, weights.info.d_model, dtype=weights.W_U.dtype, device=weights.W_U.device)
    else:
        blocks, cur = outputs, outputs[0][0]
    resid = []
    for layer, lw in enumerate(weights.layers):
        resid.append(cur)  # what this layer's heads read
        heads = blocks[1 + 2 * layer]
        after_attn = cur + (heads.sum(0) if heads is not None else 0) + _attn_bias(lw)
        resid.append(cur if parallel else after_attn)  # what its MLP reads
        mlp = blocks[2 + 2 * layer]
        cur = after_attn + (mlp[0] if mlp is not None else 0)
    resid.append(cur)
    return resid


def make_ablation(weights, outputs: list[torch.Tensor] | None) -> Ablation:
    """Ablated source outputs (``None``: zero ablation) with the residual each destination block reads."""
    return Ablation(outputs, residual_walk(weights, outputs))


def clean_states(weights, outputs: list[torch.Tensor], ablation: Ablation) -> list[PrefixState]:
    """Prefix states at every layer (and after the last) of the full circuit, which is the plain run that
    recorded ``outputs``: its residual walk and its deltas from ``ablation``."""
    resid = residual_walk(weights, outputs)
    abl = ablation.outputs or [None] * len(outputs)
    deltas = [out if a is None else out - a for out, a in zip(outputs, abl)]
    return [PrefixState(layer, resid[2 * layer], deltas[:1 + 2 * layer]) for layer in range(len(weights.layers) + 1)]
