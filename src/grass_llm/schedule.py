"""Learning-rate schedules shared by ``grass-llm train`` and the Hugging Face Trainer integration.

GRASS's probing steps change no weight, so warmup and decay should start after them: a schedule
built with ``delay_steps=probe_steps`` holds its step-0 value during probing and then runs warmup and
decay over the remaining ``num_training_steps - delay_steps`` steps.

The factors follow ``transformers.get_scheduler`` formula for formula (tested against it), but the
schedule is a plain object holding only numbers and a name, so a ``LambdaLR`` built on it saves a
``state_dict`` that ``torch.load(weights_only=True)`` reads back (the Trainer loads ``scheduler.pt``
that way on resume; a ``functools.partial`` in the state would not load). torch only.

The schedule's position counts the optimizer's completed steps, not the calls to ``scheduler.step()``:
a step the optimizer skipped (``GrassOptimizer`` sets ``last_step_skipped`` after every ``step()``:
non-finite gradients, a GradScaler overflow, no backward pass) changes nothing, and probing repeats it,
so the scheduler stays where it is too (:class:`CompletedStepsLR`; the Hugging Face Trainer calls
``scheduler.step()`` after every optimizer step, skipped or not). The warm-up thus starts at the first
training step after probing, however many steps were skipped.

    sched = build_lr_scheduler(opt, "cosine", num_warmup_steps=100, num_training_steps=3750, delay_steps=150)
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "SCHEDULES",
    "CompletedStepsLR",
    "LRSchedule",
    "build_lr_scheduler",
    "resolve_warmup",
    "warmup_after_delay",
]

#: Schedule names (``transformers.SchedulerType`` values that are a function of the step alone).
SCHEDULES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "cosine_with_min_lr",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
#: Extra arguments each schedule takes (``TrainingArguments.lr_scheduler_kwargs``), with defaults.
_KWARGS: dict[str, dict[str, float | None]] = {
    "cosine": {"num_cycles": 0.5},
    "cosine_with_restarts": {"num_cycles": 1.0},
    "cosine_with_min_lr": {"num_cycles": 0.5, "min_lr": None, "min_lr_rate": None},
    "polynomial": {"lr_end": 1e-7, "power": 1.0},
    "inverse_sqrt": {"timescale": None},
}


class LRSchedule:
    """``step -> LR factor`` of a named schedule, delayed by ``delay_steps``. Pickles as plain numbers.

    Args:
        name: one of :data:`SCHEDULES`.
        num_warmup_steps: linear warmup steps after the delay.
        num_training_steps: all optimizer steps, the delay included (not needed by the constant ones).
        delay_steps: steps held at the step-0 factor first (GRASS probing).
        lr_init: the base LR; ``polynomial`` and ``cosine_with_min_lr`` with ``min_lr`` need it.
        **kwargs: the schedule's own arguments (see ``_KWARGS``).
    """

    def __init__(
        self,
        name: str,
        num_warmup_steps: int = 0,
        num_training_steps: int | None = None,
        delay_steps: int = 0,
        lr_init: float | None = None,
        **kwargs: Any,
    ) -> None:
        name = str(getattr(name, "value", name))  # transformers.SchedulerType -> str
        if name not in SCHEDULES:
            raise ValueError(f"lr schedule {name!r} is unknown; allowed: {', '.join(SCHEDULES)}")
        if not isinstance(delay_steps, int) or delay_steps < 0:
            raise ValueError(f"delay_steps={delay_steps!r} is invalid; allowed: an integer >= 0")
        if not isinstance(num_warmup_steps, int) or num_warmup_steps < 0:
            raise ValueError(f"num_warmup_steps={num_warmup_steps!r} is invalid; allowed: an integer >= 0")
        decays = name not in ("constant", "constant_with_warmup", "inverse_sqrt")
        if decays and num_training_steps is None:
            raise ValueError(f"the {name!r} schedule needs num_training_steps")
        allowed = _KWARGS.get(name, {})
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ValueError(
                f"lr schedule {name!r} takes no argument {unknown}; allowed: {sorted(allowed) or 'none'}"
            )
        args = {**allowed, **kwargs}
        if name == "cosine_with_min_lr":
            if (args["min_lr"] is None) == (args["min_lr_rate"] is None):
                raise ValueError("cosine_with_min_lr needs exactly one of min_lr and min_lr_rate")
            if args["min_lr"] is not None:
                if not lr_init:
                    raise ValueError("cosine_with_min_lr with min_lr needs the base LR (lr_init)")
                args["min_lr_rate"] = args["min_lr"] / lr_init
            args = {"num_cycles": args["num_cycles"], "min_lr_rate": args["min_lr_rate"]}
        if name == "polynomial":
            if not lr_init:
                raise ValueError("the polynomial schedule needs the base LR (lr_init)")
            args["lr_init"] = lr_init
        if name == "inverse_sqrt" and args["timescale"] is None:
            args["timescale"] = num_warmup_steps or 10_000
        self.name = name
        self.warmup = int(num_warmup_steps)
        self.delay = int(delay_steps)
        # the schedule proper spans the steps after the delay
        self.total = None if num_training_steps is None else max(int(num_training_steps) - self.delay, 1)
        self.args = {k: float(v) for k, v in args.items()}

    def __call__(self, step: int) -> float:
        s = max(int(step) - self.delay, 0)
        w, a = self.warmup, self.args
        if self.name == "constant":
            return 1.0
        if s < w:
            return float(s) / float(max(1, w))
        if self.name == "constant_with_warmup":
            return 1.0
        if self.name == "inverse_sqrt":
            shift = a["timescale"] - w
            return 1.0 / math.sqrt((s + shift) / a["timescale"])
        total = self.total or 1
        if self.name == "linear":
            return max(0.0, float(total - s) / float(max(1, total - w)))
        if self.name == "polynomial":
            if s > total:
                return a["lr_end"] / a["lr_init"]
            remaining = 1 - (s - w) / (total - w)
            return ((a["lr_init"] - a["lr_end"]) * remaining ** a["power"] + a["lr_end"]) / a["lr_init"]
        progress = float(s - w) / float(max(1, total - w))
        if self.name == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * a["num_cycles"] * 2.0 * progress)))
        if self.name == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((a["num_cycles"] * progress) % 1.0))))
        factor = 0.5 * (1.0 + math.cos(math.pi * a["num_cycles"] * 2.0 * progress))  # cosine_with_min_lr
        return max(0.0, factor * (1 - a["min_lr_rate"]) + a["min_lr_rate"])

    def __repr__(self) -> str:
        return (
            f"LRSchedule({self.name!r}, warmup={self.warmup}, total={self.total}, delay={self.delay}, "
            f"args={self.args})"
        )


def resolve_warmup(warmup: float, training_steps: int | None) -> int:
    """Warmup steps: a value in (0, 1) is a fraction of ``training_steps`` (rounded up), else a count."""
    if warmup < 0 or not math.isfinite(warmup):
        raise ValueError(f"warmup={warmup!r} is invalid; allowed: a number >= 0")
    if 0 < warmup < 1:
        if training_steps is None:
            raise ValueError("a fractional warmup needs the number of training steps")
        return math.ceil(warmup * training_steps)
    return int(warmup)


def warmup_after_delay(warmup: float, num_training_steps: int | None, delay_steps: int) -> int:
    """Warmup steps of a schedule delayed by ``delay_steps`` (GRASS probing): a fraction in (0, 1) is of
    the steps after the delay (at least one step, even when the delay takes them all), else a count.
    What ``grass-llm train`` and the Hugging Face helper both use."""
    after = None if num_training_steps is None else max(num_training_steps - delay_steps, 1)
    return resolve_warmup(warmup, after)


class CompletedStepsLR(torch.optim.lr_scheduler.LambdaLR):
    """A ``LambdaLR`` whose position is the number of optimizer steps that completed: ``step()`` right
    after an optimizer step that was skipped (``optimizer.last_step_skipped``) leaves it where it is.
    An optimizer without ``last_step_skipped`` counts every step. Its ``state_dict`` holds plain values
    only (``torch.load(weights_only=True)`` reads it back), so resuming continues it exactly."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_lambda: Any, last_epoch: int = -1) -> None:
        self.follows_skips = False  # (the first step, at construction, always counts)
        super().__init__(optimizer, lr_lambda, last_epoch)
        self.follows_skips = True

    def step(self, epoch: int | None = None) -> None:  # type: ignore[override]
        if epoch is None and self.follows_skips and getattr(self.optimizer, "last_step_skipped", False):
            return  # the optimizer changed nothing: neither does the schedule
        super().step(epoch)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "linear",
    num_warmup_steps: int = 0,
    num_training_steps: int | None = None,
    delay_steps: int = 0,
    scheduler_kwargs: dict[str, Any] | None = None,
) -> CompletedStepsLR:
    """A :class:`CompletedStepsLR` over every param group following :class:`LRSchedule`.

    The base LR of each group is its current ``lr`` (``initial_lr`` if a scheduler ran before).
    """
    lr_init = optimizer.defaults.get("lr")
    schedule = LRSchedule(
        name, num_warmup_steps, num_training_steps, delay_steps, lr_init=lr_init, **(scheduler_kwargs or {})
    )
    return CompletedStepsLR(optimizer, schedule)
