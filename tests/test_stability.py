"""Bootstrap stability and held-out faithfulness against loops written here: each resample tokenized from its
own rows, scored by ``discover`` on a fresh Evaluator and cut by a by-hand top-n; Jaccard from sets of names;
bands from numpy percentiles; the held-out flag from its formula."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from circuitgraph.data.dataset import Example, tokenize
from circuitgraph.discovery import discover, faithfulness_curve, smallest_faithful
from circuitgraph.discovery.selection import SizeRule
from circuitgraph.discovery.stability import bootstrap, resample_rows
from circuitgraph.evaluate.evaluator import CircuitScore, Evaluator
from circuitgraph.evaluate.holdout import FLAG_SE, compare, split_rows
from circuitgraph.model.loading import CircuitModel
from conftest import CONFIGS, make_tokenizer, randomize_norms, signal_rows, write_jsonl

N_ROWS, TOP = 10, 14


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    cfg = CONFIGS["gpt2"]()
    cfg._attn_implementation = "eager"
    model = CircuitModel(randomize_norms(AutoModelForCausalLM.from_config(cfg).eval(), 1).double(), make_tokenizer())
    rows = signal_rows(model, N_ROWS, seed=7)
    return model, rows, tokenize([Example(**r) for r in rows], model.tokenizer)


def by_hand_top(scores, graph, n):
    """The n edge names of largest |score| (sorted by hand, no selection code)."""
    named = [(abs(float(scores.scores[graph.edge_index[e]])), e) for e in graph.edges]
    return {e for _, e in sorted(named, reverse=True)[:n]}


def by_hand_resamples(model, rows, draws, method="eap"):
    """Each resample's rows tokenized afresh, its own Evaluator, discover, and the by-hand top edges."""
    out = []
    for idx in draws:
        data = tokenize([Example(**rows[i]) for i in idx], model.tokenizer)
        ev = Evaluator(model, data, progress=False)
        scores = discover(ev, method, steps=2, progress=False)
        out.append((ev, scores, by_hand_top(scores, model.graph, TOP)))
    return out


def test_resample_draws():
    assert resample_rows(7, 1) == [list(range(7))]  # B = 1: the rows themselves, not a draw
    draws = resample_rows(7, 5, seed=3)
    assert len(draws) == 5 and all(len(d) == 7 and all(0 <= i < 7 for i in d) for d in draws)
    assert draws == resample_rows(7, 5, seed=3) and draws != resample_rows(7, 5, seed=4)
    assert any(len(set(d)) < 7 for d in draws)  # with replacement
    groups = ["a", "a", "b", "c", "c", "c", "b"]
    first = {g: groups.index(g) for g in groups}
    for d in resample_rows(7, 6, seed=0, groups=groups):
        times = {i: d.count(i) for i in range(7)}
        assert all(times[i] == times[first[g]] for i, g in enumerate(groups))  # a group's rows come together
        assert sum(times[i] for i in first.values()) == 3  # as many groups drawn as there are
    with pytest.raises(ValueError, match="at least 1"):
        resample_rows(7, 0)


def test_one_resample_is_the_plain_run(setup):
    model, rows, data = setup
    ev = Evaluator(model, data, progress=False)
    plain = discover(ev, "eap-ig", steps=2, progress=False)
    stab = bootstrap(ev, "eap-ig", SizeRule("top_n", TOP), 1, steps=2, progress=False)
    mask = plain.top_n(TOP)
    g = model.graph
    assert torch.equal(stab.counts.bool(), mask) and stab.n_resamples == 1 and stab.resample == "identity"
    assert set(stab.edge_frequency()) == by_hand_top(plain, g, TOP) and set(stab.edge_frequency().values()) == {1.0}
    assert torch.equal(stab.stable(0.5), mask) and torch.equal(stab.stable(1.0), mask)
    assert stab.jaccard is None and "one resample" in stab.jaccard_reason


