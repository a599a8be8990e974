"""By-position attribution (edge x span units) against computations written apart from it: the
by-hand patched forward of tests/reference.py with a weight per edge and token, finite differences
through TransformerLens hooks, and the plain scores they must sum to."""

import json

import numpy as np
import pytest
import torch

from circuitgraph.errors import CircuitWarning
from circuitgraph.data.dataset import DataError, Example, TaskData, tokenize
from circuitgraph.discovery import attribute, discover, exact_scores, faithfulness_curve
from circuitgraph.discovery.edge_scores import EdgeScores
from circuitgraph.evaluate.evaluator import Evaluator
from circuitgraph.spec.circuit_spec import CircuitSpec
from conftest import (VOCAB, adder, clean_and_corrupted_caches, hook_for, make_tokenizer, mean_logit_diff, signal_rows,
                      source_output, tiny_model, write_jsonl)
from reference import node_outputs, patched_forward

NAMES = ("A", "B", "END")


def positional_data(seed=3, B=4, P=7):
    """Rows of different lengths (padding is part of ``rest``) naming A, B and END at their own tokens."""
    g = torch.Generator().manual_seed(seed)
    clean, corrupt = torch.randint(3, VOCAB, (B, P), generator=g), torch.randint(3, VOCAB, (B, P), generator=g)
    lengths = torch.tensor([P, P - 1, P, P - 2])[:B]
    ans = torch.randint(3, VOCAB, (B, 1), generator=g)
    positions = {"A": torch.tensor([1, 0, 2, 1])[:B], "B": torch.tensor([3, 4, 3, 2])[:B], "END": lengths - 1}
    return TaskData(clean, corrupt, lengths, ans, (ans - 2) % (VOCAB - 3) + 3, positions)


def span_of_tokens(data, spans):
    """By hand: each token's index in ``spans``; the last (``rest``) where the row names none."""
    out = torch.full(data.clean.shape, len(spans) - 1)
    for j, name in enumerate(spans[:-1]):
        out[torch.arange(len(data)), data.positions[name]] = j
    return out


def by_hand_metric(m, data, ablation, in_circuit):
    """Mean logit difference of tests/reference.py's patched forward (float64 model, own ablated outputs)."""
    ablated = node_outputs(m.hf, data.corrupted)
    if ablation == "zero":
        ablated = {k: torch.zeros_like(v) for k, v in ablated.items()}
    logits, _ = patched_forward.__wrapped__(m.hf, data.clean, ablated, in_circuit)
    last = logits[torch.arange(len(data)), data.last]
    return (last.gather(1, data.answers[:, :1]) - last.gather(1, data.wrongs[:, :1])).mean()


@pytest.fixture(scope="module")
def tiny():
    m = tiny_model("gpt2", 2, double=True)
    return m, positional_data()


@pytest.mark.parametrize("family,ablation", [("gpt2", "corrupted"), ("gpt2", "zero"), ("gemma2", "corrupted"), ("tracr-causal", "zero")])
def test_positional_eap_is_the_derivative_of_the_position_restricted_forward(family, ablation):
    """Unit (e, s): d M / d alpha where edge e is ablated by the fraction alpha at the tokens of span s
    only, from reference.py's forward with a weight per edge and span, by autograd in float64."""
    m = tiny_model(family, 2, double=True)
    G, data = m.graph, positional_data()
    ev = Evaluator(m, data, ablation=ablation, progress=False)
    held = attribute(ev, "eap", progress=False, by_position=True, keep_deltas=1.0)
    with pytest.MonkeyPatch.context() as mp:  # heads' deltas rebuilt, folded one token at a time
        mp.setattr("circuitgraph.discovery.eap.FOLD_CHUNK_BYTES", 1)
        rebuilt = attribute(ev, "eap", progress=False, by_position=True, keep_deltas=0.0)
    assert held.spans == ["A", "B", "END", "rest"]
    span = span_of_tokens(data, held.spans)
    keep = torch.ones(len(G.sources), len(G.destinations), len(held.spans), dtype=torch.float64, requires_grad=True)
    metric = by_hand_metric(m, data, ablation, lambda s, d: keep[G.source_index[s], G.destination_index[d]][span])
    (grad,) = torch.autograd.grad(metric, keep)
    ref = -grad[G.legal]  # alpha = 1 - keep
    assert ref.abs().max() > 1e-3 and (ref[:, -1].abs().max() > 1e-3)  # the rest span carries signal too
    for sc in (held, rebuilt):
        assert (sc.scores[G.legal] - ref).abs().max() < 1e-5 * max(1.0, float(ref.abs().max())), family


