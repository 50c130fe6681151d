"""grass_llm.data: loading/validation, the LLM-Adapters prompt, tokenisation, batching and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from grass_llm import data as D
from grass_llm.data import IGNORE_INDEX, Batcher, DataError


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


GOOD = [
    {"instruction": "What is 1 + 1?", "input": "", "output": "2", "answer": "2"},
    {"instruction": "Add", "input": "3 and 4", "output": "7", "answer": 7},
]


# ------------------------------------------------------------------------------------------------
# loading and validation
def test_load_json_and_jsonl_agree(tmp_path):
    a = D.load_records(_write(tmp_path, "a.json", json.dumps(GOOD)))
    b = D.load_records(_write(tmp_path, "b.jsonl", "\n".join(json.dumps(r) for r in GOOD) + "\n\n"))
    assert a == b == GOOD
    assert D.load_records(_write(tmp_path, "c.json", json.dumps(GOOD)), limit=1) == GOOD[:1]


def test_missing_input_becomes_empty(tmp_path):
    recs = D.load_records(_write(tmp_path, "a.json", json.dumps([{"instruction": "x", "output": "y"}])))
    assert recs[0]["input"] == ""
    recs = D.load_records(
        _write(tmp_path, "b.json", json.dumps([{"instruction": "x", "input": None, "output": "y"}]))
    )
    assert recs[0]["input"] == ""


BAD_CASES = [
    # (file name, content, substrings the message must contain)
    ("empty.json", "  \n", ["empty.json", "empty"]),
    ("empty_array.json", "[]", ["empty_array.json", "no records"]),
    ("obj.json", '{"instruction": "x"}', ["obj.json", "JSON array", "dict"]),
    (
        "syntax.json",
        '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]',
        ["record 2", "line 2"],
    ),
    ("trunc.json", '[{"instruction": "a", "output": "b"}, {"instruction": ', ["record 2", "invalid JSON"]),
    ("missing.json", json.dumps([GOOD[0], {"instruction": "x"}]), ["missing.json", "record 2", "'output'"]),
    (
        "type.json",
        json.dumps([GOOD[0], GOOD[1], {"instruction": 3, "output": "y"}]),
        ["record 3", "'instruction'", "int"],
    ),
    ("notobj.json", json.dumps([GOOD[0], "text"]), ["record 2", "JSON object", "str"]),
    (
        "answer.json",
        json.dumps([{"instruction": "x", "output": "y", "answer": [1]}]),
        ["record 1", "'answer'", "list"],
    ),
    (
        "blank.json",
        json.dumps([{"instruction": "  ", "output": "y"}]),
        ["record 1", "'instruction' is empty"],
    ),
    ("bad.jsonl", json.dumps(GOOD[0]) + "\n\n{oops}\n", ["bad.jsonl", "record 2", "line 3"]),
    ("bad2.jsonl", json.dumps(GOOD[0]) + '\n{"instruction": "x"}\n', ["record 2", "'output'"]),
]


@pytest.mark.parametrize(("name", "content", "expected"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_files_name_file_record_and_fault(tmp_path, name, content, expected):
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError) as info:
        D.load_records(path)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    for part in expected:
        assert part in msg, (part, msg)


def test_missing_file_and_eval_fields(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        D.load_records(tmp_path / "nope.json")
    path = _write(tmp_path, "e.json", json.dumps([{"instruction": "x", "output": "y"}]))
    with pytest.raises(DataError, match=r"record 1: missing required field 'answer'"):
        D.load_records(path, required=("instruction", "answer"))


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("GRASS_DATA_DIR", str(tmp_path))
    assert D.default_data_dir() == tmp_path
    (tmp_path / "sub").mkdir()
    target = _write(tmp_path / "sub", "x.json", json.dumps(GOOD))
    assert D.resolve_data_path("sub/x.json") == target
    assert D.resolve_data_path("x.json", data_dir=tmp_path / "sub") == target
    with pytest.raises(DataError, match="not found"):
        D.resolve_data_path("sub/none.json")
    monkeypatch.delenv("GRASS_DATA_DIR")
    assert D.default_data_dir() is None  # the installed package assumes no location
    with pytest.raises(DataError, match="give data_dir or set GRASS_DATA_DIR"):
        D.resolve_data_path("sub/x.json")


def test_shared_training_set_loads(shared_data):
    recs = D.load_records(shared_data / "llm-adapters" / "ft-training_set" / "math_data.json")
    assert len(recs) == 3260 and all(r["instruction"] and "output" in r for r in recs)


# ------------------------------------------------------------------------------------------------
# prompt: the exact LLM-Adapters finetune.py / evaluate.py strings (16-space indent included)
IND = " " * 16
FINETUNE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    f"request.  \n\n{IND}### Instruction:\n{IND}Q\n{IND}\n{IND}### Response:\n{IND}A"
)
FINETUNE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
    f"{IND}### Instruction:\n{IND}Q\n{IND}\n{IND}### Input:\n{IND}I\n{IND}\n{IND}### Response:\n{IND}A"
)
EVAL_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    f"request. \n\n{IND}### Instruction:\n{IND}Q\n\n{IND}### Response:\n{IND}"
)
EVAL_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    f"{IND}### Instruction:\n{IND}Q\n\n{IND}### Input:\n{IND}I\n\n{IND}### Response:\n{IND}"
)


def test_prompt_templates_exact():
    rec = {"instruction": "Q", "input": "", "output": "A"}
    assert D.format_prompt(rec) == FINETUNE_NO_INPUT
    assert D.format_prompt({**rec, "input": "I"}) == FINETUNE_INPUT
    assert D.format_prompt(rec, with_response=False) == FINETUNE_NO_INPUT[:-1]
    assert D.format_prompt({**rec, "input": "I"}, with_response=False) == FINETUNE_INPUT[:-1]
    assert D.format_prompt(rec, with_response=False, style="evaluate") == EVAL_NO_INPUT
    assert D.format_prompt({**rec, "input": "I"}, with_response=False, style="evaluate") == EVAL_INPUT
    with pytest.raises(ValueError, match="allowed: finetune, evaluate"):
        D.format_prompt(rec, style="chat")


# ------------------------------------------------------------------------------------------------
# tokenisation
class WordTok:
    """A minimal non-HF tokenizer: one id per whitespace-separated word (plus BOS)."""

    eos_token_id = 1
    pad_token_id = 0

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text):
        return [2] + [self.vocab.setdefault(w, 3 + len(self.vocab)) for w in text.split()]


@pytest.fixture(scope="module")
def tok():
    return D.builtin_tokenizer()


def test_tokenize_response_only_masks_prompt(tok):
    rec = {"instruction": "What is 2 + 2?", "input": "", "output": "2 + 2 = 4. The answer is 4"}
    ex = D.tokenize_record(rec, tok, max_length=512, train_on_response_only=True)
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids[-1] == tok.eos_token_id and len(ids) == len(labels)
    n_prompt = len(tok(D.format_prompt(rec, with_response=False))["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[n_prompt:], skip_special_tokens=True) == rec["output"]
    full = D.tokenize_record(rec, tok, max_length=512, train_on_response_only=False)
    assert full["labels"] == full["input_ids"] == ids


def test_tokenize_truncation_and_plain_encode_tokenizer(tok):
    rec = {"instruction": "x", "input": "", "output": "a long answer " * 20}
    ex = D.tokenize_record(rec, tok, max_length=40)
    assert len(ex["input_ids"]) == 40 and ex["input_ids"][-1] != tok.eos_token_id  # truncated: no EOS
    wt = WordTok()
    ex = D.tokenize_record({"instruction": "q", "output": "r s"}, wt, max_length=64)
    assert ex["input_ids"][0] == 2 and ex["input_ids"][-1] == 1
    assert [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX] == [
        wt.vocab["r"],
        wt.vocab["s"],
        1,
    ]


def test_tokenize_records_drops_examples_without_response(tok, caplog):
    recs = [{"instruction": "short", "output": "ok"}, {"instruction": "y " * 200, "output": "z"}]
    examples = D.tokenize_records(recs, tok, max_length=64)
    assert len(examples) == 1 and "dropped 1 of 2" in caplog.text
    with pytest.raises(DataError, match="max_length=64"):
        D.tokenize_records(recs[1:], tok, max_length=64)


# ------------------------------------------------------------------------------------------------
# batching
def _examples(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(3, 20, (1,), generator=g))
        ids = [100 + i] * k
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX, *ids[1:]]})
    return out


def _rows(batch):
    return [tuple(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"], batch["attention_mask"])]


@pytest.mark.parametrize("mode", ["shuffle", "group_by_length"])
def test_padding_batches_cover_epoch_once(mode):
    ex = _examples()
    b = Batcher(ex, batch_size=4, pad_token_id=0, mode=mode, seed=1, mega_batch=2)
    assert len(b) == 6
    batches = list(b)
    assert len(batches) == 6 and b.state_dict()["epoch"] == 1 and b.state_dict()["index"] == 0
    seen = sorted(r for batch in batches for r in _rows(batch))
    assert seen == sorted(tuple(e["input_ids"]) for e in ex)
    for batch in batches:
        pad = batch["attention_mask"] == 0
        assert (batch["labels"][pad] == IGNORE_INDEX).all() and (batch["input_ids"][pad] == 0).all()
        assert batch["input_ids"].dtype == torch.long and batch["labels"].shape == batch["input_ids"].shape
    second = list(b)
    assert [_rows(x) for x in second] != [_rows(x) for x in batches]  # a new order each epoch


def test_group_by_length_reduces_padding_and_longest_first():
    ex = _examples(200)
    padded = {}
    for mode in ("shuffle", "group_by_length"):
        b = Batcher(ex, batch_size=8, pad_token_id=0, mode=mode, seed=0)
        batches = list(b)
        padded[mode] = sum(int((x["attention_mask"] == 0).sum()) for x in batches)
        if mode == "group_by_length":
            assert batches[0]["input_ids"].shape[1] == max(len(e["input_ids"]) for e in ex)
    assert padded["group_by_length"] < padded["shuffle"] / 3


def test_packing_blocks():
    ex = _examples(30)
    total = sum(len(e["input_ids"]) for e in ex)
    b = Batcher(ex, batch_size=3, pad_token_id=0, mode="packing", block_size=16, seed=0)
    rows = total // 16
    assert len(b) == -(-rows // 3)
    batches = list(b)
    stream = torch.cat([x["input_ids"].reshape(-1) for x in batches])
    labels = torch.cat([x["labels"].reshape(-1) for x in batches])
    assert stream.numel() == rows * 16 and all(x["attention_mask"].all() for x in batches)
    assert all(x["input_ids"].shape[1] == 16 for x in batches)
    assert int((labels == IGNORE_INDEX).sum()) <= len(ex)  # only each example's first label is masked
    with pytest.raises(DataError, match="fewer than one block"):
        Batcher(ex[:1], batch_size=1, pad_token_id=0, mode="packing", block_size=1000)


@pytest.mark.parametrize("mode", ["shuffle", "group_by_length", "packing"])
def test_same_seed_same_order_and_exact_resume(mode):
    ex = _examples(40)
    kw = {"batch_size": 4, "pad_token_id": 0, "mode": mode, "seed": 7, "block_size": 12}
    ref = Batcher(ex, **kw)
    stream = ref.forever()
    reference = [next(stream) for _ in range(25)]  # crosses two epoch boundaries
    # same seed: same batches; interrupted at every position: resumes exactly
    for cut in (0, 3, len(ref) - 1, len(ref), 17):
        first = Batcher(ex, **kw)
        it = first.forever()
        head = [next(it) for _ in range(cut)]
        state = first.state_dict()
        resumed = Batcher(ex, **kw)
        resumed.load_state_dict(json.loads(json.dumps(state)))  # survives JSON
        it2 = resumed.forever()
        tail = [next(it2) for _ in range(25 - cut)]
        for a, b in zip(head + tail, reference):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    other = Batcher(ex, **{**kw, "seed": 8})
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(other, reference))


def test_state_mismatch_and_bad_settings():
    ex = _examples(10)
    b = Batcher(ex, batch_size=2, pad_token_id=0)
    state = b.state_dict()
    with pytest.raises(ValueError, match="batch_size: saved 2 vs now 3"):
        Batcher(ex, batch_size=3, pad_token_id=0).load_state_dict(state)
    with pytest.raises(ValueError, match="out of range"):
        b.load_state_dict({**state, "index": 99})
    with pytest.raises(ValueError, match="allowed: shuffle, group_by_length, packing"):
        Batcher(ex, batch_size=2, pad_token_id=0, mode="random")
    with pytest.raises(ValueError, match="pad_token_id"):
        Batcher(ex, batch_size=2, pad_token_id=None)


def test_build_loader_trains_tiny_llama(tok, tiny_llama):
    recs = D.builtin_sample()
    loader = D.build_loader(recs, tok, max_length=128, batch_size=8, group_by_length=True, seed=0)
    model = tiny_llama(num_layers=1, vocab=len(tok), hidden=16)
    batch = next(iter(loader))
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0
    packed = D.build_loader(recs, tok, max_length=64, batch_size=2, packing=True)
    assert next(iter(packed))["input_ids"].shape == (2, 64)
    with pytest.raises(ValueError, match="exclude each other"):
        D.build_loader(recs, tok, max_length=64, batch_size=2, packing=True, group_by_length=True)


# ------------------------------------------------------------------------------------------------
# built-in sample and tokenizer
def test_builtin_sample_deterministic_and_correct():
    recs = D.builtin_sample()
    assert len(recs) == 64 and recs == D.builtin_sample() and recs != D.builtin_sample(seed=1)
    for r in recs:
        expr = r["instruction"].removeprefix("What is ").removesuffix("?")
        assert int(r["answer"]) == eval(expr)  # generated in code: the arithmetic must be right
        assert r["output"] == f"{expr} = {r['answer']}. The answer is {r['answer']}"


def test_builtin_tokenizer_roundtrip_save_load(tok, tmp_path):
    from transformers import AutoTokenizer

    text = D.format_prompt({"instruction": "Größe: 3,5 €?", "output": "x"})
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < 60  # template phrases are single tokens
    assert tok.eos_token_id == 1 and tok.pad_token_id == 0 and tok.padding_side == "right"
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids and loaded.encode(text) == ids
    loaded.padding_side = "left"
    batch = loaded(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, :2].tolist() == [0, 0] and batch["attention_mask"][0].tolist() == [
        0,
        0,
        1,
        1,
    ]
    assert D.builtin_tokenizer(padding_side="left").padding_side == "left"
