"""Inputs that used to give a silent wrong number or a traceback: each is now an error naming the
file, line, field or flag, or an explicit, honest result (issue #10, sections 2-4)."""

import json
import re
import math
import shutil

import pytest
import torch

from circuitgraph.cli.commands import main
from circuitgraph.data.dataset import DataError, load_dataset
from circuitgraph.errors import CircuitWarning
from circuitgraph.evaluate.evaluator import Evaluator
from circuitgraph.model.loading import load_model
from circuitgraph.spec.circuit_spec import CircuitSpec, SpecError
from conftest import WORDS, random_rows, signal_rows, write_jsonl

GOOD = {"clean": "w1 w2 w3", "corrupted": "w4 w5 w6", "answer": "w7", "wrong": "w8", "positions": {"S": 1, "END": 2}}
SPEC = {"name": "toy", "model": "tiny", "groups": {"late": ["a1.h0", "a1.h3"]},
        "connections": [{"src": "input", "dst": "late"}, {"src": "late", "dst": "logits"}]}


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


@pytest.fixture(scope="module")
def files(model, model_dir, tmp_path_factory):
    """A dataset with a clean-vs-corrupted signal, a spec, and the model directory."""
    d = tmp_path_factory.mktemp("trust")
    data = write_jsonl(d / "data.jsonl", signal_rows(model, 7, seed=3))
    spec = d / "spec.json"
    spec.write_text(json.dumps(SPEC))
    return {"--model": str(model_dir), "--data": str(data), "--spec": str(spec), "dir": d}


