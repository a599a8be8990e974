"""Circuit figures: parse the SVG that graphviz writes and count what was drawn; the matplotlib
fallback with ``dot`` hidden from PATH; the rules that keep figures honest (scene level)."""

import argparse
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import circuitgraph.cli.commands as cli
from circuitgraph.graph.computational_graph import Graph
from circuitgraph.render import figure
from circuitgraph.cli.render import register_cli
from circuitgraph.render.figure import PORT_COLORS, SIGN_COLORS, WEAK_COLOR, infer_graph, render
from circuitgraph.render.scene import build_scene, group_colors
from circuitgraph.spec.circuit_spec import CircuitSpec

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot program is not installed")

MIB_IOI = Path(__file__).resolve().parents[2] / "shared" / "data" / "mib" / "ioi-eap-ig.json"
SVG = "{http://www.w3.org/2000/svg}"
needs_mib = pytest.mark.skipif(not MIB_IOI.is_file(), reason=f"{MIB_IOI} not found")


def toy_spec() -> CircuitSpec:
    """Graph(2, 4): two groups, q/k/v edges, an MLP edge, one negative and one unscored edge."""
    s = CircuitSpec(name="toy").group("early", ["a0.h0", "a0.h1"]).group("late", ["a1.h2", "a1.h3"], color="#fdb462")
    s.add_edge("input->a0.h0<v>", score=0.3)
    s.add_edge("a0.h0->a1.h2<q>", score=0.5)
    s.add_edge("a0.h1->a1.h3<q>", score=0.2)  # merges with the edge above when collapsed
    s.add_edge("a0.h1->a1.h2<k>", score=-0.2, positions=["END"])
    s.add_edge("a0.h1->a1.h3<v>", score=0.1)
    s.add_edge("a0.h0->m0", score=0.05)
    s.add_edge("m0->a1.h3<q>")  # unscored
    s.add_edge("a1.h2->logits", score=1.0)
    return s


def drawn(svg_path):
    """(circuit node titles, [(edge title, stroke, dasharray)]) of an SVG, skipping axis and legend nodes."""
    root = ET.parse(svg_path).getroot()
    nodes, edges, other = [], [], []
    for g in root.iter(f"{SVG}g"):
        title = g.find(f"{SVG}title")
        if g.get("class") == "node":
            (other if title.text.startswith("_") else nodes).append(title.text)
        elif g.get("class") == "edge":
            path = next(g.iter(f"{SVG}path"))
            edges.append((title.text, path.get("stroke"), path.get("stroke-dasharray")))
    return nodes, edges, other


@needs_dot
def test_toy_svg_nodes_edges_and_port_colours(tmp_path):
    render(toy_spec(), Graph(2, 4), tmp_path / "toy.svg")
    nodes, edges, other = drawn(tmp_path / "toy.svg")
    assert sorted(nodes) == sorted(["input", "a0.h0", "a0.h1", "m0", "a1.h2", "a1.h3", "logits"])
    assert len(other) == 5 + 1  # axis labels of the ranks input, layer 0, MLP 0, layer 1, logits; the legend
    assert len(edges) == 8
    by_title = {}
    for title, stroke, dash in edges:
        by_title.setdefault(title, []).append((stroke, dash))
    # scored figure: colour = sign (the negative edge is red and solid, not dashed like a weak one)
    assert by_title["input->a0.h0"] == [(SIGN_COLORS[1], None)]
    assert by_title["a0.h1->a1.h2"] == [(SIGN_COLORS[-1], None)]
    assert by_title["m0->a1.h3"] == [(PORT_COLORS["q"], None)]  # unscored: colour by port
    assert "END" in (tmp_path / "toy.svg").read_text()  # position label
    text = (tmp_path / "toy.svg").read_text()
    assert "score &lt; 0" in text and "width: |score|" in text  # the legend explains sign and width


