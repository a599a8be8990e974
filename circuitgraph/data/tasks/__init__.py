"""Dataset generators for the classic circuit tasks, in the JSONL format of docs/contract.md.

Every generator is ``generate(tokenizer, n, seed=0, **options) -> list[dict]`` and returns
examples ``{"clean", "corrupted", "answer", "wrong", "positions"}``. Positions count the tokens of
the text itself (``tokenizer(text, add_special_tokens=False)``, 0-based). Generators filter
their built-in word lists down to words that are one token for the given tokenizer, and raise
:class:`TaskError` when an answer would not be a single token or too few words remain, so a
dataset is never silently wrong for the model it is made for.

The shared helpers live here, above the task imports, so each task module can use them.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence


class TaskError(ValueError):
    """A dataset cannot be generated for this tokenizer (the message names the word)."""


def give_your_own(option: str, what: str = "words") -> str:
    """How to pass an option, said for both the command line and Python."""
    return f"give your own {what} with --{option.replace('_', '-')} on the command line ({option}=[...] in Python)"


# ---------------------------------------------------------------- tokenizer helpers


def tokenizer_name(tokenizer) -> str:
    """The model name a tokenizer came from; a bundled model's short name rather than its path."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    bundled = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bundled")
    return os.path.basename(name.rstrip(os.sep)) if os.path.dirname(os.path.abspath(name)) == bundled else name


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of the text itself, as positions count them (no special tokens)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def single_token_id(tokenizer, word: str) -> int | None:
    """The word's token id if it is exactly one known token (not the unknown token), else None."""
    ids = encode(tokenizer, word)
    if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
        return None
    return ids[0]


def require_single(tokenizer, word: str, role: str) -> int:
    """Id of a word that must be one token; TaskError naming the word otherwise."""
    tid = single_token_id(tokenizer, word)
    if tid is None:
        ids = encode(tokenizer, word)
        what = "the unknown token" if len(ids) == 1 else f"{len(ids)} tokens"
        raise TaskError(f"{role} {word!r} is {what} for this tokenizer ({tokenizer_name(tokenizer)}); "
                        f"every answer and wrong word must be exactly one token")
    return tid


def single_token_words(tokenizer, words: Iterable[str], prefix: str = " ") -> list[str]:
    """The words (order kept) whose ``prefix + word`` is one known token."""
    return [w for w in words if single_token_id(tokenizer, prefix + w) is not None]


def pick_words(tokenizer, words: Sequence[str] | None, builtin: Sequence[str], what: str,
               minimum: int, prefix: str = " ") -> list[str]:
    """User-given words must all be single tokens; the built-in list is filtered instead."""
    if words is not None:
        for w in words:
            require_single(tokenizer, prefix + w, what.rstrip("s"))
        kept = list(dict.fromkeys(words))
    else:
        kept = single_token_words(tokenizer, builtin, prefix)
    if len(kept) < minimum:
        raise TaskError(f"only {len(kept)} {what} are single tokens for this tokenizer "
                        f"({tokenizer_name(tokenizer)}); need at least {minimum} distinct ones: "
                        f"{give_your_own(what, what)}")
    return kept


def unknown_words(tokenizer, text: str) -> bool:
    """Does the text hold a word this tokenizer maps to its unknown token?"""
    unk = getattr(tokenizer, "unk_token_id", None)
    return unk is not None and unk in encode(tokenizer, text)


def token_index(tokenizer, text: str, char: int) -> int:
    """Index of the token that holds character ``char`` of ``text`` (no special tokens)."""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for i, (_, end) in enumerate(offsets):
            if end > char:
                return i
        raise TaskError(f"character {char} of {text!r} is past the last token")
    prefix = text[:char]
    if prefix.endswith(" "):  # the space belongs to the word's token in GPT-2-style BPE
        prefix = prefix[:-1]
    return len(encode(tokenizer, prefix))


def fill(template: str, values: dict[str, str]) -> tuple[str, dict[str, list[int]]]:
    """Fill ``[SLOT]`` placeholders; also return each slot's character starts, in order."""
    out, starts, last = [], {}, 0
    for m in re.finditer(r"\[([A-Z_][A-Z0-9_]*)\]", template):
        out.append(template[last:m.start()])
        starts.setdefault(m.group(1), []).append(sum(map(len, out)))
        out.append(values[m.group(1)])
        last = m.end()
    out.append(template[last:])
    return "".join(out), starts


