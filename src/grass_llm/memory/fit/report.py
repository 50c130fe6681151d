"""A plan as ``grass-llm memory --budget`` prints it (Markdown)."""

from __future__ import annotations

from grass_llm.memory.budget import format_size
from grass_llm.memory.fit.margin import Margin
from grass_llm.memory.fit.plans import FitPlan

__all__ = ["format_plan", "gib", "plan_header"]


def gib(n: int | None) -> str:
    return "-" if n is None else format_size(n)


def format_plan(p: FitPlan) -> str:
    """One method's plan: the chosen settings, then every configuration considered up to it (Markdown)."""
    head = f"## {p.method}: " + (f"fits, {' '.join(p.train_args())}" if p.fits else "nothing fits")
    lines = [head, ""]
    if p.fits:
        c = p.chosen
        probe = f", probing {gib(c.probe_peak)}" if c.probe_peak is not None else ""
        lines.append(
            f"whole-run peak {gib(c.peak)} (training {gib(c.train_peak)}{probe}) + margin "
            f"{gib(p.margin.of(c.peak))} = {gib(c.needed)} <= {gib(p.budget)}; "
            f"model: {c.tokens_per_s:,.0f} tokens/s on an H200"
        )
    else:
        lines.append(p.refusal())
    lines += [
        "",
        "| # | micro x accum | checkpointing | residency | training peak | probing peak | peak + margin "
        "| model tokens/s | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, e in enumerate(p.candidates, 1):
        if e.verdict == "not estimated":
            continue
        c = e.candidate
        need = gib(e.needed) if e.needed is not None else f">= {gib(p.margin.needed(e.lower_bound))}"
        lines.append(
            f"| {i} | {c.micro_batch} x {c.grad_accum} | {c.activation_checkpointing} | {c.residency or '-'} | "
            f"{gib(e.train_peak)} | {gib(e.probe_peak)} | {need} | {e.tokens_per_s:,.0f} | {e.verdict} |"
        )
    rest = sum(e.verdict == "not estimated" for e in p.candidates)
    if rest:
        lines.append(f"\n{rest} slower configuration{'s' if rest != 1 else ''} not estimated.")
    return "\n".join(lines)


def plan_header(budget: int, batch_size: int, seq_len: int, margin: Margin) -> str:
    """What the plans below a ``grass-llm memory --budget`` header are."""
    return (
        f"Will it fit {format_size(budget)}? The fastest configuration whose whole-run peak + margin fits, per "
        f"method; effective batch {batch_size} x {seq_len} tokens (micro-batch x gradient accumulation).\n"
        f"margin: {margin.describe()}.\n"
        "peaks: grass-llm memory's estimates (the training step with the worst-case layers, the probing step). "
        "tokens/s: the speed model of docs/fit.md (fitted to H200 measurements); it orders the configurations "
        "of a method."
    )