def run(capsys, *argv):
    """(exit code, stdout, stderr) of the command line, argparse's exits included."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def evaluate_args(files, **over):
    base = {k: v for k, v in files.items() if k.startswith("--")}
    base.update(over)
    return ["evaluate", *sum(base.items(), ())]


def one_error(err: str, *needles: str):
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]


# ----- 2. silent wrong answers -----------------------------------------------------------------
@pytest.mark.parametrize("content,holds", [({}, "(it holds nothing at all)"), ({"format": "circuitgraph/1"}, "only format"),
                                           ({"name": "x", "model": "gpt2"}, "only model, name")])
def test_spec_that_selects_nothing_is_refused(files, capsys, model, content, holds):
    path = files["dir"] / "empty.json"
    path.write_text(json.dumps(content))
    code, _, err = run(capsys, *evaluate_args(files, **{"--spec": str(path)}))
    assert code == 2
    one_error(err, f"spec '{path}' selects nothing", holds)
    with pytest.raises(SpecError, match="selects nothing"):
        Evaluator(model, files["--data"], progress=False).evaluate(CircuitSpec.model_validate(content))


def test_fragment_spec_warns_and_says_what_it_holds(files, model):
    fragment = CircuitSpec().group("prev", ["a0.h1"]).group("ind", ["a1.h0"]).connect("prev", "ind", ports="k")
    ev = Evaluator(model, files["--data"], progress=False)
    with pytest.warns(CircuitWarning, match=r"no path from input to logits \(it holds 2 group\(s\) \(prev, ind\), 1 connections\)"):
        score = ev.evaluate(fragment)
    assert any("fragment" in w for w in score.warnings)


def test_mib_circuit_with_no_in_graph_edge_is_not_a_node_circuit(model, files):
    mib = {"cfg": {}, "nodes": {"a0.h0": {"in_graph": True}}, "edges": {"input->a0.h0<q>": {"score": 1.0, "in_graph": False}}}
    with pytest.raises(SpecError, match="selects no edge"):
        Evaluator(model, files["--data"], progress=False).evaluate(mib)


def test_unknown_answers_are_errors_and_unknown_prompt_words_a_warning(tmp_path, tokenizer):
    for field in ("answer", "wrong"):
        path = write_jsonl(tmp_path / f"{field}.jsonl", [GOOD, {**GOOD, field: "zebra"}])
        with pytest.raises(DataError, match=rf"{field}.jsonl:2: {field}: 'zebra' is not in the tokenizer's vocabulary"):
            load_dataset(path, tokenizer)
    path = write_jsonl(tmp_path / "prompt.jsonl", [GOOD, {**GOOD, "clean": "w1 giraffe w3", "corrupted": "w4 w5 okapi"}])
    with pytest.warns(CircuitWarning, match=r"2 prompt word\(s\) are not in the tokenizer's vocabulary.*'giraffe' \(.*prompt.jsonl:2\)"):
        data = load_dataset(path, tokenizer)
    assert data.clean[1, 1] == tokenizer.unk_token_id


def test_nan_and_null_are_just_strings(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS + ["NaN", "null", "Infinity"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    row = {"clean": "w1 NaN null", "corrupted": "w2 Infinity w3", "answer": "null", "wrong": ["NaN", "Infinity"]}
    data = load_dataset(write_jsonl(tmp_path / "s.jsonl", [row]), tok)
    assert data.answers[0].tolist() == [vocab["null"]] and data.wrongs[0].tolist() == [vocab["NaN"], vocab["Infinity"]]
    (tmp_path / "bare.jsonl").write_text('{"clean": "w1", "corrupted": "w2", "answer": NaN, "wrong": "w3"}\n')
    with pytest.raises(DataError, match=r"bare.jsonl:1: NaN is not valid JSON .*write \"NaN\" in quotes"):
        load_dataset(tmp_path / "bare.jsonl", tok)


def _strict(text):
    def reject(name):
        raise AssertionError(f"{name} in JSON output")
    return json.loads(text, parse_constant=reject)


def test_undefined_normalisation_prints_no_number(files, capsys, tmp_path):
    rows = [{**r, "corrupted": r["clean"]} for r in random_rows(6)]
    same = write_jsonl(tmp_path / "same.jsonl", rows)
    code, out, err = run(capsys, *evaluate_args(files, **{"--data": str(same)}), "--json")
    assert code == 0
    score = _strict(out)
    assert score["faithfulness"] is None and score["necessity"] is None
    assert score["faithfulness_se"] is None and score["necessity_se"] is None
    assert "are equal" in score["undefined_reason"] and "divide by zero" in score["undefined_reason"]
    assert "faithfulness and necessity are undefined" in err
    code, out, _ = run(capsys, *evaluate_args(files, **{"--data": str(same)}))
    assert code == 0 and "undefined" in out and "nan" not in out.lower() and "inf" not in out.lower()


def test_one_example_reports_no_standard_error(files, capsys, model, tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", signal_rows(model, 1, seed=5))
    code, out, _ = run(capsys, *evaluate_args(files, **{"--data": str(one)}), "--json")
    score = _strict(out)
    assert code == 0 and score["n_examples"] == 1 and score["faithfulness"] is not None
    for key in ("faithfulness_se", "necessity_se", "clean_metric_se", "corrupted_metric_se", "circuit_metric_se"):
        assert score[key] is None, key
    assert score["se_reason"] == "one example: no standard error"
    code, out, _ = run(capsys, *evaluate_args(files, **{"--data": str(one)}))
    assert "n/a" in out and "nan" not in out.lower()


def test_row_without_a_position_the_spec_uses(files, capsys, model, tmp_path):
    rows = signal_rows(model, 4, seed=3)
    del rows[2]["positions"]["S"]
    data = write_jsonl(tmp_path / "pos.jsonl", rows)
    spec = tmp_path / "pos_spec.json"
    spec.write_text(json.dumps({"edges": [{"edge": "input->a1.h0<k>", "positions": ["S"]}, "a1.h0->logits"]}))
    code, _, err = run(capsys, *evaluate_args(files, **{"--data": str(data), "--spec": str(spec)}))
    assert code == 2
    one_error(err, f"{data}:3: the example has no position 'S', which the circuit uses")


@pytest.mark.parametrize("flags,message", [
    (["--top-n", "0"], "argument --top-n: expected a positive integer, got 0"),
    (["--top-n", "-3"], "argument --top-n: expected a positive integer, got -3"),
    (["--top-n", "1000"], "--top-n 1000 is more than the model's 110 edges"),
    (["--threshold", "nan"], "argument --threshold: expected a finite number, got 'nan'"),
    (["--threshold", "-1"], "argument --threshold: expected a number >= 0"),
    (["--threshold", "1e9"], "keeps no edge; the largest |score| is"),
    (["--steps", "0"], "argument --steps: expected a positive integer"),
])
def test_discover_selection_must_keep_edges(files, capsys, flags, message):
    out = files["dir"] / "never.json"
    code, _, err = run(capsys, "discover", "--model", files["--model"], "--data", files["--data"], "--method", "eap",
                       *flags, "-o", out)
    assert code == 2
    one_error(err, message)
    assert not out.exists()


def test_discover_default_selection_reaches_the_stated_faithfulness(files, capsys):
    out = files["dir"] / "found.json"
    code, stdout, _ = run(capsys, "discover", "--model", files["--model"], "--data", files["--data"], "--method", "eap",
                          "-o", out, "--json")
    summary = _strict(stdout)
    assert code == 0 and summary["faithfulness"] >= 0.8
    assert "the smallest size found reaching faithfulness >= 0.8 (bisection on all 7 examples" in summary["selection"]
    n = summary["n_edges"]
    requested, missed = (int(x) for x in re.search(r"top \(absolute ranking\) (\d+), pruned to \d+ edges.*; top (\d+) misses it",
                                                  summary["selection"]).groups())
    assert 1 < n <= requested < 110 and requested <= max(missed + 1, missed * 1.15)
    for size, reaches in ((requested, True), (missed, False)):
        smaller = files["dir"] / f"top{size}.json"
        run(capsys, "discover", "--model", files["--model"], "--data", files["--data"], "--method", "eap", "--top-n", size,
            "--prune", "-o", smaller, "--json")
        code, stdout, _ = run(capsys, "evaluate", "--model", files["--model"], "--data", files["--data"], "--spec", smaller, "--json")
        assert (_strict(stdout)["faithfulness"] >= 0.8) == reaches  # the size found reaches the level; the one below misses
    code, stdout, _ = run(capsys, "discover", "--model", files["--model"], "--data", files["--data"], "--method", "eap",
                          "--target-faithfulness", "0.5", "-o", out)
    assert code == 0 and "faithfulness >= 0.5" in stdout


def test_default_selection_searches_both_rankings_and_keeps_the_smaller(files, model):
    """Scores whose signed ranking is good and whose |score| ranking starts with junk (large positive scores on
    edges that carry nothing, as with EAP-IG on a real model): the search stops the |score| ranking once the
    signed one reached the level at a size |score| missed, and keeps the signed circuit, whose size is checked
    here with plain evaluations of the pruned top-n."""
    from circuitgraph.discovery import discover, smallest_faithful
    from circuitgraph.discovery.curves import ranked_top_n
    from circuitgraph.discovery.edge_scores import EdgeScores, mib_prune

    data = load_dataset(files["--data"], model)
    ev = Evaluator(model, data, progress=False)
    eap = discover(ev, "eap", progress=False)
    G = model.graph
    legal = torch.nonzero(G.legal.flatten()).flatten()
    order = legal[eap.scores.abs().flatten()[legal].argsort(descending=True)]  # legal edges, best |EAP| first
    crafted = torch.zeros(G.legal.numel(), dtype=eap.scores.dtype)
    crafted[order] = -torch.linspace(2, 1, len(order), dtype=crafted.dtype)  # signed: the good edges first
    crafted[order[-40:]] = 10.0  # |score|: the 40 least useful edges first
    scores = EdgeScores(G, crafted.view_as(eap.scores), "crafted", {})
    sel = smallest_faithful(ev, scores, level=0.8)
    assert sel.ranking == "signed" and "top (signed ranking)" in sel.how and "absolute ranking" in sel.how
    def faith(n, ranking="signed"):
        mask = mib_prune(G, ranked_top_n(scores, n, ranking))
        return ev.evaluate(mask).faithfulness if mask.any() else 0.0  # nothing left: the ablated run

    assert faith(sel.n_requested) >= 0.8 and sel.faithfulness == pytest.approx(faith(sel.n_requested))
    assert faith(sel.missed) < 0.8 and sel.n_requested <= max(sel.missed + 1, sel.missed * 1.15)
    assert faith(sel.n_requested, "absolute") < 0.8
    # one ranking asked for: only it is searched
    only = smallest_faithful(ev, scores, level=0.8, ranking="absolute")
    assert only.ranking == "absolute" and "signed" not in only.how and only.n_requested > sel.n_requested


def test_path_patch_senders_must_be_upstream(files, capsys, model):
    from circuitgraph.evaluate.path_patching import path_patch, path_patch_sweep

    code, _, err = run(capsys, "path-patch", "--model", files["--model"], "--data", files["--data"],
                       "--receiver", "a1.h0<k>", "--senders", "a0.h1,a1.h2")
    assert code == 2
    one_error(err, "sender 'a1.h2' is not upstream of receiver(s) a1.h0<k>")
    data = load_dataset(files["--data"], model)
    with pytest.raises(ValueError, match="sender 'm1' is not upstream"):
        path_patch(model, data, ["a0.h0", "m1"], "a1.h0<q>")
    with pytest.raises(ValueError, match="sender 'a0.h2' is not upstream of receiver.s. a0.h1<v>"):
        path_patch_sweep(model, data, "a0.h1<v>", senders="a0.h2")


def test_spec_for_another_model_warns(files, capsys):
    code, out, _ = run(capsys, *evaluate_args(files))
    assert code == 0 and "the spec is for model 'tiny' but is evaluated on" in out
    code, out, err = run(capsys, *evaluate_args(files), "--json")
    assert "the spec is for model 'tiny'" in err and _strict(out)["warnings"]


def test_builder_refuses_to_replace_a_group():
    spec = CircuitSpec().group("movers", ["a1.h0"])
    with pytest.raises(SpecError, match=r"group 'movers' already exists \(nodes \['a1.h0'\]\)"):
        spec.group("movers", ["a1.h1"])
    with pytest.raises(SpecError, match="node 'a1.h0' is already in group 'movers'"):
        spec.group("other", ["a1.h0"])
    assert spec.groups["movers"].nodes == ["a1.h0"]


# ----- 3. tracebacks that reach the user ----------------------------------------------------------
def test_prompt_longer_than_the_context(files, capsys, tmp_path):
    long = " ".join(WORDS[i % 40] for i in range(40))  # the test model's context is 32 tokens
    data = write_jsonl(tmp_path / "long.jsonl", [GOOD, {**GOOD, "clean": long, "corrupted": long}])
    code, _, err = run(capsys, *evaluate_args(files, **{"--data": str(data)}))
    assert code == 2
    one_error(err, f"{data}:2: the prompt is 40 tokens, longer than the model's context of 32 tokens")


def test_damaged_weights_file(files, capsys, tmp_path):
    bad = tmp_path / "damaged"
    shutil.copytree(files["--model"], bad)
    weights = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    code, _, err = run(capsys, *evaluate_args(files, **{"--model": str(bad)}))
    assert code == 2
    one_error(err, f"model '{bad}': its weights file is damaged or unreadable (SafetensorError")


@pytest.mark.parametrize("device,message", [
    ("cdua", "--device 'cdua': not a device; expected cpu, cuda, cuda:N, mps or auto"),
    ("cuda:99", "--device 'cuda:99'"),
    ("meta", "device type 'meta' is not supported"),
])
def test_devices_that_are_not_there(files, capsys, device, message):
    code, _, err = run(capsys, *evaluate_args(files), "--device", device)
    assert code == 2
    one_error(err, message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(files, capsys):
    code, _, err = run(capsys, *evaluate_args(files), "--device", "cuda")
    assert code == 2
    one_error(err, "--device 'cuda':", "use --device cpu")


def test_deeply_nested_json(files, capsys, tmp_path, tokenizer):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.jsonl").write_text(json.dumps(GOOD) + "\n" + deep + "\n")
    with pytest.raises(DataError, match="deep.jsonl:2: JSON nested too deeply"):
        load_dataset(tmp_path / "deep.jsonl", tokenizer)
    (tmp_path / "deep.json").write_text('{"groups": ' + deep + "}")
    code, _, err = run(capsys, *evaluate_args(files, **{"--spec": str(tmp_path / "deep.json")}))
    assert code == 2
    one_error(err, "deep.json': JSON nested too deeply")


def test_files_that_are_not_utf8(files, capsys, tmp_path, tokenizer):
    (tmp_path / "latin1.jsonl").write_bytes((json.dumps(GOOD) + "\n").encode() + b'{"clean": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at column 15\)"):
        load_dataset(tmp_path / "latin1.jsonl", tokenizer)
    (tmp_path / "latin1.json").write_bytes(b'{\n  "name": "toy",\n  "description": "caf\xe9"\n}\n')
    code, _, err = run(capsys, *evaluate_args(files, **{"--spec": str(tmp_path / "latin1.json")}))
    assert code == 2
    one_error(err, "latin1.json:3: not UTF-8 text (byte 0xe9)")


@pytest.mark.parametrize("value", ["0", "-4", "two"])
def test_batch_size_must_be_positive(files, capsys, value):
    code, _, err = run(capsys, *evaluate_args(files), "--batch-size", value)
    assert code == 2
    one_error(err, "argument --batch-size: expected a positive integer")


def test_python_batch_size_must_be_positive(model, files):
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        Evaluator(model, files["--data"], batch_size=0)


@pytest.mark.parametrize("flag,message", [("--data", "is a directory; expected a JSONL file"),
                                          ("--spec", "is a directory; expected a circuit spec JSON file")])
def test_directory_where_a_file_is_expected(files, capsys, tmp_path, flag, message):
    code, _, err = run(capsys, *evaluate_args(files, **{flag: str(tmp_path)}))
    assert code == 2
    one_error(err, message)


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load a model fails the test: output paths must be checked first."""
    import circuitgraph.model.loading as loading

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the output path was checked")
    monkeypatch.setattr(loading, "load_model", refuse)


