"""Train the bundled ``toy-induction`` model: a 2-layer GPT-2 that continues repeated random tokens.

Deterministic (seeded, CPU, 2 threads); about two minutes. It writes the model, its word-level
tokenizer ("t0".."t63" plus <unk>/<pad>/<bos>/<eos>) and metrics.json to
circuitgraph/bundled/toy-induction/. After training it finds, from attention patterns, the
layer-0 previous-token heads and the layer-1 induction heads, and records them with their
scores so tests and notebooks can check them.

    python scripts/train_toy_induction.py [--out DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from _bundle import save_bundle
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

SEED = 0
N_WORDS = 64
SPECIALS = ["<unk>", "<pad>", "<bos>", "<eos>"]
CTX = 64  # n_positions; training sequences use the full context
OUT = Path(__file__).resolve().parents[1] / "circuitgraph" / "bundled" / "toy-induction"


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + [f"t{i}" for i in range(N_WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", model_max_length=CTX)


def batch(rng: random.Random, size: int, periodic: float = 0.9) -> torch.Tensor:
    """Random words with repeats; half the rows start with <bos>.

    A ``periodic`` share of rows is one random segment repeated to the end (many induction
    targets: a strong signal, so induction heads form early); the others are random words with
    one or two copied segments at random places (text that is mostly not a repeat).
    """
    first, rows = len(SPECIALS), []
    for _ in range(size):
        row = [rng.randrange(first, first + N_WORDS) for _ in range(CTX)]
        start = int(rng.random() < 0.5)
        if start:
            row[0] = SPECIALS.index("<bos>")
        if rng.random() < periodic:
            n = rng.randint(4, CTX // 2)
            row[start:] = (row[start:start + n] * CTX)[: CTX - start]
        else:
            for _ in range(rng.randint(1, 2)):
                n = rng.randint(4, 24)
                a = rng.randint(start, CTX - 2 * n)
                b = rng.randint(a + n, CTX - n)
                row[b:b + n] = row[a:a + n]
        rows.append(row)
    return torch.tensor(rows)


def repeated(gen: torch.Generator, size: int, k: int) -> torch.Tensor:
    """``k`` distinct random words, then the same ``k`` again: the evaluation format."""
    first = len(SPECIALS)
    a = torch.stack([torch.randperm(N_WORDS, generator=gen)[:k] for _ in range(size)]) + first
    return torch.cat([a, a], dim=1)


@torch.no_grad()
def evaluate(model, gen: torch.Generator, size: int = 200, k: int = 24) -> dict:
    """Loss on the first half vs the repeat, and per-head prev-token / induction attention scores.

    first-half loss: predicting words 1..k-1; repeat loss: predicting words k+1..2k-1 (the first
    repeated word cannot be predicted). Prev-token score of a layer-0 head: mean attention from
    position i to i-1. Induction score of a layer-1 head: mean attention from the second occurrence
    at i >= k to the word after the first occurrence, i - k + 1.
    """
    x = repeated(gen, size, k)
    out = model(x, output_attentions=True)
    nll = F.cross_entropy(out.logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")  # [B, 2k-1]
    att0, att1 = out.attentions[0], out.attentions[1]  # [B, H, T, T]
    idx = torch.arange(1, 2 * k)
    prev = att0[:, :, idx, idx - 1].mean(dim=(0, 2))
    q = torch.arange(k, 2 * k)
    ind = att1[:, :, q, q - k + 1].mean(dim=(0, 2))
    return {"loss_first_half": nll[:, : k - 1].mean().item(), "loss_repeat_half": nll[:, k:].mean().item(),
            "repeat_accuracy": (out.logits[:, k:-1].argmax(-1) == x[:, k + 1:]).float().mean().item(),
            "prev_token_scores": {f"a0.h{h}": round(s.item(), 4) for h, s in enumerate(prev)},
            "induction_scores": {f"a1.h{h}": round(s.item(), 4) for h, s in enumerate(ind)}}


@torch.no_grad()
def repeat_loss_without(model, x: torch.Tensor, heads: list[int], port: str) -> float:
    """Repeat-half loss with the layer-0 ``heads``' direct outputs removed from layer 1's ``port``
    (q, k or v) input only. A large rise for k, not q or v, means the induction heads find their
    target through K-composition with the previous-token heads."""
    blocks, d = model.transformer.h, model.config.n_embd
    dh, W = d // model.config.n_head, blocks[0].attn.c_proj.weight  # Conv1D weight: [in, out]
    saved = {}

    def splice(mod, args, out):
        if saved.get("inner"):
            return out
        removed = sum(saved["z"][..., h * dh:(h + 1) * dh] @ W[h * dh:(h + 1) * dh] for h in heads)
        saved["inner"] = True
        alt = mod(blocks[1].ln_1(saved["resid"] - removed))
        saved["inner"] = False
        i = "qkv".index(port)
        out = out.clone()
        out[..., i * d:(i + 1) * d] = alt[..., i * d:(i + 1) * d]
        return out

    hooks = [blocks[0].attn.c_proj.register_forward_pre_hook(lambda m, a: saved.__setitem__("z", a[0])),
             blocks[1].register_forward_pre_hook(lambda m, a: saved.__setitem__("resid", a[0])),
             blocks[1].attn.c_attn.register_forward_hook(splice)]
    try:
        logits = model(x).logits
    finally:
        for h in hooks:
            h.remove()
    k = x.shape[1] // 2
    return F.cross_entropy(logits[:, k:-1].transpose(1, 2), x[:, k + 1:]).item()


def pick_heads(scores: dict[str, float], floor: float = 0.3) -> list[str]:
    """Heads scoring at least ``floor`` and at least half the best head's score."""
    best = max(scores.values())
    return [h for h, s in scores.items() if s >= floor and s >= 0.5 * best]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--periodic", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--tied", action="store_true", help="tie the unembedding to the embedding (GPT-2's default)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=CTX, n_embd=64, n_layer=2, n_head=args.heads, n_inner=4,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     tie_word_embeddings=args.tied)
    model = GPT2LMHeadModel(cfg)
    # attention-only: the GPT-2 architecture has MLPs, so they are zeroed and frozen (output exactly 0),
    # which leaves the induction mechanism to the heads, as in Olsson et al.'s attention-only models
    for block in model.transformer.h:
        for p in block.mlp.parameters():
            p.requires_grad_(False).zero_()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    rng = random.Random(args.seed)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        x = batch(rng, args.batch, args.periodic)
        logits = model(x).logits
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0
    model.eval().set_attn_implementation("eager")  # attention weights are only returned by eager
    metrics = evaluate(model, torch.Generator().manual_seed(SEED + 1))
    metrics["prev_token_heads"] = pick_heads(metrics["prev_token_scores"])
    metrics["induction_heads"] = pick_heads(metrics["induction_scores"])
    x = repeated(torch.Generator().manual_seed(SEED + 2), 200, 24)
    prev = [int(h.split(".h")[1]) for h in metrics["prev_token_heads"]]
    metrics["loss_repeat_half_prev_token_heads_removed_from"] = {
        port: round(repeat_loss_without(model, x, prev, port), 4) for port in "qkv"}
    metrics.update(steps=args.steps, batch=args.batch, lr=args.lr, periodic=args.periodic, seed=args.seed, train_seconds=round(train_s, 1))
    save_bundle(model, tokenizer, args.out, metrics)


if __name__ == "__main__":
    main()
