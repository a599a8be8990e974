"""MIB's circuit track: its task datasets as our rows, and our scored circuits as its submission layout.

The data rows here are written in the schema of the ``mib-bench/*`` hub datasets, with words of
the bundled toy-ioi vocabulary; nothing is read from the network.  The last tests run MIB's own
loader and evaluator (``benchmarks/mib_checker.py``) when MIB_PYTHON and MIB_AUTOEVAL say where
they are, and skip otherwise.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from circuitgraph.cli.commands import main
from circuitgraph.data.dataset import DataError, load_dataset
from circuitgraph.data.mib import load_mib_rows
from circuitgraph.errors import CircuitWarning
from circuitgraph.graph import Graph
from circuitgraph.spec.circuit_spec import CircuitSpec, Edge, SpecError
from circuitgraph.spec.mib_submission import FRACTIONS, MODELS, write_submission

ROOT = Path(__file__).resolve().parent.parent
TOY_IOI = ROOT / "circuitgraph" / "bundled" / "toy-ioi"


@pytest.fixture(scope="module")
def toy():
    from circuitgraph.model.loading import load_model

    return load_model("toy-ioi")


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ioi_row(io="Mary", s="John", c="Adam", place="store", obj="drink"):
    p = "When {a} and {b} went to the {place}, {c} gave a {obj} to"
    return {
        "template": "When [A] and [B] went to the [PLACE], [B] gave a [OBJECT] to",
        "prompt": p.format(a=io, b=s, c=s, place=place, obj=obj),
        "choices": [io, s], "answerKey": 0,
        "metadata": {"indirect_object": io, "subject": s, "random_a": "Eric", "random_b": "Kyle", "random_c": c,
                     "place": place, "object": obj},
        "s2_io_flip_counterfactual": {"prompt": p.format(a=io, b=s, c=io, place=place, obj=obj),
                                      "choices": [io, s], "answerKey": 1},
        "abc_counterfactual": {"prompt": p.format(a="Eric", b="Kyle", c=c, place=place, obj=obj),
                               "choices": ["Eric", "Kyle"], "answerKey": 0},
    }


def choice_row(answer=1, cf_answer=2, labels=("Mary", "John", "Adam", "Eric"), cf_labels=None):
    cf_labels = list(cf_labels or labels)
    return {"dataset": "copycolors", "idx": 0, "prompt": f"The store had a drink , {' , '.join(labels)} .",
            "choices": {"label": list(labels), "text": ["a", "b", "c", "d"]}, "answerKey": answer,
            "symbol_counterfactual": {"prompt": f"The house had a drink , {' , '.join(cf_labels)} .",
                                      "choices": {"label": cf_labels, "text": ["a", "b", "c", "d"]}, "answerKey": cf_answer}}


def arith_row(label=7, cf_label=9, op="+", cf=True):
    row = {"idx": 0, "template": "x", "prompt": f"What is 3 {op} 4 ?", "label": label, "operator": op, "num_digit": 1,
           "operand1": 3, "operand2": 4}
    row["random_counterfactual"] = {"prompt": f"What is 5 {op} 4 ?", "label": cf_label} if cf else None
    return row


# ----- A: datasets -----------------------------------------------------------------------------
def test_ioi_pairs_as_mib_does(tmp_path):
    f = _write(tmp_path / "ioi.jsonl", [ioi_row(), ioi_row("Sarah", "David", "Kevin")])
    rows = load_mib_rows(f, "ioi")
    assert rows[0] == {"clean": "When Mary and John went to the store, John gave a drink to",
                       "corrupted": "When Mary and John went to the store, Mary gave a drink to",
                       "answer": " Mary", "wrong": " John", "mib_row": 0}
    abc = load_mib_rows(f, "ioi", counterfactual="abc_counterfactual")
    # the corrupted prompt changes with the counterfactual; MIB's answers stay the clean IO and subject
    assert abc[1]["corrupted"].startswith("When Eric and Kyle") and (abc[1]["answer"], abc[1]["wrong"]) == (" Sarah", " David")


def test_ioi_filter_and_first_token_follow_mib_for_the_tokenizer(tmp_path, toy):
    rows = [ioi_row(), ioi_row(c="Adam-Eric"), ioi_row("Mary-Jose", "John-Paul", "Adam-Eric")]
    f = _write(tmp_path / "ioi.jsonl", rows)
    with pytest.warns(CircuitWarning, match="dropped 1 row.*different token counts"):
        out = load_mib_rows(f, "ioi", tokenizer=toy)
    assert [r["mib_row"] for r in out] == [0, 2]
    # names of three tokens each are kept, and MIB scores their first token
    assert (out[1]["answer"], out[1]["wrong"]) == (" Mary", " John")
    assert load_mib_rows(f, "ioi", tokenizer=toy.tokenizer, n=1) == out[:1]


def test_choice_tasks_take_the_counterfactual_label(tmp_path, toy):
    f = _write(tmp_path / "mcqa.jsonl", [choice_row(1, 2), choice_row(0, 3, cf_labels=["Mary", "John", "Adam", "Eric Kyle"])])
    rows = load_mib_rows(f, "mcqa")
    assert (rows[0]["answer"], rows[0]["wrong"]) == ("John", "Adam")
    assert rows[0]["corrupted"].startswith("The house")
    with pytest.warns(CircuitWarning, match="dropped 1"):
        assert [r["mib_row"] for r in load_mib_rows(f, "arc-easy", tokenizer=toy)] == [0]


def test_arithmetic_keeps_its_operator_and_one_token_labels(tmp_path):
    from tests.conftest import make_tokenizer

    tok = make_tokenizer()  # words w0..w39: labels "w7", "w9" are one token, "w1 w2" is two
    rows = [arith_row("w7", "w9"), arith_row("w7", "w9", op="-"), arith_row("w7", "w9", cf=False),
            arith_row("w1 w2", "w9"), arith_row(12, 13)]
    f = _write(tmp_path / "add.jsonl", rows)
    with pytest.warns(CircuitWarning, match="dropped 2"):
        plain = load_mib_rows(f, "arithmetic_addition")
    assert [(r["answer"], r["wrong"], r["mib_row"]) for r in plain] == [("w7", "w9", 0), ("w1 w2", "w9", 3), ("12", "13", 4)]
    with pytest.warns(CircuitWarning, match="dropped 3"):  # "12" is one (unknown) token here, so MIB keeps it
        assert [r["mib_row"] for r in load_mib_rows(f, "arithmetic_addition", tokenizer=tok)] == [0, 4]
    with pytest.warns(CircuitWarning):
        assert [r["mib_row"] for r in load_mib_rows(f, "arithmetic-subtraction")] == [1]


def test_json_list_and_parquet_read_like_jsonl(tmp_path):
    rows = [ioi_row(), ioi_row("Sarah", "David", "Kevin")]
    want = load_mib_rows(_write(tmp_path / "a.jsonl", rows), "ioi")
    (tmp_path / "a.json").write_text(json.dumps(rows))
    assert load_mib_rows(tmp_path / "a.json", "ioi") == want
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    assert load_mib_rows(tmp_path / "a.parquet", "ioi") == want


@pytest.mark.parametrize("mutate, task, cf, message", [
    (lambda r: r["metadata"].pop("subject"), "ioi", None, r"ioi.jsonl:2: missing field 'metadata.subject'"),
    (lambda r: r["metadata"].update(subject=3), "ioi", None, r"ioi.jsonl:2: field 'metadata.subject' = 3; expected a string"),
    (lambda r: None, "ioi", "s1_io_flip_counterfactual",
     r"no counterfactual 's1_io_flip_counterfactual' for MIB task ioi; its rows have: abc_counterfactual, s2_io_flip_counterfactual"),
    (lambda r: None, "greater-than", None, r"unknown MIB task 'greater-than'; expected one of ioi, mcqa, arithmetic_addition"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, mutate, task, cf, message):
    rows = [ioi_row(), ioi_row()]
    mutate(rows[1])
    with pytest.raises(DataError, match=message):
        load_mib_rows(_write(tmp_path / "ioi.jsonl", rows), task, counterfactual=cf)


def test_bad_sources(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"MIB data file 'nope.jsonl' does not exist"):
        load_mib_rows("nope.jsonl", "ioi")
    bad = tmp_path / "c.jsonl"
    bad.write_text(json.dumps({**choice_row(), "answerKey": 7}) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl:1: field 'answerKey' = 7 is out of range for 4 choices"):
        load_mib_rows(bad, "mcqa")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(DataError, match=r"reading 'mib-bench/ioi' from the HuggingFace hub needs the datasets library: pip install datasets"):
        load_mib_rows(None, "ioi")


def test_mib_data_command(tmp_path, capsys, toy):
    f = _write(tmp_path / "ioi.jsonl", [ioi_row(), ioi_row("Sarah", "David", "Kevin"), ioi_row("Emily", "Jacob", "Paul")])
    out = tmp_path / "rows.jsonl"
    assert main(["mib-data", "--task", "ioi", "--input", str(f), "--model", "toy-ioi", "-n", "2", "-o", str(out)]) == 0
    assert "wrote 2 ioi rows" in capsys.readouterr().out
    data = load_dataset(out, toy, prepend_bos=True)  # our format, tokenized for the model
    assert len(data) == 2 and data.same_length
    assert main(["mib-data", "--task", "ioi", "--input", str(f), "--counterfactual", "nope", "--model", "toy-ioi",
                 "-o", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "its rows have: abc_counterfactual, s2_io_flip_counterfactual" in err
    assert not (tmp_path / "x.jsonl").exists()
    longer = ioi_row()
    longer["s2_io_flip_counterfactual"]["prompt"] += " the"
    _write(f, [ioi_row(), longer])
    assert main(["mib-data", "--task", "ioi", "--input", str(f), "--model", "toy-ioi", "-o", str(tmp_path / "y.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "ioi.jsonl:2: clean is 14 tokens but corrupted is 15" in err and not (tmp_path / "y.jsonl").exists()


# ----- B: submissions ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_scores():
    g = MODELS["gpt2"].graph
    torch.manual_seed(0)
    return g, dict(zip(g.edges, torch.randn(g.n_edges, dtype=torch.float64).tolist()))


def scored_spec(scores, edges=(), **kw):
    meta = {"method": "eap-ig", "ablation": "corrupted", "metric": "logit_diff", **kw.pop("metadata", {})}
    return CircuitSpec(edges=[Edge(edge=e) for e in edges], edge_scores=scores, metadata=meta, **kw)


def test_importances_file(tmp_path, gpt2_scores):
    g, scores = gpt2_scores
    spec = scored_spec(scores, g.edges[:40], model="gpt2")
    spec.to_json(tmp_path / "found.json")
    assert main(["mib-export", str(tmp_path / "found.json"), "--task", "ioi", "-o", str(tmp_path / "sub")]) == 0
    path = tmp_path / "sub" / "eap-ig_patching_edge" / "ioi_gpt2" / "importances.json"
    data = json.loads(path.read_text())
    assert data["cfg"] == {"n_layers": 12, "n_heads": 12, "parallel_attn_mlp": False, "d_model": 768}
    assert list(data["edges"]) == g.edges  # every edge, in EAP-IG's order
    assert all(data["edges"][e]["score"] == -scores[e] for e in g.edges)  # loss sign: minus ours
    assert sum(v["in_graph"] for v in data["edges"].values()) == 40
    assert data["metadata"]["score_sign"] == "loss" and data["metadata"]["metric"] == "logit_diff"
    # read back: the file says its sign, so exporting it again in ours gives the original scores
    again = CircuitSpec.load(path)
    assert main(["mib-export", str(path), "--sign", "ours", "--method", "back", "-o", str(tmp_path / "sub")]) == 0
    back = json.loads((tmp_path / "sub" / "back" / "ioi_gpt2" / "importances.json").read_text())
    assert all(back["edges"][e]["score"] == scores[e] for e in g.edges[:100])
    assert len(again.edges) == 40


def test_circuits_at_mibs_sizes(tmp_path, gpt2_scores):
    from circuitgraph.discovery.curves import mib_prune

    g, scores = gpt2_scores
    files = write_submission(scored_spec(scores), tmp_path, "ioi", "gpt2", method="m", layout="circuits")
    assert len(files) == 18
    ours = torch.tensor([scores[e] for e in g.edges])
    for ranking, key in (("abs-False", -ours), ("abs-True", ours.abs())):
        folder = tmp_path / "m" / ranking / "ioi_gpt2"
        assert len(list(folder.iterdir())) == 9
        for f in FRACTIONS:
            data = json.loads((folder / f"circuit_{f * 100:g}pct.json").read_text())
            n = int(f * g.n_edges)
            chosen = set(data["edges"])
            assert len(chosen) <= n and data["metadata"]["edges_requested"] == n  # random scores: small ones prune to nothing
            assert chosen or f < 0.1
            top = {g.edges[i] for i in torch.topk(key, n).indices.tolist()}
            assert chosen <= top  # the top-n of the ranking, pruned
            mask = torch.zeros(g.legal.shape, dtype=torch.bool)
            for e in chosen:
                mask[g.edge_index[e]] = True
            assert torch.equal(mib_prune(g, mask), mask)
            assert all(v["in_graph"] and v["score"] == -scores[e] for e, v in data["edges"].items())
    # one ranking alone goes straight into the task folder, which MIB then reports for both rankings
    write_submission(scored_spec(scores), tmp_path, "ioi", "gpt2", method="one", layout="circuits", ranking="absolute")
    assert len(list((tmp_path / "one" / "ioi_gpt2").iterdir())) == 9


def test_kl_scores_keep_their_sign(tmp_path, gpt2_scores):
    g, scores = gpt2_scores
    write_submission(scored_spec(scores, metadata={"metric": "kl"}), tmp_path, "ioi", "gpt2", method="kl")
    data = json.loads((tmp_path / "kl" / "ioi_gpt2" / "importances.json").read_text())
    e = g.edges[7]
    assert data["edges"][e]["score"] == scores[e]  # KL is already a loss: its change is the loss sign


def test_refusals(tmp_path, gpt2_scores, capsys):
    g, scores = gpt2_scores
    small = Graph(2, 4)
    cases = [
        (scored_spec({}), "ioi", "gpt2", "the spec has no edge scores"),
        (scored_spec({e: 0.1 for e in small.edges}), "ioi", "gpt2", r"scores 110 of the model's 32,491 edges; MIB ranks every edge"),
        (scored_spec({**scores, g.edges[3]: None}), "ioi", "gpt2", f"'{g.edges[3]}' has a null score"),
        (scored_spec(scores), "mcqa", "gpt2", "does not evaluate task mcqa on gpt2; for mcqa it takes qwen2.5, gemma2, llama3"),
        (scored_spec(scores, model="Qwen/Qwen2.5-0.5B"), "ioi", "gpt2", "found on Qwen/Qwen2.5-0.5B, which is MIB's qwen2.5, not on gpt2"),
        (scored_spec(scores, task="mcqa"), "ioi", "gpt2", "it is a circuit for task mcqa, not ioi"),
        (scored_spec(scores, metadata={"metric": "bleu"}), "ioi", "gpt2", "scores of metric 'bleu' have no known sign"),
        (scored_spec(scores), "ioi", "gpt-3", "unknown MIB model 'gpt-3'; expected one of gpt2, qwen2.5, gemma2, llama3"),
    ]
    for spec, task, model, message in cases:
        with pytest.raises((SpecError, DataError), match=message):
            write_submission(spec, tmp_path, task, model)
    # an MIB file that does not say its sign
    mib = scored_spec(scores).to_mib(g)
    (tmp_path / "eap.json").write_text(json.dumps(mib))
    assert main(["mib-export", str(tmp_path / "eap.json"), "--task", "ioi", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not say the sign of its scores; give --input-sign ours" in err
    assert main(["mib-export", str(tmp_path / "eap.json"), "--task", "ioi", "--input-sign", "ours", "-o", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "circuitgraph" / "ioi_gpt2" / "importances.json").read_text())["edges"][g.edges[0]]["score"] == -scores[g.edges[0]]
    # a stray file would turn the scores into a set of circuits for MIB's evaluator
    (tmp_path / "o" / "circuitgraph" / "ioi_gpt2" / "notes.json").write_text("{}")
    assert main(["mib-export", str(tmp_path / "eap.json"), "--task", "ioi", "--input-sign", "ours", "-o", str(tmp_path / "o")]) == 2
    assert "already holds notes.json; MIB reads every file there" in capsys.readouterr().err


# ----- MIB's own code, when it is installed --------------------------------------------------
MIB_PYTHON, MIB_AUTOEVAL = os.environ.get("MIB_PYTHON"), os.environ.get("MIB_AUTOEVAL")
needs_mib = pytest.mark.skipif(not (MIB_PYTHON and MIB_AUTOEVAL),
                               reason="MIB's evaluator is not installed: set MIB_PYTHON and MIB_AUTOEVAL "
                                      "(recipe in benchmarks/mib_checker.py)")


def _mib(*args) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([MIB_PYTHON, str(ROOT / "benchmarks" / "mib_checker.py"), "--autoeval", MIB_AUTOEVAL, *args],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@needs_mib
def test_rows_match_mibs_own_loader(tmp_path, toy):
    cases = [
        ("ioi", [ioi_row(), ioi_row(c="Adam-Eric"), ioi_row("Mary-Jose", "John-Paul", "Adam-Eric"), ioi_row("Sarah", "David", "Kevin")], None),
        ("ioi", [ioi_row(), ioi_row("Sarah", "David", "Kevin")], "abc_counterfactual"),
        ("mcqa", [choice_row(1, 2), choice_row(0, 3, cf_labels=["Mary", "John", "Adam", "Eric Kyle"]), choice_row(3, 0)], None),
        ("arc_challenge", [choice_row(2, 1), choice_row(0, 0)], None),
        ("arithmetic_addition", [arith_row("Mary", "John"), arith_row("Mary", "John", op="-"), arith_row("Mary", "John", cf=False),
                                 arith_row("Mary-Jose", "John"), arith_row("Adam", "Eric")], None),
    ]
    files = [_write(tmp_path / f"rows{i}.jsonl", rows) for i, (_, rows, _) in enumerate(cases)]
    args = [f"{task}={f}" + (f"@{cf}" if cf else "") for (task, _, cf), f in zip(cases, files)]
    theirs = _mib("dataset", "--tokenizer", str(TOY_IOI), "--case", *args)["cases"]
    for (task, _, cf), f, their in zip(cases, files, theirs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CircuitWarning)
            ours = load_mib_rows(f, task, counterfactual=cf, tokenizer=toy)
            data = load_dataset(ours, toy)
        assert [[r["clean"], r["corrupted"]] for r in ours] == [t[:2] for t in their["items"]], task
        assert [[int(a), int(w)] for a, w in zip(data.answers[:, 0], data.wrongs[:, 0])] == [t[2] for t in their["items"]], task


@needs_mib
def test_mibs_evaluator_reads_both_layouts(tmp_path, gpt2_scores):
    from circuitgraph.discovery.curves import mib_prune

    g, scores = gpt2_scores
    spec = scored_spec(scores)
    write_submission(spec, tmp_path / "sub", "ioi", "gpt2", method="m")
    write_submission(spec, tmp_path / "sub2", "ioi", "gpt2", method="m", layout="circuits")
    data = _write(tmp_path / "ioi.jsonl", [ioi_row(), ioi_row("Sarah", "David", "Kevin"), ioi_row("Emily", "Jacob", "Paul"),
                                           ioi_row("Rachel", "Kyle", "Sean", place="school", obj="kiss")])
    result = _mib("evaluate", str(tmp_path / "sub" / "m"), str(tmp_path / "sub2" / "m"), "--tokenizer", str(TOY_IOI),
                  "--data", f"ioi={data}")
    runs = {(c["path_info"], r["absolute"]): r for c in result["configs"] for r in c["runs"]}
    assert set(runs) == {("ioi_gpt2", True), ("ioi_gpt2", False), ("abs-True/ioi_gpt2", True), ("abs-False/ioi_gpt2", False)}
    assert all("error" not in r for r in runs.values()), runs
    ours = torch.tensor([scores[e] for e in g.edges])
    where = torch.tensor([g.edge_index[e] for e in g.edges])
    for absolute, folder in ((False, "abs-False/ioi_gpt2"), (True, "abs-True/ioi_gpt2")):
        mine, theirs = runs[(folder, absolute)], runs[("ioi_gpt2", absolute)]
        # MIB evaluates the same circuits from our nine files as from our scores ...
        assert mine["faithfulnesses"] == pytest.approx(theirs["faithfulnesses"], abs=1e-5)
        assert theirs["faithfulnesses"][-1] == pytest.approx(1.0, abs=1e-4)
        files = sorted((tmp_path / "sub2" / "m" / folder).iterdir(), key=lambda p: json.loads(p.read_text())["metadata"]["fraction"])
        assert mine["weighted_edge_counts"] == [json.loads(p.read_text())["metadata"]["edges_after_pruning"] for p in files] + [g.n_edges]
        # ... but counts a top-n circuit after one pruning pass (apply_topn), while ours are pruned to the end
        key = ours.abs() if absolute else -ours
        for f, count in zip(FRACTIONS, theirs["weighted_edge_counts"]):
            top = torch.zeros(g.legal.shape, dtype=torch.bool)
            idx = torch.topk(key, int(f * g.n_edges)).indices
            top[where[idx, 0], where[idx, 1]] = True
            assert count == int(mib_prune(g, top, passes=1).sum())
