"""Path patching against the engine and TransformerLens hooks; activation patching sweeps; the toy-induction circuit."""

import argparse
import json
from pathlib import Path

import pytest
import torch

from circuitgraph.characterise.activation_patching import activation_patching, patch_one, plot_patching
from circuitgraph.data.dataset import load_dataset
from circuitgraph.evaluate.metrics import logit_diff
from circuitgraph.model.loading import bundled_models, load_model
from circuitgraph.cli.path_patch import register_cli
from circuitgraph.evaluate.path_patching import path_patch, path_patch_sweep, plot_path_patching, receiver_index
from conftest import adder, hook_for, signal_rows, source_output, write_jsonl


@pytest.fixture(scope="module")
def setup(model_dir, tmp_path_factory):
    model = load_model(model_dir)
    path = write_jsonl(tmp_path_factory.mktemp("pp") / "data.jsonl", signal_rows(model, 9, seed=4))
    return model, load_dataset(path, model.tokenizer), path


def engine_effect(model, data, masks, pos=None):
    """(M(patched) - M(clean)) / (M(clean) - M(corrupted)) computed directly with the engine, whole dataset at once."""
    e = model.engine
    last = data.last
    with torch.no_grad():
        clean = logit_diff(e.run(data.clean, logit_positions=last)[0], data).mean()
        corrupt = logit_diff(e.run(data.corrupted, logit_positions=last)[0], data).mean()
        _, outs = e.run(data.corrupted, record=True)
        plan = e.compile(masks, pos, *data.clean.shape)
        patched = logit_diff(e.patched_run(data.clean, e.make_ablation(outs, "corrupted"), plan, logit_positions=last)[0], data).mean()
    return float((patched - clean) / (clean - corrupt))


@pytest.mark.parametrize("receiver", ["a1.h2<k>", "a1.h0<q>", "m1", "logits"])
def test_sweep_matches_one_edge_removed_engine_runs(setup, receiver):
    model, data, _ = setup
    G = model.graph
    res = path_patch_sweep(model, data, receiver, batch_size=4)  # several mini-batches
    d = G.destination_index[receiver]
    expected_senders = [G.sources[s] for s in range(len(G.sources)) if G.legal[s, d]]
    assert list(res.senders) == expected_senders
    for name in expected_senders:
        masks = G.legal.clone()[None]
        masks[0, G.source_index[name], d] = False
        assert res.senders[name] == pytest.approx(engine_effect(model, data, masks), abs=1e-5), name
    assert max(abs(v) for v in res.senders.values()) > 1e-3  # not vacuous
    assert res.heads.shape == (G.n_layers, G.n_heads) and res.mlps.shape == (G.n_layers,)
    if receiver.startswith("a1"):
        assert torch.isnan(res.heads[1]).all() and torch.isnan(res.mlps[1])
        assert res.heads[0, 3] == pytest.approx(res.senders["a0.h3"])


def test_sender_set_and_positions_match_engine(setup):
    model, data, _ = setup
    G = model.graph
    senders, receivers = ["a0.h1", "m0"], ["a1.h2<k>", "a1.h3<v>"]
    masks = G.legal.clone()[None]
    for s in senders:
        for r in receivers:
            masks[0, G.source_index[s], G.destination_index[r]] = False
    assert path_patch(model, data, senders, receivers) == pytest.approx(engine_effect(model, data, masks), abs=1e-5)
    # patched only at END: those edges stay clean at every other position
    pm = ~data.position_mask(["END"])
    pos = {(G.source_index[s], G.destination_index[r]): pm for s in senders for r in receivers}
    got = path_patch(model, data, senders, receivers, positions=["END"])
    assert got == pytest.approx(engine_effect(model, data, masks, pos), abs=1e-5)
    sweep = path_patch_sweep(model, data, receivers, senders=senders, positions=["END"])
    pos1 = {k: v for k, v in pos.items() if k[0] == G.source_index["m0"]}
    m1 = G.legal.clone()[None]
    for k in pos1:
        m1[0, k[0], k[1]] = False
    assert sweep.senders["m0"] == pytest.approx(engine_effect(model, data, m1, pos1), abs=1e-5)


