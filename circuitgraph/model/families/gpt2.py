"""GPT-2: learned positions, LayerNorm, fused Conv1D q/k/v, GELU MLP."""

from __future__ import annotations

import torch

from circuitgraph.model.families.base import Family, bias_heads, common_checks, gelu_mlp, norm, refuse, register
from circuitgraph.model.weights import ArchInfo, Attention, Layer, Weights


@register
class GPT2(Family):
    """GPT-2: learned positions, LayerNorm, fused ``c_attn`` (a Conv1D, ``x @ W``)."""

    name = "gpt2"
    architectures = ("GPT2LMHeadModel",)
    model_types = ("gpt2",)
    eager_softmax_fp32 = False  # its attention's softmax runs in the scores' own dtype

    def describe(self, config) -> ArchInfo:
        """Shape facts from GPT-2's own field names; cross-attention is refused."""
        common_checks(config)
        if getattr(config, "add_cross_attention", False):
            refuse(config, "add_cross_attention", "cross-attention is not part of a causal LM's graph")
        d, h = config.n_embd, config.n_head
        return ArchInfo(self.name, config.n_layer, h, h, d, d // h, False)

    def extract(self, hf) -> Weights:
        """Per-head form: the fused q/k/v weight viewed per head, no copies."""
        config, tr = hf.config, hf.transformer
        info = self.describe(config)
        H, D = info.n_heads, info.d_model
        layers = []
        for i, block in enumerate(tr.h):
            a = block.attn
            W = a.c_attn.weight  # [D, 3D], x @ W
            per_head = lambda cols: W[:, cols].unflatten(1, (H, -1)).permute(1, 0, 2)  # [H, D, dh] view
            b = a.c_attn.bias
            scale = (info.d_head**-0.5 if config.scale_attn_weights else 1.0) / ((i + 1) if config.scale_attn_by_inverse_layer_idx else 1)

            def project(x, a=a):
                return a.c_attn(x).split(D, dim=-1)

            attn = Attention(per_head(slice(0, D)), per_head(slice(D, 2 * D)), per_head(slice(2 * D, 3 * D)),
                             bias_heads(b[:D], H), bias_heads(b[D:2 * D], H), bias_heads(b[2 * D:], H),
                             a.c_proj.weight.unflatten(0, (H, -1)), a.c_proj.bias, project, a.c_proj, scale)
            mlp = gelu_mlp(block.mlp, block.mlp.c_fc, block.mlp.c_proj, block.mlp.dropout)
            layers.append(Layer(norm(block.ln_1), norm(block.ln_2), attn, mlp, mlp_down=block.mlp.c_proj))
        wte, wpe = tr.wte, tr.wpe

        def embed(ids):
            return wte(ids) + wpe(torch.arange(ids.shape[-1], device=ids.device))

        return Weights(info, embed, layers, norm(tr.ln_f), hf.lm_head.weight, getattr(hf.lm_head, "bias", None),
                       W_E=wte.weight, W_pos=wpe.weight)
