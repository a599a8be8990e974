"""Characterisation runs on the engine's forward: its named activations against the TransformerLens
bridge (where the bridge supports the model) and on families the bridge does not handle."""

import pytest
import torch

from circuitgraph.characterise import attention_patterns, qk_circuit, top_neurons
from circuitgraph.data import Example, tokenize
from conftest import CONFIGS, make_tokenizer, random_rows, tiny_model, tokens

NAMES = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.1.attn.hook_pattern", "blocks.0.attn.hook_z",
         "blocks.1.hook_attn_out", "blocks.1.mlp.hook_post", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"]


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_engine_activations_equal_the_bridge(family):
    m = tiny_model(family)
    x, _ = tokens(1)
    with torch.no_grad():
        logits, ours = m.engine.run_with_cache(x, NAMES)
        _, theirs = m.bridge.run_with_cache(x)
        assert (logits - m.hf(x).logits).abs().max() < 1e-4
    for n in NAMES:
        if family == "gpt2" and n == "hook_embed":  # TransformerLens' hook_embed excludes positions; ours is the input node
            continue
        assert (ours[n] - theirs[n]).abs().max() < 1e-4, n


def test_hooks_replace_activations():
    m = tiny_model("gemma2")
    x, _ = tokens(2)
    with torch.no_grad():
        plain = m.engine.run_with_hooks(x)
        zeroed = m.engine.run_with_hooks(x, [("blocks.1.hook_mlp_out", lambda a, hook: torch.zeros_like(a))])
        _, cache = m.engine.run_with_cache(x, ["blocks.1.hook_mlp_out", "ln_final.hook_in"])
        by_hand = m.weights.unembed(cache["ln_final.hook_in"] - cache["blocks.1.hook_mlp_out"])
    assert (zeroed - by_hand).abs().max() < 1e-4 and (zeroed - plain).abs().max() > 1e-3


def test_characterisation_on_neox_without_attention_bias():
    from transformers import AutoModelForCausalLM

    from circuitgraph.model.loading import CircuitModel

    cfg = CONFIGS["neox"]()
    cfg.attention_bias = False
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    tok = make_tokenizer()
    m = CircuitModel(AutoModelForCausalLM.from_config(cfg).eval(), tok)
    pats = attention_patterns(m, "w1 w2 w3 w4")
    assert torch.allclose(pats.patterns.sum(-1), torch.ones(()), atol=1e-5)
    data = tokenize([Example(**r) for r in random_rows(4)], tok)
    assert len(top_neurons(m, data, "m1", k=3).neurons) == 3


def test_qk_circuit_folds_query_and_key_norm_gains():
    m = tiny_model("qwen3")
    a = m.weights.layers[1].attn
    E = m.hf.get_input_embeddings().weight
    got = qk_circuit(m, "a1.h2", fold_ln=False).full()
    kv = 2 // a.group
    Wq = m.hf.model.layers[1].self_attn.q_proj.weight[16:24].T * m.hf.model.layers[1].self_attn.q_norm.weight
    Wk = m.hf.model.layers[1].self_attn.k_proj.weight[kv * 8:(kv + 1) * 8].T * m.hf.model.layers[1].self_attn.k_norm.weight
    assert (got - (E @ Wq) @ (E @ Wk).T).abs().max() < 1e-4