@pytest.mark.parametrize("output,message", [
    ("missing/sub/out.json", "folder '{d}/missing/sub' does not exist"),
    ("/proc/circuitgraph-out.json", "folder '/proc' is not writable"),
    ("", "is a directory; expected a file name"),
    ("data.jsonl/out.json", "is not a folder"),
])
def test_output_paths_checked_before_any_work(files, capsys, no_model_load, output, message):
    d = files["dir"]
    target = str(d / output) if not output.startswith("/") else output
    if output == "data.jsonl/out.json":
        target = files["--data"] + "/out.json"
    msg = message.format(d=d)
    for argv in (["discover", "--model", files["--model"], "--data", files["--data"], "--method", "eap", "-o", target],
                 ["make-data", "induction", "--model", files["--model"], "-o", target],
                 ["path-patch", "--model", files["--model"], "--data", files["--data"], "--receiver", "m1",
                  "-o", target.replace(".json", ".png")]):
        code, _, err = run(capsys, *argv)
        assert code == 2, argv
        one_error(err, msg if "folder" not in msg else msg.split("folder")[1])


def test_path_patch_figure_type_checked_first(files, capsys, no_model_load):
    code, _, err = run(capsys, "path-patch", "--model", files["--model"], "--data", files["--data"], "--receiver", "m1",
                       "-o", files["dir"] / "pp.xyz")
    assert code == 2
    one_error(err, "unsupported file type '.xyz'")


