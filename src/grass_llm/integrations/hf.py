"""GRASS with the Hugging Face ``Trainer`` (and TRL's ``SFTTrainer``, which takes the same arguments).

Usage::

    from transformers import Trainer, TrainingArguments
    from grass_llm import GrassConfig
    from grass_llm.integrations.hf import add_grass_callback, create_grass_optimizer_and_scheduler

    args = TrainingArguments(..., max_steps=1000, warmup_steps=100)
    opt, sched = create_grass_optimizer_and_scheduler(model, args, grass_config=GrassConfig())
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, sched))
    add_grass_callback(trainer)

``trl.SFTTrainer(..., optimizers=(opt, sched))`` works the same way. Everything the Trainer does
around the optimizer is supported: its gradient clipping (``max_grad_norm``; GRASS reads each
gradient's norm before it is clipped), gradient accumulation (the probing MGN is computed on the
accumulated gradient), fp16 with its GradScaler and bf16, ``resume_from_checkpoint`` (the optimizer
and scheduler states load with ``weights_only=True``), and ``torchrun``: the Trainer wraps the model
in DDP, whose gradient reduction GRASS switches off, as it all-reduces the active layers itself.

The LR schedule starts after probing: the ``probe_steps`` probing steps change no weight, so warmup
and decay are laid over the remaining ``num_training_steps - probe_steps`` steps. The schedule counts
the optimizer's completed steps: after a step GRASS skipped (non-finite gradients, a GradScaler
overflow) the Trainer's ``scheduler.step()`` changes nothing, so warm-up starts at the first training
step after probing (``grass_llm.schedule.CompletedStepsLR``). ``max_steps`` at or below
``probe_steps`` trains nothing, and says so (a warning).

``GrassCallback`` adds scalars to the Trainer's ``logs`` at every logging step:
``grass/num_active``, ``grass/probing``, ``grass/skipped_steps`` (steps skipped for non-finite
gradients) and per decoder layer ``grass/active/layer_{i}`` (1 or 0), ``grass/mgn/layer_{i}`` and
``grass/prob/layer_{i}``. Callbacks run in order and the reporting callbacks (``report_to``) are
registered before the ones passed in ``callbacks=``; for every reporter to see the GRASS scalars add
the callback with ``add_grass_callback(trainer)``, which puts it first. Either way they land in
``trainer.state.log_history``.

transformers is imported when this module is imported; ``grass_llm`` itself never imports it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from grass_llm.config import GrassConfig
from grass_llm.layers import LayerSpec
from grass_llm.optim import GrassOptimizer
from grass_llm.schedule import build_lr_scheduler, warmup_after_delay

try:
    from transformers.trainer_callback import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without the [hf] extra
    raise ImportError(
        "grass_llm.integrations.hf needs transformers; install it with `pip install grass-llm[hf]`"
    ) from e

__all__ = [
    "GrassCallback",
    "add_grass_callback",
    "create_grass_optimizer_and_scheduler",
    "find_grass_optimizer",
    "grass_log_scalars",
]


def create_grass_optimizer_and_scheduler(
    model: nn.Module,
    args: Any = None,
    *,
    grass_config: GrassConfig | None = None,
    num_training_steps: int | None = None,
    learning_rate: float | None = None,
    weight_decay: float | None = None,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    warmup_steps: float | None = None,
    lr_scheduler_type: str | None = None,
    scheduler_kwargs: dict[str, Any] | None = None,
    layers: LayerSpec = None,
) -> tuple[GrassOptimizer, torch.optim.lr_scheduler.LRScheduler]:
    """A ``GrassOptimizer`` and its LR scheduler, for ``Trainer(optimizers=(optimizer, scheduler))``.

    Args:
        model: the model the Trainer trains (for PEFT-free full-parameter fine-tuning).
        args: optional ``TrainingArguments``; ``learning_rate``, ``weight_decay``, ``adam_beta1/2``,
            ``adam_epsilon``, ``warmup_steps``, ``lr_scheduler_type``, ``lr_scheduler_kwargs`` and
            ``max_steps`` are read from it unless given explicitly.
        grass_config: GRASS settings; the paper's defaults when omitted.
        num_training_steps: total optimizer steps, probing included; defaults to ``args.max_steps``.
            Needed by every schedule except the constant ones.
        warmup_steps: warmup optimizer steps after probing; a value in (0, 1) is a fraction of the
            training steps (``TrainingArguments`` semantics).
        layers: override for the decoder blocks (see ``grass_llm.discover_layers``).
    """
    cfg = grass_config if grass_config is not None else GrassConfig()

    def pick(explicit: Any, attr: str, default: Any) -> Any:
        if explicit is not None:
            return explicit
        if args is not None and getattr(args, attr, None) is not None:
            return getattr(args, attr)
        return default

    lr = pick(learning_rate, "learning_rate", 3e-5)
    wd = pick(weight_decay, "weight_decay", 0.0)
    if betas is None:
        betas = (pick(None, "adam_beta1", 0.9), pick(None, "adam_beta2", 0.999))
    eps = pick(eps, "adam_epsilon", 1e-8)
    warmup = pick(warmup_steps, "warmup_steps", 0)
    sched_name = pick(lr_scheduler_type, "lr_scheduler_type", "linear")
    sched_name = getattr(sched_name, "value", sched_name)  # SchedulerType enum -> str
    if scheduler_kwargs is None and args is not None:
        scheduler_kwargs = getattr(args, "lr_scheduler_kwargs", None) or None
    if num_training_steps is None and args is not None and getattr(args, "max_steps", -1) > 0:
        num_training_steps = int(args.max_steps)
    if num_training_steps is None and not str(sched_name).startswith("constant"):
        raise ValueError(
            f"num_training_steps is needed for the {sched_name!r} schedule: pass it, or set max_steps in "
            "TrainingArguments (optimizer steps = ceil(len(dataloader) / gradient_accumulation_steps) * epochs)"
        )
    if num_training_steps is not None and cfg.probe_steps and cfg.probe_steps >= num_training_steps:
        warnings.warn(
            f"GrassConfig.probe_steps={cfg.probe_steps} >= the run's {num_training_steps} optimizer steps "
            "(max_steps): every step probes and no weight will change; lower probe_steps or raise max_steps",
            UserWarning,
            stacklevel=2,
        )
    optimizer = GrassOptimizer(
        model, config=cfg, lr=lr, betas=tuple(betas), eps=eps, weight_decay=wd, layers=layers
    )
    scheduler = build_lr_scheduler(
        optimizer,
        sched_name,
        num_warmup_steps=warmup_after_delay(warmup, num_training_steps, cfg.probe_steps),
        num_training_steps=num_training_steps,
        delay_steps=cfg.probe_steps,
        scheduler_kwargs=scheduler_kwargs,
    )
    return optimizer, scheduler


def find_grass_optimizer(optimizer: Any) -> GrassOptimizer | None:
    """The ``GrassOptimizer`` inside ``optimizer`` (accelerate wraps it in ``AcceleratedOptimizer``)."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, GrassOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