def test_frequencies_jaccard_and_bands_by_hand(setup):
    model, rows, data = setup
    B, seed = 5, 11
    ev = Evaluator(model, data, progress=False)
    stab = bootstrap(ev, "eap-ig", SizeRule("top_n", TOP), B, seed=seed, curve=True, steps=2, progress=False)
    hand = by_hand_resamples(model, rows, resample_rows(N_ROWS, B, seed), method="eap-ig")
    sets = [s for _, _, s in hand]
    freq = {e: sum(e in s for s in sets) / B for e in set().union(*sets)}
    assert stab.edge_frequency() == pytest.approx(freq) and set(stab.edge_frequency()) == set(freq)
    assert len(set(map(frozenset, sets))) > 1  # the resamples disagree, so the test sees something
    pairs = [len(a & b) / len(a | b) for a, b in itertools.combinations(sets, 2)]
    assert stab.jaccard == pytest.approx(sum(pairs) / len(pairs))
    g = model.graph
    stable = {g.sources[s] + "->" + g.destinations[d] for s, d in torch.nonzero(stab.stable(0.6)).tolist()}
    assert stable == {e for e, f in freq.items() if f >= 0.6}
    assert stab.sizes == [TOP] * B
    curves = [faithfulness_curve(ev_b, scores_b) for ev_b, scores_b, _ in hand]
    for r in ("signed", "absolute"):
        f = np.stack([getattr(c, r).faithfulness for c in curves])
        assert np.allclose(stab.bands[r].low, np.percentile(f, 2.5, axis=0), atol=1e-9)
        assert np.allclose(stab.bands[r].high, np.percentile(f, 97.5, axis=0), atol=1e-9)


def test_by_position_frequencies(setup):
    """Units are edge x span; an edge's frequency counts resamples holding it at any span."""
    model, rows, data = setup
    B = 4
    ev = Evaluator(model, data, progress=False)
    stab = bootstrap(ev, "eap", SizeRule("top_n", 20), B, seed=2, by_position=True, progress=False)
    assert stab.spans == ["S", "END", "rest"]
    per_edge: dict[str, set] = {}
    for b, idx in enumerate(resample_rows(N_ROWS, B, 2)):
        sub = tokenize([Example(**rows[i]) for i in idx], model.tokenizer)
        sc = discover(Evaluator(model, sub, progress=False), "eap", by_position=True, progress=False)
        flat = sorted(((abs(v), e, span) for e, spans in sc.as_dict().items() for span, v in spans.items()), reverse=True)[:20]
        for _, e, span in flat:
            per_edge.setdefault(e, set()).add(b)
    assert stab.edge_frequency() == pytest.approx({e: len(bs) / B for e, bs in per_edge.items()})
    assert sum(f for _, _, f in stab.units()) == pytest.approx(20)  # every resample holds 20 units


def test_default_selection_rule_is_the_default_circuit(setup):
    model, rows, data = setup
    ev = Evaluator(model, data, progress=False)
    scores = discover(ev, "eap", progress=False)
    for ranking in ("absolute", "signed", None):  # None: both searched, the smaller circuit kept
        sel = smallest_faithful(ev, scores, level=0.5, ranking=ranking)
        assert torch.equal(SizeRule("top_n", sel.n_requested, prune=True, ranking=sel.ranking).mask(scores), sel.mask)


# ----- held-out faithfulness ---------------------------------------------------------------------------
def _score(f, se, n=20):
    return CircuitScore("logit_diff", "corrupted", n, 5, 110, 1.0, 0.0, f, f, f, se, 1.0, 0.0)


def test_holdout_flag():
    se = math.sqrt(0.1 ** 2 + 0.05 ** 2)
    flagged = compare(_score(0.9, 0.1), _score(0.9 - FLAG_SE * se - 1e-3, 0.05))
    assert flagged.flagged and flagged.drop_se == pytest.approx(se) and "more than 2 combined" in flagged.line()
    kept = compare(_score(0.9, 0.1), _score(0.9 - FLAG_SE * se + 1e-3, 0.05))
    assert kept.flagged is False and kept.line() is None
    assert compare(_score(0.9, 0.1), _score(1.5, 0.05)).flagged is False  # a rise is no drop
    undefined = compare(_score(None, None), _score(0.5, 0.1))
    assert undefined.drop is None and undefined.flagged is None and "undefined" in undefined.reason
    one = compare(_score(0.9, None, 1), _score(0.5, 0.1))
    assert one.drop == pytest.approx(0.4) and one.flagged is None


