"""Phi-3: fused q/k/v and gate/up projections, partial rotary (incl. LongRoPE), optional sliding window."""

from __future__ import annotations

from circuitgraph.model.families.base import Family, heads_in, heads_out, norm, register
from circuitgraph.model.weights import Attention, Layer, Rotary, Weights


@register
class Phi3(Family):
    """Phi-3: fused q/k/v and gate/up projections, partial rotary."""

    name = "phi3"
    architectures = ("Phi3ForCausalLM",)
    model_types = ("phi3",)

    def extract(self, hf) -> Weights:
        """Per-head form: the fused projections sliced into per-head views."""
        config, tr = hf.config, hf.model
        info = self.describe(config)
        H, Hkv, dh = info.n_heads, info.n_kv_heads, info.d_head
        rotary = Rotary(tr.rotary_emb)
        layers = []
        for layer in tr.layers:
            a = layer.self_attn
            W = a.qkv_proj.weight
            q, k = H * dh, H * dh + Hkv * dh

            def project(x, a=a):
                out = a.qkv_proj(x)
                return out[..., :q], out[..., q:k], out[..., k:]

            attn = Attention(heads_in(W[:q], H), heads_in(W[q:k], Hkv), heads_in(W[k:], Hkv), None, None, None,
                             heads_out(a.o_proj.weight, H), None, project, a.o_proj, a.scaling, rotary=rotary,
                             window=getattr(config, "sliding_window", None))
            layers.append(Layer(norm(layer.input_layernorm), norm(layer.post_attention_layernorm), attn, layer.mlp, mlp_down=layer.mlp.down_proj))
        return Weights(info, tr.embed_tokens, layers, norm(tr.norm), hf.lm_head.weight, getattr(hf.lm_head, "bias", None),
                       W_E=tr.embed_tokens.weight)
