"""Discovery methods against independent computations: finite differences through TransformerLens
hooks (EAP), EAP-IG's limits, and a deliberately naive ACDC."""

import numpy as np
import pytest
import torch

from circuitgraph.data.dataset import tokenize, Example
from circuitgraph.discovery import acdc, attribute, exact_scores, faithfulness_curve, roc_auc
from circuitgraph.discovery.acdc import damage
from circuitgraph.model.loading import CircuitModel
from circuitgraph.evaluate.evaluator import Evaluator
from conftest import (CONFIGS, adder, clean_and_corrupted_caches, hook_for, make_tokenizer, mean_logit_diff,
                      randomize_norms, signal_rows, source_output, tiny_model)


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = CONFIGS["gpt2"]()
    cfg._attn_implementation = "eager"
    hf = randomize_norms(AutoModelForCausalLM.from_config(cfg).eval()).double()
    model = CircuitModel(hf, make_tokenizer())
    data = tokenize([Example(**r) for r in signal_rows(model, 6, seed=5)], model.tokenizer)
    return model, data


def test_eap_equals_finite_differences(setup):
    model, data = setup
    ev = Evaluator(model, data, progress=False)
    eap = attribute(ev, "eap", progress=False)
    bridge = model.bridge
    clean_cache, corrupt_cache = clean_and_corrupted_caches(bridge, data)
    metric = mean_logit_diff(data)

    eps = 1e-4
    for edge in ["a0.h1->a1.h2<k>", "input->a1.h3<q>", "a0.h3->a1.h0<v>", "m0->logits", "a1.h2->m1", "input->a0.h0<v>"]:
        src, dst = edge.split("->")
        delta = source_output(corrupt_cache, src) - source_output(clean_cache, src)
        hook, head = hook_for(dst)

        def run(scale):
            with torch.no_grad():
                return float(metric(bridge.run_with_hooks(data.clean, fwd_hooks=[(hook, adder(scale * delta, head))])))

        fd = (run(eps) - run(-eps)) / (2 * eps)  # d M / d scale at 0 = delta . grad
        got = eap.scores[model.graph.edge_index[edge]].item()
        assert got == pytest.approx(fd, rel=1e-6, abs=1e-8), edge
        assert abs(fd) > 1e-4


@pytest.mark.parametrize("points", ["right", "left"])
def test_eap_ig_step_points_by_hand(setup, points):
    """EAP-IG (inputs) = mean over alpha of delta_s . dM/dx_d in the run whose input embedding is
    ablated + alpha (clean - ablated); alpha = k/n for k = 1..n (right) or k = 0..n-1 (left, the
    EAP-IG repository's), each gradient a finite difference through TransformerLens hooks."""
    from circuitgraph.discovery import ig_alphas

    model, data = setup
    steps = 3
    alphas = {"right": [1 / 3, 2 / 3, 1.0], "left": [0.0, 1 / 3, 2 / 3]}[points]
    assert ig_alphas(steps, points) == pytest.approx(alphas)
    ig = attribute(Evaluator(model, data, progress=False), "eap-ig", steps=steps, ig_points=points, progress=False)
    assert ig.meta["ig_points"] == points
    bridge = model.bridge
    clean_cache, corrupt_cache = clean_and_corrupted_caches(bridge, data)
    clean_tok, corrupt_tok = clean_cache["hook_embed"], corrupt_cache["hook_embed"]
    metric = mean_logit_diff(data)

    eps = 1e-4
    for edge in ["a0.h1->a1.h2<k>", "input->a1.h3<q>", "a1.h2->m1", "m0->logits"]:
        src, dst = edge.split("->")
        delta = source_output(corrupt_cache, src) - source_output(clean_cache, src)
        hook, head = hook_for(dst)

        def run(alpha, scale):
            def embed(x, hook):
                return corrupt_tok + alpha * (clean_tok - corrupt_tok)

            with torch.no_grad():
                return float(metric(bridge.run_with_hooks(data.clean, fwd_hooks=[("hook_embed", embed),
                                                                                  (hook, adder(scale * delta, head))])))

        by_hand = np.mean([(run(a, eps) - run(a, -eps)) / (2 * eps) for a in alphas])
        assert ig.scores[model.graph.edge_index[edge]].item() == pytest.approx(by_hand, rel=1e-6, abs=1e-8), edge


def test_ig_points_differ_and_are_checked(setup):
    from circuitgraph.discovery import ig_alphas

    model, data = setup
    ev = Evaluator(model, data, progress=False)
    legal = model.graph.legal
    right = attribute(ev, "eap-ig", steps=2, progress=False).scores
    left = attribute(ev, "eap-ig", steps=2, ig_points="left", progress=False).scores
    assert not torch.allclose(right[legal], left[legal], atol=1e-6)
    with pytest.raises(ValueError, match="IG points 'middle'"):
        ig_alphas(5, "middle")


