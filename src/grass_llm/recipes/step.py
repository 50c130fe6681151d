"""One optimizer step of ``grass-llm train``: ``grad_accum`` micro-batches forward and backward with a
token-weighted loss over the whole step and all ranks, then the optimizer steps or the step is skipped
(gradients not finite), and one all-reduce gathers the loss, the tokens and any stop signal."""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass

import torch

from grass_llm.loss import IGNORE_INDEX, causal_lm_loss
from grass_llm.recipes.build import Batches, TrainObjects
from grass_llm.recipes.interrupt import StopSignals
from grass_llm.recipes.launch import Launch
from grass_llm.recipes.train_config import TrainConfig

__all__ = ["StepOutput", "train_step"]


@dataclass
class StepOutput:
    phase: str  # probe or train
    loss: float  # the global token mean
    lr: float
    active: list[int]
    tokens: int  # of all ranks
    seconds: float
    skipped: bool = False
    signal: int | None = None  # a stop signal on any rank
    local_tokens: int = 0  # of this rank (what tokens_seen counts)


def train_step(
    objs: TrainObjects,
    batches: Batches,
    cfg: TrainConfig,
    launch: Launch,
    device: torch.device,
    signals: StopSignals | None,
) -> StepOutput:
    """Forward + backward over ``grad_accum`` micro-batches, then step the optimizer and schedule.

    The loss is token-weighted over the whole step: every micro-batch's summed loss / all label
    tokens. With N ranks the gradient all-reduce takes the mean, so each rank divides by (tokens of
    all ranks) / N: the mean of the ranks' gradients is then the gradient of the global token mean.
    A step whose gradients are not finite changes nothing (``GrassOptimizer`` skips it itself; for
    the others the recipe does not call ``step()``), the LR schedule included (it counts completed
    optimizer steps, so GRASS's warm-up starts at the first training step after probing), and is
    reported as ``skipped``.
    """
    opt = objs.optimizer
    t0 = time.perf_counter()
    micro = [launch.shard(batches.next()) for _ in range(cfg.grad_accum)]
    n_items = _loss_divisor(micro, launch, device)
    layer_wise = objs.method.layer_wise
    phase = "probe" if layer_wise and opt.probing else "train"
    active = opt.active_layers if layer_wise else list(range(objs.num_layers))
    lr = opt.param_groups[0]["lr"]
    loss_sum, tokens = _forward_backward(objs, micro, n_items, cfg.compact_activations, device)
    skipped = _step_or_skip(objs, cfg.max_grad_norm)
    if not skipped:  # the schedule counts completed optimizer steps (a skipped one is repeated in probing)
        objs.scheduler.step()
    opt.zero_grad(set_to_none=True)
    received = signals.received if signals is not None else None
    # one all-reduce: the loss, the tokens, and whether any rank was asked to stop
    loss_all, tokens_all, n_int, n_term = launch.sum(
        [float(loss_sum), tokens, received == signal.SIGINT, received == signal.SIGTERM], device
    )
    # (another rank's signal: SIGTERM, the scheduler's, wins over SIGINT)
    signum = received or (signal.SIGTERM if n_term else signal.SIGINT if n_int else None)
    return StepOutput(
        phase,
        loss_all / launch.world_size,
        lr,
        active,
        int(tokens_all),
        time.perf_counter() - t0,
        skipped,
        signum if signum else None,
        tokens,
    )


def _loss_divisor(micro: list[dict[str, torch.Tensor]], launch: Launch, device: torch.device) -> torch.Tensor:
    """What each rank divides its summed loss by: the label tokens of the step (all ranks: / N)."""
    n_items = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
    if launch.distributed:
        (n_all,) = launch.sum([n_items], device)
        return torch.tensor(max(n_all, 1.0) / launch.world_size, device=device)
    return torch.tensor(max(n_items, 1), device=device)


def _forward_backward(
    objs: TrainObjects,
    micro: list[dict[str, torch.Tensor]],
    n_items: torch.Tensor,
    compact: bool,
    device: torch.device,
) -> tuple[torch.Tensor, int]:
    """Backward of every micro-batch (all but the last without gradient sync); (loss sum, tokens)."""
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    tokens = 0
    for i, b in enumerate(micro):
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        tokens += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
        with objs.no_sync() if i + 1 < len(micro) else contextlib.nullcontext():
            loss = causal_lm_loss(objs.fwd, b, objs.loss_fn, n_items, compact)
            loss.backward()
        loss_sum += loss.detach().float()
    return loss_sum, tokens


def _step_or_skip(objs: TrainObjects, max_grad_norm: float | None) -> bool:
    """Step the optimizer unless the gradients are not finite; whether the step was skipped."""
    opt = objs.optimizer
    if objs.method.layer_wise:
        opt.step()  # (clips, and skips a non-finite step, itself)
        return bool(getattr(opt, "last_step_skipped", False))
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(objs.trainable, max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in objs.trainable if p.grad is not None])
    if hasattr(norm, "full_tensor"):  # FSDP2: the norm over every rank's shards
        norm = norm.full_tensor()
    skipped = not bool(torch.isfinite(norm))  # the same on every rank: gradients are all-reduced
    if not skipped:
        opt.step()
    return skipped