@pytest.fixture(scope="module")
def signal():
    """test_discovery's set-up: rows naming S and END, with a clean-vs-corrupted signal."""
    m = tiny_model("gpt2", 0, make_tokenizer(), double=True)
    return m, tokenize([Example(**r) for r in signal_rows(m, 6, seed=5)], m.tokenizer)


def naive_acdc_by_position(ev, tau):
    """ACDC over edge x span units exactly as described: every unit, one patched run of the whole
    position-restricted circuit per trial."""
    from circuitgraph.discovery.acdc import damage
    from circuitgraph.spec.circuit_spec import ResolvedCircuit

    G, spans = ev.graph, ["S", "END", "rest"]
    keep = G.legal[..., None].repeat(1, 1, len(spans))

    def value(k):
        edges = {(s, d): (None if k[s, d].all() else [spans[j] for j in range(len(spans)) if k[s, d, j]])
                 for s, d in torch.nonzero(k.any(-1)).tolist()}
        return ev.metric_values([ResolvedCircuit(G, edges)]).mean()

    cur = value(keep)
    for d in reversed(range(len(G.destinations))):
        for s in reversed(range(int(G.n_upstream[d]))):
            for j in range(len(spans)):
                if keep[s, d, j]:
                    trial = keep.clone()
                    trial[s, d, j] = False
                    v = value(trial)
                    if damage(ev.metric_name, cur, v) < tau:
                        keep, cur = trial, v
    return keep


@pytest.mark.parametrize("tau", [0.005, 0.05])
def test_acdc_by_position_equals_naive_reference(signal, tau):
    m, data = signal
    ev = Evaluator(m, data, metric="logit_diff", batch_size=4, progress=False)
    found = discover(ev, "acdc", tau=tau, by_position=True, progress=False)
    slow = naive_acdc_by_position(ev, tau)
    assert found.spans == ["S", "END", "rest"] and torch.equal(found.in_circuit, slow)
    kept = int(slow.sum())
    assert 0 < kept < int(m.graph.legal.sum()) * 3  # a real decision
    partial = slow.any(-1) & ~slow.all(-1)
    assert bool(partial.any())  # some edge kept at some of its positions only


def test_positional_eap_ig_is_the_finite_difference_per_span(signal):
    """EAP-IG by position: the mean over IG points of the central difference of M when the edge's noising
    delta is added at the span's tokens only, through TransformerLens hooks."""
    m, data = signal
    ig = attribute(Evaluator(m, data, progress=False), "eap-ig", steps=3, progress=False, by_position=True)
    assert ig.spans == ["S", "END", "rest"]
    span = span_of_tokens(data, ig.spans)
    bridge = m.bridge
    clean_cache, corrupt_cache = clean_and_corrupted_caches(bridge, data)
    clean_tok, corrupt_tok = clean_cache["hook_embed"], corrupt_cache["hook_embed"]
    metric = mean_logit_diff(data)

    eps = 1e-4
    for edge in ["a0.h1->a1.h2<k>", "input->a1.h3<q>", "a1.h2->m1", "m0->logits"]:
        src, dst = edge.split("->")
        hook, head = hook_for(dst)
        for j, name in enumerate(ig.spans):
            delta = (source_output(corrupt_cache, src) - source_output(clean_cache, src)) * (span == j)[..., None]

            def run(alpha, scale):
                def embed(x, hook):
                    return corrupt_tok + alpha * (clean_tok - corrupt_tok)

                with torch.no_grad():
                    return float(metric(bridge.run_with_hooks(data.clean, fwd_hooks=[("hook_embed", embed),
                                                                                      (hook, adder(scale * delta, head))])))

            by_hand = np.mean([(run(a, eps) - run(a, -eps)) / (2 * eps) for a in (1 / 3, 2 / 3, 1.0)])
            got = ig.scores[m.graph.edge_index[edge]][j].item()
            assert got == pytest.approx(by_hand, rel=1e-5, abs=1e-8), (edge, name)


