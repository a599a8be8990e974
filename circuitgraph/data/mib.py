"""MIB's circuit-track datasets (``mib-bench/*`` on the HuggingFace hub) as our JSONL rows.

The pairing follows MIB's own loader, ``HFEAPDataset`` in ``MIB_circuit_track/dataset.py`` of
hannamw/MIB-circuit-track (what ``run_attribution.py`` and ``run_evaluation.py`` feed to the
logit-difference metric of ``MIB_circuit_track/metrics.py``):

* ``ioi``: clean ``prompt``; corrupted = the counterfactual's ``prompt`` (default
  ``s2_io_flip_counterfactual``); answer ``" " + metadata.indirect_object``, wrong
  ``" " + metadata.subject`` -- both from the *clean* row, whichever counterfactual is used.
  Rows whose indirect object, subject and ``metadata.random_c`` are not the same number of tokens
  are dropped.
* ``mcqa`` (config ``4_answer_choices``), ``arc_easy``, ``arc_challenge``: answer
  ``choices.label[answerKey]``; corrupted = the counterfactual's ``prompt`` (default
  ``symbol_counterfactual``) and wrong = *its* ``choices.label[answerKey]``.  Rows whose two labels
  are not the same number of tokens are dropped.
* ``arithmetic_addition`` / ``arithmetic_subtraction``: answer ``str(label)``; corrupted = the
  ``random_counterfactual`` prompt, wrong = ``str(its label)``.  Rows are kept only when their
  ``operator`` is the task's (``+`` / ``-``), the counterfactual and its prompt exist, and both
  labels are one token.

Where a kept answer is several tokens MIB scores its first token; so do these rows (the first
token written as text, checked to turn back into that token).  MIB's evaluation puts a BOS token
first (TransformerLens ``to_tokens(prepend_bos=True)``): evaluate such rows with ``--prepend-bos``.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from circuitgraph.data.dataset import DataError, parse_json
from circuitgraph.errors import CircuitWarning


@dataclass(frozen=True)
class MibTask:
    """Where MIB's scripts read one task's rows from and how its answers are encoded."""

    hub: str  # the hub dataset MIB's scripts read (``mib-bench/{TASKS_TO_HF_NAMES[task]}``)
    config: str | None  # the dataset config MIB asks for
    counterfactual: str  # the counterfactual MIB pairs with the clean prompt by default
    kind: str  # "ioi", "choice" or "arithmetic": which fields give the answers


TASKS: dict[str, MibTask] = {
    "ioi": MibTask("mib-bench/ioi", None, "s2_io_flip_counterfactual", "ioi"),
    "mcqa": MibTask("mib-bench/copycolors_mcqa", "4_answer_choices", "symbol_counterfactual", "choice"),
    "arithmetic_addition": MibTask("mib-bench/arithmetic_addition", None, "random_counterfactual", "arithmetic"),
    "arithmetic_subtraction": MibTask("mib-bench/arithmetic_subtraction", None, "random_counterfactual", "arithmetic"),
    "arc_easy": MibTask("mib-bench/arc_easy", None, "symbol_counterfactual", "choice"),
    "arc_challenge": MibTask("mib-bench/arc_challenge", None, "symbol_counterfactual", "choice"),
}
OPERATORS = {"arithmetic_addition": "+", "arithmetic_subtraction": "-"}  # HFEAPDataset's example_domain
SUFFIXES = (".jsonl", ".json", ".parquet")


def mib_task(name: str) -> str:
    """MIB's task name (``arc_easy``) from either spelling MIB uses (``arc-easy`` in folder names)."""
    key = str(name).strip().lower().replace("-", "_")
    if key not in TASKS:
        raise DataError(f"unknown MIB task '{name}'; expected one of {', '.join(TASKS)}")
    return key


