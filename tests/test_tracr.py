"""The tracr-compiled bundled models: their forward, their programs' outputs and their ground truth.

Three independent references: tracr's compiled JAX model (its output units, saved by
scripts/compile_tracr.py), tracr's RASP evaluator (the program's outputs) and the registered HF
model class, whose forward the engine must reproduce.
"""

import json
from functools import lru_cache

import pytest
import torch

from circuitgraph.data.dataset import tokenize, Example
from circuitgraph.data.tasks import make_data
from circuitgraph.evaluate import Evaluator
from circuitgraph.model import load_model
from circuitgraph.model.families.tracr import TracrConfig, TracrForCausalLM
from circuitgraph.model.loading import BUNDLED_DIR
from circuitgraph.spec import CircuitSpec

PROGRAMS = ["frac_prevs", "reverse", "sort", "shift2"]
SPECS = BUNDLED_DIR.parent / "specs"


@lru_cache(maxsize=None)
def model(name):
    return load_model(f"tracr-{name}")


@lru_cache(maxsize=None)
def info(name):
    return json.loads((BUNDLED_DIR / f"tracr-{name}" / "tracr.json").read_text())


def by_length(name):
    """Test inputs grouped by length: {length: (ids [N, 1 + length], tests)}."""
    m, groups = model(name), {}
    for t in info(name)["tests"]:
        groups.setdefault(len(t["input"]), []).append(t)
    return {n: (m.tokenizer([" ".join(t["input"]) for t in ts], return_tensors="pt")["input_ids"], ts)
            for n, ts in groups.items()}


def output_ids(name):
    return model(name).tokenizer.convert_tokens_to_ids(info(name)["output_tokens"])


@pytest.mark.parametrize("name", PROGRAMS)
def test_hf_forward_matches_tracr_compiled_model(name):
    """The HF model carries tracr's weights: its output units equal the JAX model's on every test input."""
    m, out = model(name), output_ids(name)
    for ids, tests in by_length(name).values():
        with torch.no_grad():
            units = m.hf(ids).logits[..., out]
        want = torch.tensor([t["units"] for t in tests])
        assert (units - want).abs().max() < 1e-5


@pytest.mark.parametrize("name", PROGRAMS)
def test_outputs_match_rasp_evaluator(name):
    """The bundled model computes its RASP program (tracr's own evaluator) on every test input."""
    m, meta, out = model(name), info(name), output_ids(name)
    n = 0
    for ids, tests in by_length(name).values():
        with torch.no_grad():
            units = m.hf(ids).logits[:, 1:, out]  # position 0 is BOS
        for row, t in zip(units, tests):
            for u, e in zip(row, t["expected"]):
                if e is None:  # the program leaves this position undefined
                    continue
                if meta["output"] == "categorical":
                    assert meta["output_tokens"][int(u.argmax())] == e, (t["input"], t["expected"])
                else:
                    assert abs(float(u[0]) - e) < 1e-4, (t["input"], t["expected"])
                n += 1
    assert n > 400


@pytest.mark.parametrize("name", PROGRAMS)
def test_engine_matches_hf_forward(name):
    """Clean engine logits at every position equal the registered model's own forward (1e-5)."""
    m = model(name)
    for ids, _ in by_length(name).values():
        G = m.graph
        full = torch.ones(1, len(G.sources), len(G.destinations), dtype=torch.bool)
        with torch.no_grad():
            ref = m.hf(ids).logits
            abl = m.engine.make_ablation(None, "zero")
            got = m.engine.patched_run(ids, abl, m.engine.compile(full))[0]
            plain, _ = m.engine.run(ids, logit_positions=torch.full((len(ids),), ids.shape[1] - 1))
        assert (got - ref).abs().max() < 1e-5
        assert (plain - ref[:, -1]).abs().max() < 1e-5


