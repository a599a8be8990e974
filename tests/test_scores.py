"""Scores and the evaluate command, checked against by-hand runs of the HF model, one example at a time."""

import importlib
import json

import numpy as np
import pytest
import torch

from circuitgraph.cli.commands import main
from circuitgraph.data.dataset import load_dataset
from circuitgraph.model.loading import load_model
from circuitgraph.evaluate.evaluator import Evaluator
from circuitgraph.spec.circuit_spec import CircuitSpec
from conftest import random_rows, signal_rows, write_jsonl
from reference import node_outputs, patched_forward

SPEC = {"name": "toy", "groups": {"early": {"nodes": ["a0.h1", "a0.h2"], "positions": ["S", "END"]}, "late": ["a1.h0", "a1.h3"]},
        "connections": [{"src": "early", "dst": "late", "ports": ["k", "v"]}, {"src": "late", "dst": "logits"},
                        {"src": "input", "dst": "late", "ports": ["q"]}],
        "edges": [{"edge": "input->a0.h1<v>"}, {"edge": "a0.h2->m1", "positions": ["END"]}, {"edge": "m1->logits"}]}


_CORRUPT_OUT = {}


def by_hand_metric(hf, data, keep):
    """logit_diff per example from an unpadded, independent run of each example."""
    vals = []
    for i in range(len(data)):
        L = int(data.lengths[i])
        clean, corrupt = data.clean[i:i + 1, :L], data.corrupted[i:i + 1, :L]
        pos = {k: int(v[i]) for k, v in data.positions.items()}
        key = (id(hf), tuple(corrupt[0].tolist()))
        if key not in _CORRUPT_OUT:
            _CORRUPT_OUT[key] = node_outputs(hf, corrupt)
        logits, _ = patched_forward(hf, clean, _CORRUPT_OUT[key], lambda s, d: keep(s, d, pos, L))
        last = logits[0, -1]
        vals.append(float(last[data.answers[i, 0]] - last[data.wrongs[i, 0]]))
    return np.array(vals)


@pytest.fixture(scope="module")
def setup(model_dir, tmp_path_factory):
    model = load_model(model_dir)
    rows = signal_rows(model, 7, seed=3)
    path = write_jsonl(tmp_path_factory.mktemp("d") / "data.jsonl", rows)
    data = load_dataset(path, model.tokenizer)
    return model, data, path


def test_faithfulness_and_necessity_match_by_hand(setup):
    model, data, _ = setup
    spec = CircuitSpec.from_dict(SPEC)
    score = Evaluator(model, data, batch_size=4, progress=False).evaluate(spec)
    resolved = spec.resolve(model.graph)
    G = model.graph

    def in_circuit(s, d, pos, L):
        key = (G.source_index[s], G.destination_index[d])
        if key not in resolved.edges:
            return False
        names = resolved.edges[key]
        if names is None:
            return True
        m = torch.zeros(1, L, dtype=torch.bool)
        for n in names:
            m[0, pos[n]] = True
        return m

    def complement(s, d, pos, L):
        r = in_circuit(s, d, pos, L)
        return ~r if isinstance(r, torch.Tensor) else not r

    everything = lambda s, d, pos, L: True
    nothing = lambda s, d, pos, L: False
    clean, base = by_hand_metric(model.hf, data, everything), by_hand_metric(model.hf, data, nothing)
    circ, comp = by_hand_metric(model.hf, data, in_circuit), by_hand_metric(model.hf, data, complement)
    faith = (circ.mean() - base.mean()) / (clean.mean() - base.mean())
    nec = 1 - (comp.mean() - base.mean()) / (clean.mean() - base.mean())
    assert score.clean_metric == pytest.approx(clean.mean(), abs=1e-4)
    assert score.corrupted_metric == pytest.approx(base.mean(), abs=1e-4)
    assert score.circuit_metric == pytest.approx(circ.mean(), abs=1e-4)
    assert score.faithfulness == pytest.approx(faith, abs=1e-4)
    assert score.necessity == pytest.approx(nec, abs=1e-4)
    assert 0 < score.faithfulness_se < 1 and not score.warnings and score.n_edges == len(resolved)
    per_example = Evaluator(model, data, batch_size=4, progress=False).metric_values([resolved])[0]
    assert per_example == pytest.approx(circ, abs=1e-4)
    assert np.abs(circ - clean).max() > 0.05 and np.abs(circ - base).max() > 0.05


def test_full_circuit_scores_one_and_empty_zero(setup):
    model, data, _ = setup
    ev = Evaluator(model, data, batch_size=5, progress=False)
    everything = CircuitSpec(edges=model.graph.edges)
    s = ev.evaluate(everything)
    assert s.faithfulness == pytest.approx(1.0, abs=1e-5) and s.necessity == pytest.approx(1.0, abs=1e-5)
    assert s.n_edges == s.n_edges_total == 110


