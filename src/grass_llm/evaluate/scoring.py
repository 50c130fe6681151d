"""The answer-extraction rules of LLM-Adapters' ``evaluate.py`` (arithmetic) and
``commonsense_evaluate.py`` (module docstring of ``grass_llm.evaluate``), and whether a prediction is
correct. Pure Python: what ``grass-llm eval``, the recipe's held-out accuracy and the benchmarks share."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from grass_llm.data import RESPONSE_MARKER
from grass_llm.evaluate.benchmarks import Benchmark

__all__ = [
    "NUMBER_TOLERANCE",
    "RESPONSE_MARKER",
    "extract_choice",
    "extract_letter",
    "extract_number",
    "extract_response",
    "gold_answer",
    "is_correct",
    "predict",
]

#: Maximum |prediction - gold| for an arithmetic answer to count (LLM-Adapters ``miss = 0.001``).
NUMBER_TOLERANCE = 1e-3
_NUMBER_RE = re.compile(r"-?\d+\.?\d*")
_LETTER_RE = re.compile(r"A|B|C|D|E")


def extract_response(text: str) -> str:
    """The text after ``### Response:``, stripped (``text.split("### Response:")[1]`` as upstream).

    Text without the marker is returned stripped as a whole.
    """
    parts = text.split(RESPONSE_MARKER)
    return (parts[1] if len(parts) > 1 else parts[0]).strip()


def extract_number(response: str) -> float | None:
    """The last number of ``response`` after removing commas, or None if there is none."""
    found = _NUMBER_RE.findall(response.replace(",", ""))
    if not found:
        return None
    try:
        return float(found[-1])
    except ValueError:  # pragma: no cover - the regex only matches float syntax
        return None


def extract_letter(response: str) -> str | None:
    """The first of the capital letters A-E anywhere in ``response`` (AQuA), or None."""
    found = _LETTER_RE.findall(response.strip())
    return found[0] if found else None


def extract_choice(response: str, labels: Sequence[str]) -> str | None:
    """The first occurrence of any of ``labels`` in ``response`` (case-sensitive), or None."""
    found = re.findall("|".join(re.escape(label) for label in labels), response.strip())
    return found[0] if found else None


def predict(bench: Benchmark, response: str) -> float | str | None:
    """The prediction that ``bench``'s rule extracts from ``response`` (None: nothing found)."""
    if bench.kind == "number":
        return extract_number(response)
    if bench.kind == "letter":
        return extract_letter(response)
    return extract_choice(response, bench.labels)


def gold_answer(bench: Benchmark, answer: Any) -> float | str:
    """A record's ``answer`` as ``bench``'s rule compares it (a number, or the stripped text)."""
    if bench.kind == "number":
        return float(str(answer).replace(",", ""))
    return str(answer).strip()


def is_correct(bench: Benchmark, prediction: float | str | None, gold: Any) -> bool:
    """Whether ``prediction`` matches ``gold`` (the record's ``answer``) under ``bench``'s rule."""
    if prediction is None:
        return False
    if bench.kind == "number":
        return abs(float(prediction) - gold_answer(bench, gold)) <= NUMBER_TOLERANCE
    return prediction == gold_answer(bench, gold)
