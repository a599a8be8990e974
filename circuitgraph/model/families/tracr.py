"""Normalisation-free transformers, the architecture tracr compiles RASP programs into.

Token + position embeddings, no layer norms, ReLU MLPs, attention causal or not (as the program
needs), a plain linear unembedding.  The HF-compatible config and model here are the reference
forward for the bundled ``tracr-*`` models; importing :mod:`circuitgraph.model` registers them with
transformers' ``AutoConfig`` / ``AutoModelForCausalLM``, so they load like any other model.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from circuitgraph.model.families.base import Family, bias_heads, heads_in, heads_out, register
from circuitgraph.model.weights import ArchInfo, Attention, Layer, Norm, Weights

MODEL_TYPE = "circuitgraph_tracr"


class TracrConfig(PretrainedConfig):
    """Shape of a normalisation-free transformer (every layer: attention then a ReLU MLP)."""

    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 8, hidden_size: int = 16, num_hidden_layers: int = 2,
                 num_attention_heads: int = 1, head_dim: int = 4, intermediate_size: int = 8,
                 max_position_embeddings: int = 8, causal: bool = False, bias: bool = True,
                 initializer_range: float = 0.02, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.causal = causal
        self.bias = bias
        self.initializer_range = initializer_range
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class TracrAttention(nn.Module):
    """Multi-head attention without norms, causal or bidirectional; ``key_mask`` hides padding."""

    def __init__(self, config: TracrConfig):
        super().__init__()
        H, dh, D = config.num_attention_heads, config.head_dim, config.hidden_size
        self.n_heads, self.d_head, self.causal = H, dh, config.causal
        self.q_proj = nn.Linear(D, H * dh, bias=config.bias)
        self.k_proj = nn.Linear(D, H * dh, bias=config.bias)
        self.v_proj = nn.Linear(D, H * dh, bias=config.bias)
        self.o_proj = nn.Linear(H * dh, D, bias=config.bias)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output ``[B, P, D]`` of ``x [B, P, D]`` (output bias included)."""
        B, P, _ = x.shape
        split = lambda t: t.view(B, P, self.n_heads, self.d_head).transpose(1, 2)  # [B, H, P, dh]
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = (q @ k.transpose(-1, -2)) * self.d_head**-0.5
        allowed = torch.ones(P, P, dtype=torch.bool, device=x.device)
        if self.causal:
            allowed = allowed.tril()
        allowed = allowed[None, None]
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, :].bool()
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        z = scores.softmax(-1) @ v  # [B, H, P, dh]
        return self.o_proj(z.transpose(1, 2).reshape(B, P, -1))


class TracrMLP(nn.Module):
    """A ReLU MLP."""

    def __init__(self, config: TracrConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.bias)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``fc_out(relu(fc_in(x)))``."""
        return self.fc_out(torch.relu(self.fc_in(x)))


class TracrLayer(nn.Module):
    """One residual block: attention, then the MLP, each added to the residual."""

    def __init__(self, config: TracrConfig):
        super().__init__()
        self.attn = TracrAttention(config)
        self.mlp = TracrMLP(config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The residual after this block."""
        x = x + self.attn(x, key_mask)
        return x + self.mlp(x)


class TracrForCausalLM(PreTrainedModel):
    """Embeddings -> (attention, MLP) x L -> linear unembedding; no norms anywhere."""

    config_class = TracrConfig
    base_model_prefix = "tracr"
    _no_split_modules = ["TracrLayer"]

    def __init__(self, config: TracrConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(TracrLayer(config) for _ in range(config.num_hidden_layers))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self):
        """The token embedding (HF's interface)."""
        return self.embed_tokens

    def get_output_embeddings(self):
        """The unembedding (HF's interface)."""
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels=None, **kwargs):
        """Logits of ``input_ids``; ``attention_mask`` hides padded
        keys; longer inputs than the positions are refused."""
        P = input_ids.shape[-1]
        if P > self.config.max_position_embeddings:
            raise ValueError(f"input is {P} tokens; this model has {self.config.max_position_embeddings} positions")
        x = self.embed_tokens(input_ids) + self.embed_positions(torch.arange(P, device=input_ids.device))
        for layer in self.layers:
            x = layer(x, attention_mask)
        return CausalLMOutput(logits=self.lm_head(x))


def register_auto() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know the model type (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, TracrConfig)
        AutoModelForCausalLM.register(TracrConfig, TracrForCausalLM)
    except ValueError:  # already registered
        pass


register_auto()


@register
class Tracr(Family):
    """The engine's view of :class:`TracrForCausalLM`: no norms (identity), causal or not per config."""

    name = "tracr"
    architectures = ("TracrForCausalLM",)
    model_types = (MODEL_TYPE,)
    eager_softmax_fp32 = False  # its attention's softmax runs in the scores' own dtype

    def describe(self, config) -> ArchInfo:
        """Shape facts (every head has its own keys and values; no parallel blocks)."""
        H = config.num_attention_heads
        return ArchInfo(self.name, config.num_hidden_layers, H, H, config.hidden_size, config.head_dim, False)

    def extract(self, hf) -> Weights:
        """Per-head form with identity norms (the final "norm" is ``x -> x``)."""
        config = hf.config
        info = self.describe(config)
        H = info.n_heads
        layers = []
        for block in hf.layers:
            a = block.attn

            def project(x, a=a):
                return a.q_proj(x), a.k_proj(x), a.v_proj(x)

            b = lambda m: bias_heads(m.bias, H)
            attn = Attention(heads_in(a.q_proj.weight, H), heads_in(a.k_proj.weight, H), heads_in(a.v_proj.weight, H),
                             b(a.q_proj), b(a.k_proj), b(a.v_proj), heads_out(a.o_proj.weight, H), a.o_proj.bias,
                             project, a.o_proj, info.d_head**-0.5, causal=bool(config.causal))
            layers.append(Layer(None, None, attn, block.mlp, mlp_down=block.mlp.fc_out))
        wte, wpe = hf.embed_tokens, hf.embed_positions

        def embed(ids):
            return wte(ids) + wpe(torch.arange(ids.shape[-1], device=ids.device))

        D = info.d_model
        identity = Norm(nn.Identity(), "identity", torch.ones(D, dtype=wte.weight.dtype, device=wte.weight.device), None, 0.0)
        return Weights(info, embed, layers, identity, hf.lm_head.weight, None, W_E=wte.weight, W_pos=wpe.weight)
