"""Task generators: format, equal lengths, positions, determinism and single-token checks.

No hub access here, so GPT-2's tokenizer is not available. Besides the bundled word-level
tokenizers we build two small ones: a byte-level BPE trained on the tasks' own words (GPT-2's
scheme: leading-space tokens like "ĠMary", so offsets and spaces are exercised) with a few names
left out so they split into several tokens, and a word-level tokenizer that splits digits in
pairs, so " 1732" is " 17" + "32" as in GPT-2 (for greater-than).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from circuitgraph.data.tasks import TASKS, TaskError, make_data, write_jsonl
from circuitgraph.data.tasks import docstring, greater_than, induction, ioi

BUNDLED = Path(__file__).resolve().parents[1] / "circuitgraph" / "bundled"
LEFT_OUT = ["Christopher", "Alexander", "Stephanie"]  # multi-token for the byte-level BPE


@pytest.fixture(scope="module")
def toy_ioi():
    return AutoTokenizer.from_pretrained(BUNDLED / "toy-ioi")


@pytest.fixture(scope="module")
def toy_induction():
    return AutoTokenizer.from_pretrained(BUNDLED / "toy-induction")


@pytest.fixture(scope="module")
def bpe():
    """A GPT-2-style byte-level BPE whose vocabulary holds the tasks' words (minus LEFT_OUT)."""
    names = [n for n in ioi.NAMES if n not in LEFT_OUT]
    corpus = []
    for i, name in enumerate(names):
        for t in ioi.BABA_TEMPLATES:
            corpus.append(t.replace("[A]", name).replace("[B]", names[i - 1])
                          .replace("[PLACE]", ioi.PLACES[i % 8]).replace("[OBJECT]", ioi.OBJECTS[i % 8]))
    for w in docstring.WORDS:
        corpus += [f'def {w}(self, {w}):\n    """{w} {w}\n\n    :param {w}: {w}\n    :param'] * 5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=4000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", name_or_path="test-bpe")


