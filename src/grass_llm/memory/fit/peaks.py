"""What a candidate costs: its work for the speed model (:func:`work`), the bytes it holds at least
(:func:`lower_bound`), and its whole-run peak, estimated as far as needed to tell whether it fits a budget
(:func:`evaluate`; the estimates cached for the process)."""

from __future__ import annotations

import dataclasses

from grass_llm.memory.estimate import estimate_step
from grass_llm.memory.fit.context import PlanContext
from grass_llm.memory.fit.margin import Margin
from grass_llm.memory.fit.plans import Candidate, Evaluated, FitError
from grass_llm.memory.fit.speed import Work, update_bytes
from grass_llm.memory.inputs import MemoryEstimateError
from grass_llm.memory.result import MemoryEstimate

__all__ = ["estimate", "evaluate", "lower_bound", "work"]

#: (model, method, settings..., micro-batch, checkpointing, residency, phase) -> MemoryEstimate, per process
_ESTIMATES: dict[tuple, MemoryEstimate] = {}


def estimate(ctx: PlanContext, micro: int, checkpointing: str, residency: str | None, phase: str) -> MemoryEstimate:
    """The estimator's peak of one training (probing) step of ``micro`` rows, cached for the process. The
    probing step does not depend on the residency (probing updates nothing), nor, with probe_checkpointing
    (every block recomputed while probing), on the checkpointing mode: one estimate serves them all."""
    if phase == "probe":
        residency = None
        if ctx.tc.grass.probe_checkpointing:
            checkpointing = "none"
    key = (*ctx.key, micro, ctx.seq_len, checkpointing, residency, phase)
    found = _ESTIMATES.get(key)
    if found is not None:
        ctx.stats["cached"] += 1
        return found
    # the sampling period changes no step's memory; the estimate's two steps must stay inside one period (at a
    # period's end the MGN is read from fake tensors, which have no values)
    overrides = {k: v for k, v in (ctx.inputs.overrides or {}).items() if k != "grass.period"}
    if residency is not None:
        overrides["grass.offload"] = residency
    step = dataclasses.replace(
        ctx.inputs, batch_size=micro, activation_checkpointing=checkpointing, overrides=overrides, phase=phase
    )
    try:
        est = estimate_step(ctx.config, step)
    except MemoryEstimateError as e:
        raise FitError(str(e)) from None
    ctx.stats["estimates"] += 1
    _ESTIMATES[key] = est
    return est


def work(ctx: PlanContext, cand: Candidate) -> Work:
    """What a training step of ``cand`` does (the expected lowest active layer for the layer-wise methods)."""
    s, L = ctx.shape, ctx.shape.num_layers
    n = cand.micro_batch * ctx.seq_len
    wb = ctx.weight_bytes
    if not ctx.layer_wise:
        lora = ctx.method in ("lora", "dora")
        trained = s.adapter_params if lora else s.total_params
        elem = ctx.adapter_bytes if lora else wb
        update = update_bytes(elem, 2 * elem) * trained  # torch AdamW: moments in the weights' dtype
        recompute = L if cand.activation_checkpointing == "full" else 0
        return Work(n, ctx.seq_len, cand.grad_accum, L, 0 if lora else L, recompute, not lora, update)
    g, gamma = ctx.tc.grass, ctx.gamma
    # backward runs from the lowest active layer up: expected (L - gamma) / (gamma + 1) for gamma of L drawn
    # uniformly (GRASS draws by the MGN: the uniform draw is the model's assumption), or through every block
    # when the embeddings train
    lowest = 0.0 if g.train_embeddings else (L - gamma) / (gamma + 1)
    backward = L - lowest
    recompute = {"none": 0.0, "frozen": backward - gamma, "full": backward}[cand.activation_checkpointing]
    trained = gamma * s.mean_block + ctx.always_trained()
    state = ctx.state_bytes_per_param(cand.residency)
    update = update_bytes(wb, state) * trained
    streamed = 2 * state * trained if cand.residency == "step" else 0.0
    resample = 2 * state * gamma * s.mean_block / g.period if cand.residency == "period" else 0.0
    return Work(
        n, ctx.seq_len, cand.grad_accum, backward, gamma, recompute, g.train_head, update, streamed, resample
    )


def lower_bound(ctx: PlanContext, cand: Candidate) -> int:
    """Bytes every step of ``cand`` holds at least: the weights, and the states and gradients the method keeps
    on the device through the optimizer step."""
    s, wb = ctx.shape, ctx.weight_bytes
    weights = s.total_params * wb
    if ctx.method == "fft":
        return 4 * weights  # weights, gradients and two moments (torch AdamW's, in the weights' dtype)
    if ctx.method in ("lora", "dora"):
        return weights + 4 * s.adapter_params * ctx.adapter_bytes
    if cand.residency == "step":
        return weights
    trained_blocks = s.block_params if cand.residency == "off" and _grows(ctx) else ctx.gamma * s.mean_block
    return int(weights + ctx.state_bytes_per_param(cand.residency) * (trained_blocks + ctx.always_trained()))


def _grows(ctx: PlanContext) -> bool:
    """``offload=off`` keeps a layer's state from its first activation on (unless each is reset on leaving)."""
    return ctx.tc.grass.on_reactivation == "keep"


def _off_growth(ctx: PlanContext, est: MemoryEstimate) -> int:
    """offload=off: the states of the decoder layers the estimate did not train, which a run accumulates."""
    if not _grows(ctx):
        return 0
    s = ctx.shape
    active_block_params = est.trainable_params - ctx.always_trained()
    return int(ctx.state_bytes_per_param("off") * max(s.block_params - active_block_params, 0))


def _accumulated_gradients(ctx: PlanContext, est: MemoryEstimate) -> int:
    """Gradients of the trained parameters, kept from one micro-batch to the next."""
    lora = ctx.method in ("lora", "dora")
    return int(est.trainable_params * (ctx.adapter_bytes if lora else ctx.weight_bytes))


def evaluate(ctx: PlanContext, e: Evaluated, budget: int, margin: Margin) -> bool:
    """Estimate ``e``'s whole-run peak as far as needed to tell whether it fits; True when it does."""
    cand = e.candidate
    if margin.needed(e.lower_bound) > budget:
        e.verdict = "too big (lower bound)"
        return False
    est = estimate(ctx, cand.micro_batch, cand.activation_checkpointing, cand.residency, "train")
    train = est.peak
    if cand.grad_accum > 1:
        train += _accumulated_gradients(ctx, est)
    if cand.residency == "off":
        train += _off_growth(ctx, est)
    e.train_peak = e.peak = train
    e.needed = margin.needed(train)
    if e.needed > budget:
        e.verdict = "too big"
        return False
    if ctx.probes:
        probe = estimate(ctx, cand.micro_batch, cand.activation_checkpointing, None, "probe").peak
        e.probe_peak = probe
        e.peak = max(train, probe)
        e.needed = margin.needed(e.peak)
        if e.needed > budget:
            e.verdict = "too big"
            return False
    e.verdict = "chosen"
    return True
