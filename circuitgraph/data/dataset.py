"""Task datasets: the JSONL format of DESIGN.md, tokenized with the model's own tokenizer.

Examples may differ in length; they are right-padded, which a causal model never sees (no real
position attends to a later one), and every metric reads each example's own last position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator


class DataError(ValueError):
    """A dataset line that is malformed or does not fit the tokenizer (the message names the line)."""


class Example(BaseModel):
    model_config = ConfigDict(extra="allow")
    clean: str
    corrupted: str
    answer: str | list[str]
    wrong: str | list[str]
    positions: dict[str, int] = {}

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

    def __len__(self) -> int:
        return self.clean.shape[0]

    @property
    def last(self) -> torch.Tensor:
        return self.lengths - 1

    def slice(self, start: int, stop: int) -> "TaskData":
        """Rows ``start:stop``, trimmed to their own longest example."""
        P = int(self.lengths[start:stop].max())
        return TaskData(self.clean[start:stop, :P], self.corrupted[start:stop, :P], self.lengths[start:stop],
                        self.answers[start:stop], self.wrongs[start:stop],
                        {k: v[start:stop] for k, v in self.positions.items()}, self.examples[start:stop], self.prepend_bos)

    def to(self, device) -> "TaskData":
        """The same data with the answer ids (what metrics index with) on ``device``."""
        if self.answers.device == torch.device(device):
            return self
        return TaskData(self.clean, self.corrupted, self.lengths, self.answers.to(device), self.wrongs.to(device),
                        self.positions, self.examples, self.prepend_bos)

    def position_mask(self, names: list[str]) -> torch.Tensor:
        """Bool ``[N, P]``: true at the named positions of each example."""
        N, P = self.clean.shape
        mask = torch.zeros(N, P, dtype=torch.bool)
        for name in names:
            if name not in self.positions:
                raise DataError(f"position '{name}' is not named in the dataset (it names: {', '.join(sorted(self.positions)) or 'none'})")
            idx = self.positions[name]
            ok = idx >= 0
            mask[torch.nonzero(ok).squeeze(1), idx[ok]] = True
        return mask

    @property
    def same_length(self) -> bool:
        return bool((self.lengths == self.lengths[0]).all())


def read_jsonl(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file '{path}' does not exist")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(raw, dict):
            raise DataError(f"{path}:{i}: expected a JSON object with clean, corrupted, answer, wrong")
        try:
            out.append(Example.model_validate(raw))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            msg = "missing" if err["type"] == "missing" else err["msg"].removeprefix("Value error, ")
            raise DataError(f"{path}:{i}: field '{loc}': {msg} (expected clean, corrupted: str; answer, wrong: str or list of str; positions: {{name: int}})") from None
    if not out:
        raise DataError(f"dataset file '{path}' has no examples")
    return out


def _ids(tokenizer, text: str, prepend_bos: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=not prepend_bos)["input_ids"]
    if prepend_bos:
        if tokenizer.bos_token_id is None:
            raise DataError("prepend_bos is set but the tokenizer has no BOS token")
        ids = [tokenizer.bos_token_id] + ids
    return ids


def _single_token(tokenizer, word: str, where: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise DataError(f"{where}: {word!r} is {len(ids)} tokens {pieces} for this tokenizer; answers must be single tokens")
    return ids[0]


def tokenize(examples: list[Example], tokenizer, prepend_bos: bool = False, source: str = "dataset",
             vocab_size: int | None = None) -> TaskData:
    """Tokenize examples; errors name the line (1-based) that does not fit."""
    if tokenizer is None:
        raise DataError("the model has no tokenizer; load it with load_model() or pass token ids directly")
    clean, corrupt, answers, wrongs, lengths = [], [], [], [], []
    names = sorted({k for ex in examples for k in ex.positions})
    positions = {k: [] for k in names}
    n_special = shift = len(_ids(tokenizer, "", prepend_bos))  # leading BOS, ours or the tokenizer's
    for i, ex in enumerate(examples, start=1):
        where = f"{source}:{i}"
        c, k = _ids(tokenizer, ex.clean, prepend_bos), _ids(tokenizer, ex.corrupted, prepend_bos)
        if len(c) != len(k):
            raise DataError(f"{where}: clean is {len(c)} tokens but corrupted is {len(k)}; they must tokenize to the same length")
        if len(c) == 0:
            raise DataError(f"{where}: clean prompt is empty")
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
    P = max(lengths)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def padded(rows, width, value):
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    return TaskData(padded(clean, P, pad), padded(corrupt, P, pad), torch.tensor(lengths),
                    padded(answers, max(map(len, answers)), -1), padded(wrongs, max(map(len, wrongs)), -1),
                    {k: torch.tensor(v) for k, v in positions.items()}, list(examples), prepend_bos)


def load_dataset(path: str | Path, tokenizer, prepend_bos: bool = False, vocab_size: int | None = None) -> TaskData:
    """Read and tokenize a JSONL dataset file."""
    return tokenize(read_jsonl(path), tokenizer, prepend_bos, source=str(path), vocab_size=vocab_size)
