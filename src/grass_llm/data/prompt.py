"""The Alpaca prompt of LLM-Adapters, byte for byte (training and its evaluation scripts)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["PROMPT_PHRASES", "PROMPT_STYLES", "RESPONSE_MARKER", "format_prompt"]

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
#: What precedes a response in every prompt (where ``grass_llm.evaluate`` cuts the generated text).
RESPONSE_MARKER = "### Response:"
#: The fixed phrases of the templates (the built-in tokenizer gives each a single token).
PROMPT_PHRASES = (_HEAD_INPUT, _HEAD_NO_INPUT, "### Instruction:", "### Input:", RESPONSE_MARKER, _INDENT)


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