def test_split_rows(setup):
    _, _, data = setup
    found, held = split_rows(data, 0.25)
    assert len(held) == 3 and len(found) == 7
    assert torch.equal(held.clean, data.clean[7:, :held.clean.shape[1]])
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        split_rows(data, 1.0)


# ----- command line -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ioi(tmp_path_factory):
    from circuitgraph.cli.commands import main

    d = tmp_path_factory.mktemp("stab")
    for name, seed in (("ioi.jsonl", 0), ("held.jsonl", 1)):
        assert main(["make-data", "ioi", "--model", "toy-ioi", "-n", "12", "--seed", str(seed), "-o", str(d / name)]) == 0
    return d


def _run(capsys, *argv):
    from circuitgraph.cli.commands import main

    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_bootstrap_one_equals_plain_discover(ioi, capsys):
    base = ["discover", "--model", "toy-ioi", "--data", str(ioi / "ioi.jsonl"), "--method", "eap", "--json"]
    rc, out, _ = _run(capsys, *base, "--top-n", "15", "-o", str(ioi / "plain.json"))
    plain = json.loads(out)
    rc1, out1, _ = _run(capsys, *base, "--top-n", "15", "--bootstrap", "1", "-o", str(ioi / "b1.json"))
    one = json.loads(out1)
    assert rc == rc1 == 0 and one["faithfulness"] == plain["faithfulness"] and one["n_edges"] == plain["n_edges"]
    a, b = json.loads((ioi / "plain.json").read_text()), json.loads((ioi / "b1.json").read_text())
    assert a["edges"] == b["edges"] and a["edge_scores"] == b["edge_scores"]
    assert b["edge_frequency"] == {e["edge"]: 1.0 for e in b["edges"]} and b["metadata"]["bootstrap"]["n_resamples"] == 1
    assert {u["edge"] for u in one["bootstrap"]["units"]} == {e["edge"] for e in a["edges"]}


def test_cli_bootstrap_stable_circuit_and_band(ioi, capsys):
    rc, out, err = _run(capsys, "discover", "--model", "toy-ioi", "--data", str(ioi / "ioi.jsonl"), "--method", "eap",
                        "--top-n", "15", "--bootstrap", "6", "--stability-threshold", "0.5", "--curve", str(ioi / "c.json"),
                        "--json", "-o", str(ioi / "stable.json"))
    assert rc == 0, err
    summary, spec = json.loads(out), json.loads((ioi / "stable.json").read_text())
    boot = summary["bootstrap"]
    freq = {u["edge"]: u["frequency"] for u in boot["units"]}
    assert {e["edge"] for e in spec["edges"]} == {e for e, f in freq.items() if f >= 0.5} == set(spec["edge_frequency"]) & {
        e for e, f in spec["edge_frequency"].items() if f >= 0.5}
    assert spec["edge_frequency"] == pytest.approx(freq) and summary["selection"].startswith("stability selection")
    assert 0 < boot["jaccard"] <= 1 and boot["n_stable_units"] == len(spec["edges"]) == summary["n_edges"]
    points = json.loads((ioi / "c.json").read_text())["absolute"]["points"]
    band = boot["band"]["absolute"]["points"]
    assert [p["band_low"] for p in points] == [b["low"] for b in band]
    assert all(b["low"] <= b["high"] for b in band if b["low"] is not None)


@pytest.mark.parametrize("extra,needle", [
    (["--bootstrap", "0"], "expected a positive integer"),
    (["--bootstrap", "3", "--by-template", "--data", "untemplated"], 'no "template" field'),
    (["--by-template"], "--by-template needs --bootstrap"),
    (["--stability-threshold", "0.5"], "--stability-threshold needs --bootstrap"),
    (["--bootstrap", "3", "--stability-threshold", "1.5"], "fraction of the resamples in (0, 1]"),
    (["--bootstrap", "3", "--format", "mib"], "--format mib"),
])
def test_cli_bootstrap_refusals(ioi, capsys, extra, needle):
    rows = [json.loads(line) for line in (ioi / "ioi.jsonl").read_text().splitlines()]
    (ioi / "untemplated.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "template"}) + "\n"
                                                   for r in rows))
    extra = [str(ioi / "untemplated.jsonl") if x == "untemplated" else x for x in extra]
    argv = ["discover", "--model", "toy-ioi", "--data", str(ioi / "ioi.jsonl"), "--method", "eap", "-o", str(ioi / "r.json")]
    rc, _, err = _run(capsys, *argv, *extra, "--top-n", "10")
    assert rc == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert needle in last, last


