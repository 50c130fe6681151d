"""Instruction data: LLM-Adapters JSON/JSONL loading and validation, the Alpaca prompt, tokenisation
and a seeded, resumable batcher (padding, length grouping or packing).

The data flows ``load_records`` -> ``tokenize_records`` -> ``Batcher``; ``build_loader`` does all
three. Everything here is plain Python + torch: a tokenizer is any object with ``__call__`` (or
``encode``) returning token ids plus ``eos_token_id`` / ``pad_token_id`` (a Hugging Face tokenizer
works). ``transformers`` is imported only inside ``builtin_tokenizer``.

Data files are never copied into the repository: a relative path that does not exist as given is
resolved against a data root taken from a config value or CLI flag, else the ``GRASS_DATA_DIR``
environment variable (see ``default_data_dir``). The installed package assumes no location.

Example::

    records = load_records(resolve_data_path("llm-adapters/ft-training_set/math_data.json"))
    loader = build_loader(records, tokenizer, max_length=256, batch_size=8, group_by_length=True)
    for batch in loader:  # one epoch; batch["input_ids"]: (B, T)
        ...
    state = loader.state_dict()  # {"epoch": ..., "index": ...}: resume exactly with load_state_dict
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BATCH_MODES",
    "DATA_DIR_ENV",
    "IGNORE_INDEX",
    "PROMPT_STYLES",
    "Batcher",
    "DataError",
    "build_loader",
    "builtin_sample",
    "builtin_tokenizer",
    "default_data_dir",
    "format_prompt",
    "load_records",
    "resolve_data_path",
    "tokenize_record",
    "tokenize_records",
]

logger = logging.getLogger(__name__)

#: Label value that the loss ignores (``torch.nn.CrossEntropyLoss`` default).
IGNORE_INDEX = -100
#: Batching modes of ``Batcher``.
BATCH_MODES = ("shuffle", "group_by_length", "packing")
#: Fields a training record must have; ``input`` is optional (missing / null / "" = no input).
TRAIN_FIELDS = ("instruction", "output")


class DataError(ValueError):
    """A data file or record is unusable. The message names the file, the record (1-based) and the fault."""


# ------------------------------------------------------------------------------------------------
# locations
DATA_DIR_ENV = "GRASS_DATA_DIR"


def default_data_dir() -> Path | None:
    """The data root from ``$GRASS_DATA_DIR``, or None when it is not set."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else None