def test_unexpected_errors_are_one_line(files, capsys, monkeypatch):
    import circuitgraph.cli.commands as commands

    monkeypatch.setattr(commands, "cmd_evaluate", lambda args: 1 / 0)
    monkeypatch.setattr(commands, "build_parser", _parser_with(commands))
    code, _, err = run(capsys, *evaluate_args(files))
    assert code == 2
    one_error(err, "ZeroDivisionError: division by zero (unexpected; set CIRCUITGRAPH_DEBUG=1")


def _parser_with(commands):
    original = commands.build_parser

    def build():
        parser = original()
        parser._subparsers._group_actions[0].choices["evaluate"].set_defaults(func=commands.cmd_evaluate)
        return parser
    return build


def test_argparse_errors_are_one_line(capsys):
    code, _, err = run(capsys, "evaluate", "--model", "x")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "the following arguments are required: --data, --spec (see circuitgraph evaluate --help)" in err


# ----- 4. the Python API ------------------------------------------------------------------------
def test_in_memory_rows(model, files):
    rows = signal_rows(model, 7, seed=3)
    from_rows = load_dataset(rows, model)
    from_file = load_dataset(files["--data"], model.tokenizer)
    assert torch.equal(from_rows.clean, from_file.clean) and torch.equal(from_rows.answers, from_file.answers)
    with pytest.raises(DataError, match=r"rows\[1\]: field 'wrong': missing"):
        load_dataset([rows[0], {k: v for k, v in rows[1].items() if k != "wrong"}], model)
    with pytest.raises(DataError, match="expected a list of examples"):
        load_dataset(42, model)
    ev = Evaluator(model, rows, progress=False)  # rows straight into the Evaluator
    assert ev.evaluate(SPEC).faithfulness == pytest.approx(Evaluator(model, from_file, progress=False).evaluate(SPEC).faithfulness)


