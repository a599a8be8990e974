"""The architecture registry: one module per family, each registering itself on import."""

from circuitgraph.model.families import gemma, gpt2, llama, neox, olmo2, phi3, tracr  # noqa: F401  (they register)
from circuitgraph.model.families.base import REGISTRY, Family, architecture_name, family_of, register


def describe_config(config):
    """Shape facts of a HF config, or :class:`UnsupportedArchitecture` naming what cannot be run exactly."""
    return family_of(config).describe(config)


def extract_weights(hf_model):
    """A HF causal LM (in eval mode) in the engine's per-head form, sharing its tensors."""
    family = family_of(hf_model.config)
    weights = family.extract(hf_model)
    # only eager attention upcasts its softmax; HF's sdpa / flash attention runs in the model's dtype
    fp32 = family.eager_softmax_fp32 and getattr(hf_model.config, "_attn_implementation", None) == "eager"
    for layer in weights.layers:
        layer.attn.softmax_fp32 = fp32
    return weights


__all__ = ["REGISTRY", "Family", "architecture_name", "describe_config", "extract_weights", "family_of", "register"]