# ----- reading the source rows ------------------------------------------------------------
def _local_rows(path: Path) -> list[tuple[str, object]]:
    """(where, row) for each row of a JSONL, JSON or parquet file in the hub dataset's schema."""
    if path.is_dir():
        raise DataError(f"'{path}' is a directory; give one data file of the dataset ({', '.join(SUFFIXES)})")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"'{path}': unsupported file type '{suffix or '(none)'}'; expected {', '.join(SUFFIXES)} "
                        f"(the hub dataset's schema) or a hub name like mib-bench/ioi")
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"reading '{path}' needs pyarrow: pip install pyarrow") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 -- pyarrow's own errors, said in one line
            raise DataError(f"'{path}' is not a readable parquet file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        return [(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist(), start=1)]
    from circuitgraph.data.dataset import _lines

    lines = _lines(path)
    text = "\n".join(t for _, t in lines).lstrip()
    if suffix == ".json" and text.startswith("["):  # a JSON list of rows; otherwise JSON Lines (HF's to_json)
        try:
            rows = parse_json(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except ValueError as e:
            raise DataError(f"{path}: {e}") from None
        return [(f"{path} row {i}", row) for i, row in enumerate(rows, start=1)]
    out = []
    for i, line in lines:
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{i}", parse_json(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        except ValueError as e:
            raise DataError(f"{path}:{i}: {e}") from None
    return out


def _hub_rows(name: str, config: str | None, split: str) -> list[tuple[str, object]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading '{name}' from the HuggingFace hub needs the datasets library: pip install datasets "
                        f"(or give a downloaded .parquet/.jsonl file of it)") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 -- network, auth and naming errors, said in one line
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise DataError(f"could not load '{name}'{f' ({config})' if config else ''} split '{split}' from the hub: {first}") from None
    label = f"{name} ({split})"
    return [(f"{label} row {i}", row) for i, row in enumerate(ds, start=1)]


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def read_mib_source(source, task: str, split: str = "train", config: str | None = None) -> tuple[str, list[tuple[str, object]]]:
    """(name, rows) of a local file, or of a hub dataset (``source=None``: the task's own)."""
    info = TASKS[mib_task(task)]
    if source is None:
        source = info.hub
    path = Path(source)
    if path.exists():
        return str(path), _local_rows(path)
    text = str(source)
    if path.suffix.lower() in SUFFIXES or not _HUB_NAME.match(text):
        raise DataError(f"MIB data file '{text}' does not exist (give a {'/'.join(s[1:] for s in SUFFIXES)} file "
                        f"or a hub dataset name such as {info.hub})")
    if config is None and text == info.hub:
        config = info.config
    return text, _hub_rows(text, config, split)


# ----- one row ----------------------------------------------------------------------------
_MISSING = object()


def _field(row, dotted: str, where: str, kind=str):
    """``row['a']['b']`` for ``dotted = 'a.b'``, checked to be ``kind``; the error names the field."""
    value = row
    for part in dotted.split("."):
        value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING:
            raise DataError(f"{where}: missing field '{dotted}' (expected MIB's hub schema for this task)")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise DataError(f"{where}: field '{dotted}' = {value!r}; expected an integer index")
    if kind is str and not isinstance(value, str):
        raise DataError(f"{where}: field '{dotted}' = {value!r}; expected a string")
    if kind == "label" and (isinstance(value, bool) or not isinstance(value, (int, str))):
        raise DataError(f"{where}: field '{dotted}' = {value!r}; expected a number or a string")
    if kind is list and not isinstance(value, list):
        raise DataError(f"{where}: field '{dotted}' = {value!r}; expected a list")
    return value


def _label(row, where: str, prefix: str = "") -> object:
    """``choices.label[answerKey]`` of a multiple-choice row, or of its counterfactual (``prefix``)."""
    labels = _field(row, f"{prefix}choices.label", where, list)
    key = _field(row, f"{prefix}answerKey", where, int)
    if not -len(labels) <= key < len(labels):
        raise DataError(f"{where}: field '{prefix}answerKey' = {key} is out of range for {len(labels)} choices")
    return labels[key]


def _counterfactuals(row) -> list[str]:
    return sorted(k for k, v in row.items() if k.endswith("_counterfactual")) if isinstance(row, dict) else []


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _first_token(tokenizer, word: str, where: str, role: str) -> str:
    """``word`` itself if it is one token; else its first token as text (what MIB scores), checked to
    turn back into that same token id."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) <= 1:
        return word
    first = ids[0]
    piece = tokenizer.decode([first])
    # a sentencepiece decode drops the word's leading space: put it back first
    candidates = ([" " + piece] if word.startswith(" ") and not piece.startswith(" ") else []) + [piece]
    for text in candidates:
        if tokenizer(text, add_special_tokens=False)["input_ids"] == [first]:
            return text
    raise DataError(f"{where}: MIB scores the first token of the {role} {word!r} (id {first}, {piece!r}), but that token "
                    f"does not turn back into itself as text, so it cannot be written as an answer string")


def _pair(kind: str, row, cf: str, where: str) -> tuple[str, str, str, str, list[str]]:
    """(clean, corrupted, answer, wrong, words whose token counts MIB compares) of one row."""
    clean = _field(row, "prompt", where)
    corrupted = _field(row, f"{cf}.prompt", where)
    if kind == "ioi":
        io = " " + _field(row, "metadata.indirect_object", where)
        s = " " + _field(row, "metadata.subject", where)
        c = " " + _field(row, "metadata.random_c", where)
        return clean, corrupted, io, s, [io, s, c]
    if kind == "choice":
        answer = _label(row, where)
        if not isinstance(answer, str):
            raise DataError(f"{where}: field 'choices.label' holds {answer!r} at answerKey; expected a string")
        wrong = str(_label(row, where, f"{cf}."))
        return clean, corrupted, answer, wrong, [answer, wrong]
    answer = str(_field(row, "label", where, "label"))
    wrong = str(_field(row, f"{cf}.label", where, "label"))
    return clean, corrupted, answer, wrong, [answer, wrong]


def _kept_without_tokenizer(kind: str, task: str, row, cf: str) -> bool:
    """MIB's filters that need no tokenizer: arithmetic keeps its own operator and rows whose
    counterfactual (and its prompt) exist."""
    if kind != "arithmetic":
        return True
    cf_row = row.get(cf) if isinstance(row, dict) else None
    return (isinstance(row, dict) and row.get("operator") == OPERATORS[task] and isinstance(cf_row, dict)
            and cf_row.get("prompt") is not None)


def load_mib_rows(source=None, task: str = "ioi", counterfactual: str | None = None, split: str = "train",
                  tokenizer=None, n: int | None = None, config: str | None = None) -> list[dict]:
    """MIB rows as our examples ``{"clean", "corrupted", "answer", "wrong", "mib_row"}``.

    ``source``: a local ``.parquet``/``.jsonl``/``.json`` file in the hub dataset's schema, a hub
    name, or None for the task's own hub dataset (which needs the ``datasets`` library and the
    network).  ``counterfactual`` picks the corrupted prompt (default: MIB's choice for the task).
    With ``tokenizer`` (a HF tokenizer, or a model whose tokenizer to use) the rows MIB drops for
    that tokenizer are dropped too and multi-token answers become their first token, as MIB scores
    them; ``n`` keeps the first n rows after that (MIB's ``num_examples``).  ``mib_row`` is the
    row's 0-based index in the source."""
    return [row for _, row in mib_rows_where(source, task, counterfactual, split, tokenizer, n, config)]


def mib_rows_where(source=None, task: str = "ioi", counterfactual: str | None = None, split: str = "train",
                   tokenizer=None, n: int | None = None, config: str | None = None) -> list[tuple[str, dict]]:
    """:func:`load_mib_rows` with where each row came from (``file.jsonl:7``, ``file.parquet row 7``)."""
    task = mib_task(task)
    info = TASKS[task]
    if tokenizer is not None and hasattr(tokenizer, "tokenizer") and hasattr(tokenizer, "graph"):
        tokenizer = tokenizer.tokenizer
    name, raw = read_mib_source(source, task, split, config)
    if not raw:
        raise DataError(f"'{name}' has no rows")
    cf = counterfactual or info.counterfactual
    present = sorted({k for _, r in raw[:50] for k in _counterfactuals(r)})
    if cf not in present:
        have = ", ".join(present) or "none"
        raise DataError(f"'{name}' has no counterfactual '{cf}' for MIB task {task}; its rows have: {have}")
    rows, dropped = [], {}
    for index, (where, row) in enumerate(raw):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object (a row of MIB's {task} dataset), got {type(row).__name__}")
        if not _kept_without_tokenizer(info.kind, task, row, cf):
            why = "another operator" if row.get("operator") != OPERATORS[task] else f"no {cf} prompt"
            dropped[why] = dropped.get(why, 0) + 1
            continue
        clean, corrupted, answer, wrong, compared = _pair(info.kind, row, cf, where)
        if tokenizer is not None:
            counts = [_token_count(tokenizer, w) for w in compared]
            if info.kind == "arithmetic" and counts != [1, 1]:
                dropped["a label that is not one token"] = dropped.get("a label that is not one token", 0) + 1
                continue
            if len(set(counts)) > 1:
                why = "answers of different token counts"
                dropped[why] = dropped.get(why, 0) + 1
                continue
            answer = _first_token(tokenizer, answer, where, "answer")
            wrong = _first_token(tokenizer, wrong, where, "wrong answer")
        rows.append((where, {"clean": clean, "corrupted": corrupted, "answer": answer, "wrong": wrong, "mib_row": index}))
        if n is not None and len(rows) >= n:
            break
    if dropped:
        reasons = ", ".join(f"{k} ({v})" for k, v in dropped.items())
        warnings.warn(f"{name}: dropped {sum(dropped.values())} row(s) as MIB's own loader does: {reasons}",
                      CircuitWarning, stacklevel=3)
    if not rows:
        raise DataError(f"'{name}': no row of MIB task {task} is left after MIB's filters")
    return rows


__all__ = ["TASKS", "MibTask", "load_mib_rows", "mib_rows_where", "mib_task", "read_mib_source"]
