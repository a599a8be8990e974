"""Characterisation tools against by-hand computations on a random GPT-2, and on the bundled toy-induction model."""

import json

import pytest
import torch

from circuitgraph.characterise import (attention_patterns, copying_scores, detection_scores, direct_logit_attribution,
                                       full_matrix, head_scores, integrated_gradients, lens_without, logit_lens,
                                       neuron_ablation, neuron_activations, node_activations, node_lens, ov_circuit,
                                       plot_attention, plot_attributions, plot_circuit, plot_dla, plot_head_scores,
                                       plot_logit_lens, plot_neurons, positional_qk, qk_circuit, repeated_tokens,
                                       top_neurons, train_probe)
from circuitgraph.data.dataset import load_dataset
from circuitgraph.evaluate.metrics import logit_diff
from circuitgraph.model.loading import BUNDLED_DIR, bundled_models, load_model
from conftest import signal_rows, tiny_model, write_jsonl


@pytest.fixture(scope="module")
def setup(model_dir, tmp_path_factory):
    model = load_model(model_dir)
    path = write_jsonl(tmp_path_factory.mktemp("ch") / "data.jsonl", signal_rows(model, 8, seed=6))
    return model, load_dataset(path, model.tokenizer)


def at_last(logits, data):
    return logits[torch.arange(len(data)), data.last]


# ----- logit lens and direct logit attribution -----------------------------------------------------
def test_logit_lens_last_layer_is_the_models_logits(setup):
    model, data = setup
    lens = logit_lens(model, data, keep_logits=True)
    assert lens.labels == ["embed", "L0", "L1"] and lens.answer_prob.shape == (3, len(data))
    with torch.no_grad():
        ref = at_last(model.hf(data.clean).logits, data)
    assert (lens.logits[-1] - ref).abs().max() < 1e-4
    probs = ref.softmax(-1)
    assert lens.answer_prob[-1] == pytest.approx(probs[torch.arange(len(data)), data.answers[:, 0]], abs=1e-5)
    rank = 1 + (ref > ref[torch.arange(len(data)), data.answers[:, 0]][:, None]).sum(-1)
    assert torch.equal(lens.reciprocal_rank[-1], 1.0 / rank.float())
    assert torch.equal(lens.top_ids[-1, :, 0], ref.argmax(-1))
    assert lens.logit_diff[-1] == pytest.approx(logit_diff(ref, data), abs=1e-4)


def test_lens_without_a_node(setup):
    model, data = setup
    cmp = lens_without(model, data, "a0.h2")
    lens = logit_lens(model, data)
    assert cmp.layer == 0
    assert cmp.with_node.answer_prob[0] == pytest.approx(lens.answer_prob[1], abs=1e-6)
    # by hand: subtract the head's output (bridge hook_result) from resid_post 0 and decode
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(data.clean)
    idx = torch.arange(len(data))
    resid = cache["blocks.0.hook_resid_post"][idx, data.last] - cache["blocks.0.attn.hook_result"][idx, data.last, 2]
    probs = model.weights.unembed(resid).softmax(-1)
    assert cmp.without_node.answer_prob[0] == pytest.approx(probs[idx, data.answers[:, 0]].detach(), abs=1e-5)
    assert cmp.answer_prob_change.abs().max() > 1e-4
    with pytest.raises(ValueError, match="not a head or MLP"):
        lens_without(model, data, "input")