def make_example(tokenizer, clean: str, corrupted: str, answer, wrong,
                 positions: dict[str, int], expect: dict[str, int] | None = None, template: str | None = None) -> dict:
    """Check lengths (and the token ids ``expect`` names at positions), then build the dict; ``template``
    names the template the row was filled from (``discover --bootstrap --by-template`` resamples by it)."""
    ids, cids = encode(tokenizer, clean), encode(tokenizer, corrupted)
    if len(ids) != len(cids):
        raise TaskError(f"clean and corrupted tokenize to {len(ids)} and {len(cids)} tokens for this tokenizer "
                        f"({tokenizer_name(tokenizer)}): {clean!r} / {corrupted!r}")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and (unk in ids or unk in cids):
        raise TaskError(f"{clean!r} has words this tokenizer ({tokenizer_name(tokenizer)}) does not know")
    for name, tid in (expect or {}).items():
        if ids[positions[name]] != tid:
            raise TaskError(f"position {name}={positions[name]} of {clean!r} is not the expected token "
                            f"for this tokenizer ({tokenizer_name(tokenizer)}); the word merges with its neighbours")
    row = {"clean": clean, "corrupted": corrupted, "answer": answer, "wrong": wrong, "positions": positions}
    return row if template is None else {**row, "template": template}


def rng_for(seed: int) -> random.Random:
    """The generators' one source of randomness, so a seed gives the same dataset everywhere."""
    return random.Random(seed)


# ---------------------------------------------------------------- registry

from . import docstring, greater_than, induction, ioi, tracr  # noqa: E402  (they use the helpers above)


@dataclass(frozen=True)
class Task:
    """A registered task: its generator, the metric it is meant for and a one-line description."""

    name: str
    generate: Callable[..., list[dict]]
    metric: str
    description: str


TASKS: dict[str, Task] = {
    "ioi": Task("ioi", ioi.generate, "logit_diff", "indirect object identification (Wang et al. 2022)"),
    "greater-than": Task("greater-than", greater_than.generate, "prob_diff", "year comparison (Hanna et al. 2023)"),
    "induction": Task("induction", induction.generate, "logit_diff", "repeated random tokens"),
    "docstring": Task("docstring", docstring.generate, "logit_diff", "next :param name (Heimersheim & Janiak 2023)"),
    "tracr": Task("tracr", tracr.generate, "logit_diff", "a tracr-compiled RASP program's output (bundled tracr-* models)"),
}


def get_task(name: str) -> Task:
    """The registered task called ``name``, or a :class:`TaskError` listing the valid ones."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


# Options the generators take (beyond n and seed), as the command line offers them: (tasks, kind, help).
OPTIONS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "names": (("ioi",), "words", "names, each one token with a leading space"),
    "places": (("ioi",), "words", "places for [PLACE]"),
    "objects": (("ioi",), "words", "objects for [OBJECT]"),
    "templates": (("ioi",), "words", "BABA templates: [B] subject, [A] indirect object, ending in ' [A]'"),
    "corruption": (("ioi",), "choice", "abc (default) or s2_flip"),
    "nouns": (("greater-than",), "words", "nouns for 'The [NOUN] lasted from the year ...'"),
    "century": (("greater-than",), "text", "the century's two digits (default 17)"),
    "vocab": (("induction",), "words", "words to repeat, each one token with and without a leading space"),
    "seq_len": (("induction",), "int", "length of the random sequence (default 16)"),
    "repeat_len": (("induction",), "int", "length of its repeat (default 8)"),
    "words": (("docstring",), "words", "function, argument and description words"),
}


def make_data(task_name: str, tokenizer, n: int, seed: int = 0, **options) -> list[dict]:
    """``n`` examples of a named task for this tokenizer."""
    task = get_task(task_name)
    for name in options:
        if name in OPTIONS and task_name not in OPTIONS[name][0]:
            raise TaskError(f"option {name} (--{name.replace('_', '-')}) applies to {', '.join(OPTIONS[name][0])}, not {task_name}")
    return task.generate(tokenizer, n, seed=seed, **options)


def write_jsonl(examples: Iterable[dict], path: str | os.PathLike) -> None:
    """Write examples as JSONL, one object a line (UTF-8, non-ASCII kept as is)."""
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")


__all__ = ["OPTIONS", "TASKS", "Task", "TaskError", "get_task", "make_data", "write_jsonl"]