def test_evaluate_edge_names_and_masks(model, files):
    ev = Evaluator(model, files["--data"], progress=False)
    names = ["input->a1.h0<q>", "a0.h1->a1.h0<k>", "a1.h0->logits", "m0->logits"]
    by_spec = ev.evaluate(CircuitSpec(edges=names))
    by_names = ev.evaluate(names)
    mask = torch.zeros_like(model.graph.legal)
    for n in names:
        mask[model.graph.edge_index[n]] = True
    by_mask = ev.evaluate(mask)
    assert by_names.faithfulness == pytest.approx(by_spec.faithfulness) and by_mask.necessity == pytest.approx(by_spec.necessity)
    assert by_mask.n_edges == 4
    with pytest.raises(SpecError, match=r"an edge mask must have shape \[11, 27\]"):
        ev.evaluate(torch.ones(3, 3, dtype=torch.bool))
    bad = mask.clone()
    bad[-1, 0] = True
    with pytest.raises(SpecError, match="not edges, e.g. 'm1->a0.h0<q>'"):
        ev.evaluate(bad)
    with pytest.raises(SpecError, match="edge 'a1.h0->a0.h0<q>'"):
        ev.evaluate(["a1.h0->a0.h0<q>"])
    with pytest.raises(TypeError, match="cannot evaluate a int"):
        ev.evaluate(3)