def test_cli_bootstrap_by_template_resamples_whole_templates(ioi, capsys, monkeypatch):
    """make-data rows name their template; --by-template draws templates (a template's rows come together)."""
    from circuitgraph.discovery import stability

    rows = [json.loads(line) for line in (ioi / "ioi.jsonl").read_text().splitlines()]
    templates = [r["template"] for r in rows]
    assert len(set(templates)) >= 2 and all("[A]" in t and "[B]" in t for t in templates)
    draws = []
    resample = stability.resample_rows
    monkeypatch.setattr(stability, "resample_rows", lambda *a, **k: draws.append(k.get("groups") or a[3]) or resample(*a, **k))
    rc, out, err = _run(capsys, "discover", "--model", "toy-ioi", "--data", str(ioi / "ioi.jsonl"), "--method", "eap",
                        "--top-n", "15", "--bootstrap", "4", "--by-template", "--json", "-o", str(ioi / "bt.json"))
    assert rc == 0, err
    assert draws == [templates] and json.loads(out)["bootstrap"]["resample"] == "groups"


def test_cli_holdout(ioi, tmp_path, capsys):
    data = ioi / "ioi.jsonl"
    rc, _, _ = _run(capsys, "discover", "--model", "toy-ioi", "--data", str(data), "--method", "eap", "--top-n", "15",
                    "-o", str(tmp_path / "c.json"))
    ev = ["evaluate", "--model", "toy-ioi", "--spec", str(tmp_path / "c.json"), "--json"]
    rc, out, _ = _run(capsys, *ev, "--data", str(data), "--holdout", str(ioi / "held.jsonl"))
    got = json.loads(out)
    _, alone, _ = _run(capsys, *ev, "--data", str(ioi / "held.jsonl"))
    held = json.loads(alone)
    h = got["holdout"]
    assert h["held_out"]["faithfulness"] == pytest.approx(held["faithfulness"])
    assert h["drop"] == pytest.approx(got["faithfulness"] - held["faithfulness"])
    se = math.hypot(got["faithfulness_se"], held["faithfulness_se"])
    assert h["drop_se"] == pytest.approx(se) and h["flagged"] == (h["drop"] > 2 * se)
    # a fraction: the last rows held out; refused while the spec says it saw them
    rc, _, err = _run(capsys, *ev, "--data", str(data), "--holdout", "0.25")
    assert rc == 2 and "held-out rows may be among them" in err.strip().splitlines()[-1]
    lines = data.read_text().splitlines()
    first = write_jsonl(tmp_path / "first.jsonl", [json.loads(x) for x in lines[:9]])
    last = write_jsonl(tmp_path / "last.jsonl", [json.loads(x) for x in lines[9:]])
    _run(capsys, "discover", "--model", "toy-ioi", "--data", str(first), "--method", "eap", "--top-n", "15", "-o", str(tmp_path / "c.json"))
    rc, out, err = _run(capsys, *ev, "--data", str(data), "--holdout", "0.25")
    assert rc == 0, err
    frac = json.loads(out)
    _, on_first, _ = _run(capsys, *ev, "--data", str(first))
    _, on_last, _ = _run(capsys, *ev, "--data", str(last))
    assert frac["faithfulness"] == pytest.approx(json.loads(on_first)["faithfulness"])
    assert frac["holdout"]["held_out"]["faithfulness"] == pytest.approx(json.loads(on_last)["faithfulness"])
    assert frac["n_examples"] == 9 and frac["holdout"]["held_out"]["n_examples"] == 3
    for bad in ("1.5", "0"):
        rc, _, err = _run(capsys, *ev, "--data", str(data), "--holdout", bad)
        assert rc == 2 and "expected a JSONL file or a fraction in (0, 1)" in err.strip().splitlines()[-1]