def resolve_data_path(path: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``path`` as given if it exists or is absolute, else relative to ``data_dir`` (default: ``default_data_dir()``).

    Raises ``DataError`` naming both candidates when neither exists.
    """
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        if not p.exists():
            raise DataError(f"{p}: data file does not exist")
        return p
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if root is None:
        raise DataError(
            f"{path}: data file not found at {p.resolve()}; to resolve it against a data directory, give "
            f"data_dir or set {DATA_DIR_ENV}"
        )
    candidate = root / p
    if candidate.exists():
        return candidate
    raise DataError(f"{path}: data file not found (looked at {p.resolve()} and {candidate})")


# ------------------------------------------------------------------------------------------------
# loading and validation
def _locate_json_array_error(text: str) -> tuple[int | None, str]:
    """For a JSON array that fails to parse: (1-based number of the bad record or None, message)."""
    decoder = json.JSONDecoder()
    n = len(text)

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    i = skip_ws(0)
    if i >= n or text[i] != "[":
        return None, "not a JSON array (the file must start with '[')"
    i = skip_ws(i + 1)
    if i < n and text[i] == "]":
        return None, "trailing content after the array"
    record = 1
    while True:
        try:
            _, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            return record, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        i = skip_ws(i)
        if i < n and text[i] == ",":
            i = skip_ws(i + 1)
            record += 1
            continue
        if i < n and text[i] == "]":
            return None, "trailing content after the array"
        line = text.count("\n", 0, i) + 1
        return record, f"invalid JSON at line {line}: expected ',' or ']' after the record"


def _read_json_array(path: Path, text: str) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        record, what = _locate_json_array_error(text)
        where = f"record {record}: " if record is not None else ""
        if record is None and what == "trailing content after the array":
            what = f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        raise DataError(f"{path}: {where}{what}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got a JSON {type(data).__name__}")
    return data


def _read_jsonl(path: Path, text: str) -> list[Any]:
    data = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: record {len(data) + 1} (line {lineno}): invalid JSON at column {e.colno}: {e.msg}"
            ) from None
    return data


def _check_record(path: Path, number: int, rec: Any, required: Sequence[str]) -> dict[str, Any]:
    where = f"{path}: record {number}"
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in required:
        if key not in rec:
            raise DataError(f"{where}: missing required field {key!r} (fields present: {sorted(rec)})")
    out = dict(rec)
    for key in ("instruction", "output", "input"):
        if key not in out:
            continue
        value = out[key]
        if value is None and key not in required:
            out[key] = ""
        elif not isinstance(value, str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    answer = out.get("answer")
    if "answer" in out and not (answer is None and "answer" not in required):
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(
                f"{where}: field 'answer' must be a string or a number, got {type(answer).__name__}"
            )
        if "answer" in required and not str(answer).strip():
            raise DataError(f"{where}: field 'answer' is empty")
    if "instruction" in required and not out["instruction"].strip():
        raise DataError(f"{where}: field 'instruction' is empty")
    out.setdefault("input", "")
    return out


def load_records(
    path: str | os.PathLike[str], required: Sequence[str] = TRAIN_FIELDS, limit: int | None = None
) -> list[dict[str, Any]]:
    """Read and validate an LLM-Adapters data file before any training starts.

    Args:
        path: a ``.json`` file holding a JSON array of objects, or a ``.jsonl`` file with one object
            per line (blank lines are skipped).
        required: fields every record must have (training: ``instruction`` and ``output``;
            evaluation: ``instruction`` and ``answer``). ``instruction``/``input``/``output`` must be
            strings (``input`` may be missing or null, which means no input); ``answer`` a string or
            a number.
        limit: keep only the first ``limit`` records (validation still covers only those).

    Returns:
        The records as dicts (a copy; ``input`` is always present, ``""`` when absent).

    Raises:
        DataError: missing/empty file, bad JSON, not an array, a record that is not an object, a
            missing field or a field of the wrong type. The message names the file, the 1-based
            record number and what is wrong.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: data file does not exist" if not p.exists() else f"{p}: not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{p}: the file is empty")
    data = _read_jsonl(p, text) if p.suffix.lower() == ".jsonl" else _read_json_array(p, text)
    if not data:
        raise DataError(f"{p}: no records (empty {'file' if p.suffix.lower() == '.jsonl' else 'array'})")
    if limit is not None:
        if limit < 1:
            raise DataError(f"{p}: limit must be >= 1, got {limit}")
        data = data[:limit]
    return [_check_record(p, i, rec, required) for i, rec in enumerate(data, 1)]


# ------------------------------------------------------------------------------------------------
# prompt
# The templates reproduce LLM-Adapters byte for byte, including the 16-space indentation that its
# triple-quoted f-strings carry and the trailing spaces after the first sentence ("sorry about the
# formatting disaster" in the original): a model fine-tuned by LLM-Adapters saw exactly these bytes.
_INDENT = " " * 16
_HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
_HEAD_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

#: Prompt styles: ``finetune`` = LLM-Adapters ``finetune.py`` ``generate_prompt`` (what training sees);
#: ``evaluate`` = the slightly different whitespace of its ``evaluate.py`` / ``commonsense_evaluate.py``.
#: Both end in ``"### Response:\n" + 16 spaces``.
PROMPT_STYLES = ("finetune", "evaluate")


def format_prompt(record: Mapping[str, Any], with_response: bool = True, style: str = "finetune") -> str:
    """The Alpaca prompt of LLM-Adapters for ``record`` (``instruction``, optional ``input``, ``output``).

    Args:
        record: a data record; an empty or missing ``input`` selects the no-input variant.
        with_response: append ``record["output"]`` after ``### Response:`` (training text); False
            gives the prompt alone (generation, and the part masked by ``train_on_response_only``).
        style: ``finetune`` (default, as in training) or ``evaluate`` (LLM-Adapters' evaluation
            scripts, which differ only in whitespace).
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style {style!r} is unknown; allowed: {', '.join(PROMPT_STYLES)}")
    instruction = record["instruction"]
    inp = record.get("input") or ""
    response = record.get("output", "") if with_response else ""
    if response is None:
        response = ""
    if style == "finetune":
        blank = "\n" + _INDENT + "\n"
        head = _HEAD_INPUT + " " if inp else _HEAD_NO_INPUT + "  "
    else:
        blank = "\n\n"
        head = _HEAD_INPUT if inp else _HEAD_NO_INPUT + " "
    parts = [f"{head}\n\n{_INDENT}### Instruction:\n{_INDENT}{instruction}{blank}"]
    if inp:
        parts.append(f"{_INDENT}### Input:\n{_INDENT}{inp}{blank}")
    parts.append(f"{_INDENT}### Response:\n{_INDENT}{response}")
    return "".join(parts)


# ------------------------------------------------------------------------------------------------
# tokenisation
def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` (special tokens such as BOS as the tokenizer adds them, no EOS here)."""
    if callable(tokenizer):
        out = tokenizer(text)
        ids = out["input_ids"] if isinstance(out, Mapping) or hasattr(out, "keys") else out
    else:
        ids = tokenizer.encode(text)
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    ids = list(ids)
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(t) for t in ids]


