"""Read a HuggingFace causal LM into one canonical, per-head form that the patching engine runs.

The engine needs every head's query, key and value input separately, which no stock forward
offers cheaply; so each supported architecture is translated once into per-head weight tensors
(``W_Q[h]: d_model x d_head`` etc.) plus small functions for its norms, MLP, embedding and
unembedding.  Tensors are taken from the HF model, never re-initialised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


class UnsupportedArchitecture(ValueError):
    """The model's architecture cannot be edge-patched exactly (the message says why)."""


SUPPORTED = {
    "GPT2LMHeadModel": "gpt2",
    "GPTNeoXForCausalLM": "neox",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
}


@dataclass
class ArchInfo:
    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    parallel_attn_mlp: bool


def _architecture_name(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if archs:
        return archs[0]
    by_type = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM",
               "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    return by_type.get(getattr(config, "model_type", ""), getattr(config, "model_type", "unknown"))


def describe_config(config) -> ArchInfo:
    """Shape facts of a HF config, or :class:`UnsupportedArchitecture` saying why it cannot be patched."""
    name = _architecture_name(config)
    family = SUPPORTED.get(name)
    if family is None:
        raise UnsupportedArchitecture(
            f"architecture '{name}' is not supported for exact edge patching; supported: {', '.join(sorted(SUPPORTED))}. "
            "Each needs a per-head translation of its attention (q/k/v inputs per head), norms and MLP.")
    if family == "gpt2":
        d, h = config.n_embd, config.n_head
        return ArchInfo(family, config.n_layer, h, h, d, d // h, False)
    if family == "neox":
        d, h = config.hidden_size, config.num_attention_heads
        return ArchInfo(family, config.num_hidden_layers, h, h, d, d // h, bool(config.use_parallel_residual))
    d, h = config.hidden_size, config.num_attention_heads
    layer_types = getattr(config, "layer_types", None) or []
    if "sliding_attention" in layer_types or (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", False)):
        raise UnsupportedArchitecture(f"architecture '{name}' with sliding-window attention is not supported: the engine computes full causal attention")
    if getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
        raise UnsupportedArchitecture(f"architecture '{name}' is a mixture of experts; its MLP is not one node")
    d_head = getattr(config, "head_dim", None) or d // h
    return ArchInfo(family, config.num_hidden_layers, h, config.num_key_value_heads or h, d, d_head, False)


@dataclass
class Norm:
    kind: str  # "layer" or "rms"
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


@dataclass
class Layer:
    ln1: Norm
    ln2: Norm
    W_QKV: torch.Tensor  # [3, H, d_model, d_head]; keys/values expanded to every query head (GQA)
    b_QKV: torch.Tensor | None  # [3, H, d_head]
    W_O: torch.Tensor  # [H, d_head, d_model]
    b_O: torch.Tensor | None  # [d_model], a constant that belongs to no node
    mlp: Callable[[torch.Tensor], torch.Tensor]
    q_norm: Norm | None = None
    k_norm: Norm | None = None
    attn_scale: float = 1.0


@dataclass
class Weights:
    info: ArchInfo
    embed: Callable[[torch.Tensor], torch.Tensor]  # token ids [B, P] -> input node output [B, P, D]
    layers: list[Layer]
    ln_final: Norm
    W_U: torch.Tensor  # [vocab, d_model]
    b_U: torch.Tensor | None
    rotary_dim: int = 0
    inv_freq: torch.Tensor | None = None
    rope_scaling: float = 1.0

    def rotary(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.rotary_dim:
            return None
        freqs = positions[:, None].float() * self.inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scaling).to(dtype), (emb.sin() * self.rope_scaling).to(dtype)

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln_final(resid), self.W_U, self.b_U)


def _linear(module) -> Callable[[torch.Tensor], torch.Tensor]:
    weight, bias = module.weight, module.bias
    return lambda x: F.linear(x, weight, bias)


def _ln(module) -> Norm:
    if hasattr(module, "variance_epsilon"):
        return Norm("rms", module.weight, None, module.variance_epsilon)
    return Norm("layer", module.weight, module.bias, module.eps)


def _act(name: str):
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def extract_weights(hf_model) -> Weights:
    """Translate a HF causal LM (in eval mode) into :class:`Weights`, sharing its tensors where possible."""
    config = hf_model.config
    info = describe_config(config)
    H, D, dh = info.n_heads, info.d_model, info.d_head
    rep = H // info.n_kv_heads
    layers: list[Layer] = []
    if info.family == "gpt2":
        tr = hf_model.transformer
        wte, wpe = tr.wte.weight, tr.wpe.weight
        embed = lambda ids: F.embedding(ids, wte) + wpe[: ids.shape[-1]]
        for i, block in enumerate(tr.h):
            a = block.attn
            w = a.c_attn.weight.view(D, 3, H, dh).permute(1, 2, 0, 3).contiguous()
            b = a.c_attn.bias.view(3, H, dh)
            fc, proj, act = block.mlp.c_fc, block.mlp.c_proj, _act(config.activation_function)
            mlp = (lambda fc, proj, act: lambda x: torch.addmm(proj.bias, act(torch.addmm(fc.bias, x.reshape(-1, x.shape[-1]), fc.weight)), proj.weight).view(*x.shape[:-1], -1))(fc, proj, act)
            scale = (1.0 / dh**0.5 if config.scale_attn_weights else 1.0) / ((i + 1) if config.scale_attn_by_inverse_layer_idx else 1)
            layers.append(Layer(_ln(block.ln_1), _ln(block.ln_2), w, b, a.c_proj.weight.view(H, dh, D), a.c_proj.bias,
                                mlp, attn_scale=scale))
        return Weights(info, embed, layers, _ln(tr.ln_f), hf_model.lm_head.weight, getattr(hf_model.lm_head, "bias", None))
    if info.family == "neox":
        tr = hf_model.gpt_neox
        wte = tr.embed_in.weight
        embed = lambda ids: F.embedding(ids, wte)
        for layer in tr.layers:
            a = layer.attention
            w = a.query_key_value.weight.view(H, 3, dh, D).permute(1, 0, 3, 2).contiguous()
            b = a.query_key_value.bias.view(H, 3, dh).transpose(0, 1) if a.query_key_value.bias is not None else None
            up, down, act = _linear(layer.mlp.dense_h_to_4h), _linear(layer.mlp.dense_4h_to_h), _act(config.hidden_act)
            mlp = (lambda up, down, act: lambda x: down(act(up(x))))(up, down, act)
            W_O = a.dense.weight.view(D, H, dh).permute(1, 2, 0).contiguous()
            layers.append(Layer(_ln(layer.input_layernorm), _ln(layer.post_attention_layernorm), w, b, W_O,
                                a.dense.bias, mlp, attn_scale=dh**-0.5))
        rotary = tr.rotary_emb
        inv_freq = rotary.inv_freq
        return Weights(info, embed, layers, _ln(tr.final_layer_norm), hf_model.get_output_embeddings().weight, None,
                       rotary_dim=2 * inv_freq.shape[0], inv_freq=inv_freq, rope_scaling=float(getattr(rotary, "attention_scaling", 1.0)))
    # Llama-style: RMSNorm, rotary, gated MLP, grouped-query attention
    tr = hf_model.model
    wte = tr.embed_tokens.weight
    embed = lambda ids: F.embedding(ids, wte)
    for layer in tr.layers:
        a = layer.self_attn
        wq = a.q_proj.weight.view(H, dh, D)
        wk = a.k_proj.weight.view(info.n_kv_heads, dh, D).repeat_interleave(rep, 0)
        wv = a.v_proj.weight.view(info.n_kv_heads, dh, D).repeat_interleave(rep, 0)
        w = torch.stack([wq, wk, wv]).transpose(2, 3).contiguous()
        b = None
        if a.q_proj.bias is not None:
            b = torch.stack([a.q_proj.bias.view(H, dh), a.k_proj.bias.view(-1, dh).repeat_interleave(rep, 0),
                             a.v_proj.bias.view(-1, dh).repeat_interleave(rep, 0)])
        gate, up, down, act = _linear(layer.mlp.gate_proj), _linear(layer.mlp.up_proj), _linear(layer.mlp.down_proj), _act(config.hidden_act)
        mlp = (lambda gate, up, down, act: lambda x: down(act(gate(x)) * up(x)))(gate, up, down, act)
        W_O = a.o_proj.weight.view(D, H, dh).permute(1, 2, 0).contiguous()
        qn = _ln(a.q_norm) if hasattr(a, "q_norm") else None
        kn = _ln(a.k_norm) if hasattr(a, "k_norm") else None
        layers.append(Layer(_ln(layer.input_layernorm), _ln(layer.post_attention_layernorm), w, b, W_O,
                            a.o_proj.bias, mlp, qn, kn, attn_scale=a.scaling))
    rotary = tr.rotary_emb
    return Weights(info, embed, layers, _ln(tr.norm), hf_model.lm_head.weight, getattr(hf_model.lm_head, "bias", None),
                   rotary_dim=2 * rotary.inv_freq.shape[0], inv_freq=rotary.inv_freq,
                   rope_scaling=float(getattr(rotary, "attention_scaling", 1.0)))