@pytest.mark.parametrize("method", ["eap", "eap-ig", "eap-ig-activations"])
def test_spans_sum_to_the_plain_scores(tiny, method):
    m, data = tiny
    ev = Evaluator(m, data, progress=False)
    legal = m.graph.legal
    plain = attribute(ev, method, steps=3, progress=False).scores[legal]
    for keep in (0.0, 1.0):
        pos = attribute(ev, method, steps=3, progress=False, by_position=True, keep_deltas=keep)
        assert pos.scores.shape[-1] == 4
        assert (pos.summed().scores[legal] - plain).abs().max() < 1e-6 * float(plain.abs().max())  # fp32 products


def test_exact_by_position_is_the_position_restricted_ablation(tiny):
    m, data = tiny
    G = m.graph
    ev = Evaluator(m, data, progress=False)
    ex = discover(ev, "exact", progress=False, by_position=True)
    span = span_of_tokens(data, ex.spans)
    with torch.no_grad():
        clean = by_hand_metric(m, data, "corrupted", lambda s, d: True)
    for edge, name in [("a0.h1->a1.h2<k>", "B"), ("input->a1.h3<q>", "rest"), ("m1->logits", "END"), ("a0.h0->m0", "A")]:
        j = ex.spans.index(name)
        target = G.edge_index[edge]
        with torch.no_grad():
            without = by_hand_metric(m, data, "corrupted",
                                     lambda s, d: span != j if (G.source_index[s], G.destination_index[d]) == target else True)
        assert ex.scores[target][j].item() == pytest.approx(float(without - clean), abs=1e-9), (edge, name)
    assert ex.scores[G.legal].abs().max() > 1e-3


def test_selection_spec_and_evaluation(tiny, tmp_path):
    """Units are selected and counted one by one; the spec lists each edge's spans (``rest`` included),
    keeps every unit's score, loads back, and evaluates to the by-hand forward restricted to those tokens."""
    m, data = tiny
    G = m.graph
    ev = Evaluator(m, data, progress=False)
    sc = attribute(ev, "eap", progress=False, by_position=True)
    assert sc.n_units == 4 * G.n_edges
    top = sc.top_n(12)
    assert top.shape == sc.scores.shape and int(top.sum()) == 12
    legal = G.legal[..., None].expand_as(top)
    assert sc.scores.abs()[top].min() >= sc.scores.abs()[legal & ~top].max()
    assert int(sc.threshold(float(sc.scores.abs()[top].min())).sum()) == 12
    mask = top.clone()
    mask[G.edge_index["input->a1.h0<v>"]][-1] = True  # a rest unit
    mask[G.edge_index["m1->logits"]] = True  # an edge at every span
    spec = sc.to_spec(mask)
    listed = {e.edge: e.positions for e in spec.edges}
    assert sum(len(p) for p in listed.values()) == int(mask.sum())
    assert "rest" in listed["input->a1.h0<v>"] and listed["m1->logits"] == ["A", "B", "END", "rest"]
    for e in spec.edges:
        s, d = G.edge_index[e.edge]
        assert e.score == pytest.approx(sum(sc.scores[s, d, sc.spans.index(p)].item() for p in e.positions))
    path = tmp_path / "c.json"
    spec.to_json(path)
    loaded = CircuitSpec.load(path)
    again = EdgeScores.from_spec(loaded, G)
    assert again.spans == sc.spans and torch.allclose(again.scores[legal], sc.scores[legal], rtol=0, atol=1e-12)
    assert loaded.edge_scores["m1->logits"] == pytest.approx(float(sc.scores[G.edge_index["m1->logits"]].sum()))
    resolved = loaded.resolve(G)
    assert resolved.position_names <= set(sc.spans)

    span = span_of_tokens(data, sc.spans)
    at = {G.edge_index[e]: torch.isin(span, torch.tensor([sc.spans.index(p) for p in ps])) for e, ps in listed.items()}
    with torch.no_grad():
        expected = by_hand_metric(m, data, "corrupted", lambda s, d: at.get((G.source_index[s], G.destination_index[d]), False))
    with pytest.warns(CircuitWarning, match="undefined"):  # six random rows: the ratios are noise, the metric is not
        score = ev.evaluate(loaded)
    assert score.circuit_metric == pytest.approx(float(expected), abs=1e-9)
    with pytest.raises(ValueError, match="no by-position form"):
        sc.greedy(5)


