"""Tokenisation of instruction records into training examples: ``input_ids`` and ``labels``, the prompt
masked with ``IGNORE_INDEX`` when only the response is trained."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from grass_llm.data.prompt import format_prompt
from grass_llm.data.records import DataError
from grass_llm.loss import IGNORE_INDEX

__all__ = ["tokenize_record", "tokenize_records"]

logger = logging.getLogger("grass_llm.data")


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
