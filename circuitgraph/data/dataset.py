"""Task datasets: the JSONL format of docs/contract.md, tokenized with the model's own tokenizer.

Examples may differ in length; they are right-padded, which a causal model never sees (no real
position attends to a later one), and every metric reads each example's own last position.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, field_validator

from circuitgraph.errors import CircuitWarning


REST = "rest"  # the position name of every token a row does not name (a spec's "rest" span; no dataset may name it)


class DataError(ValueError):
    """A dataset line that is malformed or does not fit the tokenizer (the message names the line)."""


class Example(BaseModel):
    """One dataset row as read from JSONL: clean and corrupted prompts, answer(s), wrong answer(s), named positions."""

    model_config = ConfigDict(extra="allow")
    clean: str
    corrupted: str
    answer: str | list[str]
    wrong: str | list[str]
    positions: dict[str, int] = {}
    _where: str | None = PrivateAttr(None)  # "file.jsonl:7" or "rows[6]", for messages

    @field_validator("answer", "wrong")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("must be a non-empty string or list of strings")
        return v


@dataclass
class TaskData:
    """A tokenized dataset: padded clean/corrupted ids, answer ids and named positions."""

    clean: torch.Tensor  # [N, P] right-padded
    corrupted: torch.Tensor  # [N, P]
    lengths: torch.Tensor  # [N]
    answers: torch.Tensor  # [N, A] token ids, -1 padded
    wrongs: torch.Tensor  # [N, W]
    positions: dict[str, torch.Tensor]  # name -> [N] (-1 where an example lacks it)
    examples: list[Example] = field(default_factory=list)
    prepend_bos: bool = False
    source: str = "dataset"  # file name or "rows", for messages

    def __len__(self) -> int:
        return self.clean.shape[0]

    @property
    def last(self) -> torch.Tensor:
        """Each example's last real position (prompts are right-padded), where every metric reads the logits."""
        return self.lengths - 1

    def slice(self, start: int, stop: int) -> "TaskData":
        """Rows ``start:stop``, trimmed to their own longest example."""
        P = int(self.lengths[start:stop].max())
        return TaskData(self.clean[start:stop, :P], self.corrupted[start:stop, :P], self.lengths[start:stop],
                        self.answers[start:stop], self.wrongs[start:stop],
                        {k: v[start:stop] for k, v in self.positions.items()}, self.examples[start:stop], self.prepend_bos,
                        self.source)

    def take(self, idx) -> "TaskData":
        """Rows ``idx`` in that order, repeats allowed (a bootstrap resample), trimmed to their own longest example."""
        idx = torch.as_tensor(list(idx), dtype=torch.long)
        if len(idx) == 0:
            raise DataError(f"{self.source}: no rows chosen")
        P = int(self.lengths[idx].max())
        examples = [self.examples[i] for i in idx.tolist()] if len(self.examples) == len(self) else []
        return TaskData(self.clean[idx, :P], self.corrupted[idx, :P], self.lengths[idx], self.answers[idx], self.wrongs[idx],
                        {k: v[idx] for k, v in self.positions.items()}, examples, self.prepend_bos, self.source)

    def where(self, i: int) -> str:
        """Where example ``i`` (0-based) came from: ``file.jsonl:7`` or ``rows[6]``."""
        ex = self.examples[i] if i < len(self.examples) else None
        return (ex._where if ex is not None and ex._where else None) or f"{self.source} example {i + 1}"

    def templates(self) -> list[str]:
        """Each row's ``template`` (an extra field ``make-data`` writes: the template it filled), for resampling
        whole templates; a row without one is refused, naming it."""
        out = []
        for i in range(len(self)):
            ex = self.examples[i] if i < len(self.examples) else None
            label = (ex.model_extra or {}).get("template") if ex is not None else None
            if not isinstance(label, (str, int)) or isinstance(label, bool):
                raise DataError(f"{self.where(i)}: no \"template\" field (a string naming the template the row was filled from, "
                                f"as make-data writes it); resampling by template needs it on every row")
            out.append(str(label))
        return out

    def check_positions(self, names, user: str = "the circuit") -> None:
        """Every example must name each position in ``names``; the error names the first that does not
        (an example without it would silently be patched nowhere).  ``rest`` is every row's own."""
        for name in sorted(set(names) - {REST}):
            if name not in self.positions:
                raise DataError(f"position '{name}' is not named in the dataset (it names: {', '.join(sorted(self.positions)) or 'none'})")
            missing = torch.nonzero(self.positions[name] < 0).flatten().tolist()
            if missing:
                more = f" (and {len(missing) - 1} other example(s))" if len(missing) > 1 else ""
                raise DataError(f"{self.where(missing[0])}: the example has no position '{name}', which {user} uses{more}")

    def to(self, device) -> "TaskData":
        """The same data with the answer ids (what metrics index with) on ``device``."""
        if self.answers.device == torch.device(device):
            return self
        return TaskData(self.clean, self.corrupted, self.lengths, self.answers.to(device), self.wrongs.to(device),
                        self.positions, self.examples, self.prepend_bos, self.source)

    def position_mask(self, names: list[str]) -> torch.Tensor:
        """Bool ``[N, P]``: true at the named positions of each example (``rest``: at those it names none of)."""
        N, P = self.clean.shape
        mask = torch.zeros(N, P, dtype=torch.bool)
        if REST in names:
            mask = ~self.position_mask(list(self.positions))
        for name in set(names) - {REST}:
            if name not in self.positions:
                raise DataError(f"position '{name}' is not named in the dataset (it names: {', '.join(sorted(self.positions)) or 'none'})")
            idx = self.positions[name]
            ok = idx >= 0
            mask[torch.nonzero(ok).squeeze(1), idx[ok]] = True
        return mask

    def span_index(self, names: list[str]) -> torch.Tensor:
        """Long ``[N, P]``: the index in ``names`` of the position each token is, ``len(names)`` (``rest``)
        where it is none.  Every row must name every position, each at its own token."""
        self.check_positions(names, "by-position scoring")
        out = torch.full(self.clean.shape, len(names), dtype=torch.long)
        rows = torch.arange(len(self))
        for j, name in enumerate(names):
            at = self.positions[name]
            if (clash := out[rows, at] < len(names)).any():
                i = int(torch.nonzero(clash)[0])
                raise DataError(f"{self.where(i)}: positions '{names[int(out[i, at[i]])]}' and '{name}' are the same token; "
                                f"by-position scores need each token in one position")
            out[rows, at] = j
        return out

    @property
    def same_length(self) -> bool:
        """Whether every prompt has the same length (bidirectional models require it)."""
        return bool((self.lengths == self.lengths[0]).all())


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (strict parsers reject it); write \"{name}\" in quotes for the string")