@pytest.mark.parametrize("name", PROGRAMS)
def test_full_and_empty_circuits(name):
    """Full circuit = clean, empty = ablated, under corrupted and zero ablation."""
    m = model(name)
    ids, _ = by_length(name)[info(name)["max_seq_len"]]
    clean, corrupt = ids[: len(ids) // 2], ids[len(ids) // 2: 2 * (len(ids) // 2)]
    e, G = m.engine, m.graph
    full = torch.ones(1, len(G.sources), len(G.destinations), dtype=torch.bool)
    masks = torch.cat([full, ~full])
    with torch.no_grad():
        ref_clean, ref_corrupt = m.hf(clean).logits, m.hf(corrupt).logits
        _, outs = e.run(corrupt, record=True)
        corrupted = e.patched_run(clean, e.make_ablation(outs, "corrupted"), e.compile(masks))
        zero = e.patched_run(clean, e.make_ablation(None, "zero"), e.compile(masks))
    assert (corrupted[0] - ref_clean).abs().max() < 1e-5
    assert (corrupted[1] - ref_corrupt).abs().max() < 1e-5
    assert (zero[0] - ref_clean).abs().max() < 1e-5
    assert zero[1].abs().max() < 1e-5  # no source, no biases: the residual is zero
    assert (ref_clean - ref_corrupt).abs().max() > 0.5  # the check can fail


@pytest.mark.parametrize("name", PROGRAMS)
def test_ground_truth_spec_verifies_under_zero_ablation(name):
    m = model(name)
    spec = CircuitSpec.load(SPECS / f"tracr_{name}.json")
    assert spec.metadata["ablation"] == "zero"
    rows = make_data("tracr", m.tokenizer, 60, seed=1)
    data = tokenize([Example.model_validate(r) for r in rows], m.tokenizer)
    score = Evaluator(m, data, ablation="zero", progress=False).evaluate(spec)
    assert score.faithfulness >= 0.99
    assert 1 - score.necessity <= 0.01  # the complement's normalised score
    assert score.clean_metric - score.corrupted_metric > 0.1
    assert not score.warnings


# Compiled edges with no effect on the task's inputs: the query and key of reverse's select-all
# length head (constant scores), and the BOS-fallback terms of heads whose selector always matches.
IDLE = {"frac_prevs": set(), "shift2": set(), "sort": {"input->a1.h0<k>"},
        "reverse": {"input->a0.h0<q>", "input->a0.h0<k>", "input->a3.h0<q>"}}


@pytest.mark.parametrize("name", PROGRAMS)
def test_idle_ground_truth_edges_are_the_known_ones(name):
    """Every other ground-truth edge, removed alone, changes the metric by at least 5%."""
    m = model(name)
    spec = CircuitSpec.load(SPECS / f"tracr_{name}.json")
    rows = make_data("tracr", m.tokenizer, 60, seed=2)
    data = tokenize([Example.model_validate(r) for r in rows], m.tokenizer)
    drops = Evaluator(m, data, ablation="zero", progress=False).edge_effects(spec)
    assert {e for e, (d, _) in drops.items() if abs(d) < 0.01} == IDLE[name]
    assert min(d for e, (d, _) in drops.items() if e not in IDLE[name]) > 0.05


def test_config_round_trip_and_causal_flag(tmp_path):
    cfg = TracrConfig(vocab_size=5, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, head_dim=3,
                      intermediate_size=4, max_position_embeddings=6, causal=True)
    hf = TracrForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[0, 1, 2, 3, 4]])
    with torch.no_grad():
        a, b = hf(ids).logits, again(ids).logits
        changed = hf(torch.tensor([[0, 1, 2, 3, 1]])).logits
    assert type(again) is TracrForCausalLM and again.config.causal
    assert torch.equal(a, b)
    assert torch.equal(a[0, :4], changed[0, :4])  # causal: earlier positions do not see the last token


def test_tracr_task_needs_a_tracr_model():
    from circuitgraph.data.tasks import TaskError

    toy = load_model("toy-induction")
    with pytest.raises(TaskError, match="needs a tracr-compiled model"):
        make_data("tracr", toy.tokenizer, 3)
    with pytest.raises(TaskError, match="has 81 inputs of length 4; asked for 500"):
        make_data("tracr", model("reverse").tokenizer, 500)