def test_clear_errors_for_the_wrong_objects(model, files):
    with pytest.raises(TypeError, match=r"got str; load it with circuitgraph.load_model\('gpt2'\)"):
        Evaluator("gpt2", files["--data"])
    with pytest.raises(TypeError, match="got GPT2LMHeadModel; wrap a HuggingFace model with circuitgraph.CircuitModel"):
        Evaluator(model.hf, files["--data"])
    with pytest.raises(TypeError, match="Evaluator needs a dataset"):
        Evaluator(model, 42)


def test_score_json_is_strict(model, files):
    score = Evaluator(model, files["--data"], progress=False).evaluate(SPEC)
    parsed = _strict(score.to_json())
    assert parsed["faithfulness"] == pytest.approx(score.faithfulness) and math.isfinite(parsed["faithfulness_se"])


def test_to_networkx_of_a_spec(model):
    spec = {"groups": {"early": {"nodes": ["a0.h1"], "positions": ["S"]}, "late": ["a1.h0"]},
            "connections": [{"src": "early", "dst": "late", "ports": ["k"]}, {"src": "late", "dst": "logits"}],
            "edges": [{"edge": "input->a0.h1<v>", "score": -0.5}]}
    spec = CircuitSpec.from_dict(spec)
    g = model.graph.to_networkx(spec)
    assert g.number_of_edges() == len(spec.resolve(model.graph)) == 3
    assert g.nodes["a0.h1"]["group"] == "early" and g.nodes["a1.h0"]["layer"] == 1 and "a0.h2" not in g
    assert g.edges["a0.h1", "a1.h0", "k"]["positions"] == ["S"]
    assert g.edges["input", "a0.h1", "v"]["score"] == -0.5
    assert model.graph.to_networkx(["a0.h1->a1.h0<k>"]).number_of_edges() == 1
    assert model.graph.to_networkx().number_of_edges() == 110


