"""What a plan is made for, resolved once (:class:`PlanContext`, :func:`plan_context`): the checked inputs,
the model's config and shape, the ``TrainConfig`` a run would have, and the key of its cached estimates."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grass_llm._tensor import DTYPES
from grass_llm.memory.fit.plans import KNOBS, FitError
from grass_llm.memory.fit.speed import ModelShape, model_shape
from grass_llm.memory.inputs import MemoryEstimateError, StepInputs, train_config
from grass_llm.memory.model import load_config

__all__ = ["PlanContext", "plan_context"]

#: config JSON, LoRA targets, rank, grass.layers -> ModelShape, per process
_SHAPES: dict[tuple, ModelShape] = {}


@dataclass
class PlanContext:
    config: Any
    name: str
    inputs: StepInputs  # the step a candidate's estimate starts from (batch_size: the effective batch)
    tc: Any  # the resolved TrainConfig
    shape: ModelShape
    key: tuple
    stats: dict[str, int] = field(default_factory=lambda: {"estimates": 0, "cached": 0})

    @property
    def method(self) -> str:
        return self.inputs.method

    @property
    def batch_size(self) -> int:
        return self.inputs.batch_size

    @property
    def seq_len(self) -> int:
        return self.inputs.seq_len

    @property
    def layer_wise(self) -> bool:
        return self.tc.layer_wise

    @property
    def probes(self) -> bool:
        return self.tc.layer_wise and self.tc.grass.probe_steps > 0

    @property
    def gamma(self) -> int:
        return self.tc.grass.active_layers

    @property
    def weight_bytes(self) -> int:
        return DTYPES[self.inputs.dtype].itemsize

    @property
    def adapter_bytes(self) -> int:
        dtype = self.tc.lora.dtype
        return DTYPES[dtype].itemsize if dtype in DTYPES else self.weight_bytes

    def state_bytes_per_param(self, residency: str) -> int:
        """Bytes of a trained weight's AdamW state (moments + master or compensation) with ``residency``."""
        from grass_llm._optim.precision import PrecisionPolicy

        dtype = DTYPES[self.inputs.dtype]
        policy = PrecisionPolicy.settle(self.tc.grass, {dtype}, residency)
        moments = 2 * (4 if policy.fp32_states else self.weight_bytes)
        return (
            moments
            + (4 if policy.use_master else 0)
            + (self.weight_bytes if policy.compensates(dtype) else 0)
        )

    def always_trained(self) -> int:
        """Parameters a layer-wise method trains besides its sampled layers (``grass.train_*``)."""
        g, s = self.tc.grass, self.shape
        return (  # (train_head trains a tied head where it is: in the embeddings, as GrassOptimizer does)
            (s.embedding_params if g.train_embeddings or (g.train_head and s.tied_head) else 0)
            + (s.head_params if g.train_head else 0)
            + (s.norm_params if g.train_norm else 0)
        )


def plan_context(model: Any, inputs: dict[str, Any]) -> PlanContext:
    """The :class:`PlanContext` of ``model`` and the arguments of :class:`~grass_llm.memory.inputs.StepInputs`
    in ``inputs``; :class:`FitError` names what is invalid."""
    try:
        step = StepInputs(**{**inputs, "overrides": dict(inputs.get("overrides") or {})})
    except MemoryEstimateError as e:
        raise FitError(str(e)) from None
    overrides = step.overrides
    for key in KNOBS:
        if key in overrides:
            raise FitError(
                f"{key} is what the plan chooses; allowed: leave it out (restrict the search with "
                "micro_batches=, checkpointing= or residencies=; the effective batch is batch_size)"
            )
    try:
        config = load_config(model)
        name = str(model) if isinstance(model, (str, Path)) else (getattr(config, "_name_or_path", "") or "model")
        tc = train_config(name, step.method, _settings(step))
    except MemoryEstimateError as e:
        raise FitError(str(e)) from None
    shape = _shape(config, tc, step.method)
    if tc.layer_wise and tc.grass.active_layers > shape.num_layers:
        raise FitError(
            f"active_layers={tc.grass.active_layers} is larger than the model's {shape.num_layers} decoder "
            f"layers; allowed: 1..{shape.num_layers}"
        )
    key = (
        config.to_json_string(),
        name,
        step.method,
        step.dtype,
        step.rank,
        step.active_layers,
        step.chunked_loss,
        step.optimizer_impl,
        json.dumps(overrides, sort_keys=True, default=str),
    )
    return PlanContext(config, name, step, tc, shape, key)


def _settings(step: StepInputs) -> dict[str, Any]:
    """The ``grass-llm train`` keys of the run the plan is for (the user's, not an estimate's)."""
    settings = {**step.overrides, "dtype": step.dtype, "max_length": max(step.seq_len, 8)}
    settings.setdefault("lora.rank", step.rank)
    settings.setdefault("lora.alpha", 2 * step.rank)
    if step.active_layers is not None:
        settings["grass.active_layers"] = step.active_layers
    return settings


def _shape(config: Any, tc: Any, method: str) -> ModelShape:
    """The model's :class:`ModelShape` (with LoRA's adapters), cached for the process."""
    targets = tuple(tc.lora.target_modules) if method in ("lora", "dora") else ()  # adapters: LoRA's only
    key = (config.to_json_string(), targets, tc.lora.rank, tc.grass.layers)
    if key not in _SHAPES:
        _SHAPES[key] = model_shape(config, targets, tc.lora.rank, tc.grass.layers)
    return _SHAPES[key]