@pytest.mark.slow
def test_torchrun_bootstrap_equals_one_process(tmp_path, model_dir):
    """Two ranks share each resample's rows and end with the one-process frequencies."""
    from conftest import cli_alone_and_under_torchrun, random_rows

    data = write_jsonl(tmp_path / "d.jsonl", random_rows(8, positions=False))
    args = ["discover", "--model", str(model_dir), "--data", str(data), "--method", "eap", "--top-n", "12",
            "--batch-size", "2", "--bootstrap", "3", "--json"]
    one, many = cli_alone_and_under_torchrun(args, tmp_path)
    a = json.loads(one.stdout)["bootstrap"]
    b = json.loads([line for line in many.stdout.splitlines() if line.startswith("{")][0])["bootstrap"]
    assert a["units"] == b["units"] and a["jaccard"] == pytest.approx(b["jaccard"])
    fa = json.loads((tmp_path / "one.json").read_text())["edge_frequency"]
    assert fa == json.loads((tmp_path / "many.json").read_text())["edge_frequency"]


# ----- the explorer: positions on the arrow, frequency as opacity ---------------------------------------
def test_explorer_draws_positions_and_frequencies(ioi, tmp_path, capsys):
    import warnings

    from chromium import Browser, find_chromium
    from circuitgraph.explore import Limits, Study
    from circuitgraph.model.loading import load_model
    from circuitgraph.spec.circuit_spec import CircuitSpec

    rc, _, err = _run(capsys, "discover", "--model", "toy-ioi", "--data", str(ioi / "ioi.jsonl"), "--method", "eap",
                      "--by-position", "--top-n", "30", "--bootstrap", "4", "-o", str(tmp_path / "pos.json"))
    assert rc == 0, err
    spec = CircuitSpec.load(tmp_path / "pos.json")
    model = load_model("toy-ioi")
    data = tokenize([Example(**json.loads(x)) for x in (ioi / "ioi.jsonl").read_text().splitlines()], model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = Study.collect(model, data, spec, limits=Limits(examples=1, ig_steps=2, neurons=2, top_edges=0))
    edges = {e["id"]: e for e in study.data["edges"]}
    assert study.data["circuits"][0]["n_resamples"] == 4
    for e in spec.edges:  # the page's data carries both, as the spec has them
        assert edges[e.edge]["pos"] == sorted(e.positions) and edges[e.edge]["freq"] == [pytest.approx(spec.edge_frequency[e.edge], abs=1e-3)]
        assert edges[e.edge]["pos_freq"] == pytest.approx(spec.position_frequency[e.edge], abs=1e-3)
    exe, why = find_chromium()
    if exe is None:
        pytest.skip(f"browser part skipped: {why}")
    b = Browser(exe)
    try:
        b.open(study.to_html(tmp_path / "pos.html"))
        drawn = b.js("[...document.querySelectorAll('#circuit-0 path.edge')].map(p => [p.dataset.id, +p.getAttribute('stroke-opacity')])")
        labels = dict(b.js("[...document.querySelectorAll('#circuit-0 text.edge-label')].map(t => [t.dataset.id, t.textContent])"))
        assert len(drawn) == len(spec.edges) == len(labels)
        for name, opacity in drawn:
            assert opacity == pytest.approx(0.12 + 0.83 * spec.edge_frequency[name], abs=2e-3)
            assert labels[name] == ",".join(sorted(next(e.positions for e in spec.edges if e.edge == name)))
        assert len({o for _, o in drawn}) > 1  # some edges were kept more often than others
        legend = b.js("document.querySelector('#legend').textContent")
        assert "opacity: how often bootstrap resamples kept the edge (4 resamples)" in legend and "token positions" in legend
        x, y = b.js("(() => { const p = document.querySelector('#circuit-0 path.edge');"
                    " const pt = p.getPointAtLength(p.getTotalLength() / 3), m = p.getScreenCTM();"
                    " return [pt.x * m.a + pt.y * m.c + m.e, pt.x * m.b + pt.y * m.d + m.f]; })()")
        b.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        tip = b.js("document.querySelector('#tooltip').textContent")
        assert "of 4 bootstrap resamples" in tip and "by position:" in tip
        assert b.errors() == []
    finally:
        b.close()
