"""Indirect object identification (Wang et al. 2022, "Interpretability in the Wild").

"When Mary and John went to the store, John gave a drink to" -> " Mary" (the indirect object,
IO), not " John" (the subject, S). Templates, names, places and objects are the paper's. Both
orders are generated: BABA (S1 before IO) and ABBA (IO before S1).

Corruptions: ``"abc"`` (default, the paper's ABC distribution: IO, S1 and S2 replaced by three
fresh distinct names, so no name is repeated and lengths stay equal) and ``"s2_flip"`` (S2
becomes the IO name, so the repeated name, and the answer, switch).

Positions: ``IO``, ``S1``, ``S1+1`` (the token after S1), ``S2`` and ``END`` (last token).
"""

from __future__ import annotations

import re

from . import (TaskError, fill, give_your_own, make_example, pick_words, require_single, rng_for, token_index,
               tokenizer_name, unknown_words)

# The paper's BABA templates ([B] is the subject, [A] the indirect object); ABBA swaps the first pair.
BABA_TEMPLATES = [
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
]


def abba(template: str) -> str:
    """The ABBA form of a BABA template (IO named before S1)."""
    return template.replace("[B] and [A]", "[A] and [B]", 1)


ABBA_TEMPLATES = [abba(t) for t in BABA_TEMPLATES]

NAMES = [
    "Michael", "Christopher", "Jessica", "Matthew", "Ashley", "Jennifer", "Joshua", "Amanda", "Daniel",
    "David", "James", "Robert", "John", "Joseph", "Andrew", "Ryan", "Brandon", "Jason", "Justin", "Sarah",
    "William", "Jonathan", "Stephanie", "Brian", "Nicole", "Nicholas", "Anthony", "Heather", "Eric",
    "Elizabeth", "Adam", "Megan", "Melissa", "Kevin", "Steven", "Thomas", "Timothy", "Christina", "Kyle",
    "Rachel", "Laura", "Lauren", "Amber", "Brittany", "Danielle", "Richard", "Kimberly", "Jeffrey", "Amy",
    "Crystal", "Michelle", "Tiffany", "Jeremy", "Benjamin", "Mark", "Emily", "Aaron", "Charles", "Rebecca",
    "Jacob", "Stephen", "Patrick", "Sean", "Erin", "Jamie", "Kelly", "Samantha", "Nathan", "Sara", "Dustin",
    "Paul", "Angela", "Tyler", "Scott", "Katherine", "Andrea", "Gregory", "Erica", "Mary", "Travis", "Lisa",
    "Kenneth", "Bryan", "Lindsey", "Kristen", "Jose", "Alexander", "Jesse", "Katie", "Lindsay", "Shannon",
    "Vanessa", "Courtney", "Christine", "Alicia", "Cody", "Allison", "Bradley", "Samuel",
]
PLACES = ["store", "garden", "restaurant", "school", "hospital", "office", "house", "station"]
OBJECTS = ["ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack"]

CORRUPTIONS = ("abc", "s2_flip")


def prompt_template(template: str) -> str:
    """The template without its final answer slot: the prompt ends just before the IO name."""
    if not template.endswith(" [A]") or template.count("[B]") != 2 or template.count("[A]") != 2:
        raise TaskError(f"IOI template {template!r} must name the subject [B] twice and the indirect object [A] "
                        "twice, and end with ' [A]'")
    return template[: -len(" [A]")]


def _usable_templates(tokenizer, templates):
    """Drop templates whose fixed words are unknown to a word-level tokenizer."""
    return [t for t in templates if not unknown_words(tokenizer, re.sub(r"\[[A-Z_]+\]", " ", t))]


def generate(tokenizer, n: int, seed: int = 0, corruption: str = "abc", names=None, places=None,
             objects=None, templates=None, orders=("BABA", "ABBA")) -> list[dict]:
    """``n`` IOI examples; ``templates`` are BABA-form strings ending in ``' [A]'``."""
    if corruption not in CORRUPTIONS:
        raise TaskError(f"unknown IOI corruption {corruption!r}; choose one of {', '.join(CORRUPTIONS)}")
    for t in templates or ():
        prompt_template(t)
    baba = _usable_templates(tokenizer, templates or BABA_TEMPLATES)
    if not baba:
        raise TaskError(f"no IOI template uses only words this tokenizer ({tokenizer_name(tokenizer)}) knows; "
                        f"{give_your_own('templates', 'BABA templates')}, e.g. '[B] and [A] went home. [B] spoke to [A]' "
                        "in words it knows")
    names = pick_words(tokenizer, names, NAMES, "names", minimum=5)
    places = pick_words(tokenizer, places, PLACES, "places", minimum=1) if any("[PLACE]" in t for t in baba) else [""]
    objects = pick_words(tokenizer, objects, OBJECTS, "objects", minimum=1) if any("[OBJECT]" in t for t in baba) else [""]
    forms = []
    for order in orders:
        if order not in ("BABA", "ABBA"):
            raise TaskError(f"unknown IOI order {order!r}; use 'BABA' and/or 'ABBA'")
        forms += [(order, t if order == "BABA" else abba(t)) for t in baba]
    rng = rng_for(seed)
    out = []
    for _ in range(n):
        order, template = rng.choice(forms)
        t = prompt_template(template)
        io, s, *fresh = rng.sample(names, 5)
        place, obj = rng.choice(places), rng.choice(objects)
        clean, starts = fill(t, {"A": io, "B": s, "PLACE": place, "OBJECT": obj})
        if corruption == "abc":  # IO, S1 and S2 all become different fresh names
            t_abc = t.replace("[B]", "[C]", 1).replace("[B]", "[D]", 1).replace("[A]", "[B]", 1)
            corrupted, _ = fill(t_abc, {"B": fresh[0], "C": fresh[1], "D": fresh[2], "PLACE": place, "OBJECT": obj})
        else:  # s2_flip: the second subject mention becomes the IO name
            corrupted = clean[: starts["B"][1]] + io + clean[starts["B"][1] + len(s):]
        pos = {name: token_index(tokenizer, clean, char) for name, char in
               (("IO", starts["A"][0]), ("S1", starts["B"][0]), ("S2", starts["B"][1]))}
        pos["S1+1"] = pos["S1"] + 1
        pos["END"] = len(tokenizer(clean, add_special_tokens=False)["input_ids"]) - 1
        pos = {k: pos[k] for k in ("IO", "S1", "S1+1", "S2", "END")}
        io_id = require_single(tokenizer, " " + io, "answer")
        s_id = require_single(tokenizer, " " + s, "wrong")
        out.append(make_example(tokenizer, clean, corrupted, " " + io, " " + s, pos,
                                expect={"IO": io_id, "S1": s_id, "S2": s_id}, template=t))
    return out