@pytest.mark.parametrize("variant", ["eap-ig", "eap-ig-activations"])
def test_eap_ig_with_one_step_is_eap(setup, variant):
    model, data = setup
    ev = Evaluator(model, data, progress=False)
    eap = attribute(ev, "eap", progress=False).scores
    ig = attribute(ev, variant, steps=1, progress=False).scores
    legal = model.graph.legal
    if variant == "eap-ig":
        assert torch.allclose(ig[legal], eap[legal], atol=1e-10)
    else:
        # MIB's activation variant fixes one block's output at a time, which also cuts the gradient
        # through that block; only the logits' input gradient never passes through a block.
        col = model.graph.logits_dest
        assert torch.allclose(ig[:, col], eap[:, col], atol=1e-10)
        assert not torch.allclose(ig[legal], eap[legal], atol=1e-6)
    five = attribute(ev, variant, steps=5, progress=False).scores
    assert not torch.allclose(five[legal], eap[legal], atol=1e-6)


def naive_acdc(ev, tau):
    """ACDC exactly as described: every edge, one full patched run per trial."""
    G = ev.graph
    current = G.legal.clone()
    cur = ev.mask_values(current[None]).mean()
    for d in reversed(range(len(G.destinations))):
        for s in reversed(range(int(G.n_upstream[d]))):
            if not current[s, d]:
                continue
            trial = current.clone()
            trial[s, d] = False
            value = ev.mask_values(trial[None]).mean()
            if damage(ev.metric_name, cur, value) < tau:
                current, cur = trial, value
    return current


@pytest.mark.parametrize("metric,tau", [("kl", 0.002), ("kl", 0.02), ("logit_diff", 0.05), ("logit_diff", 0.3)])
def test_acdc_equals_naive_reference(setup, metric, tau):
    model, data = setup
    ev = Evaluator(model, data, metric=metric, batch_size=4, progress=False)
    slow = naive_acdc(ev, tau)
    for batch in (1, 4):  # one trial at a time, and speculative batches
        fast = acdc(ev, tau, batch=batch, progress=False)
        assert torch.equal(fast.in_circuit, slow)
    assert 0 < int(slow.sum()) < model.graph.n_edges  # a real decision, neither everything nor nothing


def test_exact_scores_are_single_edge_ablations(setup):
    model, data = setup
    ev = Evaluator(model, data, progress=False)
    ex = exact_scores(ev, progress=False)
    G = model.graph
    for edge in ["a0.h1->a1.h2<k>", "m1->logits", "input->m0"]:
        m = G.legal.clone()
        m[G.edge_index[edge]] = False
        expected = ev.mask_values(m[None]).mean() - ev.clean_values.mean()
        assert ex.scores[G.edge_index[edge]].item() == pytest.approx(expected, abs=1e-9)


def test_selection_and_spec(setup):
    model, data = setup
    ev = Evaluator(model, data, progress=False)
    sc = attribute(ev, "eap", progress=False)
    top = sc.top_n(10)
    assert int(top.sum()) == 10
    assert sc.scores.abs()[top].min() >= sc.scores.abs()[model.graph.legal & ~top].max()
    greedy = sc.greedy(15)
    assert int(greedy.sum()) == 15
    spec = sc.to_spec(greedy)
    assert len(spec.edges) == 15 and len(spec.edge_scores) == model.graph.n_edges
    assert spec.resolve(model.graph).mask().eq(greedy).all()
    mib = spec.to_mib(model.graph)
    assert sum(v["in_graph"] for v in mib["edges"].values()) == 15


def test_faithfulness_curve_and_auc(setup):
    model, data = setup
    ev = Evaluator(model, data, progress=False)
    ex = exact_scores(ev, progress=False)
    curve = faithfulness_curve(ev, ex, fractions=(0.05, 0.2, 0.5, 1.0))
    # six rows: clean and ablated differ within noise, so every ratio is reported undefined, not printed
    assert ev.undefined_reason and curve.undefined_reason == ev.undefined_reason
    assert curve.cpr is None and curve.cmd is None and curve.to_dict()["signed"]["points"][-1]["faithfulness"] is None
    reference = ex.top_n(20)
    auc, fpr, tpr = roc_auc(ex, reference)
    assert auc == pytest.approx(1.0) and tpr[-1] == 1.0 and fpr[-1] == 1.0
    flipped = ex.top_n(model.graph.n_edges - 20) ^ model.graph.legal  # the 20 lowest |score|
    assert roc_auc(ex, flipped)[0] == pytest.approx(0.0)


