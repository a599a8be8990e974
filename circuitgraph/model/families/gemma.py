"""Gemma, Gemma-2, Gemma-3 (text): scaled embeddings, ``1 + w`` RMSNorms, GeGLU MLP.

Gemma-2/3 add post-attention and post-MLP norms (docs/engine.md, "Post-norms"), alternate sliding and
global layers, and Gemma-2 soft-caps attention and final logits; Gemma-3 normalises each head's
queries and keys and takes a separate rotary table per attention type.
"""

from __future__ import annotations

from circuitgraph.model.families.base import Family, common_checks, layer_window, norm, refuse, register, separate_qkv
from circuitgraph.model.weights import ArchInfo, Layer, Rotary, Weights


@register
class Gemma(Family):
    """Gemma, Gemma-2 and Gemma-3 (text)."""

    name = "gemma"
    architectures = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
    model_types = ("gemma", "gemma2", "gemma3_text")

    def describe(self, config) -> ArchInfo:
        """Shape facts; an attention bias is refused (under a post-norm it would not be a constant)."""
        common_checks(config)
        d, h = config.hidden_size, config.num_attention_heads
        if getattr(config, "attention_bias", False):
            refuse(config, "attention_bias", "a post-normed attention output bias would not be a constant")
        return ArchInfo(self.name, config.num_hidden_layers, h, config.num_key_value_heads or h, d, config.head_dim, False)

    def extract(self, hf) -> Weights:
        """Per-head form with ``1 + w`` norms, post-norms, sliding windows, soft-capping and per-type rotary tables."""
        config, tr = hf.config, hf.model
        info = self.describe(config)
        post_norms = hasattr(tr.layers[0], "post_feedforward_layernorm")
        per_type_rotary = config.model_type == "gemma3_text"
        layers = []
        for i, layer in enumerate(tr.layers):
            a = layer.self_attn
            rotary = Rotary(tr.rotary_emb, config.layer_types[i] if per_type_rotary else None)
            attn = separate_qkv(a, info.n_heads, info.n_kv_heads, rotary=rotary, window=layer_window(config, a, i),
                                q_norm=norm(a.q_norm, 1.0) if hasattr(a, "q_norm") else None,
                                k_norm=norm(a.k_norm, 1.0) if hasattr(a, "k_norm") else None,
                                softcap=getattr(config, "attn_logit_softcapping", None))
            if post_norms:
                layers.append(Layer(norm(layer.input_layernorm, 1.0), norm(layer.pre_feedforward_layernorm, 1.0), attn, layer.mlp,
                                    post_attn=norm(layer.post_attention_layernorm, 1.0),
                                    post_mlp=norm(layer.post_feedforward_layernorm, 1.0), mlp_down=layer.mlp.down_proj))
            else:
                layers.append(Layer(norm(layer.input_layernorm, 1.0), norm(layer.post_attention_layernorm, 1.0), attn, layer.mlp,
                                    mlp_down=layer.mlp.down_proj))
        emb = tr.embed_tokens
        return Weights(info, emb, layers, norm(tr.norm, 1.0), hf.lm_head.weight, None,
                       final_softcap=getattr(config, "final_logit_softcapping", None), W_E=emb.weight,
                       embed_scale=float(emb.embed_scale))
