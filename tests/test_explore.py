"""The explorer page: its data comes from the scoring / characterisation functions, it is one
self-contained file, and it works in a real (headless, system) Chromium."""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

import circuitgraph
import circuitgraph.cli.commands as cli
from chromium import Browser, find_chromium
from circuitgraph.characterise import attention_patterns, direct_logit_attribution
from circuitgraph.data.dataset import Example, tokenize
from circuitgraph.data.tasks import make_data, write_jsonl
from circuitgraph.discovery import discover
from circuitgraph.evaluate.evaluator import Evaluator
from circuitgraph.explore import Limits, Study
from circuitgraph.explore.layout import layout
from circuitgraph.graph.computational_graph import Graph
from circuitgraph.model.loading import load_model
from circuitgraph.spec.circuit_spec import CircuitSpec

SPEC = Path(circuitgraph.__file__).parent / "specs" / "induction_toy.json"
SMALL = Limits(examples=3, ig_steps=8, neurons=5)


@pytest.fixture(scope="module")
def toy():
    """toy-induction, 16 induction prompts, the shipped hypothesis and an EAP circuit of 12 edges."""
    model = load_model("toy-induction")
    rows = make_data("induction", model.tokenizer, 16, seed=0)
    data = tokenize([Example(**r) for r in rows], model.tokenizer)
    spec = CircuitSpec.load(SPEC)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = Evaluator(model, data, progress=False)
        scores = discover(ev, "eap", progress=False)
    found = scores.to_spec(scores.greedy(12), prune=True)
    found.name = "EAP circuit"
    study = Study.collect(model, data, spec, found, evaluator=ev, limits=SMALL, title="toy </script><b>study</b>")
    return model, data, spec, found, ev, study, rows


@pytest.fixture(scope="module")
def page(toy, tmp_path_factory):
    return toy[5].to_html(tmp_path_factory.mktemp("explore") / "study.html")


# ----- the data ---------------------------------------------------------------------------------
def test_layout_layers_as_ranks():
    seq, par = layout(Graph(3, 4)), layout(Graph(3, 4, parallel_attn_mlp=True))
    assert {n["id"] for n in seq} == set(Graph(3, 4).nodes)
    y = {n["id"]: n["y"] for n in seq}
    assert y["input"] < y["a0.h0"] == y["a0.h3"] < y["m0"] < y["a1.h0"] < y["m2"] < y["logits"]
    x = {n["id"]: n["x"] for n in seq}
    assert x["a0.h0"] < x["a0.h1"] < x["a0.h3"]
    yp = {n["id"]: n["y"] for n in par}
    assert yp["m1"] == yp["a1.h2"]  # parallel blocks share a rank


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("n_heads", [1, 2, 3, 4, 8, 9, 12, 15])
def test_layout_mlps_never_on_a_head_column(n_heads, parallel):
    """An MLP centred over an odd number of heads would sit on the middle head's column and cover the
    edges leaving it upwards (SmolLM2's 9 heads: head 4): MLPs have a column of their own."""
    nodes = layout(Graph(3, n_heads, parallel_attn_mlp=parallel))
    heads = [n for n in nodes if n["kind"] == "head"]
    mlps = [n for n in nodes if n["kind"] == "mlp"]
    assert len(mlps) == 3 and len(heads) == 3 * n_heads
    for m in mlps:
        assert min(abs(m["x"] - h["x"]) for h in heads) >= 1, (m, n_heads)  # a whole slot from every head, any rank
    assert len({(n["x"], n["y"]) for n in nodes}) == len(nodes)  # no two nodes in one place


def test_data_comes_from_the_scoring_and_characterisation_functions(toy):
    model, data, spec, found, ev, study, _ = toy
    d = study.data
    score = ev.evaluate(spec)
    got = d["circuits"][0]["score"]
    assert got["faithfulness"] == pytest.approx(score.faithfulness, rel=1e-3)
    assert got["necessity_se"] == pytest.approx(score.necessity_se, rel=1e-3, abs=1e-6)
    effects = ev.node_effects(found)
    for node, (drop, se) in effects.items():
        assert d["circuits"][1]["node_effects"][node][0] == pytest.approx(drop, rel=1e-3, abs=1e-6)
    # every circuit edge is embedded with its membership bit; edge effects are the evaluator's
    edges = {e["id"]: e for e in d["edges"]}
    for bit, circuit in enumerate((spec, found)):
        res = circuit.resolve(model.graph)
        for name in res.edge_names:
            assert edges[name]["in"] >> bit & 1
    name, (drop, se) = next(iter(ev.edge_effects(spec).items()))
    assert edges[name]["eff"][0] == [pytest.approx(drop, rel=1e-3, abs=1e-6), pytest.approx(se, rel=1e-3, abs=1e-6)]
    # per-example views
    ex = d["examples"][1]
    P = int(data.lengths[1])
    pats = attention_patterns(model, data.clean[1, :P], ["a1.h2"])
    rows = ex["patterns"]["a1.h2"]  # the causal (lower) triangle
    assert [len(r) for r in rows] == list(range(1, P + 1)) and pats.patterns[0].triu(1).abs().max() < 1e-6
    assert torch.allclose(torch.tensor([r + [0.0] * (P - len(r)) for r in rows]), pats.patterns[0], atol=6e-4)
    assert ex["tokens"] == pats.tokens and len(ex["ig"]["attributions"]) == P
    assert ex["dla"]["a1.h0"] == pytest.approx(float(direct_logit_attribution(model, data).per_example[1, model.graph.source_index["a1.h0"]]), rel=1e-3)
    assert ex["lens"]["labels"] == ["embed", "L0", "L1"] and len(ex["lens"]["wrong_prob"]) == 3
    assert len(d["examples"]) == SMALL.examples and set(d["heads"]["scores"]) >= {"previous_token", "induction", "copying"}


