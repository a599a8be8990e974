"""Faithfulness curves under MIB's rules, against a separate transcription of EAP-IG's ``Graph.prune``
(node/edge sets, loops) and hand-computed sizes and areas."""

import numpy as np
import pytest
import torch

from circuitgraph.data.dataset import Example, tokenize
from circuitgraph.discovery import attribute, faithfulness_curve
from circuitgraph.discovery.curves import FaithfulnessCurve, mib_sizes, ranked_top_n
from circuitgraph.discovery.edge_scores import mib_prune, prune_dangling
from circuitgraph.discovery.edge_scores import EdgeScores
from circuitgraph.evaluate.evaluator import Evaluator
from circuitgraph.graph.computational_graph import Graph
from circuitgraph.model.loading import CircuitModel
from conftest import CONFIGS, make_tokenizer, signal_rows


def eap_ig_prune(edges: set[str], one_pass: bool) -> set[str]:
    """EAP-IG's ``prune`` written over edge names.  ``apply_topn`` stores the node set (nodes with an
    outgoing and an incoming edge; input always has one) and prunes once; ``evaluate_graph`` prunes
    again.  Each prune loops: recompute the nodes, stop after this pass if they equal the stored ones,
    drop edges that lost an end (logits is always there)."""
    def node(dst):
        return dst.split("<")[0]

    def live_nodes(es):
        return {e.split("->")[0] for e in es} & ({node(e.split("->")[1]) for e in es} | {"input"})

    def prune(edges, stored):
        while True:
            new = live_nodes(edges)
            same = new == stored
            stored = new
            edges = {e for e in edges if e.split("->")[0] in stored and (e.endswith("->logits") or node(e.split("->")[1]) in stored)}
            if same:
                return edges, stored

    edges, stored = prune(edges, live_nodes(edges))  # apply_topn(..., prune=True)
    if not one_pass:
        edges, stored = prune(edges, stored)  # evaluate_graph
    return edges


def random_mask(graph, n, seed):
    g = torch.Generator().manual_seed(seed)
    flat = torch.rand(graph.legal.shape, generator=g).masked_fill(~graph.legal, -1).flatten()
    m = torch.zeros_like(flat, dtype=torch.bool)
    m[flat.topk(n).indices] = True
    return m.view(graph.legal.shape)


@pytest.mark.parametrize("seed,n", [(0, 8), (1, 20), (2, 40), (3, 60), (4, 110)])
def test_prune_equals_eap_ig_prune(seed, n):
    graph = Graph(n_layers=2, n_heads=4)
    mask = random_mask(graph, n, seed)
    names = set(graph.mask_to_edges(mask)) if hasattr(graph, "mask_to_edges") else \
        {f"{graph.sources[s]}->{graph.destinations[d]}" for s, d in torch.nonzero(mask).tolist()}
    for one_pass in (True, False):
        got = mib_prune(graph, mask, passes=1 if one_pass else None)
        got_names = {f"{graph.sources[s]}->{graph.destinations[d]}" for s, d in torch.nonzero(got).tolist()}
        assert got_names == eap_ig_prune(names, one_pass)


def reachable_edges(graph, mask) -> torch.Tensor:
    """Edges on some input -> logits path of the selected edges (networkx reachability)."""
    import networkx as nx

    g = nx.DiGraph()
    pairs = torch.nonzero(mask).tolist()
    g.add_edges_from((graph.sources[s], graph.node_of(graph.destinations[d])) for s, d in pairs)
    out = torch.zeros_like(mask)
    if "input" in g and "logits" in g:
        live = (nx.descendants(g, "input") | {"input"}) & (nx.ancestors(g, "logits") | {"logits"})
        for s, d in pairs:
            out[s, d] = graph.sources[s] in live and graph.node_of(graph.destinations[d]) in live
    return out


@pytest.mark.parametrize("seed,n", [(0, 8), (1, 20), (2, 40), (3, 60), (5, 15), (6, 30)])
def test_pruning_to_the_end_keeps_the_input_to_logits_paths(seed, n):
    graph = Graph(n_layers=2, n_heads=4)
    mask = random_mask(graph, n, seed)
    assert torch.equal(mib_prune(graph, mask), reachable_edges(graph, mask))
    assert torch.equal(prune_dangling(graph, mask), reachable_edges(graph, mask))