def test_curves_count_units(tiny):
    m, data = tiny
    ev = Evaluator(m, data, progress=False)
    sc = attribute(ev, "eap", progress=False, by_position=True)
    pair = faithfulness_curve(ev, sc, fractions=(0.01, 0.1, 1.0))
    total = sc.n_units
    for curve in (pair.signed, pair.absolute):
        assert list(curve.n_requested) == [int(f * total) for f in (0.01, 0.1, 1.0)]
        assert curve.n_edges[-1] == total and curve.n_edges[0] <= int(0.01 * total)
    assert pair.meta["n_edges_total"] == total


def test_refusals(tiny):
    m, data = tiny
    with pytest.raises(DataError, match="names none"):
        attribute(Evaluator(m, TaskData(data.clean, data.corrupted, data.lengths, data.answers, data.wrongs, {}),
                            progress=False), "eap", progress=False, by_position=True)
    lacking = dict(data.positions, B=torch.tensor([3, -1, 3, 2]))  # the second row names no B
    with pytest.raises(DataError, match="example 2: the example has no position 'B'"):
        attribute(Evaluator(m, TaskData(data.clean, data.corrupted, data.lengths, data.answers, data.wrongs, lacking),
                            progress=False), "eap", progress=False, by_position=True)
    clash = dict(data.positions, B=data.positions["A"])
    with pytest.raises(DataError, match="positions 'A' and 'B' are the same token"):
        attribute(Evaluator(m, TaskData(data.clean, data.corrupted, data.lengths, data.answers, data.wrongs, clash),
                            progress=False), "eap", progress=False, by_position=True)
    with pytest.raises(DataError, match="'rest' is reserved"):
        tokenize([Example(clean="a b", corrupted="b a", answer="a", wrong="b", positions={"rest": 0})], make_tokenizer())


def test_rest_is_every_token_a_row_does_not_name(tiny):
    _, data = tiny
    rest = data.position_mask(["rest"])
    named = data.position_mask(list(NAMES))
    assert torch.equal(rest, ~named) and torch.equal(data.position_mask(["A", "rest"]), rest | data.position_mask(["A"]))
    data.check_positions(["rest"])


@pytest.fixture(scope="module")
def ioi_file(tmp_path_factory):
    from circuitgraph.cli.commands import main

    path = tmp_path_factory.mktemp("ioi") / "ioi.jsonl"
    assert main(["make-data", "ioi", "--model", "toy-ioi", "-n", "12", "-o", str(path)]) == 0
    return path


