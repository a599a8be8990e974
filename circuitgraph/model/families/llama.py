"""Llama, Mistral, Qwen2, Qwen3: RMSNorm, rotary, gated MLP, grouped-query attention.

Mistral slides every layer's window; Qwen2/3 slide the layers their ``layer_types`` mark (from
``max_window_layers``); Qwen3 normalises each head's queries and keys.
"""

from __future__ import annotations

from circuitgraph.model.families.base import Family, layer_window, norm, register, separate_qkv
from circuitgraph.model.weights import Layer, Rotary, Weights


@register
class LlamaLike(Family):
    """Llama, Mistral, Qwen2 and Qwen3: RMSNorm, rotary positions, grouped-query attention, gated MLP."""

    name = "llama"
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def extract(self, hf) -> Weights:
        """Per-head form, with Qwen3's per-head q/k norms and sliding windows where the config sets them."""
        config, tr = hf.config, hf.model
        info = self.describe(config)
        rotary = Rotary(tr.rotary_emb)
        layers = []
        for i, layer in enumerate(tr.layers):
            a = layer.self_attn
            qn = norm(a.q_norm) if hasattr(a, "q_norm") else None
            kn = norm(a.k_norm) if hasattr(a, "k_norm") else None
            attn = separate_qkv(a, info.n_heads, info.n_kv_heads, q_norm=qn, k_norm=kn, rotary=rotary,
                                window=layer_window(config, a, i))
            layers.append(Layer(norm(layer.input_layernorm), norm(layer.post_attention_layernorm), attn, layer.mlp, mlp_down=layer.mlp.down_proj))
        return Weights(info, tr.embed_tokens, layers, norm(tr.norm), hf.lm_head.weight, getattr(hf.lm_head, "bias", None),
                       W_E=tr.embed_tokens.weight)