def test_edge_effects_match_two_evaluations(setup):
    model, data, _ = setup
    spec = CircuitSpec.from_dict(SPEC)
    ev = Evaluator(model, data, batch_size=4, progress=False)
    effects = ev.edge_effects(spec)
    assert len(effects) == len(spec.resolve(model.graph))
    edge = "a1.h0->logits"
    smaller = CircuitSpec.from_dict(SPEC)
    smaller.connections[1] = type(smaller.connections[1])(src="a1.h3", dst="logits")
    expected = ev.evaluate(spec).faithfulness - ev.evaluate(smaller).faithfulness
    assert effects[edge][0] == pytest.approx(expected, abs=1e-5)
    nodes = ev.node_effects(spec)
    assert set(nodes) == {"a0.h1", "a0.h2", "a1.h0", "a1.h3", "m1"}


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("ablation,positional", [("corrupted", False), ("mean", False), ("zero", False),
                                                 ("corrupted", True), ("mean", True)])
def test_effects_resumed_from_the_circuits_own_run_equal_full_runs(setup, ablation, positional, chunk):
    """Each removal resumes from the circuit's run paused at the first layer it changes: the same
    numbers as running every reduced circuit from the embedding (over two batches of examples), for
    circuits at every position and for position-restricted ones."""
    model, data, _ = setup
    ev = Evaluator(model, data, batch_size=5, ablation=ablation, progress=False)
    spec = json.loads(json.dumps(SPEC))
    if not positional:  # the spec at every position
        del spec["groups"]["early"]["positions"], spec["edges"][1]["positions"]
    circuit = ev.resolve(CircuitSpec.from_dict(spec))
    assert bool(circuit.position_names) == positional and len(circuit.edges) == 15
    removals = [[k] for k in circuit.edges] + [list(circuit.edges)[:3]]
    resumed = ev.values_without(circuit.mask(), removals, chunk=chunk,
                                position_edges={k: v for k, v in circuit.edges.items() if v is not None})
    full = ev.metric_values([circuit.without(r) for r in removals], chunk=1)
    assert ev.n_batches == 2 and resumed.shape == full.shape
    assert np.abs(resumed - full).max() < 1e-5


def test_node_and_edge_effects_together_are_the_separate_ones(setup):
    """``effects`` shares one set of runs between node and edge effects (and runs a removal repeated, as a
    node with one edge and that edge, once): the numbers are those of the two methods."""
    model, data, _ = setup
    ev = Evaluator(model, data, batch_size=5, progress=False)
    circuit = ev.resolve(CircuitSpec.from_dict(SPEC))
    nodes, edges = ev.effects(circuit)
    for got, expected in ((nodes, ev.node_effects(circuit)), (edges, ev.edge_effects(circuit))):
        assert list(got) == list(expected)
        for k, (drop, se) in expected.items():
            assert got[k][0] == pytest.approx(drop, abs=1e-6) and got[k][1] == pytest.approx(se, abs=1e-6)
    assert ev.effects(circuit, edges=False) == (nodes, {})
    k = list(circuit.edges)
    twice = ev.values_without(circuit.mask(), [[k[0]], [k[1], k[2]], [k[0]], [k[2], k[1]]])
    assert (twice[0] == twice[2]).all() and (twice[1] == twice[3]).all()
    once = ev.values_without(circuit.mask(), [[k[0]], [k[1], k[2]]])
    assert np.abs(twice[:2] - once).max() < 1e-6
    # the circuit's own run is kept: scoring it again, or its effects, does not run it again
    calls = []
    ev.metric_values = lambda *a, **kw: calls.append(kw) or Evaluator.metric_values(ev, *a, **kw)
    ev.evaluate(circuit), ev.edge_effects(circuit)
    assert calls == [{"complement": True}]  # only the complement (necessity) was new


@pytest.mark.parametrize("metric", ["prob_diff", "kl", "accuracy"])
def test_other_metrics_normalise_between_baselines(setup, metric):
    model, data, _ = setup
    ev = Evaluator(model, data, metric=metric, progress=False)
    if metric == "kl":
        assert ev.clean_values == pytest.approx(0.0, abs=1e-5)
        assert (ev.base_values > 0).all()
    full = ev.faithfulness_of([CircuitSpec(edges=model.graph.edges).resolve(model.graph)])
    if abs(ev.clean_values.mean() - ev.base_values.mean()) > 1e-6:
        assert full[0] == pytest.approx(1.0, abs=1e-5)


def test_mean_ablation_per_position(setup):
    model, data, _ = setup
    ev = Evaluator(model, data, ablation="mean", progress=False)
    # with no edges, the logits are the mean-ablated residual, independent of the clean input
    empty = CircuitSpec(edges=["input->a0.h0<q>"]).resolve(model.graph)
    assert ev.faithfulness_of([empty])[0] == pytest.approx(0.0, abs=1e-5)