def parse_json(text: str):
    """Strict JSON: no bare NaN/Infinity, and deep nesting is an error rather than a crash."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of a UTF-8 file; a byte that is not UTF-8 is reported with its line."""
    if path.is_dir():
        raise DataError(f"dataset '{path}' is a directory; expected a JSONL file")
    if not path.is_file():
        raise DataError(f"dataset file '{path}' does not exist")
    out = []
    for i, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            out.append((i, raw.decode("utf-8-sig" if i == 1 else "utf-8")))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{i}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                            f"save the file as UTF-8") from None
    return out


def _example(raw, where: str) -> Example:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object with clean, corrupted, answer, wrong")
    try:
        ex = Example.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = "missing" if err["type"] == "missing" else err["msg"].removeprefix("Value error, ")
        raise DataError(f"{where}: field '{loc}': {msg} (expected clean, corrupted: str; answer, wrong: str or list of str; positions: {{name: int}})") from None
    ex._where = where
    return ex


def read_jsonl(path: str | Path) -> list[Example]:
    """The examples of a JSONL dataset file; a malformed line raises :class:`DataError` naming the file and line."""
    path = Path(path)
    out = []
    for i, line in _lines(path):
        if not line.strip():
            continue
        try:
            raw = parse_json(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        except ValueError as e:
            raise DataError(f"{path}:{i}: {e}") from None
        out.append(_example(raw, f"{path}:{i}"))
    if not out:
        raise DataError(f"dataset file '{path}' has no examples")
    return out


def read_rows(rows, source: str = "rows") -> list[Example]:
    """In-memory examples (dicts or :class:`Example`), checked like the lines of a file."""
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, (list, tuple)):
        raise DataError(f"expected a list of examples (dicts with clean, corrupted, answer, wrong), got {type(rows).__name__}")
    out = [r if isinstance(r, Example) else _example(r, f"{source}[{i}]") for i, r in enumerate(rows)]
    if not out:
        raise DataError(f"{source}: no examples")
    return out


