"""Train the bundled ``toy-ioi`` model: a small GPT-2 that solves indirect object identification.

Deterministic (seeded, CPU, 2 threads); about a minute. The word-level tokenizer covers exactly the IOI task's
template words, names, places and objects (circuitgraph.tasks.ioi), so that task's generator
works with it. Training is language modelling on full IOI sentences (answer included, both BABA
and ABBA orders), with the answer token's loss counted extra because it is the one
non-trivial prediction. Accuracy and logit difference are measured on held-out prompts made by
the task generator itself. Writes circuitgraph/bundled/toy-ioi/.

    python scripts/train_toy_ioi.py [--out DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from _bundle import save_bundle
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from circuitgraph.data.tasks import ioi  # noqa: E402

SEED = 0
SPECIALS = ["<unk>", "<pad>", "<bos>", "<eos>"]
CTX = 32
OUT = ROOT / "circuitgraph" / "bundled" / "toy-ioi"
PRE = pre_tokenizers.Whitespace()  # words and punctuation runs, like "store" "."
SLOTS = {"[A]", "[B]", "[PLACE]", "[OBJECT]"}


def template_words(template: str) -> list[str]:
    """The template as a word list with slots kept whole, e.g. ['Then', ',', '[B]', ...]."""
    out = []
    for piece in re.split(r"(\[[A-Z]+\])", template):
        out += [piece] if piece in SLOTS else [w for w, _ in PRE.pre_tokenize_str(piece)]
    return out


def build_tokenizer() -> PreTrainedTokenizerFast:
    words = []
    for t in ioi.BABA_TEMPLATES:
        words += [w for w in template_words(t) if w not in SLOTS]
    words = SPECIALS + sorted(set(words)) + ioi.NAMES + ioi.PLACES + ioi.OBJECTS
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", model_max_length=CTX)


def batch(rng: random.Random, size: int, forms, vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """Full sentences (half starting with <bos>), right-padded; returns ids and the answer index."""
    names = [vocab[n] for n in ioi.NAMES]
    places, objects = [vocab[p] for p in ioi.PLACES], [vocab[o] for o in ioi.OBJECTS]
    rows = []
    for _ in range(size):
        io, s = rng.sample(names, 2)
        fill = {"[A]": io, "[B]": s, "[PLACE]": rng.choice(places), "[OBJECT]": rng.choice(objects)}
        row = [fill[w] if w in fill else vocab[w] for w in rng.choice(forms)]
        rows.append([vocab["<bos>"]] * (rng.random() < 0.5) + row)
    x = torch.full((size, max(map(len, rows))), vocab["<pad>"])
    for r, row in zip(x, rows):
        r[: len(row)] = torch.tensor(row)
    return x, torch.tensor([len(row) - 1 for row in rows])


@torch.no_grad()
def evaluate(model, tokenizer, n: int = 1000, seed: int = 12345) -> dict:
    """Accuracy (argmax at END is the IO name) and mean logit diff IO - S on generated prompts,
    overall and per order, plus the logit diff on the ABC-corrupted prompts (should be ~0)."""
    data = ioi.generate(tokenizer, n, seed=seed)
    tid = {d[k]: tokenizer(d[k], add_special_tokens=False)["input_ids"][0] for d in data for k in ("answer", "wrong")}
    res = {"clean": [], "corrupted": []}
    for key in res:
        for i in range(0, n, 200):
            chunk = data[i:i + 200]
            enc = tokenizer([d[key] for d in chunk], add_special_tokens=False, padding=True, return_tensors="pt")
            for row, d in zip(model(**enc).logits, chunk):
                last, io, s = row[d["positions"]["END"]], tid[d["answer"]], tid[d["wrong"]]
                order = "BABA" if d["positions"]["S1"] < d["positions"]["IO"] else "ABBA"
                res[key].append((order, int(last.argmax()) == io, (last[io] - last[s]).item()))
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    clean = res["clean"]
    return {"accuracy": mean([c for _, c, _ in clean]), "logit_diff": mean([d for _, _, d in clean]),
            **{f"accuracy_{o}": mean([c for oo, c, _ in clean if oo == o]) for o in ("BABA", "ABBA")},
            "logit_diff_abc_corrupted": mean([d for _, _, d in res["corrupted"]]), "n_eval": n}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    forms = [template_words(t) for t in ioi.BABA_TEMPLATES + ioi.ABBA_TEMPLATES]
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=CTX, n_embd=args.d_model, n_layer=args.layers,
                     n_head=4, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.steps, pct_start=0.1)
    rng = random.Random(args.seed)
    pad = tokenizer.pad_token_id
    t0 = time.time()
    for step in range(1, args.steps + 1):
        x, ans = batch(rng, args.batch, forms, vocab)
        logits = model(x, attention_mask=(x != pad).long()).logits[:, :-1]
        target = x[:, 1:]
        lm = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=pad)
        rows = torch.arange(len(x))
        answer = F.cross_entropy(logits[rows, ans - 1], target[rows, ans - 1])
        loss = lm + answer
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps:
            print(f"step {step:5d}  lm {lm.item():.3f}  answer {answer.item():.3f}  {time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0
    model.eval()
    metrics = evaluate(model, tokenizer)
    metrics.update(steps=args.steps, batch=args.batch, seed=args.seed, train_seconds=round(train_s, 1),
                   n_layer=args.layers, d_model=args.d_model)
    save_bundle(model, tokenizer, args.out, metrics)


if __name__ == "__main__":
    main()