def test_close_baselines_warn(setup, tmp_path):
    model, _, _ = setup
    rows = [{**r, "corrupted": r["clean"]} for r in random_rows(6)]
    data = load_dataset(write_jsonl(tmp_path / "same.jsonl", rows), model.tokenizer)
    with pytest.warns(UserWarning, match="faithfulness and necessity are undefined: clean and ablated logit_diff are equal"):
        score = Evaluator(model, data, progress=False).evaluate(CircuitSpec(edges=["m1->logits"]))
    assert score.faithfulness is None and score.necessity is None and score.faithfulness_se is None
    assert "divide by zero" in score.undefined_reason


def test_cli_evaluate_json_and_table(setup, model_dir, tmp_path, capsys):
    _, _, data_path = setup
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(SPEC))
    assert main(["evaluate", "--model", str(model_dir), "--data", str(data_path), "--spec", str(spec_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("clean_metric", "corrupted_metric", "circuit_metric", "faithfulness", "necessity", "n_edges", "n_edges_total"):
        assert key in out
    assert out["n_edges_total"] == 110 and out["prepend_bos"] is False
    assert main(["evaluate", "--model", str(model_dir), "--data", str(data_path), "--spec", str(spec_path)]) == 0
    assert "faithfulness" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--spec", "missing.json"], "spec file 'missing.json' does not exist"),
    (["--model", "/nonexistent/dir"], "no such directory"),
    (["--metric-bad"], None),
])
def test_cli_errors_are_one_line(setup, model_dir, tmp_path, capsys, args, message):
    _, _, data_path = setup
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(SPEC))
    base = {"--model": str(model_dir), "--data": str(data_path), "--spec": str(spec_path)}
    if message is None:
        with pytest.raises(SystemExit):
            main(["evaluate", *sum(base.items(), ()), *args])
        return
    base[args[0]] = args[1]
    code = main(["evaluate", *sum(base.items(), ())])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_model_dir_errors(tmp_path):
    from circuitgraph.model.loading import ModelLoadError

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="has no weights"):
        load_model(tmp_path / "noweights")


def test_unsupported_architecture_says_why():
    from transformers import BertConfig

    from circuitgraph.model.loading import UnsupportedArchitecture, from_config

    with pytest.raises(UnsupportedArchitecture, match="'BertForMaskedLM' is not supported"):
        from_config(BertConfig(architectures=["BertForMaskedLM"]))