def test_head_to_key_matches_transformerlens_hook_patch(setup):
    """a0.h1 -> a1.h2<k> by hand: add (corrupted - clean) a0.h1 output to a1.h2's key input, nothing else."""
    model, data, _ = setup
    bridge = model.bridge
    with torch.no_grad():
        _, clean_cache = bridge.run_with_cache(data.clean)
        _, corrupt_cache = bridge.run_with_cache(data.corrupted)
        diff = source_output(corrupt_cache, "a0.h1") - source_output(clean_cache, "a0.h1")
        hook, head = hook_for("a1.h2<k>")

        idx = torch.arange(len(data))
        at_last = lambda logits: logits[idx, data.last]
        m_patch = logit_diff(at_last(bridge.run_with_hooks(data.clean, fwd_hooks=[(hook, adder(diff, head))])), data).mean()
        m_clean = logit_diff(at_last(bridge(data.clean)), data).mean()
        m_corrupt = logit_diff(at_last(bridge(data.corrupted)), data).mean()
    expected = float((m_patch - m_clean) / (m_clean - m_corrupt))
    got = path_patch(model, data, "a0.h1", "a1.h2<k>")
    assert got == pytest.approx(expected, abs=1e-5)
    assert abs(expected) > 1e-3


@pytest.mark.parametrize("bad,match", [
    ("a1.h2", r"receiver 'a1.h2': a head receiver needs a port: 'a1.h2<q>'"),
    ("a7.h0<k>", r"receiver 'a7.h0<k>': layer 7 out of range"),
    ("input", r"receiver 'input': 'input' reads nothing"),
    ("a1.h2<x>", r"receiver 'a1.h2<x>' is not a destination"),
    ("banana", r"receiver 'banana': unknown node"),
])
def test_bad_receivers_name_themselves(setup, bad, match):
    model, data, _ = setup
    with pytest.raises(ValueError, match=match):
        receiver_index(model.graph, bad)
    with pytest.raises(ValueError, match=match):
        path_patch_sweep(model, data, bad)