def digit_pairs(split_years: bool = True):
    """Word-level tokenizer over the greater-than words; digits split in pairs if split_years."""
    words = ["The", "lasted", "from", "the", "year", "to"] + greater_than.NOUNS + [f"{i:02d}" for i in range(100)]
    if not split_years:
        words += [f"17{i:02d}" for i in range(100)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>"] + words)}, unk_token="<unk>"))
    pre = [pre_tokenizers.WhitespaceSplit()]
    if split_years:
        pre.append(pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", name_or_path="test-digits")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def one(tok, word):
    (tid,) = ids(tok, word)
    return tid


def check_format(tok, examples, n):
    """The dataset contract (docs/contract.md) every task shares."""
    assert len(examples) == n
    for ex in examples:
        assert set(ex) - {"template"} == {"clean", "corrupted", "answer", "wrong", "positions"}
        assert isinstance(ex.get("template", ""), str)  # the template a row was filled from, when it names one
        clean, corrupted = ids(tok, ex["clean"]), ids(tok, ex["corrupted"])
        assert len(clean) == len(corrupted)
        assert ex["positions"]["END"] == len(clean) - 1
        assert all(0 <= p < len(clean) for p in ex["positions"].values())
        for word in [ex["answer"], ex["wrong"]]:
            for w in word if isinstance(word, list) else [word]:
                assert len(ids(tok, w)) == 1, w
        json.dumps(ex)


CASES = [("ioi", "toy_ioi"), ("ioi", "bpe"), ("induction", "toy_induction"), ("induction", "bpe"),
         ("docstring", "bpe"), ("greater-than", "digits")]


@pytest.fixture
def tokenizer(request):
    name = request.param
    return digit_pairs() if name == "digits" else request.getfixturevalue(name)


@pytest.mark.parametrize("task,tokenizer", CASES, indirect=["tokenizer"])
def test_format_and_determinism(task, tokenizer):
    a = make_data(task, tokenizer, 40, seed=3)
    check_format(tokenizer, a, 40)
    assert a == make_data(task, tokenizer, 40, seed=3)
    assert a != make_data(task, tokenizer, 40, seed=4)


def test_registry_and_unknown_task(toy_ioi):
    assert set(TASKS) == {"ioi", "greater-than", "induction", "docstring", "tracr"}
    assert TASKS["greater-than"].metric == "prob_diff"
    assert all(TASKS[t].metric == "logit_diff" for t in ("ioi", "induction", "docstring"))
    with pytest.raises(TaskError, match="valid tasks: ioi, greater-than, induction, docstring"):
        make_data("ioii", toy_ioi, 3)


def test_write_jsonl(tmp_path, toy_ioi):
    data = make_data("ioi", toy_ioi, 5)
    write_jsonl(data, tmp_path / "d.jsonl")
    assert [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()] == data


@pytest.mark.parametrize("tokenizer", ["toy_ioi", "bpe"], indirect=True)
def test_ioi_positions_and_corruptions(tokenizer):
    data = ioi.generate(tokenizer, 60, seed=1)
    flip = ioi.generate(tokenizer, 60, seed=1, corruption="s2_flip")
    orders = set()
    for ex, fl in zip(data, flip):
        p, t, c = ex["positions"], ids(tokenizer, ex["clean"]), ids(tokenizer, ex["corrupted"])
        io, s = one(tokenizer, ex["answer"]), one(tokenizer, ex["wrong"])
        assert t[p["IO"]] == io and t[p["S1"]] == t[p["S2"]] == s and p["S1+1"] == p["S1"] + 1
        assert p["S2"] > max(p["IO"], p["S1"])
        orders.add("BABA" if p["S1"] < p["IO"] else "ABBA")
        # abc: three distinct fresh names at IO, S1, S2; everything else unchanged
        fresh = {c[p["IO"]], c[p["S1"]], c[p["S2"]]}
        assert len(fresh) == 3 and not fresh & {io, s}
        assert [x for i, x in enumerate(c) if i not in (p["IO"], p["S1"], p["S2"])] == \
               [x for i, x in enumerate(t) if i not in (p["IO"], p["S1"], p["S2"])]
        # s2_flip: same clean prompt, S2 now names the IO
        ft = ids(tokenizer, fl["corrupted"])
        assert fl["clean"] == ex["clean"] and ft[p["S2"]] == io and ft[:p["S2"]] == t[:p["S2"]]
    assert orders == {"BABA", "ABBA"}


def test_ioi_filters_and_rejects_multi_token_names(bpe):
    names = ioi.generate(bpe, 200, seed=0)
    used = {ex["answer"].strip() for ex in names} | {ex["wrong"].strip() for ex in names}
    assert used and not used & set(LEFT_OUT)  # the built-in list is filtered silently
    with pytest.raises(TaskError, match=r"' Christopher' is \d+ tokens for this tokenizer \(test-bpe\)"):
        ioi.generate(bpe, 5, names=["Mary", "John", "Sara", "Paul", "Christopher"])
    with pytest.raises(TaskError, match="only 2 names"):
        ioi.generate(bpe, 5, names=["Mary", "John"])
    with pytest.raises(TaskError, match="unknown IOI corruption"):
        ioi.generate(bpe, 5, corruption="xyz")


def test_ioi_unknown_words_for_word_level(toy_ioi):
    with pytest.raises(TaskError, match="name ' Zebediah' is the unknown token"):
        ioi.generate(toy_ioi, 5, names=["Mary", "John", "Sara", "Paul", "Zebediah"])


def test_greater_than_positions_and_answers():
    tok = digit_pairs()
    for ex in greater_than.generate(tok, 50, seed=2):
        p, t = ex["positions"], ids(tok, ex["clean"])
        yy = tok.convert_ids_to_tokens(t[p["YY"]])
        assert ex["clean"].endswith(f"the year 17{yy} to the year 17") and 2 <= int(yy) <= 98
        assert ex["answer"] == [f"{y:02d}" for y in range(int(yy) + 1, 100)]
        assert ex["wrong"] == [f"{y:02d}" for y in range(int(yy) + 1)]
        assert "year 1701 to" in ex["corrupted"]
        assert tok.convert_ids_to_tokens(t[p["NOUN"]]) in greater_than.NOUNS
        assert tok.convert_ids_to_tokens(t[p["END"]]) == "17"


def test_greater_than_needs_split_years(toy_ioi):
    with pytest.raises(TaskError, match="' 1701' is 1 tokens .*not ' 17' \\+ '01'"):
        greater_than.generate(digit_pairs(split_years=False), 5)
    with pytest.raises(TaskError, match="' 17'"):
        greater_than.generate(toy_ioi, 5)


@pytest.mark.parametrize("tokenizer", ["toy_induction", "bpe"], indirect=True)
def test_induction_positions(tokenizer):
    for ex in induction.generate(tokenizer, 30, seed=5, seq_len=12, repeat_len=5):
        p, t, c = ex["positions"], ids(tokenizer, ex["clean"]), ids(tokenizer, ex["corrupted"])
        assert len(t) == 17 and p == {"END": 16, "FIRST": 4, "FIRST+1": 5}
        # the repeat (the first word has no leading space, so compare from the second), and
        # END's first occurrence
        assert t[13:] == t[1:5] and t[p["FIRST"]] == t[p["END"]]
        assert t[p["FIRST+1"]] == one(tokenizer, ex["answer"])  # what the induction head copies
        assert c[12:] == t[12:] and not set(c[:12]) & set(t[:12])  # corrupted: fresh first part
        assert c[p["FIRST+1"]] == one(tokenizer, ex["wrong"]) != one(tokenizer, ex["answer"])


def test_induction_vocab_checks(toy_induction):
    with pytest.raises(TaskError, match="'t999' is the unknown token"):
        induction.generate(toy_induction, 3, vocab=["t1", "t2", "t999"])
    with pytest.raises(TaskError, match="repeat_len"):
        induction.generate(toy_induction, 3, repeat_len=1)
    with pytest.raises(TaskError, match="needs 40"):
        induction.generate(toy_induction, 3, seq_len=20, vocab=[f"t{i}" for i in range(30)])


def test_docstring_positions(bpe):
    for ex in docstring.generate(bpe, 30, seed=7):
        p, t, c = ex["positions"], ids(bpe, ex["clean"]), ids(bpe, ex["corrupted"])
        assert t[p["C_def"]] == one(bpe, ex["answer"])
        assert t[p["A_def"]] == t[p["A_doc"]] and t[p["B_def"]] == t[p["B_doc"]]
        assert p["A_def"] < p["B_def"] < p["C_def"] < p["A_doc"] < p["B_doc"] < p["END"]
        assert ex["clean"].endswith(":param") and ex["clean"].split("def ")[1].split("(")[0] in docstring.WORDS
        # random_def: only the def's arguments change
        assert c[p["C_def"]] == one(bpe, ex["wrong"]) and c[p["A_doc"]:] == t[p["A_doc"]:]
        assert c[p["A_def"]] != t[p["A_def"]]


def test_make_data_command(tmp_path, capsys):
    from circuitgraph.cli.commands import main
    from circuitgraph.data.dataset import load_dataset
    from circuitgraph.model.loading import load_model

    out = tmp_path / "ioi.jsonl"
    assert main(["make-data", "ioi", "--model", "toy-ioi", "-n", "20", "--seed", "3", "-o", str(out)]) == 0
    data = load_dataset(out, load_model("toy-ioi").tokenizer)
    assert len(data) == 20 and {"IO", "S1", "S1+1", "S2", "END"} <= set(data.positions)
    assert main(["make-data", "sorting", "--model", "toy-ioi", "-o", str(out)]) == 2
    assert "sorting" in capsys.readouterr().err