def test_unknown_model_name_is_one_clear_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    (tmp_path / "s.json").write_text(json.dumps(SPEC))
    (tmp_path / "d.jsonl").write_text(json.dumps(random_rows(1)[0]) + "\n")
    r = subprocess.run([sys.executable, "-m", "circuitgraph", "evaluate", "--model", "no-such-model-xyz", "--data",
                        str(tmp_path / "d.jsonl"), "--spec", str(tmp_path / "s.json")], capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert "model 'no-such-model-xyz': not a bundled model (toy-induction, toy-ioi, tracr-" in r.stderr
    assert "), not a local directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_memory_budget_caps_the_batch_not_the_scores(setup):
    model, data, _ = setup
    spec = CircuitSpec.from_dict(SPEC)
    whole = Evaluator(model, data, batch_size=7, progress=False)
    one = whole.pass_mb(1)
    assert whole.pass_mb(2, 3) == pytest.approx(2 * one + 2 * 2 * (whole.pass_mb(1) - whole.pass_mb(1, 0)))
    tight = Evaluator(model, data, batch_size=7, progress=False, memory_budget_mb=2.5 * one)
    assert tight.batch_size == 2 and tight.circuits_per_pass == 1 and tight.n_batches == 4
    assert not tight._cache_ok  # all batches' ablated runs would not fit beside a pass
    a, b = whole.evaluate(spec), tight.evaluate(spec)
    assert b.faithfulness == pytest.approx(a.faithfulness, abs=1e-6) and b.necessity == pytest.approx(a.necessity, abs=1e-6)
    roomy = Evaluator(model, data, batch_size=7, progress=False, memory_budget_mb=1e6)
    assert roomy.batch_size == 7 and roomy.circuits_per_pass == whole.circuits_per_pass and roomy._cache_ok
    with pytest.raises(ValueError, match="memory budget of .* is below what one example's patched pass holds"):
        Evaluator(model, data, progress=False, memory_budget_mb=0.5 * one)


def test_memory_sizes_read_with_or_without_a_unit():
    from circuitgraph.cli.checks import memory_mib

    assert [memory_mib(t) for t in ("512", "512MiB", "0.5 GiB", "8G", "1GB", "2048kib")] == \
        [512, 512, 512, 8192, pytest.approx(1e9 / 2**20), 2]


def test_on_a_cpu_only_tiny_passes_stack_circuits(setup, monkeypatch):
    """A circuit run alone takes the CPU's chunked one-circuit path, so full runs stack only when d_model x
    tokens <= 2^15; resumed trials (exact edge effects) up to 2^21."""
    model, data, _ = setup
    ev = Evaluator(model, data, batch_size=7, progress=False)
    tokens = 7 * data.clean.shape[1]
    assert model.engine.D * tokens <= 2**15 and ev.circuits_per_pass == ev.trials_per_pass == 16
    monkeypatch.setattr(model.engine, "D", 2**16 // tokens)  # a wider model: past 2^15, within 2^21
    assert ev.circuits_per_pass == 1 and ev.trials_per_pass == 16
    monkeypatch.setattr(model.engine, "D", 2**22 // tokens)
    assert ev.circuits_per_pass == ev.trials_per_pass == 1


def test_without_a_budget_passes_fit_in_half_the_free_memory(setup, monkeypatch):
    """No --memory-budget: the batch shrinks to what half the device's free memory holds (a large model's
    default batch would otherwise fail out of memory), never below one example; the scores are the same."""
    evaluator = importlib.import_module("circuitgraph.evaluate.evaluator")  # the package name is also a function

    model, data, _ = setup
    spec = CircuitSpec.from_dict(SPEC)
    whole = Evaluator(model, data, batch_size=7, progress=False)
    assert evaluator.free_mb(torch.device("cpu")) > 0 and whole.batch_size == 7
    one = whole.pass_mb(1)
    monkeypatch.setattr(evaluator, "free_mb", lambda device: 5 * one)
    tight = Evaluator(model, data, batch_size=7, progress=False)
    assert tight.batch_size == 2 and tight.circuits_per_pass == 1 and not tight._cache_ok
    a, b = whole.evaluate(spec), tight.evaluate(spec)
    assert b.faithfulness == pytest.approx(a.faithfulness, abs=1e-6) and b.necessity == pytest.approx(a.necessity, abs=1e-6)
    monkeypatch.setattr(evaluator, "free_mb", lambda device: 0.1 * one)
    assert Evaluator(model, data, batch_size=7, progress=False).batch_size == 1
    monkeypatch.setattr(evaluator, "free_mb", lambda device: float("inf"))
    assert Evaluator(model, data, batch_size=7, progress=False).batch_size == 7


@pytest.mark.parametrize("value,message", [("0.000001", "is below what one example's patched pass holds"),
                                           ("1KiB", "is below what one example's patched pass holds"),
                                           ("-3", "argument --memory-budget: expected a number > 0"),
                                           ("0GB", "argument --memory-budget: expected a number > 0, got '0GB'"),
                                           ("nan", "argument --memory-budget: expected a finite number"),
                                           ("8XB", "argument --memory-budget: expected a size such as 512, 512MiB or 8GB")])
def test_cli_memory_budget_errors_are_one_line(setup, model_dir, tmp_path, capsys, value, message):
    _, _, data_path = setup
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(SPEC))
    try:
        code = main(["evaluate", "--model", str(model_dir), "--data", str(data_path), "--spec", str(spec_path),
                     "--memory-budget", value])
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err


@pytest.mark.parametrize("rows", [[1, 2, 3], [7, 1, 1, 9, 2, 2]])
def test_an_evaluator_on_some_rows_reuses_the_cached_runs_and_scores_as_a_fresh_one(rows, tokenizer, monkeypatch):
    """``first_rows`` (the size selection's look) and ``on_rows`` (bootstrap resamples) take their rows'
    clean logits and ablations from the full evaluator's cached batches, in any order with repeats."""
    from conftest import tiny_model

    m = tiny_model("llama", seed=1, tokenizer=tokenizer, double=True)
    data = load_dataset(signal_rows(m, 10), m)
    ev = Evaluator(m, data, batch_size=4, progress=False)
    fresh = Evaluator(m, data.take(rows), batch_size=4, progress=False)
    runs = []
    monkeypatch.setattr(m.engine, "run", lambda *a, **k: runs.append(1) or pytest.fail("a run was repeated"))
    sub = ev.on_rows(rows)
    mask = (torch.rand(len(m.graph.sources), len(m.graph.destinations), generator=torch.Generator().manual_seed(0)) < 0.3) & m.graph.legal
    assert np.abs(sub.clean_values - fresh.clean_values).max() < 1e-10
    assert np.abs(sub.base_values - fresh.base_values).max() < 1e-10
    assert np.abs(sub.mask_values(mask[None]) - fresh.mask_values(mask[None])).max() < 1e-10
    assert not runs
