"""Circuit specs: builder, node circuits, JSON Schema, lossless MIB import/export, and errors."""

import json
from pathlib import Path

import pytest
from transformers import GPT2Config

from circuitgraph.graph.computational_graph import Graph
from circuitgraph.spec.circuit_spec import CircuitSpec, SpecError, json_schema

MIB = Path(__file__).resolve().parents[2] / "shared" / "data" / "mib" / "ioi-eap-ig.json"
ROOT = Path(__file__).resolve().parents[1]


def small():
    return Graph(2, 4)


def test_graph_counts_match_contract():
    g = small()
    assert len(g.nodes) == 12 and g.n_edges == 110 == len(g.edges) == len(set(g.edges))
    big = Graph.from_hf_config(GPT2Config())
    assert len(big.nodes) == 158 and big.n_edges == 32491
    # parallel attention/MLP: m{L} no longer reads layer L's heads (2 layers x 4 heads fewer)
    assert Graph(2, 4, parallel_attn_mlp=True).n_edges == 110 - 8
    nx_graph = g.to_networkx()
    assert nx_graph.number_of_edges() == 110 and nx_graph.number_of_nodes() == 12
    assert nx_graph.has_edge("a0.h1", "a1.h2", key="k")


def test_node_circuit_is_induced_edges():
    g = small()
    spec = CircuitSpec().group("heads", ["a0.h1", "a1.h2"])
    names = set(spec.resolve(g).edge_names)
    expected = {"input->a0.h1<q>", "input->a0.h1<k>", "input->a0.h1<v>", "input->a1.h2<q>", "input->a1.h2<k>",
                "input->a1.h2<v>", "a0.h1->a1.h2<q>", "a0.h1->a1.h2<k>", "a0.h1->a1.h2<v>", "input->logits",
                "a0.h1->logits", "a1.h2->logits"}
    assert names == expected


def test_connections_ports_positions_and_explicit_edges():
    g = small()
    spec = (CircuitSpec(name="t").group("prev", ["a0.h0", "a0.h1"], positions=["S"]).group("ind", ["a1.h3"])
            .connect("prev", "ind", ports="k").connect("ind", "logits").add_edge("input->a0.h0<q>", score=0.5))
    r = spec.resolve(g)
    assert r.edges[g.edge_index["a0.h0->a1.h3<k>"]] == ["S"]
    assert r.edges[g.edge_index["a1.h3->logits"]] is None
    assert len(r) == 4
    again = CircuitSpec.model_validate_json(spec.to_json())
    assert again.resolve(g).edges == r.edges


def test_shipped_schema_is_current():
    shipped = json.loads((ROOT / "specs" / "circuit.schema.json").read_text())
    assert shipped == json_schema()


@pytest.mark.skipif(not MIB.is_file(), reason=f"{MIB} not found (shared data, not in a fresh clone)")
def test_mib_round_trip_is_lossless():
    original = json.loads(MIB.read_text())
    g = Graph.from_hf_config(GPT2Config())
    spec = CircuitSpec.load(MIB)
    assert len(spec.resolve(g)) == 756
    assert sum(1 for n in spec.nodes) == 81
    out = spec.to_mib(g)
    assert json.dumps(out) == json.dumps(original)  # same keys, order, scores, flags
    via_ours = CircuitSpec.model_validate_json(spec.to_json()).to_mib(g)
    assert json.dumps(via_ours) == json.dumps(original)


BAD_SPECS = [
    ({"groups": {"nm": ["a9.h9"]}}, "layer 9 out of range"),
    ({"groups": {"nm": ["a1.h7"]}}, "head 7 out of range"),
    ({"nodes": ["b1.h2"]}, "unknown node"),
    ({"edges": ["a1.h2->a0.h1<q>"]}, "edges never go backwards"),
    ({"edges": ["a0.h1->a0.h2<q>"]}, "cannot feed"),
    ({"edges": ["a0.h1->m0<q>"]}, "only attention heads have q/k/v ports"),
    ({"edges": ["a0.h1->a1.h2"]}, "needs a port"),
    ({"edges": ["a0.h1->a1.h2<x>"]}, "unknown port <x>"),
    ({"edges": ["a0.h1->a1.h2<q>", "a0.h1->a1.h2<q>"]}, "duplicate edge 'a0.h1->a1.h2<q>'"),
    ({"edges": ["a0.h1 a1.h2"]}, "expected 'SRC->DST'"),
    ({"edges": ["logits->m1"]}, "'logits' cannot be a source"),
    ({"connections": [{"src": "movers", "dst": "logits"}]}, "'movers' is neither a group"),
    ({"groups": {"g": ["a1.h0"]}, "connections": [{"src": "g", "dst": "m1", "ports": ["q"]}]}, "not an attention head"),
    ({"groups": {"late": ["a1.h0"], "early": ["a0.h0"]}, "connections": [{"src": "late", "dst": "early"}]}, "no edge of the model goes"),
    ({"groups": {"a": ["a0.h0"], "b": ["a0.h0"]}}, "in both groups 'a' and 'b'"),
    ({"groups": {"a": []}}, "group 'a' has no nodes"),
    ({"connections": [{"src": "a0.h0", "dst": "a1.h0", "ports": ["z"]}]}, "connections.0.ports.0"),
    ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    ({"edge_scores": {"a0.h0->a9.h0<q>": 1.0}}, "layer 9 out of range"),
]


@pytest.mark.parametrize("data,message", BAD_SPECS)
def test_bad_specs_name_the_problem(data, message):
    with pytest.raises(SpecError) as err:
        CircuitSpec.from_dict(data).resolve(small())
    assert message in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        CircuitSpec.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        CircuitSpec.load(tmp_path / "bad.json")
    (tmp_path / "mib.json").write_text(json.dumps({"cfg": {}, "edges": {"input->logits": {"score": 1.0}}, "nodes": {}}))
    with pytest.raises(SpecError, match="edge 'input->logits' needs an object with 'in_graph'"):
        CircuitSpec.load(tmp_path / "mib.json")


def test_shipped_reference_specs_fit_gpt2():
    g = Graph.from_hf_config(GPT2Config())
    ioi = CircuitSpec.load(ROOT / "specs" / "ioi_gpt2.json")
    heads = ioi.all_nodes()
    assert len(heads) == 26 and len(ioi.groups) == 7 and ioi.source
    assert set(ioi.groups["name movers"].nodes) == {"a9.h9", "a10.h0", "a9.h6"}
    r = ioi.resolve(g)
    assert r.position_names == {"IO", "S1", "S1+1", "S2", "END"}
    assert r.edges[g.edge_index["a4.h11->a5.h5<k>"]] == ["S1+1"]
    gt = CircuitSpec.load(ROOT / "specs" / "greaterthan_gpt2.json")
    assert {"m8", "m9", "m10", "m11"} <= set(gt.all_nodes()) and gt.source
    assert g.edge_index["m9->m10"] in gt.resolve(g).edges
