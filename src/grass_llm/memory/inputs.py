"""What a measured training step is built from, checked once: the arguments that
:func:`~grass_llm.memory.estimate.estimate_memory`, :func:`~grass_llm.memory.step.training_step`,
:func:`~grass_llm.memory.cuda.measure_cuda_step` and the planner (:mod:`grass_llm.memory.fit`) share
(:class:`StepInputs`), and the ``TrainConfig`` ``grass-llm train`` would run with them."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from grass_llm._tensor import DTYPES

__all__ = [
    "OPTIMIZER_IMPLS",
    "PHASES",
    "PROBE_FOREVER",
    "RUN_PROBE_STEPS",
    "MemoryEstimateError",
    "StepInputs",
    "check_choice",
    "check_int",
    "methods",
    "probes",
    "train_config",
]

#: How torch.optim's AdamW allocates its temporaries: ``auto`` (what ``grass-llm train`` builds on CUDA: the
#: fused kernel, no temporaries), ``fused``, ``foreach`` (one temporary per parameter of a group at once),
#: ``for-loop`` (one parameter at a time). GrassOptimizer's update runs on bounded pieces either way.
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "for-loop")
#: What is estimated: a training step, a probing step (backward through every layer, no update), or a whole
#: run (the larger of the two, with what a run keeps on the device beyond one step:
#: :func:`~grass_llm.memory.result.whole_run`).
PHASES = ("train", "probe", "run")
#: Probing steps a measured whole run (``measure_cuda_step(phase="run")``) runs before its training steps
RUN_PROBE_STEPS = 2
#: ``grass.probe_steps`` of a real run that measures probing steps: every step it runs probes
PROBE_FOREVER = 2**31 - 1


class MemoryEstimateError(ValueError):
    """An argument of the estimator is invalid. The message names it and what is allowed."""


def methods() -> tuple[str, ...]:
    """The methods ``grass-llm train`` knows (``grass_llm.recipes.methods``), all of which can be estimated."""
    from grass_llm.recipes.methods import METHODS

    return tuple(METHODS)


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MemoryEstimateError(f"{name}={value!r} is invalid; allowed: an integer >= {minimum}")
    return value


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise MemoryEstimateError(f"{name}={value!r} is invalid; allowed: {', '.join(map(str, allowed))}")
    return value


@dataclass(frozen=True)
class StepInputs:
    """The method and batch of a measured step, checked when made (:class:`MemoryEstimateError` names the
    first invalid one).

    Attributes:
        method: a ``grass-llm train`` method (:func:`methods`).
        active_layers: gamma (``grass.active_layers``) of the layer-wise methods; default the method's
            (2 for grass and lisa, 1 for badam).
        active_layer_ids: the active decoder layers; default ``0 .. gamma-1``, the worst case
            (activations are saved from the lowest active layer upward).
        rank: LoRA / DoRA rank r (``lora.rank``; ``lora.alpha`` = 2r).
        batch_size, seq_len: the batch of one step (B, T).
        dtype: weight dtype, ``bf16`` (the paper's pure-bf16 setting) or ``fp32``.
        activation_checkpointing: ``none``, ``full`` or ``frozen`` (``grass-llm train``'s key).
        chunked_loss: the chunked cross-entropy of ``grass-llm train`` (its default) or the model's own.
        optimizer_impl: torch.optim's AdamW implementation, one of :data:`OPTIMIZER_IMPLS`.
        overrides: more ``grass-llm train`` keys, dotted (``{"grass.offload": False, "lora.dtype": "fp32"}``).
        phase: ``train`` (a training step), ``probe`` (a probing step of the methods that probe) or ``run``
            (a whole run), :data:`PHASES`.
    """

    method: str = "grass"
    active_layers: int | None = None
    active_layer_ids: Sequence[int] | None = None
    rank: int = 128
    batch_size: int = 1
    seq_len: int = 1024
    dtype: str = "bf16"
    activation_checkpointing: str = "none"
    chunked_loss: bool = True
    optimizer_impl: str = "auto"
    overrides: dict[str, Any] | None = None
    phase: str = "train"

    def __post_init__(self) -> None:
        check_choice("method", self.method, methods())
        check_choice("dtype", self.dtype, tuple(DTYPES))
        check_choice("optimizer_impl", self.optimizer_impl, OPTIMIZER_IMPLS)
        check_int("batch_size", self.batch_size, 1)
        check_int("seq_len", self.seq_len, 2)
        check_choice("phase", self.phase, PHASES)
        if self.layer_wise and self.active_layers is not None:
            check_int("active_layers", self.active_layers, 1)
        check_int("rank", self.rank, 1)

    @property
    def layer_wise(self) -> bool:
        from grass_llm.recipes.methods import get_method

        return get_method(self.method).layer_wise

    @property
    def lora(self) -> bool:
        return self.method in ("lora", "dora")

    def settings(self) -> dict[str, Any]:
        """The ``grass-llm train`` keys of these inputs: a layer-wise method's training phase
        (``grass.probe_steps: 0``; probing runs no update), ``overrides`` over them."""
        settings: dict[str, Any] = {
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "max_length": max(self.seq_len, 8),
            "activation_checkpointing": self.activation_checkpointing,
            "chunked_loss": self.chunked_loss,
        }
        if self.layer_wise:  # (the method's defining settings still win)
            settings["grass.probe_steps"] = 0
            if self.active_layers is not None:
                settings["grass.active_layers"] = self.active_layers
        if self.lora:
            settings.update({"lora.rank": self.rank, "lora.alpha": 2 * self.rank})
        for key, value in (self.overrides or {}).items():
            if not isinstance(key, str):
                raise MemoryEstimateError(f"overrides key {key!r} is invalid; allowed: grass-llm train keys")
            settings[key] = value
        if self.layer_wise and self.phase != "run":
            # no resample inside an estimate's or a one-phase measurement's few steps: a draw reads MGN values,
            # which fake tensors do not hold (a step's memory does not depend on the period; the active layers
            # are forced). A run (training_step(phase="run")) resamples every period, as grass-llm train does.
            settings["grass.period"] = max(int(settings.get("grass.period", 25)), 1000)
        return settings

    def train_config(self, model_name: str, probe_steps: int | None = None, defaults: dict[str, Any] | None = None):
        """The ``TrainConfig`` of these inputs: :meth:`settings`, a layer-wise method's ``grass.probe_steps``
        set to ``probe_steps`` when given, ``defaults`` for the keys not set. ``phase="probe"`` needs a method
        that probes with these settings (LISA's fixed settings do not)."""
        settings = self.settings()
        if probe_steps is not None and self.layer_wise:
            settings["grass.probe_steps"] = probe_steps
        for key, value in (defaults or {}).items():
            settings.setdefault(key, value)
        cfg = train_config(model_name, self.method, settings)
        if self.phase == "probe" and not (cfg.layer_wise and cfg.grass.probe_steps > 0):
            raise MemoryEstimateError(f"method={self.method} does not probe; allowed: phase=train")
        return cfg

    def active_ids(self, cfg, num_layers: int | None) -> list[int] | None:
        """The decoder layers a layer-wise method trains: ``active_layer_ids``, by default
        ``0 .. gamma-1`` (the worst case), checked; None for the other methods."""
        if not self.layer_wise:
            return None
        gamma = cfg.grass.active_layers
        ids = sorted({int(i) for i in (range(gamma) if self.active_layer_ids is None else self.active_layer_ids)})
        if len(ids) != gamma:
            raise MemoryEstimateError(
                f"active_layer_ids={ids!r} has {len(ids)} distinct layers; allowed: exactly active_layers={gamma}"
            )
        if num_layers is not None and self.active_layer_ids is None and gamma > num_layers:
            raise MemoryEstimateError(
                f"active_layers={gamma} is larger than the model's {num_layers} decoder layers; allowed: 1..{num_layers}"
            )
        if num_layers is not None and (ids[0] < 0 or ids[-1] >= num_layers):
            raise MemoryEstimateError(
                f"active_layer_ids={ids!r} is invalid; allowed: layers 0..{num_layers - 1}"
            )
        return ids


def train_config(model_name: str, method: str, settings: dict[str, Any]):
    """The ``TrainConfig`` ``grass-llm train`` would run with these dotted ``settings``
    (``TrainConfigError`` -> :class:`MemoryEstimateError`)."""
    from grass_llm.recipes.config_values import nest
    from grass_llm.recipes.train_config import TrainConfig, TrainConfigError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a method overriding a key given to all methods
            return TrainConfig.from_dict(nest({"model": model_name, **settings, "method": method}))
    except TrainConfigError as e:
        raise MemoryEstimateError(str(e)) from None


def probes(method: str, overrides: dict[str, Any]) -> bool:
    """Whether ``method`` with these settings has a probing phase (as ``grass-llm train`` resolves them)."""
    cfg = train_config("model", method, dict(overrides))
    return cfg.layer_wise and cfg.grass.probe_steps > 0