def test_direct_logit_attribution_by_hand(setup, tmp_path):
    model, data = setup
    dla = direct_logit_attribution(model, data, batch_size=3)
    with torch.no_grad():
        logits, cache = model.bridge.run_with_cache(data.clean)
    idx = torch.arange(len(data))
    total = logit_diff(at_last(logits, data), data)
    du = model.weights.W_U[data.answers[:, 0]] - model.weights.W_U[data.wrongs[:, 0]]
    scale = cache["ln_final.hook_scale"][idx, data.last]  # [N, 1], the clean run's final layer-norm scale
    w = model.weights.ln_final.weight

    def direct(c):
        with torch.no_grad():
            return (((c - c.mean(-1, keepdim=True)) / scale * w) * du).sum(-1).mean()

    for l in range(2):
        for h in range(4):
            assert float(dla.heads[l, h]) == pytest.approx(float(direct(cache[f"blocks.{l}.attn.hook_result"][idx, data.last, h])), abs=1e-4)
        assert float(dla.mlps[l]) == pytest.approx(float(direct(cache[f"blocks.{l}.hook_mlp_out"][idx, data.last])), abs=1e-4)
    b_O = sum(layer.b_O for layer in model.weights.layers)
    with torch.no_grad():
        bias = direct(b_O.expand(len(data), -1)) + (model.weights.ln_final.bias * du).sum(-1).mean()
    assert dla.bias == pytest.approx(float(bias), abs=1e-4)
    assert dla.logit_diff == pytest.approx(float(total.mean()), abs=1e-4)
    assert float(dla.heads.sum() + dla.mlps.sum()) + dla.input + dla.bias == pytest.approx(dla.logit_diff, abs=1e-4)
    assert plot_dla(dla, tmp_path / "dla.png").stat().st_size > 5000


def test_node_lens_decodes_each_output_linearly(setup):
    model, data = setup
    res = node_lens(model, data, nodes=["input", "a1.h3", "m1"], keep_logits=True)
    with torch.no_grad():
        logits, cache = model.bridge.run_with_cache(data.clean)
    idx = torch.arange(len(data))
    c = cache["blocks.1.hook_mlp_out"][idx, data.last]
    scale = cache["ln_final.hook_scale"][idx, data.last]
    ref = ((c - c.mean(-1, keepdim=True)) / scale * model.weights.ln_final.weight) @ model.weights.W_U.T
    assert (res.logits[2] - ref).abs().max() < 1e-4
    assert res.labels == ["input", "a1.h3", "m1"] and res.top_ids.shape == (3, len(data), 5)


# ----- QK / OV circuits -----------------------------------------------------------------------------
def _hand_weights(model, l, h):
    hf = model.hf.transformer
    D, dh = 32, 8
    W = hf.h[l].attn.c_attn.weight  # [D, 3D], columns: q | k | v, heads inside
    cols = lambda part: slice(part * D + h * dh, part * D + (h + 1) * dh)
    W_O = hf.h[l].attn.c_proj.weight[h * dh:(h + 1) * dh]  # [dh, D]
    return W[:, cols(0)], W[:, cols(1)], W[:, cols(2)], W_O


@pytest.mark.parametrize("fold_ln", [False, True])
def test_qk_and_ov_full_matrices_equal_hand_products(setup, fold_ln):
    model, _ = setup
    hf = model.hf
    E, U = hf.transformer.wte.weight, hf.lm_head.weight
    l, h = 1, 2
    W_Q, W_K, W_V, W_O = _hand_weights(model, l, h)
    if fold_ln:
        E = (E - E.mean(-1, keepdim=True)) * hf.transformer.h[l].ln_1.weight
        W_O = (W_O - W_O.mean(-1, keepdim=True)) * hf.transformer.ln_f.weight
    with torch.no_grad():
        qk_ref = (E @ W_Q) @ (E @ W_K).T
        ov_ref = E @ W_V @ W_O @ U.T
    qk = qk_circuit(model, "a1.h2", fold_ln=fold_ln)
    ov = ov_circuit(model, "a1.h2", fold_ln=fold_ln)
    assert (full_matrix(qk) - qk_ref).abs().max() < 1e-4 * qk_ref.abs().max()
    assert (full_matrix(ov) - ov_ref).abs().max() < 1e-4 * ov_ref.abs().max()
    # top pairs are the largest entries of the full matrix, whatever the chunking
    pairs = ov.top_pairs(5, chunk=7)
    flat = ov_ref.flatten().topk(5)
    assert [p[2] for p in pairs] == pytest.approx(flat.values.tolist(), rel=1e-4)
    assert (pairs[0][0], pairs[0][1]) == divmod(int(flat.indices[0]), ov_ref.shape[1])
    sub = qk_circuit(model, "a1.h2", fold_ln=fold_ln, tokens=[5, 9, 11])
    assert (sub.full() - qk_ref[[5, 9, 11]][:, [5, 9, 11]]).abs().max() < 1e-4 * qk_ref.abs().max()