def test_dot_source_has_one_rank_per_layer(tmp_path):
    render(toy_spec(), Graph(2, 4), tmp_path / "toy.dot")
    text = (tmp_path / "toy.dot").read_text()
    assert text.count("rank=same") == 5
    assert "subgraph cluster_legend" in text


@needs_dot
def test_collapse_groups_merges_parallel_edges(tmp_path):
    render(toy_spec(), Graph(2, 4), tmp_path / "c.svg", collapse_groups=True)
    nodes, edges, _ = drawn(tmp_path / "c.svg")
    assert sorted(nodes) == ["group_0", "group_1", "input", "logits", "m0"]
    # early->late: q (two edges merged), k, v; plus input->early, early->m0, m0->late, late->logits
    assert len(edges) == 7
    assert sum(t == "group_0->group_1" for t, _, _ in edges) == 3
    render(toy_spec(), Graph(2, 4), tmp_path / "one.svg", collapse_groups=["late"])
    nodes, _, _ = drawn(tmp_path / "one.svg")
    assert sorted(nodes) == sorted(["input", "a0.h0", "a0.h1", "m0", "group_1", "logits"])
    with pytest.raises(ValueError, match="nope"):
        render(toy_spec(), Graph(2, 4), collapse_groups=["nope"])


@needs_dot
def test_min_score_hides_small_edges_but_keeps_unscored(tmp_path):
    render(toy_spec(), Graph(2, 4), tmp_path / "m.svg", min_score=0.25)
    nodes, edges, _ = drawn(tmp_path / "m.svg")
    # m0->a1.h3 (unscored) stays but is dangling once a0.h0->m0 is hidden, and a1.h3 reaches no logits
    assert sorted(t for t, _, _ in edges) == sorted(["input->a0.h0", "a0.h0->a1.h2", "a1.h2->logits"])
    assert "a0.h1" not in nodes and "m0" not in nodes  # no dangling nodes after thresholding


@needs_dot
def test_verified_weak_edges_are_dotted_grey(tmp_path):
    render(toy_spec(), Graph(2, 4), tmp_path / "v.svg", verified={"a0.h1->a1.h3<v>": 2e-4, "a0.h0->a1.h2<q>": -0.1,
                                                                  "a1.h2->logits": 0.5})
    _, edges, _ = drawn(tmp_path / "v.svg")
    weak = sorted(t for t, stroke, _ in edges if stroke == WEAK_COLOR)
    assert weak == ["a0.h0->a1.h2", "a0.h1->a1.h3"]
    assert all(dash for _, stroke, dash in edges if stroke == WEAK_COLOR)


@needs_dot
def test_infers_graph_and_displays_inline():
    spec = toy_spec()
    assert infer_graph(spec) == Graph(2, 4)
    dot = render(spec)
    assert "<svg" in dot._repr_mimebundle_()["image/svg+xml"]
    assert infer_graph(CircuitSpec(metadata={"mib_cfg": {"n_layers": 12, "n_heads": 12}})) == Graph(12, 12)


@needs_dot
@needs_mib
def test_mib_ioi_circuit(tmp_path):
    spec = CircuitSpec.load(MIB_IOI)
    g = Graph(12, 12)
    names = spec.resolve(g).edge_names
    touched = {part.split("<")[0] for name in names for part in name.split("->")}
    assert len(names) == 756 and len(touched) == 81
    render(spec, g, tmp_path / "ioi.svg")
    nodes, edges, _ = drawn(tmp_path / "ioi.svg")
    assert set(nodes) == touched and len(nodes) == 81
    assert len(edges) == 756
    thr = sorted(abs(spec.edge_scores[n]) for n in names)[-50]
    render(spec, g, tmp_path / "top.svg", min_score=thr)
    _, edges, _ = drawn(tmp_path / "top.svg")
    assert 0 < len(edges) <= 50  # the top 50, less those left dangling


@needs_dot
@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".pdf", b"%PDF")])
def test_image_formats(tmp_path, suffix, magic):
    render(toy_spec(), Graph(2, 4), tmp_path / f"toy{suffix}")
    data = (tmp_path / f"toy{suffix}").read_bytes()
    assert data.startswith(magic) and len(data) > 5000


