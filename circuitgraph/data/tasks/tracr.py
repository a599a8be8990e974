"""Known-answer tasks of the tracr-compiled bundled models (``tracr-frac_prevs``, ``tracr-reverse``, ...).

The examples come from the test set that ``scripts/compile_tracr.py`` saved next to the model
(``tracr.json``: inputs with tracr's own evaluator outputs), so every answer is the RASP program's.
Clean: one input of the program's task length (its maximum, or shorter where the maximum would hide
part of the circuit; BOS is added by the tokenizer); corrupted: another input of the same length.  The metric reads the last position:

- categorical programs (reverse, sort, shift2): ``answer`` is the program's output there,
  ``wrong`` the other output values, so logit_diff is about 1 clean and 0 with every edge
  zero-ablated;
- numerical programs (frac_prevs): the model has one output unit, read as the logit of the token
  named after the program; ``wrong`` is BOS, whose logit is identically 0, so logit_diff is the
  output number itself.

The ground-truth specs (``specs/tracr_<name>.json``) are exact under zero ablation.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import TaskError, make_example, rng_for, tokenizer_name


def program_info(tokenizer) -> dict:
    """The ``tracr.json`` saved beside the tokenizer's model, or TaskError naming what is missing."""
    where = Path(getattr(tokenizer, "name_or_path", "") or ".")
    path = where / "tracr.json"
    if not path.is_file():
        raise TaskError(f"the tracr task needs a tracr-compiled model (its directory holds tracr.json); "
                        f"{tokenizer_name(tokenizer)} has none: use one of the bundled tracr-* models")
    return json.loads(path.read_text())


def generate(tokenizer, n: int, seed: int = 0, length: int | None = None) -> list[dict]:
    """``n`` examples of ``length`` input tokens (default: the program's task length) from the saved test set."""
    info = program_info(tokenizer)
    length = length or info.get("task_length", info["max_seq_len"])
    pool = [t for t in info["tests"] if len(t["input"]) == length and t["expected"][-1] is not None]
    if len(pool) < n:
        raise TaskError(f"the saved tracr-{info['program']} test set has {len(pool)} inputs of length {length}; asked for {n}")
    rng = rng_for(seed)
    chosen = rng.sample(range(len(pool)), n)
    out = []
    for i in chosen:
        t = pool[i]
        other = pool[rng.choice([j for j in range(len(pool)) if j != i])]
        if info["output"] == "categorical":
            answer = str(t["expected"][-1])
            wrong = [w for w in info["output_tokens"] if w != answer]
        else:
            answer, wrong = info["output_tokens"][0], info["bos"]
        ex = make_example(tokenizer, " ".join(t["input"]), " ".join(other["input"]), answer, wrong, {"END": length - 1})
        ex["expected"] = t["expected"]
        out.append(ex)
    return out