def test_copying_score_from_eigenvalues_of_the_full_matrix(setup):
    model, _ = setup
    scores = copying_scores(model)
    assert scores.shape == (2, 4) and (scores.abs() <= 1 + 1e-6).all()
    ev = torch.linalg.eigvals(full_matrix(ov_circuit(model, "a0.h3")).double())
    ev = ev[ev.abs() > 1e-6 * ev.abs().max()]  # rank d_head: the rest are numerically zero
    assert float(scores[0, 3]) == pytest.approx(float(ev.real.sum() / ev.abs().sum()), abs=1e-3)


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
def test_copying_scores_of_every_head_equal_each_heads_own_eigenvalues(family):
    """All heads' scores come from one vocabulary product per kind of norm: the same numbers as each
    head's own factored OV circuit (grouped key/value heads, RMS and layer norms, parallel blocks)."""
    model = tiny_model(family, seed=5)
    scores = copying_scores(model, chunk=7)
    G = model.graph
    for l in range(G.n_layers):
        for h in range(G.n_heads):
            ev = ov_circuit(model, f"a{l}.h{h}").matrix.eigenvalues
            assert float(scores[l, h]) == pytest.approx(float(ev.real.sum() / ev.abs().sum()), abs=1e-4), (l, h)


def test_full_matrix_refuses_huge_vocabularies(setup):
    model, _ = setup
    with pytest.raises(ValueError, match="keep it factored"):
        full_matrix(qk_circuit(model, "a0.h0"), limit=10)
    with pytest.raises(ValueError, match="not an attention head"):
        qk_circuit(model, "m0")


# ----- heads ------------------------------------------------------------------------------------------
def test_detection_scores_by_hand(setup):
    model, _ = setup
    toks = repeated_tokens(model, n=3, seq_len=6)
    assert toks.shape == (3, 13) and toks[0, 0] == model.tokenizer.bos_token_id
    assert torch.equal(toks[:, 1:7], toks[:, 7:])
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(toks)
    pat = cache["blocks.1.attn.hook_pattern"][:, 3]  # [B, P, P] of a1.h3
    q = torch.arange(1, 13)
    prev = pat[:, q, q - 1].mean()
    q2 = torch.arange(7, 13)  # second half: the token after the first occurrence is at q - 5
    induction = pat[:, q2, q2 - 5].mean()
    dup = pat[:, q2, q2 - 6].mean()
    assert float(detection_scores(model, toks, "previous_token")[1, 3]) == pytest.approx(float(prev), abs=1e-5)
    assert float(detection_scores(model, toks, "induction", batch_size=2)[1, 3]) == pytest.approx(float(induction), abs=1e-5)
    assert float(detection_scores(model, toks, "duplicate_token")[1, 3]) == pytest.approx(float(dup), abs=1e-5)


def test_attention_patterns_and_head_score_figures(setup, tmp_path):
    model, data = setup
    pats = attention_patterns(model, data.examples[0].clean, heads=["a0.h1", "a1.h3"])
    P = len(model.tokenizer(data.examples[0].clean)["input_ids"])
    assert pats.patterns.shape == (2, P, P) and len(pats.tokens) == P
    assert pats.patterns.sum(-1) == pytest.approx(torch.ones(2, P), abs=1e-5)
    assert plot_attention(pats, tmp_path / "att.png").stat().st_size > 5000
    scores = head_scores(model, data, n_random=4, seq_len=8)
    assert set(scores.scores) == {"previous_token", "duplicate_token", "induction", "copying", "dla"}
    assert all(v.shape == (2, 4) for v in scores.scores.values())
    assert plot_head_scores(scores, tmp_path / "scores.png").stat().st_size > 5000


