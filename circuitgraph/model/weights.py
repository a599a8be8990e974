"""The canonical per-head form of a causal LM that the engine runs.

The engine needs every head's query, key and value input separately, which no stock forward
offers; each architecture family (``circuitgraph.model.families``) describes its model in this
form.  Every tensor here is a *view* of a HF parameter and every callable is a HF module or a thin
wrapper around one, so the engine adds no weight copies and reproduces each family's own
arithmetic (norm variants, embedding scaling, rotary types, MLPs) by construction (HF's unfused
tanh-GELU formula alone runs as PyTorch's fused kernel: see ``families.base.gelu_mlp``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


class UnsupportedArchitecture(ValueError):
    """The model's architecture or config cannot be edge-patched exactly (the message says why)."""


@dataclass
class ArchInfo:
    """Shape facts of a model, read from its config before any weight: what the graph and the engine are sized by."""

    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    parallel_attn_mlp: bool


@dataclass
class Norm:
    """A norm as the model applies it (``module``) plus what folding and post-norm shares need.

    ``gain`` is the effective per-feature gain (``w``, or ``1 + w`` in Gemma), ``bias`` LayerNorm's.
    """

    module: Callable[[torch.Tensor], torch.Tensor]
    kind: str  # "layer", "rms" or "identity" (normalisation-free models: the final "norm" is x -> x)
    gain: torch.Tensor
    bias: torch.Tensor | None
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def into(self, x: torch.Tensor, out: torch.Tensor, piece_bytes: int = 1 << 19) -> torch.Tensor:
        """``self(x)`` written into ``out`` (shaped like ``x``), a slice of ``piece_bytes`` along the first
        axis at a time: a norm is per row, so this is bit for bit ``self(x)``, and its temporaries stay
        small and in cache where one call on a large ``x`` would take fresh pages for each."""
        step = max(1, piece_bytes // max(1, x[0].numel() * x.element_size()))
        for i in range(0, x.shape[0], step):
            out[i:i + step] = self(x[i:i + step])
        return out

    @property
    def weight(self) -> torch.Tensor:
        """The effective per-feature gain, under the name a norm module's parameter has."""
        return self.gain

    def inv_scale(self, total: torch.Tensor) -> torch.Tensor:
        """``1 / rms`` (or ``1 / std``) of ``total``, in float32, ``[..., 1]``."""
        t = total.float()
        if self.kind == "identity":
            return torch.ones_like(t[..., :1])
        if self.kind == "layer":
            return torch.rsqrt(t.var(-1, unbiased=False, keepdim=True) + self.eps)
        return torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + self.eps)

    def vjp(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``u^T d norm(x) / dx`` for cotangents ``u [..., B, P, D]`` at one input ``x [B, P, D]``, in float32.

        Closed form, so a batch of cotangents (one per head port) costs no autograd graph.
        """
        xf, v = x.float(), u.float() * self.gain.float()
        if self.kind == "identity":
            return v
        if self.kind == "layer":
            r = torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + self.eps)
            xh = (xf - xf.mean(-1, keepdim=True)) * r
            return r * (v - v.mean(-1, keepdim=True) - xh * (v * xh).mean(-1, keepdim=True))
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return r * v - xf * r.pow(3) * (xf * v).mean(-1, keepdim=True)

    def share(self, part: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        """One summand's share of ``norm(sum of parts)`` given the sum's ``inv_scale`` (post-norms).

        RMSNorm(sum_h o_h) = sum_h gain * o_h / rms; a LayerNorm centres each part and its bias is a
        constant that belongs to no node.
        """
        p = part.float()
        if self.kind == "layer":
            p = p - p.mean(-1, keepdim=True)
        return (p * inv * self.gain.float()).to(part.dtype)


@dataclass
class Rotary:
    """Cos/sin from the model's own rotary module, for the actual positions (every HF RoPE type)."""

    module: torch.nn.Module
    layer_type: str | None = None  # Gemma-3 keeps one table per attention type

    def __call__(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = positions[None]
        if self.layer_type is None:
            cos, sin = self.module(like, pos)
        else:
            cos, sin = self.module(like, pos, self.layer_type)
        return cos[0].to(like.dtype), sin[0].to(like.dtype)

    @property
    def key(self) -> tuple:
        """Identifies one rotary table, so a run computes each table once for all layers that share it."""
        return id(self.module), self.layer_type


@dataclass
class Attention:
    """One layer's attention in per-head form; tensors are views of the HF parameters."""

    W_Q: torch.Tensor  # [H, D, dh]
    W_K: torch.Tensor  # [H_kv, D, dh]
    W_V: torch.Tensor  # [H_kv, D, dh]
    b_Q: torch.Tensor | None  # [H, dh]
    b_K: torch.Tensor | None  # [H_kv, dh]
    b_V: torch.Tensor | None
    W_O: torch.Tensor  # [H, dh, D]
    b_O: torch.Tensor | None  # [D], a constant that belongs to no node
    project: Callable  # x [..., D] -> (q [..., H*dh], k [..., H_kv*dh], v [..., H_kv*dh]) with the fused HF weights
    out: Callable  # z [..., H*dh] -> [..., D], output bias included
    scale: float
    q_norm: Callable | None = None
    k_norm: Callable | None = None
    qk_norm_over_heads: bool = False  # OLMo-2: one norm over all heads' queries (keys), not one per head
    rotary: Rotary | None = None
    window: int | None = None  # sliding window: a query sees keys with q - k < window
    causal: bool = True
    softcap: float | None = None  # attention-logit soft-capping (Gemma-2)
    softmax_fp32: bool = False  # the model takes its attention softmax in float32 whatever its dtype (HF eager)

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.W_Q.shape[0] // self.W_K.shape[0]


@dataclass
class Layer:
    """One transformer block in per-head form: its norms, attention and MLP, as the model applies them."""

    ln1: Norm | None  # before attention (None: no pre-norm, OLMo-2)
    ln2: Norm | None  # before the MLP
    attn: Attention
    mlp: Callable[[torch.Tensor], torch.Tensor]
    post_attn: Norm | None = None  # applied to the attention output before the residual (Gemma-2/3, OLMo-2)
    post_mlp: Norm | None = None
    mlp_down: torch.nn.Module | None = None  # the MLP's output projection: its input is the neurons' activations

    # compatibility names used by characterisation
    @property
    def W_O(self) -> torch.Tensor:
        """The attention's per-head output projection ``[H, dh, D]``."""
        return self.attn.W_O

    @property
    def b_O(self) -> torch.Tensor | None:
        """The attention output bias (a constant that belongs to no node)."""
        return self.attn.b_O


@dataclass
class Weights:
    """A whole model in per-head form: what the engine runs, views of the HF model's own parameters and modules."""

    info: ArchInfo
    embed: Callable[[torch.Tensor], torch.Tensor]  # token ids [B, P] -> input node output [B, P, D]
    layers: list[Layer]
    ln_final: Norm
    W_U: torch.Tensor  # [vocab, d_model]
    b_U: torch.Tensor | None = None
    final_softcap: float | None = None
    W_E: torch.Tensor | None = None  # token embedding matrix (for QK/OV), before ``embed_scale``
    embed_scale: float = 1.0  # Gemma multiplies token embeddings by sqrt(d_model)
    W_pos: torch.Tensor | None = None  # learned position embeddings, if any

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits of residual states: the final norm, the unembedding and any final soft-cap."""
        logits = F.linear(self.ln_final(resid), self.W_U, self.b_U)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