def test_edge_scores_as_a_table(model, files):
    pd = pytest.importorskip("pandas")
    from circuitgraph.discovery import discover

    ev = Evaluator(model, files["--data"], progress=False)
    scores = discover(ev, "eap", progress=False)
    table = pd.DataFrame(scores.to_dict())
    assert len(table) == 110 and list(table.columns) == ["edge", "source", "destination", "port", "score", "abs_score"]
    assert table.set_index("edge")["score"].to_dict() == pytest.approx(scores.as_dict())
    effects = ev.edge_effects(SPEC)
    frame = pd.DataFrame.from_dict(effects, orient="index", columns=["drop", "se"])
    assert len(frame) == len(CircuitSpec.from_dict(SPEC).resolve(model.graph))


def test_readme_python_section_runs():
    """The README's Python section, run as written."""
    pytest.importorskip("pandas")
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Python\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    scope = {}
    exec(compile(code, "README.md (Python)", "exec"), scope)
    assert scope["score"].faithfulness > 0.9 and len(scope["table"]) == 110
    assert scope["g"].number_of_edges() == len(scope["spec"].resolve(scope["model"].graph))


def test_our_runtime_errors_are_not_called_unexpected():
    from circuitgraph.cli.commands import error_message
    from circuitgraph.model.guard import ExactnessError

    assert error_message(ExactnessError("engine and model disagree by 0.3\nmore")) == "engine and model disagree by 0.3"
    assert "unexpected" in error_message(ZeroDivisionError("division by zero"))
    assert error_message(FileNotFoundError(2, "No such file or directory", "x.json")) == "No such file or directory: 'x.json'"


def test_real_entry_point_warns_and_fails_in_one_line(files, tmp_path):
    """Through ``python -m circuitgraph``: our warnings are one line each, errors one line, no traceback."""
    import subprocess
    import sys

    rows = signal_rows(load_model(files["--model"]), 7, seed=3)
    rows[1] = {**rows[1], "clean": rows[1]["clean"] + " giraffe", "corrupted": rows[1]["corrupted"] + " okapi"}
    data = write_jsonl(tmp_path / "unknown.jsonl", rows)
    base = [sys.executable, "-m", "circuitgraph", "evaluate", "--model", files["--model"], "--data", str(data),
            "--spec", files["--spec"], "--json"]
    r = subprocess.run(base, capture_output=True, text=True)
    assert r.returncode == 0 and "Traceback" not in r.stderr
    warning = [line for line in r.stderr.splitlines() if "warning" in line]
    assert any(line.startswith("circuitgraph: warning: ") and "'giraffe'" in line and "'okapi'" in line for line in warning), r.stderr
    assert not any("warnings.warn" in line for line in r.stderr.splitlines())
    _strict(r.stdout)
    r = subprocess.run(base + ["--device", "cdua"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == ("circuitgraph evaluate: error: --device 'cdua': not a device; "
                                                      "expected cpu, cuda, cuda:N, mps or auto")


def test_path_patching_with_no_corruption_effect_prints_no_number(files, capsys, model, tmp_path):
    from circuitgraph.evaluate.path_patching import path_patch

    rows = [{**r, "corrupted": r["clean"]} for r in random_rows(6)]
    same = write_jsonl(tmp_path / "same.jsonl", rows)
    code, out, err = run(capsys, "path-patch", "--model", files["--model"], "--data", same, "--receiver", "a1.h0<k>", "--json")
    result = _strict(out)
    assert code == 0 and set(result["senders"].values()) == {None} and set(result["senders_se"].values()) == {None}
    assert "divide by zero" in result["undefined_reason"] and "path-patching effects are not meaningful" in err
    code, out, _ = run(capsys, "path-patch", "--model", files["--model"], "--data", same, "--receiver", "m1")
    assert "n/a" in out and "nan" not in out.lower()
    with pytest.raises(ValueError, match="the path-patching effect is undefined"):
        path_patch(model, load_dataset(rows, model), "a0.h1", "a1.h0<k>")


def test_demo_checks_its_inputs_first(capsys, no_model_load):
    code, _, err = run(capsys, "demo", "-n", "1", "-o", "/tmp/circuitgraph-demo-never")
    assert code == 2
    one_error(err, "-n 1: the demo needs at least 2 prompts")
    code, _, err = run(capsys, "demo", "-o", "/proc/circuitgraph/demo")
    assert code == 2
    one_error(err, "-o '/proc/circuitgraph/demo': '/proc' is not a writable folder")