def test_page_is_one_self_contained_file(page):
    text = page.read_text()
    assert not re.search(r"<(script|img|link|iframe)[^>]+(src|href)=", text, re.I)  # nothing fetched at view time
    assert "d3js.org v7" in text and "@import" not in text
    blob = re.search(r'<script type="application/json" id="study-data">(.*?)</script>', text, re.S).group(1)
    assert json.loads(blob)["title"] == "toy </script><b>study</b>"  # prompt text cannot close the element
    assert "<title>toy &lt;/script&gt;" in text


def test_to_html_wants_html(toy, tmp_path):
    with pytest.raises(ValueError, match=r"\.html"):
        toy[5].to_html(tmp_path / "study.png")


def test_gpt2_small_shaped_graph_page_size(tmp_path):
    """GPT-2 small's 32,491-edge graph: the page embeds the circuit plus the best 1,000 other edges."""
    from transformers import GPT2Config

    from circuitgraph.discovery.edge_scores import EdgeScores
    from circuitgraph.model.loading import from_config
    from conftest import VOCAB, make_tokenizer, random_rows

    cfg = GPT2Config(n_layer=12, n_head=12, n_embd=48, vocab_size=VOCAB, n_positions=32, bos_token_id=1, eos_token_id=1,
                     architectures=["GPT2LMHeadModel"])
    model = from_config(cfg, tokenizer=make_tokenizer())
    assert model.graph.n_edges == 32491
    data = tokenize([Example(**r) for r in random_rows(6, length=10)], model.tokenizer)
    scores = EdgeScores(model.graph, torch.randn(model.graph.legal.shape, generator=torch.Generator().manual_seed(0)), "random")
    spec = scores.to_spec(scores.top_n(150))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = Study.collect(model, data, spec, limits=Limits(examples=4, ig_steps=4, neurons=5))
    path = study.to_html(tmp_path / "gpt2.html")
    d = study.data
    assert d["graph"]["n_edges"] == 32491 and len(d["nodes"]) == 158
    assert sum(1 for e in d["edges"] if e["in"]) == 150 and sum(1 for e in d["edges"] if not e["in"]) == 1000
    kept = [abs(e["score"]) for e in d["edges"] if not e["in"]]
    assert min(kept) >= max(abs(s) for k, s in spec.edge_scores.items() if k not in {e["id"] for e in d["edges"]})
    assert path.stat().st_size < 2.5e6, f"{path.stat().st_size / 1e6:.2f} MB"
    score = d["circuits"][0]["score"]  # a random model: no signal, so no number, but the reason
    assert score["faithfulness"] is None and any("undefined" in w for w in score["warnings"])


