"""What an estimate reports: :class:`MemoryEstimate`, the peak of one step and its breakdown, and
:func:`whole_run`, a whole run's peak composed from its steps' estimates."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from grass_llm.memory.inputs import MemoryEstimateError
from grass_llm.memory.tracker import CATEGORIES

__all__ = ["STEP_LABELS", "MemoryEstimate", "whole_run"]

#: what a peak is of, per phase
STEP_LABELS = {"train": "training step", "probe": "probing step", "run": "whole run"}


@dataclass
class MemoryEstimate:
    """Peak device memory of one training step and its breakdown (bytes)."""

    model: str
    method: str
    batch_size: int
    seq_len: int
    dtype: str
    active_layers: int | None = None
    active_layer_ids: list[int] | None = None
    rank: int | None = None
    activation_checkpointing: str = "none"
    chunked_loss: bool = True
    optimizer_impl: str = "auto"
    num_layers: int = 0
    total_params: int = 0
    trainable_params: int = 0
    weights: int = 0
    gradients: int = 0
    optimizer_states: int = 0
    activations: int = 0
    workspaces: int = 0  # cuBLAS / cuBLASLt workspaces (CUDA: one per thread that runs matmuls)
    peak: int = 0
    fake: bool = True
    measured_peak: int | None = None  # torch.cuda.max_memory_allocated, when measured
    world_size: int = 1  # > 1: one rank of an FSDP2 run
    phase: str = "train"  # train, probe, or run (the whole run: whole_run())
    settings: dict[str, Any] = field(default_factory=dict)  # the TrainConfig keys given (overrides)
    #: the GPU the estimate stands for (sizes the cuBLAS workspaces): hopper, other, or None (a CPU)
    gpu: str | None = "hopper"
    #: a training step with offload=off and on_reactivation=keep: the device bytes of the AdamW states of the
    #: trainable layers this step does not train, which a run keeps once it has trained them (whole_run adds
    #: them); 0 where the states live in host memory
    other_layers_states: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Short label of the method and what the peak is of: ``GRASS γ=2``, ``GRASS γ=2, probing``,
        ``GRASS γ=2, whole run``, ``LoRA r=128``, ``FFT``."""
        return self.method_label + {"train": "", "probe": ", probing", "run": ", whole run"}[self.phase]

    @property
    def method_label(self) -> str:
        """Short method label: ``GRASS γ=2``, ``LoRA r=128``, ``FFT`` (with FSDP2, the world size)."""
        names = {"grass": "GRASS", "grass-static": "GRASS*", "lisa": "LISA", "badam": "BAdam"}
        if self.method in names:
            label = f"{names[self.method]} γ={self.active_layers}"
        elif self.method in ("lora", "dora"):
            label = f"{'LoRA' if self.method == 'lora' else 'DoRA'} r={self.rank}"
        else:
            label = self.method.upper()
        if self.world_size > 1:
            label += f", FSDP2 x{self.world_size} (per rank)"
        return label

    @property
    def step(self) -> str:
        """What the peak is of: ``training step``, ``probing step``, or ``whole run``."""
        return STEP_LABELS[self.phase]

    def breakdown(self) -> dict[str, int]:
        """Bytes per category at the peak (they sum to ``peak``)."""
        return {c: getattr(self, c) for c in CATEGORIES}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["label"] = self.label
        d["method_label"] = self.method_label
        d["peak_gib"] = self.peak / 2**30
        d["peak_gb"] = self.peak / 1e9
        return d


def whole_run(train: MemoryEstimate, probe: MemoryEstimate | None = None) -> MemoryEstimate:
    """The whole run's peak from its training step's estimate and, for a method that probes, its probing
    step's: the larger of the two. A training step with ``other_layers_states`` (``offload=off``, whose run
    keeps the AdamW states of every layer it has trained on the device) counts them in its optimizer
    states: the whole run is the worst layers training with every other trainable layer's states held.
    The breakdown is that of the step that sets the peak (``extra["whole_run_from"]``); ``extra["steps"]``
    holds both steps' own peaks (``extra["other_layers_states_added"]``: the bytes added to the training step's)."""
    if train.phase != "train" or (probe is not None and probe.phase != "probe"):
        raise MemoryEstimateError("whole_run takes a training step's estimate and a probing step's (or None)")
    trained = dataclasses.replace(
        train,
        optimizer_states=train.optimizer_states + train.other_layers_states,
        peak=train.peak + train.other_layers_states,
        extra=dict(train.extra),
    )
    top = probe if probe is not None and probe.peak > trained.peak else trained
    steps = {"train": train.peak} | ({"probe": probe.peak} if probe is not None else {})
    run = dataclasses.replace(top, phase="run", measured_peak=None, extra=dict(top.extra))
    run.extra.update(whole_run_from=top.phase, steps=steps)
    if top is trained and train.other_layers_states:
        run.extra["other_layers_states_added"] = train.other_layers_states
        run.extra.pop("peak_storages", None)  # (those of the training step alone)
    return run