def test_prune_chain_needs_several_passes():
    graph = Graph(n_layers=2, n_heads=4)
    names = ["input->a0.h0<q>", "a0.h0->a1.h0<v>", "a1.h0->m1", "m1->logits", "a0.h1->a1.h2<k>"]
    # a1.h2 has no outgoing edge: the first pass drops a0.h1->a1.h2<k>; then a0.h1 has nothing left
    mask = torch.zeros(graph.legal.shape, dtype=torch.bool)
    for e in names:
        s, d = e.split("->")
        mask[graph.source_index[s], graph.destination_index[d]] = True
    once = mib_prune(graph, mask, passes=1)
    assert int(once.sum()) == 4 and int(mib_prune(graph, mask).sum()) == 4
    mask[graph.source_index["a0.h1"], graph.destination_index["a1.h2<k>"]] = False
    mask[graph.source_index["a1.h2"], graph.destination_index["m0"]] = True  # m0 -> nothing: a1.h2 dangles later
    mask[graph.source_index["a0.h1"], graph.destination_index["a1.h2<q>"]] = True
    full = mib_prune(graph, mask)
    assert int(full.sum()) == 4


def test_sizes_floor_like_mib():
    assert mib_sizes((0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1), 32491) == \
        [32, 64, 162, 324, 649, 1624, 3249, 6498, 16245, 32491]
    assert mib_sizes((0.001, 0.01, 0.29), 110) == [0, 1, 31]  # 0.29 * 110 = 31.9 -> 31


def test_signed_ranking_puts_most_negative_first():
    graph = Graph(n_layers=2, n_heads=4)
    scores = torch.zeros(graph.legal.shape).masked_fill(~graph.legal, float("nan"))
    scores[0, graph.logits_dest] = -3.0
    scores[1, graph.logits_dest] = 2.0
    scores[2, graph.logits_dest] = -1.0
    sc = EdgeScores(graph, scores, "test")
    signed = ranked_top_n(sc, 2, "signed")
    absolute = ranked_top_n(sc, 2, "absolute")
    assert signed[0, -1] and signed[2, -1] and not signed[1, -1]
    assert absolute[0, -1] and absolute[1, -1] and not absolute[2, -1]
    assert not ranked_top_n(sc, 0, "signed").any()


def test_areas_are_trapezoids():
    synthetic = FaithfulnessCurve(np.array([0.0, 0.5, 1.0]), np.array([0, 1, 2]), np.array([0.0, 1.0, 1.0]))
    assert synthetic.area_under == pytest.approx(0.75) and synthetic.area_from_1 == pytest.approx(0.25)
    over = FaithfulnessCurve(np.array([0.1, 0.2]), np.array([1, 2]), np.array([1.5, 0.5]))
    assert over.area_from_1 == pytest.approx(0.1 * 0.5)


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = CONFIGS["gpt2"]()
    cfg._attn_implementation = "eager"
    model = CircuitModel(AutoModelForCausalLM.from_config(cfg).eval(), make_tokenizer())
    data = tokenize([Example(**r) for r in signal_rows(model, 6, seed=5)], model.tokenizer)
    return model, data


def test_curve_points_follow_mib_rules(setup):
    model, data = setup
    ev = Evaluator(model, data, progress=False)
    sc = attribute(ev, "eap", progress=False)
    pair = faithfulness_curve(ev, sc)
    total = model.graph.n_edges
    for curve, ranking in ((pair.signed, "signed"), (pair.absolute, "absolute")):
        assert curve.n_requested.tolist() == mib_sizes(curve.fractions.tolist(), total)
        for i, n in enumerate(curve.n_requested):
            chosen = ranked_top_n(sc, int(n), ranking)
            evaluated = mib_prune(model.graph, chosen)
            assert curve.n_edges_counted[i] == int(mib_prune(model.graph, chosen, passes=1).sum())
            assert curve.n_edges[i] == int(evaluated.sum())
            expect = ev.normalise(ev.mask_values(evaluated[None]))[0] if evaluated.any() else 0.0
            assert curve.faithfulness[i] == pytest.approx(expect, abs=1e-5)  # fp32, batched vs alone
        assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-6)
    assert pair.cpr == pytest.approx(np.trapezoid(pair.signed.faithfulness, pair.signed.fractions))
    assert pair.cmd == pytest.approx(np.trapezoid(np.abs(1 - pair.absolute.faithfulness), pair.absolute.fractions))
    d = pair.to_dict()
    assert set(d) >= {"cpr", "cmd", "signed", "absolute"} and len(d["signed"]["points"]) == 10
    assert d["signed"]["points"][0]["edges_requested"] == 0


