"""The demo's held-out accuracy (``eval_heldout``): built-in arithmetic questions that are not in the
training sample, answered by greedy decoding and scored by LLM-Adapters' arithmetic rule (the same
``grass_llm.evaluate`` code as ``grass-llm eval``)."""

from __future__ import annotations

from typing import Any

import torch

from grass_llm.data import builtin_heldout, format_prompt
from grass_llm.evaluate.benchmarks import Benchmark
from grass_llm.evaluate.generation import generate_responses
from grass_llm.evaluate.scoring import is_correct, predict

__all__ = ["BUILTIN_ARITH", "heldout_accuracy"]

#: The built-in arithmetic questions as a benchmark: numeric answers, the last number of the response.
BUILTIN_ARITH = Benchmark("builtin:arith", "", "arithmetic", "number", "arith")


def heldout_accuracy(model: Any, tokenizer: Any, device: torch.device, n: int) -> float:
    """Accuracy (%) on ``n`` held-out built-in arithmetic questions. The RNG states are left as they
    were (generation runs on a fork), and ``use_cache`` back at False (training's setting)."""
    records = builtin_heldout(n)
    prompts = [format_prompt(r, with_response=False) for r in records]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.config.use_cache = True
        try:
            responses = generate_responses(model, tokenizer, prompts, batch_size=64, max_new_tokens=40)
        finally:
            model.config.use_cache = False
    correct = sum(is_correct(BUILTIN_ARITH, predict(BUILTIN_ARITH, r), rec["answer"]) for rec, r in zip(records, responses))
    return 100.0 * correct / len(records)
