"""The ``grass-llm memory`` table: estimates as Markdown (:func:`format_table`)."""

from __future__ import annotations

from collections.abc import Sequence

from grass_llm.memory.inputs import check_choice
from grass_llm.memory.result import STEP_LABELS, MemoryEstimate
from grass_llm.memory.tracker import CATEGORIES

__all__ = ["UNITS", "format_table"]

_CATEGORY_LABELS = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "activations": "activations + temporaries",
    "workspaces": "cuBLAS workspaces",
}
#: the table's units
UNITS = {"GiB": 2**30, "GB": 1e9}


def format_table(
    estimates: Sequence[MemoryEstimate],
    paper: dict[str, float] | None = None,
    unit: str = "GiB",
) -> str:
    """A Markdown table of ``estimates``: per row the model, the method, what the peak is of (the whole run,
    a training step or a probing step), the breakdown of the peak and the peak in ``unit`` (``GiB`` or
    ``GB``). Whole-run peaks are bold when the table has any; else every peak is.

    ``paper`` maps a method label (``MemoryEstimate.method_label``) to a reference figure shown beside the
    estimate.
    """
    check_choice("unit", unit, tuple(UNITS))
    scale = UNITS[unit]
    cols = ["model", "method", "peak of", "B", "T", *(_CATEGORY_LABELS[c] for c in CATEGORIES), f"peak ({unit})"]
    if paper is not None:
        cols.append("paper")
    measured = any(e.measured_peak is not None for e in estimates)
    if measured:
        cols.append(f"measured max_memory_allocated ({unit})")
    bold_runs = any(e.phase == "run" for e in estimates)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for e in estimates:
        bold = e.phase == "run" or not bold_runs
        row = [
            e.model,
            e.method_label + {"none": "", "full": " +AC", "frozen": " +AC frozen"}[e.activation_checkpointing],
            _peak_of(e),
            str(e.batch_size),
            str(e.seq_len),
        ]
        row += [f"{getattr(e, c) / scale:.2f}" for c in CATEGORIES]
        row.append(f"**{e.peak / scale:.2f}**" if bold else f"{e.peak / scale:.2f}")
        if paper is not None:
            ref = paper.get(e.method_label)
            row.append("" if ref is None else f"{ref:.2f}")
        if measured:
            row.append("" if e.measured_peak is None else f"{e.measured_peak / scale:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _peak_of(e: MemoryEstimate) -> str:
    """The ``peak of`` cell: the step, or for a whole run the step that sets it."""
    if e.phase != "run":
        return e.step
    source = e.extra.get("whole_run_from", "train")
    if source == "train" and e.extra.get("other_layers_states_added"):
        return "whole run: training step + every layer's states (offload=off)"
    return f"whole run: {STEP_LABELS[source]}"