def test_cli_writes_a_page(toy, tmp_path, capsys):
    rows = toy[6]
    write_jsonl(rows[:6], tmp_path / "d.jsonl")
    rc = cli.main(["explore", "--model", "toy-induction", "--data", str(tmp_path / "d.jsonl"), "--spec", str(SPEC),
                   "--examples", "2", "-o", str(tmp_path / "s.html")])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    assert (tmp_path / "s.html").read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize("args, message", [
    (["-o", "x.png"], "expected .html"),
    (["-o", "nowhere/x.html"], "does not exist"),
    (["-o", "x.html", "--examples", "0"], "--examples: expected a positive integer"),
    (["-o", "x.html", "--top-edges", "-1"], "--top-edges: expected an integer >= 0"),
    (["-o", "x.html", "--compare", "missing.json"], "missing.json"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    write_jsonl([], tmp_path / "d.jsonl")
    try:
        rc = cli.main(["explore", "--model", "toy-induction", "--data", "d.jsonl", "--spec", str(SPEC), *args])
    except SystemExit as e:  # argparse's own one-line errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ----- in a real browser ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    exe, why = find_chromium()
    if exe is None:
        pytest.skip(f"browser tests skipped: {why}")
    b = Browser(exe)
    yield b
    b.close()


@pytest.fixture
def loaded(browser, page):
    browser.events.clear()
    browser.open(page)
    assert browser.errors() == []
    return browser


def _set(b, selector, value, event="change"):
    """Set a control's value as a user would and fire its event."""
    b.js(f"{{ const el = document.querySelector({json.dumps(selector)}); el.value = {json.dumps(str(value))};"
         f" el.dispatchEvent(new Event('{event}')); }}")


def _drawn(b, panel="#circuit-overlay", faint=False):
    sel = f"{panel} .node" + ("" if faint else ":not(.off)")
    return set(b.js(f"[...document.querySelectorAll('{sel}')].map(n => n.dataset.id)"))


def test_page_loads_offline_and_draws_every_circuit_node(loaded, toy):
    model, _, spec, found, *_ = toy
    assert loaded.requests() == [loaded.js("location.href")]  # nothing but the file itself
    drawn = _drawn(loaded)
    for circuit in (spec, found):
        res = circuit.resolve(model.graph)
        nodes = {model.graph.sources[s] for s, _ in res.edges} | {model.graph.node_of(model.graph.destinations[d]) for _, d in res.edges}
        assert nodes <= drawn
    assert _drawn(loaded, faint=True) == set(model.graph.nodes)  # the rest of the graph, faint
    n_edges = len(set(spec.resolve(model.graph).edge_names) | set(found.resolve(model.graph).edge_names))
    assert loaded.js("document.querySelectorAll('#circuit-overlay path.edge').length") == n_edges
    assert loaded.js("document.title") == "toy </script><b>study</b>"
    footer = loaded.js("document.querySelector('#limits').textContent")  # the page states what it left out
    assert "limit 1000" in footer and f"of {model.graph.n_edges} in the graph" in footer and "limit 3" in footer
    # overlay filters: in both / only in one
    a, b = set(spec.resolve(model.graph).edge_names), set(found.resolve(model.graph).edge_names)
    for show, expected in (("both", a & b), ("a", a - b), ("b", b - a)):
        _set(loaded, "#show", show)
        assert set(loaded.js("[...document.querySelectorAll('#circuit-overlay path.edge')].map(p => p.dataset.id)")) == expected
    _set(loaded, "#show", "all")
    # hovering a node shows its scores with their standard errors
    loaded.hover('#circuit-overlay .node[data-id="a1.h0"]')
    tip = loaded.js("document.querySelector('#tooltip').textContent")
    assert "a1.h0" in tip and "direct logit attribution" in tip and "±" in tip
    # and hovering an edge (the strongest, drawn on top) its effect with its standard error
    x, y = loaded.js("(() => { const p = [...document.querySelectorAll('#circuit-overlay path.edge')].pop();"
                     " const pt = p.getPointAtLength(p.getTotalLength() / 2), m = p.getScreenCTM();"
                     " return [pt.x * m.a + pt.y * m.c + m.e, pt.x * m.b + pt.y * m.d + m.f]; })()")
    loaded.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
    tip = loaded.js("document.querySelector('#tooltip').textContent")
    assert "->" in tip and "effect of removing it from" in tip and "±" in tip
    # side by side: one panel per circuit, each with its own nodes
    _set(loaded, "#mode", "side")
    assert {"a1.h0", "a0.h3"} <= _drawn(loaded, "#circuit-0") and loaded.js("!!document.querySelector('#circuit-1')")
    assert loaded.errors() == []


def test_click_on_a_head_shows_its_attention_pattern(loaded, toy):
    data = toy[1]
    loaded.click('#circuit-overlay .node[data-id="a1.h0"]')
    P = int(data.lengths[0])
    assert loaded.js("document.querySelectorAll('#attention rect.cell').length") == P * (P + 1) // 2
    assert loaded.js("document.querySelector('#detail h3').textContent").startswith("a1.h0")
    assert loaded.js("document.querySelectorAll('#head-scores g').length") == 4
    # the example picker switches the pattern (and the prompt view) to another row
    _set(loaded, "#example", 2)
    P2 = int(data.lengths[2])
    assert loaded.js("document.querySelectorAll('#attention rect.cell').length") == P2 * (P2 + 1) // 2
    assert loaded.js("document.querySelectorAll('#saliency .token').length") == P2
    loaded.click('#circuit-overlay .node[data-id="m0"]')
    assert loaded.js("document.querySelectorAll('#neurons g').length") == len(toy[5].data["examples"][2]["neurons"]["m0"]) == 4  # d_mlp
    assert loaded.errors() == []


def test_threshold_and_top_n_filter_edges(loaded):
    count = "document.querySelectorAll('#circuit-overlay path.edge').length"
    weights = "[...document.querySelectorAll('#circuit-overlay path.edge')].map(p => Math.abs(+p.dataset.w))"
    before = loaded.js(count)
    ws = sorted(loaded.js(weights))
    t = ws[len(ws) // 2]
    _set(loaded, "#threshold", t, "input")
    after, t = loaded.js(weights), loaded.js("+document.querySelector('#threshold').value")  # the slider snaps to its step
    assert 0 < len(after) < before and min(after) >= t > 0
    assert loaded.js("document.querySelector('#edge-count').textContent").startswith(f"showing {len(after)} of")
    _set(loaded, "#threshold", 0, "input")
    _set(loaded, "#topn", 3, "input")
    assert sorted(loaded.js(weights)) == ws[-3:]
    assert loaded.errors() == []


def test_edges_outside_the_circuits_on_request(loaded, toy):
    count = "document.querySelectorAll('#circuit-overlay path.edge').length"
    inside = loaded.js(count)
    _set(loaded, "#weight", "score")
    loaded.click("#outside")
    assert loaded.js(count) == len(toy[5].data["edges"]) == 110 > inside  # the toy's whole graph is embedded
    assert loaded.js("document.querySelectorAll('#circuit-overlay path.edge.outside').length") == 110 - inside
    assert loaded.errors() == []


def test_groups_collapse_and_expand(loaded, toy):
    spec = toy[2]
    box = "#groups input"
    loaded.click(box)  # the first group: "previous token"
    drawn = _drawn(loaded, faint=True)
    assert "group:previous token" in drawn and not set(spec.groups["previous token"].nodes) & drawn
    loaded.click(box)
    assert set(spec.groups["previous token"].nodes) <= _drawn(loaded)
    assert loaded.errors() == []


def test_mlps_drawn_clear_of_every_head(browser, tmp_path):
    """In the drawn page of an odd head count, no MLP box covers a head's column (edges leave heads upwards
    from their centres) and every node lies inside its panel."""
    from transformers import LlamaConfig

    from circuitgraph.model.loading import from_config
    from conftest import VOCAB, make_tokenizer, random_rows

    cfg = LlamaConfig(num_hidden_layers=3, num_attention_heads=9, num_key_value_heads=3, hidden_size=36, intermediate_size=48,
                      vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=1, eos_token_id=1,
                      architectures=["LlamaForCausalLM"])
    model = from_config(cfg, tokenizer=make_tokenizer())
    data = tokenize([Example(**r) for r in random_rows(4, length=8)], model.tokenizer)
    spec = CircuitSpec(edges=["input->a0.h4<q>", "a0.h4->m0", "m0->a1.h4<v>", "a1.h4->m1", "m1->a2.h4<k>", "a2.h4->logits"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        page = Study.collect(model, data, spec, limits=Limits(examples=1, ig_steps=2, neurons=2)).to_html(tmp_path / "odd.html")
    browser.events.clear()
    browser.open(page)
    boxes = browser.js("""(() => { const svg = document.querySelector('#circuit-0').getBoundingClientRect();
        const box = el => { const r = el.querySelector('.shape').getBoundingClientRect(); return [r.left, r.right, r.top, r.bottom]; };
        const of = kind => [...document.querySelectorAll('#circuit-0 .node.' + kind)].map(box);
        return {svg: [svg.left, svg.right, svg.top, svg.bottom], heads: of('head'), mlps: of('mlp')}; })()""")
    assert len(boxes["heads"]) == 27 and len(boxes["mlps"]) == 3
    for left, right, top, bottom in boxes["mlps"]:
        for h in boxes["heads"]:
            assert not left <= (h[0] + h[1]) / 2 <= right  # no head's column passes under an MLP
    l0, r0, t0, b0 = boxes["svg"]
    assert all(l0 <= b[0] and b[1] <= r0 and t0 <= b[2] and b[3] <= b0 for b in boxes["heads"] + boxes["mlps"])
    assert browser.errors() == []


def test_one_circuit_page(browser, toy, tmp_path):
    model, data, spec = toy[:3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        page = Study.collect(model, data, spec, limits=SMALL).to_html(tmp_path / "one.html")
    browser.events.clear()
    browser.open(page)
    nodes = set(spec.all_nodes()) | {"input", "logits"}
    assert nodes <= _drawn(browser, "#circuit-0") and not browser.js("document.querySelector('#mode')")
    browser.click('#circuit-0 .node[data-id="a0.h3"]')
    assert browser.js("document.querySelectorAll('#attention rect.cell').length") > 0
    assert browser.errors() == []


def test_screenshot(loaded, tmp_path):
    loaded.click('#circuit-overlay .node[data-id="a1.h0"]')
    png = loaded.screenshot(tmp_path / "explorer.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
