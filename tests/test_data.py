"""Dataset reading and tokenization: shapes, BOS handling, and specific errors naming the line."""

import json

import pytest

from circuitgraph.data.dataset import DataError, load_dataset
from conftest import write_jsonl

GOOD = {"clean": "w1 w2 w3", "corrupted": "w4 w5 w6", "answer": "w7", "wrong": "w8", "positions": {"S": 1, "END": 2}}


def test_tokenizes_pads_and_shifts_positions_for_bos(tmp_path, tokenizer):
    rows = [GOOD, {**GOOD, "clean": "w1 w2 w3 w9", "corrupted": "w4 w5 w6 w0", "positions": {"S": 0, "END": 3},
                   "answer": ["w7", "w9"], "wrong": "w8"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    d = load_dataset(path, tokenizer)
    assert d.clean.shape == (2, 4) and d.lengths.tolist() == [3, 4]
    assert d.clean[0, :3].tolist() == tokenizer.convert_tokens_to_ids(["w1", "w2", "w3"])
    assert d.answers.tolist() == [[tokenizer.convert_tokens_to_ids("w7"), -1], tokenizer.convert_tokens_to_ids(["w7", "w9"])]
    assert d.positions["END"].tolist() == [2, 3]
    b = load_dataset(path, tokenizer, prepend_bos=True)
    assert b.clean[:, 0].tolist() == [tokenizer.bos_token_id] * 2
    assert b.positions["END"].tolist() == [3, 4] and b.lengths.tolist() == [4, 5]


BAD_ROWS = [
    ({**GOOD, "corrupted": "w4 w5"}, ":2: clean is 3 tokens but corrupted is 2"),
    ({**GOOD, "answer": "w7 w8"}, ":2: answer: 'w7 w8' is 2 tokens"),
    ({**GOOD, "wrong": ["w8", "w1 w2"]}, ":2: wrong: 'w1 w2' is 2 tokens"),
    ({**GOOD, "positions": {"END": 3}}, ":2: position 'END' = 3 is out of range; the clean prompt has 3 tokens"),
    ({**GOOD, "positions": {"END": -1}}, "position 'END' = -1 is out of range"),
    ({k: v for k, v in GOOD.items() if k != "wrong"}, ":2: field 'wrong': missing"),
    ({**GOOD, "answer": []}, ":2: field 'answer': must be a non-empty"),
    ({**GOOD, "clean": 5}, ":2: field 'clean'"),
    ({**GOOD, "positions": {"END": "last"}}, ":2: field 'positions.END'"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_bad_rows_name_the_line(tmp_path, tokenizer, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, row])
    with pytest.raises(DataError) as err:
        load_dataset(path, tokenizer)
    assert message in str(err.value)


def test_bad_files(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "none.jsonl", tokenizer)
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="has no examples"):
        load_dataset(tmp_path / "e.jsonl", tokenizer)
    (tmp_path / "j.jsonl").write_text(json.dumps(GOOD) + "\n{oops\n")
    with pytest.raises(DataError, match=r"j.jsonl:2: not valid JSON"):
        load_dataset(tmp_path / "j.jsonl", tokenizer)
    (tmp_path / "l.jsonl").write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"l.jsonl:1: expected a JSON object"):
        load_dataset(tmp_path / "l.jsonl", tokenizer)
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        load_dataset(write_jsonl(tmp_path / "v.jsonl", [GOOD]), tokenizer, vocab_size=5)
