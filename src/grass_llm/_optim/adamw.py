"""The update: PyTorch's functional AdamW (``torch.optim.adam.adam`` with decoupled weight decay, the
defaults of ``torch.optim.AdamW``) over *pieces*: whole parameters or flat element ranges of them, each
with the matching pieces of its state. AdamW is elementwise, so a piece updates exactly like the whole
tensor; pieces bound the fp32 temporaries of an update, and are what the offloader stages.

With every parameter in one piece, fp32 weights (or bf16 ones with ``nearest`` rounding and no masters)
get exactly ``torch.optim.AdamW``'s result, bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.optim.adam import adam as _functional_adam

from grass_llm._optim import fused_adamw as fused
from grass_llm._optim.precision import LOW_PRECISION, PrecisionPolicy

__all__ = ["Piece", "adamw_pieces"]


@dataclasses.dataclass
class Piece:
    """One tensor to update: the weight (a whole parameter, or a 1-D range of it), its gradient and state
    pieces alike (``exp_avg``, ``exp_avg_sq``, and ``master`` or ``compensation``), its new step count,
    whether it takes weight decay, and ``where`` (parameter number, first element) to key the
    stochastic-rounding bits."""

    param: torch.Tensor
    grad: torch.Tensor
    state: dict[str, torch.Tensor]
    step: float
    decay: bool
    where: tuple[int, int]


def adamw_pieces(
    pieces: list[Piece], group: dict[str, Any], policy: PrecisionPolicy, global_step: int
) -> None:
    """One AdamW step of ``pieces`` with the hyper-parameters of param group ``group``, bucketed by dtype
    and weight decay (biases and norms take none unless ``decay_bias_and_norm``)."""
    buckets: dict[tuple[torch.dtype, bool], list[Piece]] = {}
    for piece in pieces:
        buckets.setdefault((piece.param.dtype, piece.decay), []).append(piece)
    for (_, decay), bucket in buckets.items():
        weight_decay = group["weight_decay"] if decay else 0.0

        def unfused(ps: list[Piece], weight_decay: float = weight_decay) -> None:
            _update(ps, group, weight_decay, policy, global_step)

        contiguous = all(t.is_contiguous() for p in bucket for t in (p.param, p.grad, *p.state.values()))
        if (
            contiguous
            and fused.usable([p.param for p in bucket], set(bucket[0].state), policy.rounding, policy.fused)
            and fused.fused_update_is_sound(bucket, group, weight_decay, unfused)
        ):
            fused.fused_adamw_(bucket, group, weight_decay)
        else:
            unfused(bucket)


def _update(
    pieces: list[Piece], group: dict[str, Any], weight_decay: float, policy: PrecisionPolicy, global_step: int
) -> None:
    params = [p.param for p in pieces]
    grads = [p.grad for p in pieces]
    exp_avgs = [p.state["exp_avg"] for p in pieces]
    exp_avg_sqs = [p.state["exp_avg_sq"] for p in pieces]
    masters = [p.state["master"] for p in pieces] if "master" in pieces[0].state else None
    comps = [p.state["compensation"] for p in pieces] if "compensation" in pieces[0].state else None
    low = params[0].dtype in LOW_PRECISION
    rounding = policy.rounding if low and not masters else "nearest"
    # the tensors AdamW updates: the weights themselves, their fp32 masters, or fp32 copies that are
    # written back after the update (fp32 moments, or a rounding that needs the exact new value)
    if masters:
        targets = masters
    elif rounding == "kahan" and comps:
        targets = [p.float() + c.float() for p, c in zip(params, comps)]
    elif rounding == "stochastic" or exp_avgs[0].dtype != params[0].dtype:
        targets = [p.to(torch.float32, memory_format=torch.contiguous_format) for p in params]
    else:
        targets = params
    dtype = targets[0].dtype
    grads = grads if grads[0].dtype == dtype else [g.to(dtype) for g in grads]
    # bf16 moments with an fp32 update: computed in fp32, stored back rounded
    m_work = exp_avgs if exp_avgs[0].dtype == dtype else [m.to(dtype) for m in exp_avgs]
    v_work = exp_avg_sqs if exp_avg_sqs[0].dtype == dtype else [v.to(dtype) for v in exp_avg_sqs]
    beta1, beta2 = group["betas"]
    _functional_adam(
        targets,
        grads,
        m_work,
        v_work,
        [],
        [torch.tensor(p.step - 1, dtype=torch.float32) for p in pieces],
        foreach=group["foreach"],
        capturable=False,
        differentiable=False,
        fused=None,
        grad_scale=None,
        found_inf=None,
        has_complex=any(torch.is_complex(p) for p in params),
        decoupled_weight_decay=True,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=weight_decay,
        eps=group["eps"],
        maximize=False,
    )
    if m_work is not exp_avgs:
        for m, w in zip(exp_avgs, m_work):
            m.copy_(w)
        for v, w in zip(exp_avg_sqs, v_work):
            v.copy_(w)
    if targets is params:
        return
    for i, (p, t) in enumerate(zip(params, targets)):
        if rounding == "stochastic":
            policy.stochastic_round_(p, t, pieces[i].where, global_step)
        else:
            p.copy_(t)
            if rounding == "kahan" and comps:
                comps[i].copy_(t - p.float())