def grass_log_scalars(optimizer: GrassOptimizer, prefix: str = "grass") -> dict[str, float]:
    """The GRASS state as flat scalars: active layers (1/0), MGN and probability per layer."""
    active = set(optimizer.active_layers)
    mgn = optimizer.importance.tolist()
    prob = optimizer.probabilities.tolist()
    out: dict[str, float] = {
        f"{prefix}/num_active": float(len(active)),
        f"{prefix}/probing": float(optimizer.probing),
        f"{prefix}/skipped_steps": float(optimizer.skipped_steps),
    }
    for i in range(optimizer.num_layers):
        out[f"{prefix}/active/layer_{i}"] = 1.0 if i in active else 0.0
    for i, v in enumerate(mgn):
        out[f"{prefix}/mgn/layer_{i}"] = float(v)
    for i, v in enumerate(prob):
        out[f"{prefix}/prob/layer_{i}"] = float(v)
    return out


class GrassCallback(TrainerCallback):
    """Adds the GRASS state to the Trainer's logs.

    Args:
        optimizer: the ``GrassOptimizer``; found in the Trainer's optimizer when omitted.
        prefix: prefix of the logged keys.
    """

    def __init__(self, optimizer: GrassOptimizer | None = None, prefix: str = "grass") -> None:
        self.optimizer = optimizer
        self.prefix = prefix

    def _grass(self, kwargs: dict[str, Any]) -> GrassOptimizer | None:
        if self.optimizer is None:
            self.optimizer = find_grass_optimizer(kwargs.get("optimizer"))
        return self.optimizer

    def on_train_begin(self, args, state, control, **kwargs):
        opt = self._grass(kwargs)
        if opt is None:
            warnings.warn(
                "GrassCallback: the Trainer's optimizer is not a GrassOptimizer; pass "
                "optimizers=create_grass_optimizer_and_scheduler(...) to the Trainer",
                UserWarning,
                stacklevel=2,
            )
            return control
        left = opt.config.probe_steps - opt.probe_done  # (the steps still to probe)
        if opt.probing and state.max_steps and state.max_steps - state.global_step <= left:
            warnings.warn(
                f"GrassCallback: {left} probing steps remain and the Trainer runs {state.max_steps - state.global_step} "
                "more optimizer steps: every step probes and no weight will change; lower probe_steps or train longer",
                UserWarning,
                stacklevel=2,
            )
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        opt = self._grass(kwargs)
        if opt is None or logs is None:
            return control
        scalars = grass_log_scalars(opt, self.prefix)
        logs.update(scalars)
        # Trainer.log appended a copy of the logs to the history before calling the callbacks
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)
        return control


def add_grass_callback(trainer: Any, optimizer: GrassOptimizer | None = None) -> GrassCallback:
    """Put a ``GrassCallback`` first in ``trainer``'s callbacks, so every reporter sees its scalars."""
    callback = GrassCallback(optimizer)
    handler = trainer.callback_handler
    handler.callbacks = [c for c in handler.callbacks if not isinstance(c, GrassCallback)]
    handler.callbacks.insert(0, callback)
    return callback
