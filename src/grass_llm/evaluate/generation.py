"""Batched greedy decoding (``do_sample=False``, left padding) and the responses it gives to text prompts.
``transformers`` is imported only inside the functions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from grass_llm.evaluate.benchmarks import EvalInputError
from grass_llm.evaluate.scoring import RESPONSE_MARKER, extract_response

__all__ = ["generate_responses", "greedy_generate"]


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def greedy_generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    eos_id: int | None,
    max_new_tokens: int,
    batch_size: int,
) -> list[list[int]]:
    """Greedy continuations (new token ids only) of tokenised ``prompts``, batched with left padding.

    Prompts are sorted by length so that a batch holds similar lengths; results come back in the order
    of ``prompts``. ``eos_id=None``: generate ``max_new_tokens`` tokens. The model's train/eval mode is
    restored afterwards.
    """
    from transformers import GenerationConfig

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    gen_cfg = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id
    )
    device = _model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)  # (B, T) left-padded
            attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids = list(prompts[i])
                input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[r, width - len(ids) :] = 1
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=gen_cfg,
            )  # (B, T + new)
            out = out.cpu()
            for r, i in enumerate(idx):
                outputs[i] = out[r, width:].tolist()
    finally:
        if was_training:
            model.train()
    return outputs


def generate_responses(
    model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy responses to text ``prompts`` (``greedy_generate``; the text after ``### Response:`` of
    prompt + generation). Decoding skips special tokens, as LLM-Adapters does."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise EvalInputError("the tokenizer has neither a pad nor an eos token; cannot batch prompts")
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    new = greedy_generate(model, encoded, pad_id, tokenizer.eos_token_id, max_new_tokens, batch_size)
    responses = []
    for ids, gen in zip(encoded, new):
        full = tokenizer.decode(list(ids) + gen, skip_special_tokens=True)
        if RESPONSE_MARKER in full:
            responses.append(extract_response(full))
        else:  # a tokenizer whose decode does not reproduce the prompt text
            responses.append(tokenizer.decode(gen, skip_special_tokens=True).strip())
    return responses
