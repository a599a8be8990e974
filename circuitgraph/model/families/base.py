"""What an architecture family provides, the registry, and helpers every family shares.

A family translates one HF model class into :class:`~circuitgraph.model.weights.Weights` (views of
its parameters, its own modules) and refuses, naming the config field, any feature it cannot run
exactly.  Adding a family is one module here plus a test entry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from circuitgraph.model.weights import ArchInfo, Norm, UnsupportedArchitecture, Weights

REGISTRY: dict[str, "Family"] = {}  # HF architecture class name -> family
MODEL_TYPES: dict[str, str] = {}  # config.model_type -> architecture class name


class Family:
    """One architecture family: describe its config, extract its per-head weights."""

    name: str = ""
    architectures: tuple[str, ...] = ()  # HF class names as in ``config.architectures``
    model_types: tuple[str, ...] = ()  # ``config.model_type`` values, same order as ``architectures``
    # HF's eager attention takes its softmax in float32 and casts back (GPT-2's and tracr's stay in the
    # scores' own dtype); in float64 that rounding is the model's own, about 1e-7 of a logit
    eager_softmax_fp32: bool = True

    def describe(self, config) -> ArchInfo:
        """Shape of a decoder with ``hidden_size``/``num_attention_heads``/``num_key_value_heads`` fields
        (families with other field names or refusals override it)."""
        common_checks(config)
        d, h = config.hidden_size, config.num_attention_heads
        dh = getattr(config, "head_dim", None) or d // h
        return ArchInfo(self.name, config.num_hidden_layers, h, getattr(config, "num_key_value_heads", None) or h, d, dh, False)

    def extract(self, hf_model) -> Weights:
        """The model's per-head form: views of its parameters and its
        own modules (no copies), refusing what cannot run exactly."""
        raise NotImplementedError


def register(family_cls):
    """Class decorator: add a family to the registry under its architectures and model types."""
    fam = family_cls()
    for arch in fam.architectures:
        REGISTRY[arch] = fam
    for arch, mt in zip(fam.architectures, fam.model_types):
        MODEL_TYPES[mt] = arch
    return family_cls


def architecture_name(config) -> str:
    """The HF architecture class a config names (``config.architectures[0]``, else from its ``model_type``)."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return archs[0]
    mt = getattr(config, "model_type", "unknown")
    return MODEL_TYPES.get(mt, mt)


def family_of(config) -> Family:
    """The registered family of a config, or :class:`UnsupportedArchitecture` listing the supported ones."""
    name = architecture_name(config)
    fam = REGISTRY.get(name)
    if fam is None:
        raise UnsupportedArchitecture(
            f"architecture '{name}' is not supported for exact edge patching; supported: {', '.join(sorted(REGISTRY))}. "
            "Each needs a per-head translation of its attention (q/k/v inputs per head), norms and MLP.")
    return fam


def refuse(config, field: str, why: str):
    """Raise :class:`UnsupportedArchitecture` naming the config field, its value and why it cannot run exactly."""
    raise UnsupportedArchitecture(f"{architecture_name(config)}: config field '{field}' = {getattr(config, field, None)!r} "
                                  f"is not supported for exact edge patching: {why}")


def common_checks(config) -> None:
    """Features no family here runs exactly; refused by name before any weight is read."""
    if getattr(config, "use_bidirectional_attention", False):
        refuse(config, "use_bidirectional_attention", "the engine runs causal attention for this family")
    for f in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(config, f, None):
            refuse(config, f, "a mixture of experts' MLP is not one node")
    if getattr(config, "attention_chunk_size", None):
        refuse(config, "attention_chunk_size", "chunked attention is not modelled")


def norm(module, offset: float = 0.0) -> Norm:
    """Wrap a HF LayerNorm or RMSNorm module (``offset=1`` for Gemma's ``1 + w`` gain)."""
    if isinstance(module, torch.nn.LayerNorm):
        return Norm(module, "layer", module.weight, module.bias, module.eps)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    gain = module.weight + offset if offset else module.weight
    return Norm(module, "rms", gain, None, eps)


def heads_in(weight: torch.Tensor, n: int) -> torch.Tensor:
    """``[n * dh, D]`` (F.linear layout) -> per-head ``[n, D, dh]``, a view."""
    return weight.unflatten(0, (n, -1)).transpose(1, 2)


def heads_out(weight: torch.Tensor, n: int) -> torch.Tensor:
    """Output projection ``[D, n * dh]`` (F.linear layout) -> per-head ``[n, dh, D]``, a view."""
    return weight.T.unflatten(0, (n, -1))


def bias_heads(bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A fused bias ``[n * dh]`` viewed per head, ``[n, dh]`` (``None`` stays ``None``)."""
    return None if bias is None else bias.view(n, -1)


def linear(module):
    """``x -> module(x)`` via F.linear on the module's own parameters (no copies)."""
    return lambda x: F.linear(x, module.weight, module.bias)


def gelu_mlp(mlp, up, down, after=None):
    """``mlp``, or, where its activation ``mlp.act`` is HF's unfused tanh-GELU formula (``gelu_new``,
    ``gelu_fast``: GPT-2's), ``after(down(gelu(up(x))))`` with PyTorch's fused tanh GELU: the same function
    up to float rounding (within 5e-7 of HF's formula on [-30, 30], a test pins it) in one pass over the
    neurons instead of five (an engine forward of GPT-2 small took 0.92-0.94x the time in
    ``benchmarks/bench_revisions.py``).  ``down`` stays the module (neuron hooks fire on it)."""
    from transformers.activations import FastGELUActivation, NewGELUActivation

    if type(getattr(mlp, "act", None)) not in (NewGELUActivation, FastGELUActivation):
        return mlp
    after = after or (lambda h: h)
    return lambda x: after(down(F.gelu(up(x), approximate="tanh")))


def separate_qkv(a, n_heads: int, n_kv: int, **kw):
    """Attention of the Llama kind (separate q/k/v/o projections, ``a.scaling``), as views."""
    from circuitgraph.model.weights import Attention

    def project(x):
        return a.q_proj(x), a.k_proj(x), a.v_proj(x)

    b = lambda m, n: bias_heads(getattr(m, "bias", None), n)
    return Attention(heads_in(a.q_proj.weight, n_heads), heads_in(a.k_proj.weight, n_kv), heads_in(a.v_proj.weight, n_kv),
                     b(a.q_proj, n_heads), b(a.k_proj, n_kv), b(a.v_proj, n_kv), heads_out(a.o_proj.weight, n_heads),
                     getattr(a.o_proj, "bias", None), project, a.o_proj, a.scaling, **kw)


def layer_window(config, attn_module, layer: int) -> int | None:
    """Sliding window of one layer: per layer type where the config has them, else the config's."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if types is not None and window is not None and getattr(config, "use_sliding_window", True) is not False:
        return window if types[layer] == "sliding_attention" else None
    if hasattr(attn_module, "sliding_window"):
        return attn_module.sliding_window
    return window
