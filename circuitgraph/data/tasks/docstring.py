"""Docstring (Heimersheim & Janiak 2023, "A circuit for Python docstrings").

    def port(self, load, size, files, last):
        \"\"\"oil column piece

        :param load: crime population
        :param size: unit dark
        :param

-> " files": the next argument of the def that the docstring has not described yet.

Corruption (the paper's ``random_def``): the def's argument names are replaced by fresh random
words, the docstring is kept, so the answer can no longer be read off the def. ``wrong`` is the
corrupted def's third argument (what the model should say on the corrupted prompt).

Positions: ``A_def``, ``B_def``, ``C_def`` (the first three arguments in the def), ``A_doc``,
``B_doc`` (their ``:param`` mentions in the docstring) and ``END`` (the last token, "param").
"""

from __future__ import annotations

import re

from . import (TaskError, encode, fill, make_example, pick_words, rng_for, single_token_id, token_index, tokenizer_name,
               unknown_words)

DEF = "def [F](self, [A], [B], [C], [D]):\n"
DOC = '    """[W1] [W2] [W3]\n\n    :param [A]: [W4] [W5]\n    :param [B]: [W6] [W7]\n    :param'
TEMPLATE = DEF + DOC
WORDS = [
    "load", "size", "files", "last", "port", "oil", "column", "piece", "crime", "population", "unit", "dark",
    "image", "name", "data", "key", "value", "user", "text", "line", "table", "field", "group", "order", "state",
    "title", "model", "style", "shape", "page", "token", "block", "check", "count", "limit", "mode", "node",
    "path", "query", "range", "score", "sort", "source", "target", "time", "type", "word", "year", "house",
    "money", "water", "music", "voice", "light", "color", "sound", "heart", "night", "paper", "market", "plant",
    "river", "storm", "glass", "stone", "metal", "field", "horse", "train", "track", "ball", "game", "team",
    "card", "door", "room", "wall", "window", "tree", "road", "city", "country", "world", "party", "story",
    "play", "movie", "song", "book", "letter", "number", "point", "level", "scale", "frame", "panel", "layer",
]


def generate(tokenizer, n: int, seed: int = 0, words=None) -> list[dict]:
    """``n`` docstring examples; ``words`` supplies function, argument and description words."""
    fixed = re.sub(r"\[[A-Z0-9_]+\]", " ", TEMPLATE)
    if unknown_words(tokenizer, fixed):
        raise TaskError(f"the docstring task's code template (def, self, :param, quotes) has text this tokenizer "
                        f"({tokenizer_name(tokenizer)}) maps to its unknown token, so no word list can fix it: "
                        "make the data for a model with a tokenizer for code (e.g. gpt2)")
    words = pick_words(tokenizer, words, list(dict.fromkeys(WORDS)), "words", minimum=16)
    rng = rng_for(seed)
    out = []
    for _ in range(n):
        w = rng.sample(words, 16)
        vals = {"F": w[0], "A": w[1], "B": w[2], "C": w[3], "D": w[4], **{f"W{i}": w[8 + i] for i in range(1, 8)}}
        clean, starts = fill(TEMPLATE, vals)
        # random_def: fresh argument names in the def (w[5..8]), the docstring unchanged
        corrupted = fill(DEF, {**vals, "A": w[5], "B": w[6], "C": w[7], "D": w[8]})[0] + fill(DOC, vals)[0]
        pos = {"A_def": token_index(tokenizer, clean, starts["A"][0]),
               "B_def": token_index(tokenizer, clean, starts["B"][0]),
               "C_def": token_index(tokenizer, clean, starts["C"][0]),
               "A_doc": token_index(tokenizer, clean, starts["A"][1]),
               "B_doc": token_index(tokenizer, clean, starts["B"][1]),
               "END": len(encode(tokenizer, clean)) - 1}
        out.append(make_example(tokenizer, clean, corrupted, " " + vals["C"], " " + w[7], pos,
                                expect={"C_def": single_token_id(tokenizer, " " + vals["C"]),
                                        "A_doc": single_token_id(tokenizer, " " + vals["A"])}))
    return out