def test_cli_discover_by_position(ioi_file, tmp_path, capsys):
    from circuitgraph.cli.commands import main

    out = tmp_path / "c.json"
    capsys.readouterr()
    assert main(["discover", "--model", "toy-ioi", "--data", str(ioi_file), "--method", "eap-ig", "--steps", "2",
                 "--by-position", "--top-n", "25", "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["spans"] == ["IO", "S1", "S1+1", "S2", "END", "rest"]
    assert summary["n_units"] == len(summary["units"]) == 25 and summary["n_units_total"] == 6 * summary["n_edges_total"]
    assert all(u["span"] in summary["spans"] and isinstance(u["score"], float) for u in summary["units"])
    spec = json.loads(out.read_text())
    assert sum(len(e["positions"]) for e in spec["edges"]) == 25 and len(spec["edges"]) == summary["n_edges"]
    assert {(e["edge"], p) for e in spec["edges"] for p in e["positions"]} == {(u["edge"], u["span"]) for u in summary["units"]}
    assert len(spec["position_scores"]) == summary["n_edges_total"]
    assert main(["evaluate", "--model", "toy-ioi", "--data", str(ioi_file), "--spec", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["faithfulness"] == pytest.approx(summary["faithfulness"])
    assert main(["curve", "--model", "toy-ioi", "--data", str(ioi_file), "--scores", str(out), "--json"]) == 0
    points = json.loads(capsys.readouterr().out)["absolute"]["points"]
    assert points[-1]["edges_requested"] == points[-1]["edges_evaluated"] == summary["n_units_total"]
    assert points[-1]["faithfulness"] == pytest.approx(1.0)


def test_cli_acdc_by_position_writes_edges_at_their_positions(ioi_file, tmp_path, capsys):
    from circuitgraph.cli.commands import main

    capsys.readouterr()
    assert main(["discover", "--model", "toy-ioi", "--data", str(ioi_file), "--by-position", "--method", "acdc",
                 "--tau", "0.001", "--json", "-o", str(tmp_path / "c.json")]) == 0
    summary, spec = json.loads(capsys.readouterr().out), json.loads((tmp_path / "c.json").read_text())
    assert summary["selection"].startswith("ACDC") and spec["edges"]
    assert any(e.get("positions") for e in spec["edges"])  # some edge kept at some positions only


@pytest.mark.parametrize("extra,needle", [(["--method", "eap", "--greedy"], "--greedy"),
                                          (["--method", "eap", "--format", "mib"], "--format mib"),
                                          (["--method", "eap", "--top-n", "100000"], "edge x position units")])
def test_cli_by_position_refusals(ioi_file, tmp_path, capsys, extra, needle):
    from circuitgraph.cli.commands import main

    capsys.readouterr()
    assert main(["discover", "--model", "toy-ioi", "--data", str(ioi_file), "--by-position", *extra, "--json",
                 "-o", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err  # model loading may print its own progress first
    assert "Traceback" not in err and needle in err.splitlines()[-1].removeprefix("circuitgraph discover: error: ")


def test_cli_refuses_data_without_named_positions(ioi_file, tmp_path, capsys):
    from circuitgraph.cli.commands import main

    rows = [json.loads(line) for line in ioi_file.read_text().splitlines()]
    plain = write_jsonl(tmp_path / "plain.jsonl", [{k: v for k, v in r.items() if k != "positions"} for r in rows])
    capsys.readouterr()
    assert main(["discover", "--model", "toy-ioi", "--data", str(plain), "--method", "eap", "--by-position",
                 "-o", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("circuitgraph discover: error: --by-position:") and "names none" in err


def test_rest_means_other_tokens_on_a_dataset_naming_other_positions(tiny):
    """``rest`` is relative to the dataset's named positions: evaluating on data that names others says so."""
    m, data = tiny
    ev = Evaluator(m, data, progress=False)
    sc = attribute(ev, "eap", progress=False, by_position=True)
    rest = torch.zeros_like(sc.scores, dtype=torch.bool)
    rest[..., -1] = m.graph.legal  # every edge at the tokens the rows do not name
    spec = sc.to_spec(rest)
    fewer = TaskData(data.clean, data.corrupted, data.lengths, data.answers, data.wrongs,
                     {k: v for k, v in data.positions.items() if k != "B"})
    with pytest.warns(CircuitWarning, match="'rest' positions were every token but A, B, END; this dataset names A, END"):
        Evaluator(m, fewer, progress=False).resolve(spec)
