"""The bundled toy models load as plain HF models and really do their task.

Everything is recomputed here on fresh seeded data (different seeds from training and from the
scripts' own evaluation), not read from metrics.json; metrics.json only says which heads to check.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from circuitgraph.data.tasks import make_data

BUNDLED = Path(__file__).resolve().parents[1] / "circuitgraph" / "bundled"


def load(name):
    d = BUNDLED / name
    model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(d), json.loads((d / "metrics.json").read_text())


@pytest.fixture(scope="module")
def induction_model():
    return load("toy-induction")


@pytest.fixture(scope="module")
def ioi_model():
    return load("toy-ioi")


@torch.no_grad()
def end_logits(model, tokenizer, texts, positions):
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    logits = model(**enc).logits
    return logits[torch.arange(len(texts)), torch.tensor(positions)]


def logit_diff_and_accuracy(model, tokenizer, data, key="clean"):
    last = end_logits(model, tokenizer, [d[key] for d in data], [d["positions"]["END"] for d in data])
    tid = lambda w: tokenizer(w, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    ans = torch.tensor([tid(d["answer"]) for d in data])
    wrong = torch.tensor([tid(d["wrong"]) for d in data])
    rows = torch.arange(len(data))
    diff = last[rows, ans] - last[rows, wrong]
    return diff.mean().item(), (last.argmax(-1) == ans).float().mean().item()


@pytest.mark.parametrize("name", ["toy-induction", "toy-ioi"])
def test_bundle_is_a_small_gpt2(name):
    d = BUNDLED / name
    config = json.loads((d / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert config["attn_pdrop"] == config["resid_pdrop"] == config["embd_pdrop"] == 0.0
    assert (d / "model.safetensors").is_file() and not (d / "pytorch_model.bin").exists()
    assert sum(f.stat().st_size for f in d.iterdir()) < 5_000_000
    tok = AutoTokenizer.from_pretrained(d)
    assert tok("a", add_special_tokens=True)["input_ids"] == tok("a", add_special_tokens=False)["input_ids"]


@torch.no_grad()
def test_induction_loss_drops_on_repeat(induction_model):
    model, tok, _ = induction_model
    gen = torch.Generator().manual_seed(2024)
    k = 20
    a = torch.stack([torch.randperm(64, generator=gen)[:k] for _ in range(64)])
    words = [" ".join(f"t{i}" for i in row.tolist() * 2) for row in a]
    x = tok(words, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert x.shape == (64, 2 * k)
    nll = F.cross_entropy(model(x).logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
    first, repeat = nll[:, : k - 1].mean().item(), nll[:, k:].mean().item()
    assert first > 3.5  # random words: about ln(64) = 4.16
    assert repeat < 0.3 and repeat < 0.1 * first


@torch.no_grad()
def test_named_heads_have_their_attention_patterns(induction_model):
    model, tok, metrics = induction_model
    assert metrics["prev_token_heads"] and metrics["induction_heads"]
    gen = torch.Generator().manual_seed(7)
    k = 16
    x = torch.stack([torch.randperm(64, generator=gen)[:k] for _ in range(32)]) + tok.convert_tokens_to_ids("t0")
    att = model(torch.cat([x, x], 1), output_attentions=True).attentions
    i = torch.arange(1, 2 * k)
    prev = att[0][:, :, i, i - 1].mean((0, 2))
    q = torch.arange(k, 2 * k)
    ind = att[1][:, :, q, q - k + 1].mean((0, 2))
    for head in metrics["prev_token_heads"]:
        assert head.startswith("a0.") and prev[int(head.split(".h")[1])] > 0.4, (head, prev)
    for head in metrics["induction_heads"]:
        assert head.startswith("a1.") and ind[int(head.split(".h")[1])] > 0.4, (head, ind)
    assert prev.max() > 0.6 and ind.max() > 0.6


def test_induction_task_data_on_toy_induction(induction_model):
    model, tok, _ = induction_model
    data = make_data("induction", tok, 100, seed=11)
    clean_diff, clean_acc = logit_diff_and_accuracy(model, tok, data)
    corrupted_diff, _ = logit_diff_and_accuracy(model, tok, data, key="corrupted")
    assert clean_acc > 0.95 and clean_diff > 5
    assert corrupted_diff < 0.2 * clean_diff


def test_toy_ioi_solves_ioi(ioi_model):
    model, tok, _ = ioi_model
    data = make_data("ioi", tok, 300, seed=777)
    diff, acc = logit_diff_and_accuracy(model, tok, data)
    assert acc > 0.9 and diff > 3
    abc_diff, _ = logit_diff_and_accuracy(model, tok, data, key="corrupted")
    assert abs(abc_diff) < 0.2 * diff  # the ABC prompts name neither answer twice
    flip = make_data("ioi", tok, 300, seed=777, corruption="s2_flip")
    flip_diff, _ = logit_diff_and_accuracy(model, tok, flip, key="corrupted")
    assert flip_diff < -0.5 * diff  # with S2 = IO the other name is the answer