# ----- neurons, probes, attribution -------------------------------------------------------------------
def test_neurons_activity_and_ablation(setup, tmp_path):
    model, data = setup
    act = top_neurons(model, data, "m1", k=5)
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(data.clean)
    post = cache["blocks.1.mlp.hook_post"][torch.arange(len(data)), data.last]
    assert act.mean == pytest.approx(post.mean(0)[act.neurons].detach(), abs=1e-5)
    assert (act.mean[:-1] >= act.mean[1:]).all()
    assert neuron_activations(model, data, 1, position="all").shape == (int(data.lengths.sum()), 128)
    eff = neuron_ablation(model, data, "m1", act.neurons, max_batch=16)  # two neurons per run
    n = int(act.neurons[1])

    def zero(x, hook):
        x = x.clone()
        x[:, :, n] = 0
        return x

    with torch.no_grad():
        ref = logit_diff(at_last(model.bridge.run_with_hooks(data.clean, fwd_hooks=[("blocks.1.mlp.hook_post", zero)]), data), data).mean()
    assert float(eff.ablated_metric[1]) == pytest.approx(float(ref), abs=1e-4)
    assert float(eff.normalised[1]) == pytest.approx((float(ref) - eff.clean_metric) / (eff.clean_metric - eff.corrupted_metric), abs=1e-4)
    assert plot_neurons(act, tmp_path / "neurons.png", effects=eff).stat().st_size > 5000


def test_probe_on_separable_feature():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 16, generator=g)
    w = torch.randn(16, generator=g)
    margin = X @ w / w.norm()
    X = X[margin.abs() > 0.3][:300]  # separable with a margin
    y = (X @ w > 0).long()
    res = train_probe(X, y)
    assert res.test_accuracy > 0.95 and res.n_test == round(0.25 * len(X)) and res.chance < 0.7
    assert torch.equal(res.predict(X[:5]), res.classes[(((X[:5] - res.mean) / res.std) @ res.weight.T + res.bias).argmax(-1)])
    noise = train_probe(X, torch.randint(0, 2, (len(X),), generator=g))
    assert noise.test_accuracy < 0.75


def test_node_activations_match_bridge(setup):
    model, data = setup
    X = node_activations(model, data, "a1.h2")
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(data.clean)
    assert (X - cache["blocks.1.attn.hook_result"][torch.arange(len(data)), data.last, 2]).abs().max() < 1e-5
    assert node_activations(model, data, "m0", position="S").shape == (len(data), 32)


def test_integrated_gradients_completeness(setup, tmp_path):
    model, data = setup
    res = integrated_gradients(model, data, n_steps=32, max_batch=40)
    gap = res.metric_clean - res.metric_corrupted
    # midpoint rule, 32 steps: within 1% of each example's clean - corrupted gap (+ float noise)
    assert (res.completeness_error.abs() <= 0.01 * gap.abs() + 1e-3).all(), res.completeness_error
    assert gap.abs().min() > 0.05
    same = data.clean == data.corrupted
    assert (res.attributions[same] == 0).all()
    assert plot_attributions(res, data, tmp_path / "ig.png", tokenizer=model.tokenizer).stat().st_size > 5000


def test_logit_lens_and_circuit_figures(setup, tmp_path):
    model, data = setup
    assert plot_logit_lens(logit_lens(model, data), tmp_path / "lens.png", tokenizer=model.tokenizer).stat().st_size > 5000
    assert plot_circuit(ov_circuit(model, "a1.h0"), tmp_path / "ov.png", tokenizer=model.tokenizer).stat().st_size > 5000
    qk = positional_qk(model, "a0.h1", n_positions=10)
    assert qk.shape == (10, 10) and torch.isnan(qk[0, 1]) and not torch.isnan(qk[1, 0])


# ----- the bundled toy-induction model -------------------------------------------------------------------
needs_toy = pytest.mark.skipif("toy-induction" not in bundled_models(),
                               reason="bundled model toy-induction not trained yet (scripts/train_toy_induction.py)")


@needs_toy
def test_toy_induction_head_types():
    model = load_model("toy-induction")
    meta = json.loads((BUNDLED_DIR / "toy-induction" / "metrics.json").read_text())
    scores = head_scores(model, n_random=8, seq_len=20)
    prev = {name for name, _ in scores.top("previous_token", len(meta["prev_token_heads"]))}
    best_induction = max(meta["induction_scores"], key=meta["induction_scores"].get)
    print("previous-token:", scores.top("previous_token", 3), "induction:", scores.top("induction", 3))
    assert prev == set(meta["prev_token_heads"])
    assert scores.top("induction", 1)[0][0] == best_induction
    assert set(n for n, _ in scores.top("induction", len(meta["induction_heads"]))) == set(meta["induction_heads"])
    assert float(scores["induction"][0].max()) < 0.05 and float(scores["previous_token"][1].max()) < 0.2