def test_earlier_convention_is_an_explicit_option(setup):
    model, data = setup
    ev = Evaluator(model, data, progress=False)
    sc = attribute(ev, "eap", progress=False)
    old = faithfulness_curve(ev, sc, fractions=(0.05, 0.5, 1.0), rules="unpruned-rounded")
    total = model.graph.n_edges
    assert old.absolute.n_requested.tolist() == [max(1, round(f * total)) for f in (0.05, 0.5, 1.0)]
    assert old.absolute.n_edges.tolist() == old.absolute.n_requested.tolist()  # no pruning
    assert old.cpr == pytest.approx(old.absolute.area_under)
    with pytest.raises(ValueError, match="rules"):
        faithfulness_curve(ev, sc, rules="nope")


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    from circuitgraph.cli import main

    d = tmp_path_factory.mktemp("curve")
    assert main(["make-data", "ioi", "--model", "toy-ioi", "-n", "40", "-o", str(d / "ioi.jsonl")]) == 0
    assert main(["discover", "--model", "toy-ioi", "--data", str(d / "ioi.jsonl"), "--method", "eap", "--top-n", "30",
                 "-o", str(d / "found.json"), "--curve", str(d / "curve.json"), "--json"]) == 0
    assert main(["discover", "--model", "toy-ioi", "--data", str(d / "ioi.jsonl"), "--method", "eap", "--top-n", "30",
                 "-o", str(d / "found_mib.json"), "--format", "mib", "--json"]) == 0
    return d


def test_curve_command_json(toy_files, capsys):
    import json

    from circuitgraph.cli import main

    d = toy_files
    capsys.readouterr()
    assert main(["curve", "--model", "toy-ioi", "--data", str(d / "ioi.jsonl"), "--scores", str(d / "found.json"),
                 "--json", "-o", str(d / "curve.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"cpr", "cmd", "signed", "absolute"} <= set(out) and out["score_sign"] == "metric"
    assert [p["edges_requested"] for p in out["absolute"]["points"]] == mib_sizes(MIB := [p["fraction"] for p in out["absolute"]["points"]], 110)
    assert (d / "curve.png").stat().st_size > 0
    written = json.loads((d / "curve.json").read_text())  # discover --curve: the same curves
    assert written["cpr"] == pytest.approx(out["cpr"], abs=1e-9) and written["cmd"] == pytest.approx(out["cmd"], abs=1e-9)
    # MIB JSON: the sign assumed is said; the loss sign flips the signed ranking, not the |score| one
    assert main(["curve", "--model", "toy-ioi", "--data", str(d / "ioi.jsonl"), "--scores", str(d / "found_mib.json"), "--json"]) == 0
    captured = capsys.readouterr()
    assert "changes of the metric" in captured.err and json.loads(captured.out)["cpr"] == pytest.approx(out["cpr"], abs=1e-9)
    assert main(["curve", "--model", "toy-ioi", "--data", str(d / "ioi.jsonl"), "--scores", str(d / "found_mib.json"),
                 "--score-sign", "loss", "--json"]) == 0
    flipped = json.loads(capsys.readouterr().out)
    assert flipped["cmd"] == pytest.approx(out["cmd"], abs=1e-9) and flipped["cpr"] != pytest.approx(out["cpr"], abs=1e-6)


def test_curve_command_refusals(toy_files, tmp_path, capsys):
    import json

    from circuitgraph.cli import main

    d = toy_files
    spec = json.loads((d / "found.json").read_text())
    spec["edge_scores"].pop(next(iter(spec["edge_scores"])))
    (tmp_path / "partial.json").write_text(json.dumps(spec))
    capsys.readouterr()
    assert main(["curve", "--model", "toy-ioi", "--data", str(d / "ioi.jsonl"), "--scores", str(tmp_path / "partial.json")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and len(errors) == 1 and "109 of the model's 110 edges" in errors[0]
    assert main(["curve", "--model", "toy-ioi", "--data", str(d / "ioi.jsonl"), "--scores", str(d / "found.json"),
                 "--score-sign", "loss"]) == 2
    assert "says its scores are 'metric'" in capsys.readouterr().err
    assert main(["curve", "--model", "toy-ioi", "--data", str(d / "ioi.jsonl"), "--scores", str(d / "found.json"),
                 "-o", str(tmp_path / "x.txt")]) == 2
    assert "unsupported file type" in capsys.readouterr().err