def _ids(tokenizer, text: str, prepend_bos: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=not prepend_bos)["input_ids"]
    if prepend_bos:
        if tokenizer.bos_token_id is None:
            raise DataError("prepend_bos is set but the tokenizer has no BOS token")
        ids = [tokenizer.bos_token_id] + ids
    return ids


def _unknown_words(tokenizer, text: str, ids: list[int]) -> list[str]:
    """Words of ``text`` that the tokenizer turns into its unknown token (a literal unknown-token
    string, e.g. GPT-2's ``<|endoftext|>``, is not unknown)."""
    unk = tokenizer.unk_token_id
    if unk is None or unk not in ids:
        return []
    return [w for w in text.split() if w != tokenizer.unk_token
            and unk in tokenizer(w, add_special_tokens=False)["input_ids"]]


def _single_token(tokenizer, word: str, where: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise DataError(f"{where}: {word!r} is {len(ids)} tokens {pieces} for this tokenizer; answers must be single tokens")
    if ids[0] == tokenizer.unk_token_id and word.strip() != tokenizer.unk_token:
        raise DataError(f"{where}: {word!r} is not in the tokenizer's vocabulary (it becomes the unknown token "
                        f"{tokenizer.unk_token!r}); answers must be known single tokens")
    return ids[0]


def _tokenizer_of(tokenizer_or_model):
    """A tokenizer, or the tokenizer of a :class:`~circuitgraph.CircuitModel` (with its vocabulary
    size and context length)."""
    if hasattr(tokenizer_or_model, "graph") and hasattr(tokenizer_or_model, "tokenizer"):
        return tokenizer_or_model.tokenizer, model_limits(tokenizer_or_model)
    if tokenizer_or_model is not None and not callable(tokenizer_or_model):
        raise DataError(f"expected a HuggingFace tokenizer or a circuitgraph model, got {type(tokenizer_or_model).__name__}")
    return tokenizer_or_model, (None, None)


def model_limits(model) -> tuple[int | None, int | None]:
    """(vocabulary size, context length) of a :class:`~circuitgraph.CircuitModel`.  The context is a
    hard limit only with learned position embeddings (GPT-2's ``n_positions``: later positions have
    no embedding); rotary models run past ``max_position_embeddings`` as their HF forward does."""
    context = getattr(model.config, "n_positions", None)
    return int(model.weights.W_U.shape[0]), int(context) if context else None


def tokenize(examples: list[Example], tokenizer, prepend_bos: bool = False, source: str = "dataset",
             vocab_size: int | None = None, max_length: int | None = None) -> TaskData:
    """Tokenize examples; errors name the line (1-based) that does not fit.

    Prompt words the tokenizer does not know become its unknown token: that is allowed (the model
    sees what it would see), with one :class:`CircuitWarning` naming them.  ``tokenizer`` may also
    be a :class:`~circuitgraph.CircuitModel`, whose vocabulary and context then bound the ids."""
    tokenizer, (model_vocab, model_context) = _tokenizer_of(tokenizer)
    vocab_size = vocab_size if vocab_size is not None else model_vocab
    max_length = max_length if max_length is not None else model_context
    if tokenizer is None:
        raise DataError("the model has no tokenizer; load it with load_model() or pass token ids directly")
    examples = read_rows(examples, source)
    clean, corrupt, answers, wrongs, lengths = [], [], [], [], []
    names = sorted({k for ex in examples for k in ex.positions})
    if REST in names:
        i = next(i for i, ex in enumerate(examples) if REST in ex.positions)
        raise DataError(f"{examples[i]._where or f'{source}:{i + 1}'}: position name '{REST}' is reserved (every token a row "
                        f"does not name); call it something else")
    positions = {k: [] for k in names}
    unknown: dict[str, str] = {}
    n_special = shift = len(_ids(tokenizer, "", prepend_bos))  # leading BOS, ours or the tokenizer's
    for i, ex in enumerate(examples, start=1):
        where = ex._where or f"{source}:{i}"
        c, k = _ids(tokenizer, ex.clean, prepend_bos), _ids(tokenizer, ex.corrupted, prepend_bos)
        if len(c) != len(k):
            raise DataError(f"{where}: clean is {len(c)} tokens but corrupted is {len(k)}; they must tokenize to the same length")
        if len(c) == 0:
            raise DataError(f"{where}: clean prompt is empty")
        if max_length is not None and len(c) > max_length:
            raise DataError(f"{where}: the prompt is {len(c)} tokens, longer than the model's context of {max_length} tokens")
        for text, ids in ((ex.clean, c), (ex.corrupted, k)):
            for w in _unknown_words(tokenizer, text, ids):
                unknown.setdefault(w, where)
        ans = [_single_token(tokenizer, a, f"{where}: answer") for a in (ex.answer if isinstance(ex.answer, list) else [ex.answer])]
        wr = [_single_token(tokenizer, w, f"{where}: wrong") for w in (ex.wrong if isinstance(ex.wrong, list) else [ex.wrong])]
        if vocab_size is not None:
            for t in c + k + ans + wr:
                if t >= vocab_size:
                    raise DataError(f"{where}: token id {t} is outside the model's vocabulary ({vocab_size})")
        text_len = len(c) - n_special
        for name in names:
            if name not in ex.positions:
                positions[name].append(-1)
                continue
            p = ex.positions[name]
            if not 0 <= p < text_len:
                raise DataError(f"{where}: position '{name}' = {p} is out of range; the clean prompt has {text_len} tokens (0..{text_len - 1})")
            positions[name].append(p + shift)
        clean.append(c), corrupt.append(k), answers.append(ans), wrongs.append(wr), lengths.append(len(c))
    if unknown:
        listed = ", ".join(f"{w!r} ({where})" for w, where in list(unknown.items())[:8])
        more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        warnings.warn(f"{source}: {len(unknown)} prompt word(s) are not in the tokenizer's vocabulary and become "
                      f"{tokenizer.unk_token!r}: {listed}{more}", CircuitWarning, stacklevel=2)
    P = max(lengths)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def padded(rows, width, value):
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    return TaskData(padded(clean, P, pad), padded(corrupt, P, pad), torch.tensor(lengths),
                    padded(answers, max(map(len, answers)), -1), padded(wrongs, max(map(len, wrongs)), -1),
                    {k: torch.tensor(v) for k, v in positions.items()}, list(examples), prepend_bos, source)


def load_dataset(source, tokenizer, prepend_bos: bool = False, vocab_size: int | None = None,
                 max_length: int | None = None) -> TaskData:
    """A tokenized dataset from a JSONL file or from in-memory rows (a list of dicts).

    ``tokenizer`` may be the model itself (``load_dataset(rows, model)``), which also checks the
    prompts against its vocabulary and context length."""
    if isinstance(source, (str, Path)):
        examples, name = read_jsonl(source), str(source)
    else:
        examples, name = read_rows(source), "rows"
    return tokenize(examples, tokenizer, prepend_bos, source=name, vocab_size=vocab_size, max_length=max_length)
