"""The search: :func:`plan`, the fastest configuration of a method whose whole-run peak and margin fit a
budget. The configurations (:func:`candidates`) are ordered by the speed model and estimated fastest first,
up to the first that fits (see :mod:`grass_llm.memory.fit`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from grass_llm.memory.budget import BudgetError, parse_budget
from grass_llm.memory.fit.context import PlanContext, plan_context
from grass_llm.memory.fit.margin import Margin
from grass_llm.memory.fit.peaks import evaluate, lower_bound, work
from grass_llm.memory.fit.plans import CHECKPOINTING, RESIDENCIES, Candidate, Evaluated, FitError, FitPlan
from grass_llm.memory.fit.speed import SPEED_MODEL, SpeedModel

__all__ = ["candidates", "plan"]


def plan(
    model: Any,
    budget: int | float | str,
    method: str = "grass",
    *,
    batch_size: int = 1,
    seq_len: int = 1024,
    dtype: str = "bf16",
    rank: int = 128,
    active_layers: int | None = None,
    chunked_loss: bool = True,
    optimizer_impl: str = "auto",
    overrides: dict[str, Any] | None = None,
    margin: Margin | None = None,
    micro_batches: Sequence[int] | None = None,
    checkpointing: Sequence[str] | None = None,
    residencies: Sequence[str] | None = None,
    speed: SpeedModel = SPEED_MODEL,
) -> FitPlan:
    """The fastest configuration of ``method`` whose whole-run peak + ``margin`` fits ``budget``.

    Args:
        model: a ``PretrainedConfig``, a config.json path or directory, or a cached hub name.
        budget: device memory, in bytes (an int), or as written (``"24GiB"``, ``"24GB"``, ``24.0`` GiB).
        method: a ``grass-llm train`` method.
        batch_size: the effective batch B (rows per optimizer step), kept as micro-batch x grad_accum.
        seq_len: tokens per row (``max_length``).
        dtype, rank, active_layers, chunked_loss, optimizer_impl, overrides: as in
            :func:`grass_llm.memory.estimate.estimate_memory` (``overrides``: more ``grass-llm train`` keys;
            not the keys the plan chooses, :data:`KNOBS`).
        margin: what the device needs beyond the estimated peak (default :class:`Margin`).
        micro_batches, checkpointing, residencies: restrict the search to these values.
        speed: the speed model that orders the configurations.

    Returns a :class:`FitPlan`; ``plan.chosen`` is None when nothing fits (``plan.refusal()`` says why).
    """
    t0 = time.perf_counter()
    budget = _budget(budget)
    margin = Margin() if margin is None else margin
    ctx = plan_context(
        model,
        dict(
            method=method,
            batch_size=batch_size,
            seq_len=seq_len,
            dtype=dtype,
            rank=rank,
            active_layers=active_layers,
            chunked_loss=chunked_loss,
            optimizer_impl=optimizer_impl,
            overrides=overrides,
        ),
    )
    evaluated = _ranked(ctx, candidates(ctx, micro_batches, checkpointing, residencies), speed)
    chosen = next((e for e in evaluated if evaluate(ctx, e, budget, margin)), None)
    return FitPlan(
        model=ctx.name,
        method=method,
        budget=budget,
        batch_size=batch_size,
        seq_len=seq_len,
        margin=margin,
        candidates=evaluated,
        chosen=chosen,
        seconds=time.perf_counter() - t0,
        estimates=ctx.stats["estimates"],
        cached=ctx.stats["cached"],
    )


def _budget(budget: int | float | str) -> int:
    """``budget`` in bytes (an int as it is; a size as written parsed); :class:`FitError` when invalid."""
    if isinstance(budget, bool) or not isinstance(budget, int):
        try:
            return parse_budget("budget", budget)
        except BudgetError as e:
            raise FitError(str(e)) from None
    if budget < 1:
        raise FitError(f"budget={budget!r} is invalid; allowed: a number of bytes > 0, or a size such as 24GiB")
    return budget


def _ranked(ctx: PlanContext, cands: list[Candidate], speed: SpeedModel) -> list[Evaluated]:
    """The candidates with their modelled speed and lower bound, fastest first; ties (none in practice) by
    less recomputation, then the larger micro-batch."""
    evaluated = []
    for cand in cands:
        w = work(ctx, cand)
        seconds = speed.seconds(ctx.shape, w)
        tokens_per_s = ctx.batch_size * ctx.seq_len / seconds
        evaluated.append(
            Evaluated(cand, seconds, tokens_per_s, speed.breakdown(ctx.shape, w), lower_bound(ctx, cand))
        )
    order = {c: i for i, c in enumerate(CHECKPOINTING)}
    evaluated.sort(
        key=lambda e: (e.step_seconds, order[e.candidate.activation_checkpointing], -e.candidate.micro_batch)
    )
    return evaluated


def candidates(
    ctx: PlanContext,
    micro_batches: Sequence[int] | None,
    checkpointing: Sequence[str] | None,
    residencies: Sequence[str] | None,
) -> list[Candidate]:
    B = ctx.batch_size
    divisors = [m for m in range(B, 0, -1) if B % m == 0]
    if micro_batches is not None:
        bad = [m for m in micro_batches if m not in divisors]
        if bad:
            raise FitError(
                f"micro_batches={list(micro_batches)!r} is invalid; allowed: divisors of batch_size={B} "
                f"({', '.join(map(str, divisors))})"
            )
        divisors = [m for m in divisors if m in micro_batches]
    modes = list(CHECKPOINTING if ctx.layer_wise else ("none", "full"))
    if checkpointing is not None:
        bad = [c for c in checkpointing if c not in modes]
        if bad:
            raise FitError(
                f"activation_checkpointing={bad[0]!r} is invalid for method={ctx.method}; allowed: {', '.join(modes)}"
            )
        modes = [c for c in modes if c in checkpointing]
    places: list[str | None] = [None]
    if ctx.layer_wise:
        places = list(RESIDENCIES)
        if residencies is not None:
            bad = [r for r in residencies if r not in RESIDENCIES]
            if bad:
                raise FitError(f"grass.offload={bad[0]!r} is invalid; allowed: {', '.join(RESIDENCIES)}")
            places = [r for r in places if r in residencies]
    elif residencies is not None:
        raise FitError(
            f"grass.offload is for the layer-wise methods; method={ctx.method} has no GRASS states"
        )
    return [Candidate(m, B // m, c, r) for m in divisors for c in modes for r in places]