def test_bad_suffix_names_it(tmp_path):
    with pytest.raises(ValueError, match=r"'\.jpg'.*\.svg, \.png, \.pdf, \.dot"):
        render(toy_spec(), Graph(2, 4), tmp_path / "toy.jpg")
    with pytest.raises(ValueError, match="rankdir"):
        render(toy_spec(), Graph(2, 4), rankdir="UP")


@needs_dot
def test_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_EXTRA_COMMANDS", [register_cli])
    spec = tmp_path / "toy.json"
    toy_spec().to_json(spec)
    assert cli.main(["render", str(spec), "-o", str(tmp_path / "a.svg"), "--collapse-groups", "--rankdir", "LR"]) == 0
    assert len(drawn(tmp_path / "a.svg")[0]) == 5
    if MIB_IOI.is_file():
        assert cli.main(["render", str(MIB_IOI), "-o", str(tmp_path / "b.dot"), "--min-score", "0.05"]) == 0
    assert cli.main(["render", str(spec), "-o", str(tmp_path / "c.gif")]) == 2
    assert "'.gif'" in capsys.readouterr().err
    assert cli.main(["render", str(tmp_path / "missing.json"), "-o", str(tmp_path / "d.svg")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # the subcommand is self-contained: it also registers on a bare parser
    sub = argparse.ArgumentParser().add_subparsers()
    register_cli(sub)


@needs_dot
@pytest.mark.parametrize("name,graph,n_nodes,n_edges", [("ioi_gpt2.json", Graph(12, 12), 28, 158),
                                                         ("induction_toy.json", Graph(2, 4), 9, 33)])
def test_shipped_specs_render(tmp_path, name, graph, n_nodes, n_edges):
    spec = CircuitSpec.load(Path(__file__).resolve().parents[1] / "specs" / name)
    resolved = spec.resolve(graph)
    render(spec, graph, tmp_path / "c.svg")
    nodes, edges, _ = drawn(tmp_path / "c.svg")
    assert len(nodes) == n_nodes == len(spec.all_nodes()) + 2  # the groups' heads, input and logits
    assert len(edges) == n_edges == len(resolved)
    ports = {name.split("<")[1][0] if "<" in name else None for name in resolved.edge_names}
    strokes = {stroke for _, stroke, _ in edges}
    assert {PORT_COLORS[p] for p in ports} == strokes  # unscored: one colour per port, and q, k, v all present


# ----- without graphviz: the matplotlib fallback -------------------------------------------------
@pytest.fixture
def no_dot(monkeypatch, tmp_path):
    """PATH without graphviz's dot (a fresh laptop); python itself stays reachable."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(figure, "_noted", False)
    assert shutil.which("dot") is None


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".pdf", b"%PDF"), (".svg", b"<?xml")])
def test_fallback_without_dot(no_dot, tmp_path, capsys, suffix, magic):
    render(toy_spec(), Graph(2, 4), tmp_path / f"toy{suffix}", collapse_groups=["late"])
    data = (tmp_path / f"toy{suffix}").read_bytes()
    assert data.startswith(magic) and len(data) > 5000
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "install Graphviz" in err and "full-quality layout" in err
    render(toy_spec(), Graph(2, 4), tmp_path / f"again{suffix}")
    assert capsys.readouterr().err == ""  # said once


def test_fallback_inline_and_dot_source(no_dot, tmp_path):
    dot = render(toy_spec(), Graph(2, 4), tmp_path / "toy.dot")
    assert "rank=same" in (tmp_path / "toy.dot").read_text()  # the DOT source needs no dot program
    assert "<svg" in dot._repr_mimebundle_()["image/svg+xml"]


def test_fallback_cli(no_dot, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_EXTRA_COMMANDS", [register_cli])
    assert cli.main(["render", "induction_toy", "-o", str(tmp_path / "ind.png")]) == 0  # a shipped spec, by name
    assert (tmp_path / "ind.png").read_bytes().startswith(b"\x89PNG")
    out = capsys.readouterr()
    assert "wrote" in out.out and "full-quality layout" in out.err


# ----- what the figures say (backend-independent) -----------------------------------------------
def test_scene_sign_width_and_legend():
    scene = build_scene(toy_spec(), Graph(2, 4))
    by_name = {e.names[0]: e for e in scene.edges}
    strongest, weakest = by_name["a1.h2->logits"], by_name["a0.h0->m0"]
    assert strongest.width == 4.0 and weakest.width < 1.5  # width by |score|
    assert by_name["a0.h1->a1.h2<k>"].color == SIGN_COLORS[-1] and by_name["a0.h1->a1.h2<k>"].style == "solid"
    texts = [it.text for it in scene.legend]
    assert {"score > 0", "score < 0", "width: |score|"} <= set(texts)
    assert any(t.startswith("@P") for t in texts)  # positions explained


def test_scene_heads_sorted_and_fill_by_role_or_layer():
    spec = CircuitSpec(name="x").group("late", ["a1.h3", "a1.h0"])
    spec.add_edge("a0.h2->a1.h3<q>", score=1.0).add_edge("a0.h1->a1.h0<k>", score=1.0)
    spec.add_edge("a1.h3->logits", score=1.0).add_edge("a1.h0->logits", score=1.0)
    spec.add_edge("input->a0.h2<q>", score=1.0).add_edge("input->a0.h1<q>", score=1.0)
    scene = build_scene(spec, Graph(2, 4))
    rows = {}
    for n in scene.nodes:
        rows.setdefault(n.rank, []).append(n.id)
    assert rows[(0, 0)] == ["a0.h1", "a0.h2"] and rows[(1, 0)] == ["a1.h0", "a1.h3"]
    fills = {n.id: n.fill for n in scene.nodes}
    assert fills["a1.h0"] == fills["a1.h3"] == group_colors(spec)["late"]
    assert fills["a0.h1"] == "#ffffff"  # ungrouped: grey by layer, white in layer 0


def test_group_keeps_its_colour_across_figures():
    a = CircuitSpec().group("name movers", ["a9.h9"]).group("my heads", ["a1.h1"])
    b = CircuitSpec().group("other", ["a2.h2"]).group("my heads", ["a3.h3"]).group("name movers", ["a9.h6"])
    assert group_colors(a)["name movers"] == group_colors(b)["name movers"]
    assert group_colors(a)["my heads"] == group_colors(b)["my heads"]


def test_positions_move_onto_nodes():
    spec = (CircuitSpec().group("early", ["a0.h0"], positions=["S2"]).group("late", ["a1.h1"], positions=["END"])
            .connect("early", "late", "k").connect("late", "logits").connect("input", "early"))
    scene = build_scene(spec, Graph(2, 4))
    subs = {n.id: n.sub for n in scene.nodes}
    assert subs["a0.h0"] == "early @S2" and subs["a1.h1"] == "late @END"
    assert all(e.label is None for e in scene.edges)


def test_collapsed_group_sits_on_its_own_layer():
    spec = (CircuitSpec().group("duplicate token", ["a0.h1", "a3.h0"]).group("movers", ["a5.h1"])
            .connect("input", "duplicate token").connect("duplicate token", "movers", "v").connect("movers", "logits"))
    scene = build_scene(spec, Graph(6, 4), collapse_groups=True)
    group = next(n for n in scene.nodes if n.label == "duplicate token")
    assert group.rank == (3, 0) and "L0-3" in group.sub
    assert dict(scene.ranks)[group.rank] == "layer 3"


def test_title_carries_faithfulness():
    spec = toy_spec()
    spec.metadata["faithfulness"] = 0.8312
    assert build_scene(spec, Graph(2, 4)).title == "toy (faithfulness 0.83)"
    assert build_scene(spec, Graph(2, 4), title="mine: faithfulness 0.8").title == "mine: faithfulness 0.8"
