"""The results of an evaluation as Markdown tables laid out as the paper's Table 2 / Table 3."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from grass_llm.evaluate.benchmarks import BENCHMARKS, GROUPS

__all__ = ["format_results_markdown", "group_averages"]

_TABLE_TITLES = {
    "arithmetic": "Arithmetic reasoning (accuracy %, layout of Table 2)",
    "commonsense": "Commonsense reasoning (accuracy %, layout of Table 3)",
}


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def format_results_markdown(results: Mapping[str, Any]) -> str:
    """Markdown tables of ``results`` (as returned by ``evaluate_model``), one per group evaluated.

    Columns follow the paper (Table 2: ``| Model | Method | MultiArith | AddSub | GSM8K | AQuA |
    SingleEq | SVAMP | Avg. |``; Table 3: ``BoolQ PIQA SIQA HellaS. WinoG. ARC-e ARC-c OBQA Avg.``);
    a benchmark not evaluated shows ``-``; ``Avg.`` is the mean over the benchmarks evaluated.
    """
    scores = results["benchmarks"]
    lines: list[str] = []
    for group, names in GROUPS.items():
        if group == "all" or not any(n in scores for n in names):
            continue
        cols = [BENCHMARKS[n].column for n in names]
        cells = [_fmt(scores[n]["accuracy"]) if n in scores else "-" for n in names]
        lines += [
            f"### {_TABLE_TITLES[group]}",
            "",
            "| Model | Method | " + " | ".join(cols) + " | Avg. |",
            "|---|---|" + "---:|" * (len(cols) + 1),
            f"| {results['model']} | {results['method']} | "
            + " | ".join(cells)
            + f" | {_fmt(results['averages'][group])} |",
            "",
        ]
    limit = results["settings"].get("limit")
    if limit:
        lines.append(
            f"Evaluated on the first {limit} items of each benchmark (`--limit {limit}`), not the full sets."
        )
        lines.append("")
    for name, reason in results.get("skipped", {}).items():
        lines.append(f"- {name} skipped: {reason}")
    if results.get("skipped"):
        lines.append("")
    return "\n".join(lines)


def group_averages(scores: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """Mean accuracy (%) of each group over the benchmarks of ``scores`` evaluated (None: none was)."""
    averages: dict[str, float | None] = {}
    for group in ("arithmetic", "commonsense"):
        accs = [100.0 * s["correct"] / s["total"] for n, s in scores.items() if BENCHMARKS[n].group == group]
        averages[group] = round(sum(accs) / len(accs), 4) if accs else None
    return averages