def _by_hand(hf, ids, ablated, keep):
    """Edge-patched forward of a TracrForCausalLM written out from docs/engine.md: every destination input is
    the sum of its sources' outputs (this run's where ``keep(src, dst)``, ``ablated``'s otherwise) plus the
    attention output biases; returns (logits, this run's node outputs)."""
    cfg = hf.config
    H, dh = cfg.num_attention_heads, cfg.head_dim
    P = ids.shape[1]
    out = {"input": hf.embed_tokens(ids) + hf.embed_positions(torch.arange(P))}
    order = ["input"]

    def dest(name, srcs, biases):
        x = sum(out[s] if keep(s, name) else ablated[s] for s in srcs)
        return x + sum(biases) if biases else x

    allowed = torch.ones(P, P, dtype=torch.bool)
    if cfg.causal:
        allowed = allowed.tril()
    for L, block in enumerate(hf.layers):
        a = block.attn
        biases = [hf.layers[i].attn.o_proj.bias for i in range(L)]
        heads = []
        for h in range(H):
            rows = slice(h * dh, (h + 1) * dh)
            x = {p: dest(f"a{L}.h{h}<{p}>", order, biases) for p in "qkv"}
            q = x["q"] @ a.q_proj.weight[rows].T + a.q_proj.bias[rows]
            k = x["k"] @ a.k_proj.weight[rows].T + a.k_proj.bias[rows]
            v = x["v"] @ a.v_proj.weight[rows].T + a.v_proj.bias[rows]
            scores = (q @ k.transpose(-1, -2) * dh**-0.5).masked_fill(~allowed, float("-inf"))
            heads.append((f"a{L}.h{h}", scores.softmax(-1) @ v @ a.o_proj.weight[:, rows].T))
        for name, o in heads:
            out[name] = o
        order = order + [n for n, _ in heads]
        x = dest(f"m{L}", order, biases + [a.o_proj.bias])
        out[f"m{L}"] = block.mlp.fc_out(torch.relu(block.mlp.fc_in(x)))
        order = order + [f"m{L}"]
    biases = [b.attn.o_proj.bias for b in hf.layers]
    return hf.lm_head(dest("logits", order, biases)), out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_random_edge_subsets_match_by_hand(causal, density):
    """Random-init models of both attention kinds, biases non-zero: the engine equals the written-out semantics."""
    from circuitgraph.model.loading import CircuitModel

    torch.manual_seed(0)
    cfg = TracrConfig(vocab_size=11, hidden_size=12, num_hidden_layers=2, num_attention_heads=2, head_dim=4,
                      intermediate_size=10, max_position_embeddings=8, causal=causal)
    hf = TracrForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # O(1) weights and non-zero biases, so a misplaced term shows
            p.copy_((0.3 if name.endswith("bias") else 0.5) * torch.randn(p.shape))
    m = CircuitModel(hf)
    G, e = m.graph, m.engine
    g = torch.Generator().manual_seed(int(density * 10) + causal)
    clean, corrupt = torch.randint(0, 11, (3, 7), generator=g), torch.randint(0, 11, (3, 7), generator=g)
    masks = (torch.rand(1, len(G.sources), len(G.destinations), generator=g) < density) & G.legal
    with torch.no_grad():
        _, ablated = _by_hand(hf, corrupt, {}, lambda s, d: True)
        ref, _ = _by_hand(hf, clean, ablated, lambda s, d: bool(masks[0, G.source_index[s], G.destination_index[d]]))
        _, outs = e.run(corrupt, record=True)
        got = e.patched_run(clean, e.make_ablation(outs, "corrupted"), e.compile(masks))[0]
        plain = hf(clean).logits
    full_ref, _ = _by_hand(hf, clean, ablated, lambda s, d: True)
    tol = 1e-5 * max(1.0, float(plain.abs().max()))
    assert (full_ref - plain).abs().max() < tol  # the written-out forward is the model's
    assert (got - ref).abs().max() < tol
    assert (ref - plain).abs().max() > 0.1  # the check can fail


def test_bidirectional_model_refuses_mixed_lengths():
    """Right-padding is invisible to causal attention only: a bidirectional model needs equal lengths."""
    from circuitgraph.data.dataset import DataError

    m = model("reverse")
    rows = make_data("tracr", m.tokenizer, 4, seed=0) + make_data("tracr", m.tokenizer, 2, seed=0, length=3)
    data = tokenize([Example.model_validate(r) for r in rows], m.tokenizer)
    with pytest.raises(DataError, match="bidirectional.*same length"):
        Evaluator(m, data, ablation="zero", progress=False)
    import importlib

    ch = lambda mod: importlib.import_module(f"circuitgraph.characterise.{mod}")
    for name, call in [("activation_patching", lambda: ch("activation_patching").activation_patching(m, data)),
                       ("direct_logit_attribution", lambda: ch("dla").direct_logit_attribution(m, data)),
                       ("head_scores", lambda: ch("heads").head_scores(m, data)),
                       ("integrated_gradients", lambda: ch("integrated_gradients").integrated_gradients(m, data)),
                       ("logit_lens", lambda: ch("logit_lens").logit_lens(m, data)),
                       ("node_lens", lambda: ch("logit_lens").node_lens(m, data)),
                       ("top_neurons", lambda: ch("neurons").top_neurons(m, data, "m0"))]:
        with pytest.raises(DataError, match="bidirectional.*same length"):
            call()
    causal = model("shift2")  # causal: mixed lengths are fine
    rows = make_data("tracr", causal.tokenizer, 4, seed=0) + make_data("tracr", causal.tokenizer, 2, seed=0, length=3)
    Evaluator(causal, tokenize([Example.model_validate(r) for r in rows], causal.tokenizer), ablation="zero", progress=False)