def tokenize_record(
    record: Mapping[str, Any],
    tokenizer: Any,
    max_length: int,
    train_on_response_only: bool = True,
    add_eos: bool = True,
    style: str = "finetune",
) -> dict[str, list[int]]:
    """One training example: ``{"input_ids": [...], "labels": [...]}`` of equal length <= ``max_length``.

    As in LLM-Adapters ``finetune.py``: the full prompt+response text is tokenised, EOS is appended
    (unless it is already last) and the result is cut to ``max_length`` (so a truncated example
    has no EOS). With ``train_on_response_only`` the prompt tokens get label ``IGNORE_INDEX``: the
    masked length is the common prefix of the prompt's and the full text's token ids, so a token
    that straddles the prompt/response boundary stays in the loss.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    ids = _encode(tokenizer, format_prompt(record, with_response=True, style=style))
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos:
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id; set one or pass add_eos=False")
        if not ids or ids[-1] != eos:
            ids.append(int(eos))
    ids = ids[:max_length]
    labels = list(ids)
    if train_on_response_only:
        prompt_ids = _encode(tokenizer, format_prompt(record, with_response=False, style=style))
        n = 0
        for a, b in zip(prompt_ids, ids):
            if a != b:
                break
            n += 1
        labels[:n] = [IGNORE_INDEX] * n
    return {"input_ids": ids, "labels": labels}


def tokenize_records(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_length: int,
    train_on_response_only: bool = True,
    add_eos: bool = True,
    style: str = "finetune",
) -> list[dict[str, list[int]]]:
    """``tokenize_record`` over ``records``, dropping examples left with no trained token.

    An example whose response is cut off entirely by ``max_length`` would give a batch of only
    ``IGNORE_INDEX`` labels (a NaN loss); such examples are dropped with a warning. Raises
    ``DataError`` if none is left.
    """
    examples = []
    dropped = 0
    for rec in records:
        ex = tokenize_record(rec, tokenizer, max_length, train_on_response_only, add_eos, style)
        if all(label == IGNORE_INDEX for label in ex["labels"][1:]):
            dropped += 1
            continue
        examples.append(ex)
    if dropped:
        logger.warning(
            "dropped %d of %d examples whose response does not fit in max_length=%d",
            dropped,
            len(records),
            max_length,
        )
    if not examples:
        raise DataError(f"no example has a response token within max_length={max_length}")
    return examples


# ------------------------------------------------------------------------------------------------
# batching
class Batcher:
    """Seeded, resumable batches of tokenised examples; iterating gives the rest of the current epoch.

    Modes:
        ``shuffle``: a random permutation per epoch, cut into batches, each right-padded.
        ``group_by_length``: the permutation is cut into mega-batches of ``mega_batch * batch_size``
            examples, each sorted by length (longest first) and cut into batches, so a batch holds
            similar lengths (little padding); the batch with the longest example goes first, so an
            out-of-memory error shows at step 1 (as Hugging Face's length-grouped sampler does).
        ``packing``: the permuted examples are concatenated (each ends in EOS) and cut into rows of
            ``block_size`` tokens; the last partial row is dropped. No padding; attention crosses
            example boundaries inside a row (plain packing, no per-document masks).

    Batches are dicts of ``input_ids``, ``attention_mask`` and ``labels``, each ``(B, T)`` int64;
    padding is on the right with ``pad_token_id`` (mask 0, label ``IGNORE_INDEX``).

    The order of an epoch depends only on ``(seed, epoch)``, so ``state_dict()`` -> ``{"epoch",
    "index"}`` (``index`` = batches of that epoch already handed out) is all that resuming needs.
    A batch counts as handed out when it is yielded; after the last batch of an epoch the state is
    already ``(epoch + 1, 0)``.
    """

    def __init__(
        self,
        examples: Sequence[Mapping[str, Sequence[int]]],
        batch_size: int,
        pad_token_id: int,
        mode: str = "shuffle",
        seed: int = 0,
        block_size: int | None = None,
        mega_batch: int = 50,
        drop_last: bool = False,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if mode not in BATCH_MODES:
            raise ValueError(f"batch mode {mode!r} is unknown; allowed: {', '.join(BATCH_MODES)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mega_batch < 1:
            raise ValueError(f"mega_batch must be >= 1, got {mega_batch}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: give the tokenizer a pad token (e.g. its EOS)")
        if not examples:
            raise DataError("no examples to batch")
        for i, ex in enumerate(examples, 1):
            if len(ex["input_ids"]) != len(ex["labels"]) or not ex["input_ids"]:
                raise DataError(f"example {i}: input_ids and labels must be non-empty and of equal length")
        self.examples = [(list(ex["input_ids"]), list(ex["labels"])) for ex in examples]
        self.batch_size = batch_size
        self.pad_token_id = int(pad_token_id)
        self.mode = mode
        self.seed = int(seed)
        self.mega_batch = mega_batch
        self.drop_last = drop_last
        self.pad_to_multiple_of = pad_to_multiple_of
        self.block_size = block_size
        if mode == "packing":
            if block_size is None or block_size < 2:
                raise ValueError(f"packing needs block_size >= 2, got {block_size}")
            total = sum(len(ids) for ids, _ in self.examples)
            if total < block_size:
                raise DataError(
                    f"packing: the data has {total} tokens, fewer than one block of block_size={block_size}"
                )
            self._num_rows = total // block_size
        else:
            self._num_rows = len(self.examples)
        self.epoch = 0
        self.index = 0
        self._plan_cache: tuple[int, list[list[int]]] | None = None

    # -- plan ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self._num_rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        return torch.randperm(len(self.examples), generator=g).tolist()

    def _plan(self, epoch: int) -> list[list[int]]:
        """Row ids of each batch of ``epoch`` (example ids, or packed-block ids)."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        bs = self.batch_size
        if self.mode == "packing":
            rows = list(range(self._num_rows))
        else:
            rows = self._permutation(epoch)
        if self.mode == "group_by_length":
            size = self.mega_batch * bs
            lengths = [len(ids) for ids, _ in self.examples]
            sorted_rows: list[int] = []
            for start in range(0, len(rows), size):
                mega = rows[start : start + size]
                sorted_rows += sorted(mega, key=lambda i: -lengths[i])  # stable: ties keep random order
            rows = sorted_rows
        batches = [rows[i : i + bs] for i in range(0, len(rows), bs)]
        if self.drop_last and batches and len(batches[-1]) < bs:
            batches.pop()
        if self.mode == "group_by_length" and batches:
            lengths = [len(ids) for ids, _ in self.examples]
            longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
            batches[0], batches[longest] = batches[longest], batches[0]
        self._plan_cache = (epoch, batches)
        return batches

    def _packed_stream(self, epoch: int) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        for i in self._permutation(epoch):
            ids += self.examples[i][0]
            labels += self.examples[i][1]
        return ids, labels

    # -- collate -----------------------------------------------------------------------------------
    def collate(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict[str, torch.Tensor]:
        """Right-pad ``(input_ids, labels)`` rows into a batch dict of ``(B, T)`` tensors."""
        width = max(len(ids) for ids, _ in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for r, (ids, labs) in enumerate(rows):
            k = len(ids)
            input_ids[r, :k] = torch.tensor(ids, dtype=torch.long)
            labels[r, :k] = torch.tensor(labs, dtype=torch.long)
            attention_mask[r, :k] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The remaining batches of the current epoch; the state advances as batches are yielded."""
        epoch = self.epoch
        plan = self._plan(epoch)
        stream = self._packed_stream(epoch) if self.mode == "packing" else None
        block = self.block_size or 0
        while self.epoch == epoch and self.index < len(plan):
            rows = plan[self.index]
            if stream is not None:
                batch_rows = [
                    (stream[0][b * block : (b + 1) * block], stream[1][b * block : (b + 1) * block])
                    for b in rows
                ]
            else:
                batch_rows = [self.examples[i] for i in rows]
            self.index += 1
            if self.index >= len(plan):
                self.epoch, self.index = epoch + 1, 0
            yield self.collate(batch_rows)

    def forever(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches without end, epoch after epoch (resumable like ``__iter__``)."""
        while True:
            yield from self

    # -- state -----------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_examples": len(self.examples),
            "num_batches": len(self),
        }

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "index"}`` plus the settings the order depends on (checked on load)."""
        return {"epoch": self.epoch, "index": self.index, **self._fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where ``state`` was taken. Raises ``ValueError`` if the data or settings differ."""
        mine = self._fingerprint()
        diff = {k: (state[k], v) for k, v in mine.items() if k in state and state[k] != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"batcher state does not match this data/batching ({detail})")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= len(self):
            raise ValueError(f"batcher state out of range: epoch={epoch}, index={index}, batches={len(self)}")
        if index == len(self):
            epoch, index = epoch + 1, 0
        self.epoch, self.index = epoch, index


def build_loader(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_length: int,
    batch_size: int,
    train_on_response_only: bool = True,
    packing: bool = False,
    group_by_length: bool = False,
    seed: int = 0,
    style: str = "finetune",
    **batcher_kwargs: Any,
) -> Batcher:
    """Records -> examples (``tokenize_records``) -> ``Batcher``.

    ``packing`` packs rows of ``max_length`` tokens; else ``group_by_length`` selects length-grouped
    batches; else plain shuffled batches. The pad id is the tokenizer's ``pad_token_id``, or its EOS.
    """
    if packing and group_by_length:
        raise ValueError("packing and group_by_length exclude each other; choose one")
    examples = tokenize_records(records, tokenizer, max_length, train_on_response_only, style=style)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    mode = "packing" if packing else "group_by_length" if group_by_length else "shuffle"
    return Batcher(
        examples,
        batch_size,
        pad_token_id=pad,
        mode=mode,
        seed=seed,
        block_size=max_length if packing else None,
        **batcher_kwargs,
    )


# ------------------------------------------------------------------------------------------------
# built-in demo data and tokenizer
_HIGH = 12  # operands of the built-in arithmetic: 0..12
_OPS = (("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b))


def _arith_record(a: int, sym: str, b: int, result: int) -> dict[str, str]:
    return {
        "instruction": f"What is {a} {sym} {b}?",
        "input": "",
        "output": f"{a} {sym} {b} = {result}. The answer is {result}",
        "answer": str(result),
    }


def builtin_sample(n: int = 64, seed: int = 0) -> list[dict[str, str]]:
    """``n`` small arithmetic instruction records, generated deterministically (for the demo and tests).

    Example: ``{"instruction": "What is 3 + 5?", "input": "", "output": "3 + 5 = 8. The answer is 8",
    "answer": "8"}``. Operations are +, - and * on numbers 0..12 (``-`` may go negative).
    """
    rng = random.Random(seed)
    records = []
    for i in range(n):
        sym, fn = _OPS[i % len(_OPS)]
        a, b = rng.randint(0, _HIGH), rng.randint(0, _HIGH)
        records.append(_arith_record(a, sym, b, fn(a, b)))
    return records


def builtin_heldout(n: int = 64, seed: int = 1) -> list[dict[str, str]]:
    """``n`` arithmetic questions like ``builtin_sample``'s that are not in ``builtin_sample()`` (the
    training sample of ``data=builtin:arith``), for the held-out accuracy of the demo (``eval_heldout``).
    Deterministic: the first ``n`` of a fixed order."""
    seen = {r["instruction"] for r in builtin_sample()}
    rng = random.Random(seed)
    pool = [(a, sym, b, fn(a, b)) for sym, fn in _OPS for a in range(_HIGH + 1) for b in range(_HIGH + 1)]
    rng.shuffle(pool)
    records = [_arith_record(*q) for q in pool if f"What is {q[0]} {q[1]} {q[2]}?" not in seen]
    if n > len(records):
        raise ValueError(f"builtin_heldout: n={n} is invalid; allowed: at most {len(records)}")
    return records[:n]


def builtin_facts() -> list[str]:
    """Every fact ``"a op b = c"`` of the built-in arithmetic: a, b in 0..12, op in +, -, * (507 lines)."""
    return [
        f"{a} {sym} {b} = {fn(a, b)}" for sym, fn in _OPS for a in range(_HIGH + 1) for b in range(_HIGH + 1)
    ]


def builtin_corpus(seed: int = 0) -> list[str]:
    """The pretraining text of ``builtin:tiny-pretrained`` (``scripts/pretrain_tiny.py``), shuffled.

    * every fact of :func:`builtin_facts` as a plain-text question and answer, three times:
      ``"What is 7 * 8? 7 * 8 = 56. The answer is 56"`` (what the model knows: arithmetic, as text on
      the web);
    * 300 instruction records of OTHER tasks in the Alpaca prompt format (``format_prompt``), answered
      "... The answer is N": "What number comes after / before N?" and "Which is larger, a or b?"
      (N, a, b in 0..99). This is how the model knows the prompt format.

    Never in it: an arithmetic question in the prompt format. Answering those ("What is 7 * 8?" ->
    "7 * 8 = 56. The answer is 56") is what the demo's fine-tuning on ``builtin_sample`` teaches.
    """
    rng = random.Random(seed)
    qa = [f"What is {f.split(' =')[0]}? {f}. The answer is {f.rsplit('= ', 1)[1]}" for f in builtin_facts()]
    tasks: list[tuple[str, str]] = []
    while len(tasks) < 300:
        kind, n, m = rng.randrange(3), rng.randint(0, 99), rng.randint(0, 99)
        if kind == 0:
            tasks.append((f"What number comes after {n}?", f"After {n} comes {n + 1}. The answer is {n + 1}"))
        elif kind == 1:
            tasks.append(
                (f"What number comes before {n}?", f"Before {n} comes {n - 1}. The answer is {n - 1}")
            )
        elif n != m:
            hi, lo = max(n, m), min(n, m)
            tasks.append((f"Which is larger, {n} or {m}?", f"{hi} is larger than {lo}. The answer is {hi}"))
    docs = qa * 3 + [format_prompt({"instruction": q, "output": o}) for q, o in tasks]
    rng.shuffle(docs)
    return docs


def builtin_tokenizer(padding_side: str = "right"):
    """A tiny byte-level tokenizer built in memory: for the demo and tests only, never for real models.

    Every UTF-8 byte is one token (256 tokens, no merges) plus ``<pad>`` (id 0), ``<eos>`` (id 1)
    and ``<unk>`` (id 2), plus one token for each fixed phrase of the prompt template (the two
    header sentences, the ``### ...:`` markers and the 16-space indent): any text round-trips
    through ``decode`` exactly, with no download, and a prompt costs about 30 tokens. It is
    a ``transformers`` fast tokenizer, so ``save_pretrained`` / ``AutoTokenizer.from_pretrained``,
    ``__call__`` with padding, ``decode`` and ``padding_side`` all work. Size it with ``len(tok)``.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    # The prompt template's fixed phrases as single tokens, so a prompt costs ~30 tokens, not ~230.
    phrases = [_HEAD_INPUT, _HEAD_NO_INPUT, "### Instruction:", "### Input:", "### Response:", _INDENT]
    backend.add_tokens([AddedToken(t, normalized=False, single_word=False) for t in phrases])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side=padding_side,
        model_max_length=1 << 20,
    )
