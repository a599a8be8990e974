"""OLMo-2: no pre-norms; post-attention and post-MLP RMSNorms; q/k norms over all heads at once.

The q/k norm spans every head, so a head port's query (key) is that of the whole layer run on
the port's own input (as GQA ports are ungrouped, docs/engine.md, "Grouped-query attention").
"""

from __future__ import annotations

from circuitgraph.model.families.base import Family, common_checks, norm, refuse, register, separate_qkv
from circuitgraph.model.weights import ArchInfo, Layer, Rotary, Weights


@register
class OLMo2(Family):
    """OLMo-2: no pre-norms, post-norms on attention and MLP outputs, q/k norms over all heads."""

    name = "olmo2"
    architectures = ("Olmo2ForCausalLM",)
    model_types = ("olmo2",)

    def describe(self, config) -> ArchInfo:
        """Shape facts; an attention bias is refused (under a post-norm it would not be a constant)."""
        common_checks(config)
        if getattr(config, "attention_bias", False):
            refuse(config, "attention_bias", "a post-normed attention output bias would not be a constant")
        return super().describe(config)

    def extract(self, hf) -> Weights:
        """Per-head form with post-norms and q/k norms taken over the whole layer."""
        config, tr = hf.config, hf.model
        info = self.describe(config)
        rotary = Rotary(tr.rotary_emb)
        layers = []
        for layer in tr.layers:
            a = layer.self_attn
            attn = separate_qkv(a, info.n_heads, info.n_kv_heads, q_norm=norm(a.q_norm), k_norm=norm(a.k_norm),
                                qk_norm_over_heads=True, rotary=rotary, window=getattr(config, "sliding_window", None))
            layers.append(Layer(None, None, attn, layer.mlp, post_attn=norm(layer.post_attention_layernorm),
                                post_mlp=norm(layer.post_feedforward_layernorm), mlp_down=layer.mlp.down_proj))
        return Weights(info, tr.embed_tokens, layers, norm(tr.norm), hf.lm_head.weight, None, W_E=tr.embed_tokens.weight)