def test_cli_discover_writes_spec_and_mib(model_dir, tmp_path, capsys):
    import json

    from circuitgraph.cli.commands import main
    from circuitgraph.model.loading import load_model
    from conftest import write_jsonl

    model = load_model(model_dir)
    data = write_jsonl(tmp_path / "d.jsonl", signal_rows(model, 6, seed=2))
    out = tmp_path / "c.json"
    assert main(["discover", "--model", str(model_dir), "--data", str(data), "--method", "eap-ig", "--top-n", "12",
                 "--steps", "3", "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_edges"] == 12 and summary["n_edges_total"] == 110
    spec = json.loads(out.read_text())
    assert len(spec["edges"]) == 12 and len(spec["edge_scores"]) == 110
    mib = tmp_path / "m.json"
    assert main(["discover", "--model", str(model_dir), "--data", str(data), "--method", "acdc", "--tau", "0.01",
                 "--format", "mib", "-o", str(mib)]) == 0
    m = json.loads(mib.read_text())
    assert len(m["edges"]) == 110 and all(set(v) == {"score", "in_graph"} for v in m["edges"].values())
    assert main(["discover", "--model", str(model_dir), "--data", str(data), "--method", "eap", "--top-n", "3",
                 "--threshold", "0.1", "-o", str(out)]) == 2
    assert "not both" in capsys.readouterr().err


def test_cli_dtype_and_ig_points(model_dir, tmp_path, capsys):
    import json

    from circuitgraph.cli.commands import main
    from circuitgraph.model.loading import load_model
    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", signal_rows(load_model(model_dir), 6, seed=2))
    out = tmp_path / "c.json"
    assert main(["discover", "--model", str(model_dir), "--data", str(data), "--method", "eap-ig", "--steps", "2",
                 "--ig-points", "left", "--dtype", "bfloat16", "--top-n", "5", "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_edges"] == 5
    assert json.loads(out.read_text())["metadata"]["ig_points"] == "left"
    with pytest.raises(SystemExit):
        main(["discover", "--model", str(model_dir), "--data", str(data), "--method", "eap", "--dtype", "float8", "-o", str(out)])
    assert "--dtype" in capsys.readouterr().err
    scores = {}
    for keep in ("0", "1"):
        assert main(["discover", "--model", str(model_dir), "--data", str(data), "--method", "eap", "--keep-deltas", keep,
                     "--top-n", "5", "-o", str(out), "--json"]) == 0
        capsys.readouterr()
        scores[keep] = json.loads(out.read_text())["edge_scores"]
    assert scores["0"].keys() == scores["1"].keys()
    assert max(abs(scores["0"][k] - scores["1"][k]) for k in scores["0"]) < 1e-6
    with pytest.raises(SystemExit):
        main(["discover", "--model", str(model_dir), "--data", str(data), "--method", "eap", "--keep-deltas", "2", "-o", str(out)])
    err = capsys.readouterr().err
    assert "--keep-deltas" in err and "from 0 to 1" in err


@pytest.mark.parametrize("family,ablation", [("qwen2", "corrupted"), ("neox", "corrupted"), ("gemma2", "corrupted"),
                                             ("olmo2", "corrupted"), ("phi3", "corrupted"), ("qwen3", "corrupted"),
                                             ("llama", "zero"), ("tracr", "zero"), ("tracr-causal", "corrupted")])
def test_eap_is_the_derivative_of_the_naive_patched_forward(family, ablation):
    """An edge's EAP score is the change in M as the edge moves from clean towards ablated:
    -dM/dk_e at k = 1 in the by-hand forward where every edge carries a weight k_e."""
    from reference import node_outputs, patched_forward

    from circuitgraph.data.dataset import TaskData

    m = tiny_model(family, seed=2)
    G = m.graph
    g = torch.Generator().manual_seed(3)
    B, P = 3, 6
    clean, corrupt = torch.randint(3, 40, (B, P), generator=g), torch.randint(3, 40, (B, P), generator=g)
    ans = torch.randint(3, 40, (B, 1), generator=g)
    data = TaskData(clean, corrupt, torch.full((B,), P), ans, (ans + 1) % 40 + 3, {})
    ev = Evaluator(m, data, ablation=ablation, progress=False)
    kept = attribute(ev, "eap", progress=False, keep_deltas=1.0).scores
    with pytest.MonkeyPatch.context() as mp:  # and folded one token at a time
        mp.setattr("circuitgraph.discovery.eap.FOLD_CHUNK_BYTES", 1)
        recomputed = attribute(ev, "eap", progress=False, keep_deltas=0.0).scores

    keep = torch.ones(len(G.sources), len(G.destinations), dtype=torch.float64, requires_grad=True)
    ablated = node_outputs(m.hf, corrupt)
    if ablation == "zero":
        ablated = {k: torch.zeros_like(v) for k, v in ablated.items()}
    logits, _ = patched_forward.__wrapped__(m.hf, clean, ablated, lambda s, d: keep[G.source_index[s], G.destination_index[d]])
    last = logits[:, -1]
    metric = (last.gather(1, ans) - last.gather(1, data.wrongs)).mean()
    (grad,) = torch.autograd.grad(metric, keep)
    ref = -grad[G.legal]
    assert ref.abs().max() > 1e-3
    for eap in (kept, recomputed):  # head deltas held, or rebuilt from the heads' values when folded
        assert (eap[G.legal] - ref).abs().max() < 1e-4 * max(1.0, float(ref.abs().max())), family
