"""Greater-than (Hanna et al. 2023, "How does GPT-2 compute greater-than?").

"The war lasted from the year 1732 to the year 17" -> a two-digit year token greater than 32.
``answer`` lists the two-digit tokens "YY+1".."99", ``wrong`` lists "00".."YY"; the metric is the
probability difference (sum of p over answers minus sum over wrong). The corrupted prompt uses
the year 1701, where nearly every continuation is correct, as in the paper.

This relies on the GPT-2-style BPE split " 1732" = " 17" + "32" with every two-digit string one
token; start years whose split differs are skipped, and a tokenizer that does not split years
this way at all raises TaskError.

Positions: ``NOUN``, ``YY`` (the start year's two-digit token) and ``END`` (the final " 17").
"""

from __future__ import annotations

from . import (TaskError, encode, fill, make_example, pick_words, require_single, rng_for, single_token_id, token_index,
               tokenizer_name)

TEMPLATE = "The [NOUN] lasted from the year [XX][YY] to the year [XX]"
NOUNS = [
    "abduction", "accord", "affair", "agreement", "appraisal", "assaults", "assessment", "attack", "attempts",
    "campaign", "captivity", "case", "challenge", "chaos", "clash", "collaboration", "coma", "competition",
    "confrontation", "consequence", "conspiracy", "construction", "consultation", "contact", "contract",
    "convention", "cooperation", "custody", "deal", "decline", "decrease", "demonstrations", "development",
    "disagreement", "disorder", "dispute", "domination", "dynasty", "effect", "effort", "employment",
    "endeavor", "engagement", "epidemic", "evaluation", "exchange", "existence", "expansion", "expedition",
    "experiments", "fall", "fame", "flights", "friendship", "growth", "hardship", "hostility", "illness",
    "impact", "imprisonment", "improvement", "incarceration", "increase", "insurgency", "invasion",
    "investigation", "journey", "kingdom", "marriage", "modernization", "negotiation", "notoriety",
    "obstruction", "operation", "order", "outbreak", "outcome", "overhaul", "patrols", "pilgrimage", "plague",
    "plan", "practice", "process", "program", "progress", "project", "pursuit", "quest", "raids", "reforms",
    "reign", "relationship", "retaliation", "riot", "rise", "rivalry", "romance", "rule", "sanctions", "shift",
    "siege", "slump", "stature", "stint", "strikes", "study", "test", "testing", "tests", "therapy", "tour",
    "tradition", "treaty", "trial", "trip", "unemployment", "voyage", "warfare", "work", "war",
]
CORRUPT_YY = "01"


def _splits(tokenizer, century_id: int, century: str, yy: str, yy_id: int) -> bool:
    """Does " {century}{yy}" tokenize as " {century}" + "{yy}"?"""
    return encode(tokenizer, f" {century}{yy}") == [century_id, yy_id]


def generate(tokenizer, n: int, seed: int = 0, nouns=None, century: str = "17") -> list[dict]:
    """``n`` greater-than examples with start years ``{century}02`` .. ``{century}98``."""
    two_digit = [f"{y:02d}" for y in range(100)]
    missing = [w for w in [" " + century, *two_digit] if single_token_id(tokenizer, w) is None]
    if missing:
        raise TaskError(f"greater-than needs GPT-2-style year tokens (' {century}32' = ' {century}' + '32', every "
                        f"two-digit string one token); this tokenizer ({tokenizer_name(tokenizer)}) has no single "
                        f"token for {', '.join(repr(w) for w in missing[:3])}{' ...' if len(missing) > 3 else ''}, "
                        "so no option can fix it: make the data for a model with such a tokenizer (e.g. gpt2)")
    century_id = require_single(tokenizer, " " + century, "century")
    ids = {yy: require_single(tokenizer, yy, "year") for yy in two_digit}
    if not _splits(tokenizer, century_id, century, CORRUPT_YY, ids[CORRUPT_YY]):
        raise TaskError(f"the year ' {century}{CORRUPT_YY}' is {len(encode(tokenizer, f' {century}{CORRUPT_YY}'))} "
                        f"tokens for this tokenizer ({tokenizer_name(tokenizer)}), not ' {century}' + '{CORRUPT_YY}'; "
                        "greater-than needs GPT-2-style year tokens")
    years = [yy for yy in two_digit[2:99] if _splits(tokenizer, century_id, century, yy, ids[yy])]
    if len(years) < 10:
        raise TaskError(f"only {len(years)} start years ' {century}YY' split into ' {century}' + 'YY' for this "
                        f"tokenizer ({tokenizer_name(tokenizer)}); greater-than needs GPT-2-style year tokens")
    nouns = pick_words(tokenizer, nouns, NOUNS, "nouns", minimum=1)
    rng = rng_for(seed)
    out = []
    for _ in range(n):
        noun, yy = rng.choice(nouns), rng.choice(years)
        clean, starts = fill(TEMPLATE, {"NOUN": noun, "XX": century, "YY": yy})
        corrupted, _ = fill(TEMPLATE, {"NOUN": noun, "XX": century, "YY": CORRUPT_YY})
        end = len(encode(tokenizer, clean)) - 1
        pos = {"NOUN": token_index(tokenizer, clean, starts["NOUN"][0]),
               "YY": token_index(tokenizer, clean, starts["YY"][0]), "END": end}
        y = int(yy)
        out.append(make_example(tokenizer, clean, corrupted, two_digit[y + 1:], two_digit[: y + 1], pos,
                                expect={"YY": ids[yy], "END": century_id}))
    return out
