"""Induction: continue a repeated sequence of random tokens.

Clean: ``seq_len`` distinct random words ``a_0 .. a_{k-1}``, then the first ``repeat_len`` (m) of
them again; the answer is the repeat's next word ``a_m``. An induction head at the last position
(``a_{m-1}``, second occurrence) attends to the token after its first occurrence (``a_m`` at
index m) and copies it.

Corrupted: the first ``seq_len`` words are replaced by fresh random words (disjoint from the
clean ones) and the repeated part is kept, so the last word has no earlier occurrence and there
is nothing to copy. ``wrong`` is the corrupted prompt's word at index m (what an induction head
would copy from the corrupted first half at that offset), never the answer.

Positions: ``END`` (last token, ``a_{m-1}``'s second occurrence), ``FIRST`` (index m-1, its first
occurrence) and ``FIRST+1`` (index m: the token the induction head attends to, equal to the
answer). Every word is one token with and without a leading space, so positions are word indices.
"""

from __future__ import annotations

import re

from . import TaskError, encode, give_your_own, make_example, require_single, rng_for, single_token_id, tokenizer_name

_WORD = re.compile(r"[A-Za-z][A-Za-z0-9]+")


def default_vocab(tokenizer, limit: int = 500, scan: int = 20000) -> list[str]:
    """Alphanumeric words that are single tokens both with and without a leading space."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    words = []
    for tid in range(min(len(tokenizer), scan)):
        if tid in special:
            continue
        w = tokenizer.decode([tid]).strip()
        if _WORD.fullmatch(w) and w not in words and single_token_id(tokenizer, w) is not None \
                and single_token_id(tokenizer, " " + w) is not None:
            words.append(w)
            if len(words) >= limit:
                break
    return words


def generate(tokenizer, n: int, seed: int = 0, seq_len: int = 16, repeat_len: int = 8, vocab=None) -> list[dict]:
    """``n`` induction examples of ``seq_len + repeat_len`` tokens each."""
    if not 2 <= repeat_len < seq_len:
        raise TaskError(f"need 2 <= repeat_len < seq_len, got repeat_len={repeat_len}, seq_len={seq_len}")
    if vocab is None:
        vocab = default_vocab(tokenizer)
    else:  # user words: strict single-token check, with and without the leading space
        for w in vocab:
            require_single(tokenizer, w, "vocab word")
            require_single(tokenizer, " " + w, "vocab word")
        vocab = list(dict.fromkeys(vocab))
    if len(vocab) < 2 * seq_len:
        raise TaskError(f"only {len(vocab)} single-token words for this tokenizer ({tokenizer_name(tokenizer)}); "
                        f"induction with seq_len={seq_len} needs {2 * seq_len}: {give_your_own('vocab')}, or a smaller --seq-len")
    rng = rng_for(seed)
    k, m = seq_len, repeat_len
    out = []
    for _ in range(n):
        words = rng.sample(vocab, 2 * k)
        a, b = words[:k], words[k:]
        clean = " ".join(a + a[:m])
        corrupted = " ".join(b + a[:m])
        pos = {"END": k + m - 1, "FIRST": m - 1, "FIRST+1": m}
        ids = encode(tokenizer, clean)
        if len(ids) != k + m:
            raise TaskError(f"{clean!r} is {len(ids)} tokens for this tokenizer ({tokenizer_name(tokenizer)}), "
                            f"expected one token per word ({k + m})")
        out.append(make_example(tokenizer, clean, corrupted, " " + a[m], " " + b[m], pos,
                                expect={"FIRST+1": single_token_id(tokenizer, " " + a[m]),
                                        "FIRST": single_token_id(tokenizer, " " + a[m - 1]),
                                        "END": single_token_id(tokenizer, " " + a[m - 1])}))
    return out
