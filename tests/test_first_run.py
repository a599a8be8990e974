"""A new user's first hour: the README's tour, make-data on every bundled model, names that do not exist.

The tour is read from the README itself, so the two cannot drift; it runs in an empty directory
with graphviz's ``dot`` hidden from PATH (figures then come from the matplotlib fallback).
"""

import re
import shlex
import time
from pathlib import Path

import pytest

import circuitgraph.cli.commands as cli
from circuitgraph.model import names
from circuitgraph.model.loading import ModelLoadError, load_model
from circuitgraph.render import figure
from circuitgraph.spec.circuit_spec import CircuitSpec, SpecError

README = Path(__file__).resolve().parents[1] / "README.md"
HUB = "needs the hub"


def tour_lines() -> list[str]:
    text = README.read_text()
    section = text[text.index("## A short tour"):]
    block = re.search(r"```console\n(.*?)```", section, re.S).group(1)
    return [line[2:] for line in block.splitlines() if line.startswith("$ ")]


@pytest.fixture
def no_dot(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(figure, "_noted", False)


@pytest.mark.slow
def test_readme_tour_runs_offline_in_an_empty_directory(tmp_path, monkeypatch, no_dot, capsys):
    lines = tour_lines()
    offline = [line for line in lines if HUB not in line]
    assert len(offline) >= 6 and all("gpt2" in line for line in lines if HUB in line)
    assert all("gpt2" not in line for line in offline)  # a hub model is never used without the mark
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for line in offline:
        argv = shlex.split(line, comments=True)
        assert argv[0] == "circuitgraph"
        assert cli.main(argv[1:]) == 0, f"README tour line failed: {line}\n{capsys.readouterr().err}"
    for made in ("induction.jsonl", "found.json", "found.svg", "study.html", "pp.png", "ioi_toy.png", "circuitgraph-demo/discovered.png"):
        assert (work / made).is_file(), made
    assert "full-quality layout" in capsys.readouterr().err  # the fallback said so, once


# ----- make-data: every task on every bundled model works, or says what would ---------------------
WORKS = {("toy-induction", "induction"), ("toy-ioi", "induction"), ("toy-ioi", "ioi")}
CANNOT = {"greater-than": "GPT-2-style year tokens", "docstring": "tokenizer for code"}


@pytest.mark.parametrize("model", ["toy-induction", "toy-ioi"])
@pytest.mark.parametrize("task", ["ioi", "greater-than", "induction", "docstring"])
def test_make_data_every_pair(model, task, tmp_path, capsys):
    out = tmp_path / "d.jsonl"
    rc = cli.main(["make-data", task, "--model", model, "-n", "4", "-o", str(out)])
    err = capsys.readouterr().err
    if (model, task) in WORKS:
        assert rc == 0 and len(out.read_text().splitlines()) == 4
    elif task in CANNOT:
        assert rc == 2 and CANNOT[task] in err and ("no option can fix it" in err or "no word list can fix it" in err)
        assert len([ln for ln in err.splitlines() if ln.startswith("circuitgraph make-data: error:")]) == 1
    else:  # toy-induction's words are t0..t63: follow the advice, flag by flag
        assert rc == 2 and "--templates" in err
        argv = ["make-data", task, "--model", model, "-n", "4", "-o", str(out),
                "--templates", "[B] t40 [A] t41 t42 [B] t43 [A]"]
        assert cli.main(argv) == 2 and "--names" in capsys.readouterr().err
        assert cli.main(argv + ["--names", "t1", "t2", "t3", "t4", "t5", "t6"]) == 0
        assert len(out.read_text().splitlines()) == 4


def test_make_data_option_for_another_task(tmp_path, capsys):
    assert cli.main(["make-data", "induction", "--model", "toy-ioi", "--names", "Mary", "-o", str(tmp_path / "x.jsonl")]) == 2
    assert "(--names) applies to ioi, not induction" in capsys.readouterr().err


# ----- unknown model names: seconds, one line, a did-you-mean ---------------------------------------
def test_unknown_model_offline_fails_fast_with_suggestion(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"HF_HUB_OFFLINE is set; did you mean 'toy-ioi'"):
        load_model("toy-iio")
    assert time.perf_counter() - t0 < 5


def test_unknown_model_unreachable_hub(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(names, "hub_reachable", lambda timeout=0: False)
    with pytest.raises(ModelLoadError, match=r"cannot be reached; did you mean 'gpt2'\?"):
        load_model("gtp2")
    # local directories are suggested too
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"did you mean 'my-model'"):
        load_model("my-modle")


def test_hub_reachable_gives_up_quickly(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    t0 = time.perf_counter()
    assert names.hub_reachable(timeout=1.0) is False
    assert time.perf_counter() - t0 < 3


def test_unknown_model_cli_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["make-data", "ioi", "--model", "toy-inductoin", "-o", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'toy-induction'" in err and "Retrying" not in err  # before any loading


# ----- shipped specs by name ----------------------------------------------------------------------
def test_shipped_spec_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not in a checkout: no specs/ folder here
    assert CircuitSpec.load("induction_toy").model == "toy-induction"
    assert CircuitSpec.load("ioi_gpt2.json").groups
    assert CircuitSpec.load("specs/greaterthan_gpt2.json").groups  # the README's old repo-relative form
    with pytest.raises(SpecError, match=r"did you mean 'induction_toy'( or '\w+')?\?.*usable by name: greaterthan_gpt2"):
        CircuitSpec.load("induction_tyo")
    own = tmp_path / "induction_toy"
    own.write_text('{"format": "circuitgraph/1", "name": "mine", "groups": {"g": ["a0.h0"]}}')
    assert CircuitSpec.load("induction_toy").name == "mine"  # an existing file wins