def _cli(argv):
    parser = argparse.ArgumentParser(prog="circuitgraph")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_json_and_figure(setup, model_dir, tmp_path, capsys):
    model, data, path = setup
    fig = tmp_path / "pp.png"
    assert _cli(["path-patch", "--model", str(model_dir), "--data", str(path), "--receiver", "a1.h2<k>", "--json", "-o", str(fig)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["receiver"] == "a1.h2<k>" and out["metric"] == "logit_diff" and out["n_examples"] == len(data)
    assert set(out["senders"]) == {"input", "a0.h0", "a0.h1", "a0.h2", "a0.h3", "m0"}
    assert out["senders"]["a0.h1"] == pytest.approx(path_patch(model, data, "a0.h1", "a1.h2<k>"), abs=1e-6)
    assert fig.stat().st_size > 5000
    assert _cli(["path-patch", "--model", str(model_dir), "--data", str(path), "--receiver", "m1"]) == 0
    assert "a1.h" in capsys.readouterr().out
    with pytest.raises(ValueError, match="receiver 'a1.h9<k>': head 9 out of range"):
        _cli(["path-patch", "--model", str(model_dir), "--data", str(path), "--receiver", "a1.h9<k>"])


# ----- activation patching -----------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_patching_all_of_resid_pre_0_restores_fully(setup, direction):
    model, data, _ = setup
    assert patch_one(model, data, "resid_pre", 0, direction) == pytest.approx(1.0, abs=1e-5)
    # and a single position is a partial effect, the same as the sweep's cell
    sweep = activation_patching(model, data, "resid_pre", direction, max_batch=20)
    assert sweep.values[0, 2] == pytest.approx(patch_one(model, data, "resid_pre", 0, direction, positions=[2]), abs=1e-5)
    assert sweep.values[1, 4] == pytest.approx(patch_one(model, data, "resid_pre", 1, direction, positions=[4]), abs=1e-5)


def test_sweep_shapes_labels_and_head_cells(setup, tmp_path):
    model, data, _ = setup
    N, P = data.clean.shape
    res = activation_patching(model, data, "attn_out", "denoising")
    assert res.values.shape == (2, P) and res.dims == ("layer", "position") and len(res.position_labels) == P
    first = model.tokenizer.decode([int(data.clean[0, 0])])
    assert res.position_labels[0].startswith(f"0 {first}")
    heads = activation_patching(model, data, "heads", "noising")
    assert heads.values.shape == (2, 4) and heads.dims == ("layer", "head")
    assert heads.values[1, 3] == pytest.approx(patch_one(model, data, "heads", 1, "noising", head=3), abs=1e-5)
    hp = activation_patching(model, data, "heads_by_position", "denoising", layers=[1])
    assert hp.values.shape == (1, 4, P)
    assert hp.values[0, 2, P - 1] == pytest.approx(patch_one(model, data, "heads", 1, "denoising", positions=[P - 1], head=2), abs=1e-5)
    resid = activation_patching(model, data, "resid_pre", "denoising")
    out = plot_patching([resid, res], tmp_path / "act.png")
    assert out.stat().st_size > 5000
    with pytest.raises(ValueError, match="unknown direction 'forwards'"):
        activation_patching(model, data, "resid_pre", "forwards")


# ----- the bundled toy-induction model ------------------------------------------------------------
needs_toy = pytest.mark.skipif("toy-induction" not in bundled_models(),
                               reason="bundled model toy-induction not trained yet (scripts/train_toy_induction.py)")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from circuitgraph.data.tasks import make_data, write_jsonl as write

    model = load_model("toy-induction")
    meta = json.loads((model_dir_of("toy-induction") / "metrics.json").read_text())
    path = tmp_path_factory.mktemp("toy") / "induction.jsonl"
    write(make_data("induction", model.tokenizer, 24, seed=1), path)
    return model, load_dataset(path, model.tokenizer), meta


def model_dir_of(name):
    from circuitgraph.model.loading import BUNDLED_DIR

    return BUNDLED_DIR / name


@needs_toy
def test_toy_induction_prev_token_heads_feed_induction_keys(toy, tmp_path):
    model, data, meta = toy
    prev, ind = meta["prev_token_heads"], meta["induction_heads"]
    keys = [f"{h}<k>" for h in ind]
    queries = [f"{h}<q>" for h in ind]
    to_k = path_patch(model, data, prev, keys)
    to_q = path_patch(model, data, prev, queries)
    print(f"prev-token heads {prev} -> induction keys: {to_k:+.3f}, -> queries: {to_q:+.3f}")
    assert to_k < -0.3 and abs(to_q) < 0.05
    sweep = path_patch_sweep(model, data, keys)
    ranked = [name for name, _ in sweep.top(len(sweep.senders)) if name.startswith("a")]
    print("sweep to induction keys:", {k: round(v, 3) for k, v in sweep.senders.items()})
    # the heads that write the induction keys: the previous-token heads plus the head that attends
    # two tokens back (specs/induction_toy.json records the attention-pattern evidence)
    from circuitgraph.spec.circuit_spec import CircuitSpec

    spec = CircuitSpec.load(Path(__file__).resolve().parents[1] / "specs" / "induction_toy.json")
    key_writers = set(spec.groups["previous token"].nodes) | set(spec.groups["token two back"].nodes)
    assert set(prev) <= key_writers
    assert set(ranked[:len(key_writers)]) == key_writers
    assert plot_path_patching(sweep, tmp_path / "toy.png").stat().st_size > 5000
    # the induction heads' direct paths to the logits carry the behaviour
    logit_sweep = path_patch_sweep(model, data, "logits")
    assert sum(logit_sweep.senders[h] for h in ind) < -0.3


@pytest.mark.filterwarnings("ignore:path-patching effects are not meaningful")  # equal either way is the point
def test_memory_budget_caps_the_sweep_not_its_effects(setup, model_dir, capsys):
    """A tight budget stacks fewer senders' circuits per pass and shrinks the batch; the effects stay."""
    from circuitgraph.evaluate.evaluator import Evaluator

    model, data, path = setup
    whole = path_patch_sweep(model, data, "logits", batch_size=9)
    one = Evaluator(model, data, batch_size=9, progress=False).pass_mb(1)
    tight = path_patch_sweep(model, data, "logits", batch_size=9, memory_budget_mb=2.5 * one)
    assert tight.senders == pytest.approx(whole.senders, abs=1e-6)
    assert path_patch(model, data, "a0.h1", "m1", memory_budget_mb=2.5 * one) == pytest.approx(
        path_patch(model, data, "a0.h1", "m1"), abs=1e-6)
    assert _cli(["path-patch", "--model", str(model_dir), "--data", str(path), "--receiver", "logits", "--json",
                 "--memory-budget", str(2.5 * one)]) == 0
    assert json.loads(capsys.readouterr().out)["senders"] == pytest.approx(whole.senders, abs=1e-6)
