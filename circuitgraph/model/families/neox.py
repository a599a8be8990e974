"""GPT-NeoX / Pythia: fused per-head interleaved q/k/v, partial rotary, parallel or sequential residual."""

from __future__ import annotations

from circuitgraph.model.families.base import Family, common_checks, gelu_mlp, heads_out, norm, register
from circuitgraph.model.weights import ArchInfo, Attention, Layer, Rotary, Weights


@register
class GPTNeoX(Family):
    """GPT-NeoX / Pythia: partial rotary, LayerNorm, parallel or sequential attention and MLP."""

    name = "neox"
    architectures = ("GPTNeoXForCausalLM",)
    model_types = ("gpt_neox",)

    def describe(self, config) -> ArchInfo:
        """Shape facts, including whether attention and MLP run in parallel."""
        common_checks(config)
        d, h = config.hidden_size, config.num_attention_heads
        return ArchInfo(self.name, config.num_hidden_layers, h, h, d, d // h, bool(config.use_parallel_residual))

    def extract(self, hf) -> Weights:
        """Per-head form: the fused, head-interleaved q/k/v weight viewed per head."""
        config, tr = hf.config, hf.gpt_neox
        info = self.describe(config)
        H, D, dh = info.n_heads, info.d_model, info.d_head
        rotary = Rotary(tr.rotary_emb)
        layers = []
        for layer in tr.layers:
            a = layer.attention
            qkv = a.query_key_value
            W = qkv.weight.view(H, 3, dh, D)
            b = None if qkv.bias is None else qkv.bias.view(H, 3, dh)

            def project(x, qkv=qkv):
                out = qkv(x).unflatten(-1, (H, 3, dh))
                return tuple(out[..., j, :].flatten(-2) for j in range(3))

            attn = Attention(*(W[:, j].transpose(1, 2) for j in range(3)), *((None,) * 3 if b is None else (b[:, j] for j in range(3))),
                             heads_out(a.dense.weight, H), a.dense.bias, project, a.dense, a.scaling, rotary=rotary)
            layers.append(Layer(norm(layer.input_layernorm), norm(layer.post_attention_layernorm), attn,
                                gelu_mlp(layer.mlp, layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h),
                                mlp_down=layer.mlp.dense_4h_to_h))
        return Weights(info, tr.embed_in, layers, norm(tr.final_layer_norm), hf.get_output_embeddings().weight, None,
                       W_E=tr.embed_in.weight)
