"""Peak device memory of one training step, estimated without a GPU, by the code that trains.

``estimate_memory`` builds the model under
:class:`torch._subclasses.fake_tensor.FakeTensorMode` on the ``meta`` device (fake tensors: shapes
and dtypes, no data), builds the method with ``grass_llm.recipes.methods.build_method`` from a
``TrainConfig``, exactly as ``grass-llm train`` does on a CUDA device, and runs training steps
(forward, the loss as ``grass-llm train`` computes it, backward, gradient clipping, the optimizer's
``step()``, ``zero_grad``). There is no model of the optimizer: ``GrassOptimizer`` steps with its real
``LayerStateOffloader`` (host buffers on the CPU, device slots on ``meta``), FFT and LoRA/DoRA with the
``torch.optim.AdamW`` (and peft adapters) the registry builds. :class:`LiveBytesTracker`, a
``TorchDispatchMode``, counts the bytes of every live tensor storage on the model's device (``meta``),
so host-side buffers are left out by the same placement that keeps them in host memory on CUDA. Each
storage is rounded up to 512 bytes, the granularity of the CUDA caching allocator, so the peak is
comparable with ``torch.cuda.max_memory_allocated`` (which, like this estimate, leaves out the CUDA
context and the allocator's cached-but-free blocks). Two things a CUDA run holds beyond the ops' outputs
are modelled by the tracker: PyTorch's cuBLAS workspaces (one per thread that runs matmuls, forward and
autograd's backward thread: 2 x 32 MiB on a Hopper GPU, the default ``gpu="hopper"``; ``CUBLAS_WORKSPACE_CONFIG``
sizes them when set), and autograd summing two gradients of one tensor in place (a tied embedding and
head), which it does out of place under any dispatch mode. Checked against an H200 on 2026-12-04: Gemma-2B
FFT, LoRA r=128, LISA and GRASS + frozen-block checkpointing, and the 512-wide test model's FFT and GRASS,
within 0.6% of ``max_memory_allocated`` (``tests/test_memory.py`` pins those measurements).

A run of a layer-wise method has two kinds of step: probing steps (backward through every layer) and
training steps. ``phase="run"`` is the whole run's peak: the larger of the two, and with ``offload=off``
the training step plus the AdamW states of every trainable layer, which such a run keeps on the device
once it has trained them (:func:`~grass_llm.memory.result.whole_run`). ``grass-llm memory`` reports it first.

The settings are ``grass-llm train``'s (``TrainConfig`` keys, ``overrides``) with the device taken to be
CUDA: weights in ``dtype`` (bf16 by default), offload on (``grass.offload: auto``: the active layers'
states kept on the device for a period, every state in host memory), the chunked loss, no activation
checkpointing unless asked. Two things are set for the measurement: GRASS-style methods run their
training phase (``grass.probe_steps: 0``) with the WORST-case active layers, ``0 .. gamma-1``
(activations are saved from the lowest active layer upward), forced with
``GrassOptimizer.activate``; and ``torch.optim``'s AdamW runs the implementation ``grass-llm train``
builds on a CUDA device, fused (``optimizer_impl="auto"``; on ``meta`` torch would pick the for-loop).

``estimate_memory(..., fake=False)`` runs the same steps on real CPU tensors (the device is then the
CPU, where ``offload: auto`` is off); the tests use it to check that the fake run counts the same bytes
as a real one. :func:`~grass_llm.memory.cuda.measure_cuda_step` runs them on a real CUDA device and returns
``torch.cuda.max_memory_allocated``.

The parts: :mod:`~grass_llm.memory.inputs` (the arguments, checked once), :mod:`~grass_llm.memory.model`
(the config and the model), :mod:`~grass_llm.memory.fake` (what makes a fake run follow a CUDA one),
:mod:`~grass_llm.memory.step` (the training step), :mod:`~grass_llm.memory.result` (the estimate and the
whole run), :mod:`~grass_llm.memory.cuda` (measurement), :mod:`~grass_llm.memory.report` (the table); the
command line is :mod:`grass_llm.memory.cli`. This module runs an estimate and keeps the names it had before
the split importable from here.

Only torch is imported at module import time; transformers and peft are imported when needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grass_llm.memory.cuda import cuda_gpu, measure_cuda_step
from grass_llm.memory.fake import fake_mode_patches, fake_process_group
from grass_llm.memory.inputs import (
    OPTIMIZER_IMPLS,
    PHASES,
    MemoryEstimateError,
    StepInputs,
    check_choice,
    check_int,
    methods,
    probes,
)
from grass_llm.memory.model import config_name, load_config
from grass_llm.memory.report import format_table
from grass_llm.memory.result import MemoryEstimate, whole_run
from grass_llm.memory.step import TrainingStep, training_step
from grass_llm.memory.tracker import ALLOCATOR_ROUND, CATEGORIES, LiveBytesTracker
from grass_llm.memory.workspaces import GPUS, cublas_workspace_bytes, cublaslt_workspace_bytes

__all__ = [
    "CATEGORIES",
    "GPUS",
    "OPTIMIZER_IMPLS",
    "PHASES",
    "MemoryEstimate",
    "MemoryEstimateError",
    "TrainingStep",
    "cuda_gpu",
    "estimate_memory",
    "estimate_step",
    "format_table",
    "load_config",
    "measure_cuda_step",
    "methods",
    "tag_gradients",
    "training_step",
    "whole_run",
]


def estimate_memory(
    model: Any,
    method: str = "grass",
    *,
    active_layers: int | None = None,
    active_layer_ids: Sequence[int] | None = None,
    rank: int = 128,
    batch_size: int = 1,
    seq_len: int = 1024,
    dtype: str = "bf16",
    activation_checkpointing: str = "none",
    chunked_loss: bool = True,
    optimizer_impl: str = "auto",
    overrides: dict[str, Any] | None = None,
    steps: int = 2,
    fake: bool = True,
    round_to: int = ALLOCATOR_ROUND,
    world_size: int = 1,
    phase: str = "train",
    peak_detail: bool = False,
    gpu: str | None = "hopper",
) -> MemoryEstimate:
    """Estimate the peak device memory of a training step of ``model`` with ``method``.

    ``model`` is a ``PretrainedConfig``, a config.json path or directory, or a cached hub name; ``method``
    to ``overrides`` and ``phase`` say what step is run: :class:`~grass_llm.memory.inputs.StepInputs`.
    ``phase="run"`` is the whole run's peak (:func:`~grass_llm.memory.result.whole_run` of the training
    and probing steps; the training step alone for methods that do not probe). How it is run:

    Args:
        steps: training steps run (>= 2: the first step creates the optimizer states).
        fake: fake tensors on ``meta`` standing for a CUDA device (no memory, any size); ``False`` runs
            real CPU tensors (small models only; used to validate the fake run; no cuBLAS workspaces).
        round_to: storages are rounded up to this many bytes (CUDA caching allocator: 512).
        world_size: > 1: the peak of one of ``world_size`` ranks running FSDP2
            (``distributed.strategy: fsdp2``: every decoder block and the root ``fully_shard``-ed, GRASS on
            ``FSDP2Backend``, offload on as on CUDA), with a fake process group; the model is on fake
            CPU tensors (FSDP2 refuses meta ones) and the offloader's host buffers on meta, out of the count.
        peak_detail: also list every storage live at the peak, labelled with what made it
            (``extra["peak_storages"]``: ``LiveBytesTracker.peak_storages`` with ``origins=True``; slower).
        gpu: the GPU the fake run stands for, which sizes PyTorch's cuBLAS workspaces (one per thread
            running matmuls: forward, and autograd's backward thread): ``hopper`` (H100 / H200, the default:
            32 MiB each), ``other`` (any other NVIDIA GPU: 8 MiB + 128 KiB each), or ``None`` (none counted);
            ``CUBLAS_WORKSPACE_CONFIG``, when set, sizes them as it does for PyTorch. Ignored with
            ``fake=False`` (a CPU has none).
    """
    inputs = StepInputs(
        method,
        active_layers,
        active_layer_ids,
        rank,
        batch_size,
        seq_len,
        dtype,
        activation_checkpointing,
        chunked_loss,
        optimizer_impl,
        overrides,
        phase,
    )
    return estimate_step(
        model,
        inputs,
        steps=steps,
        fake=fake,
        round_to=round_to,
        world_size=world_size,
        peak_detail=peak_detail,
        gpu=gpu,
    )


def estimate_step(
    model: Any,
    inputs: StepInputs,
    *,
    steps: int = 2,
    fake: bool = True,
    round_to: int = ALLOCATOR_ROUND,
    world_size: int = 1,
    peak_detail: bool = False,
    gpu: str | None = "hopper",
) -> MemoryEstimate:
    """:func:`estimate_memory` of checked ``inputs`` (what the planner calls)."""
    run = _Run(steps, fake, round_to, world_size, peak_detail, gpu)
    if inputs.phase != "run":
        return _estimate(model, inputs, run)
    train = _estimate(model, dataclasses.replace(inputs, phase="train"), run)
    probing = inputs.layer_wise and probes(inputs.method, inputs.overrides or {})
    probe = _estimate(model, dataclasses.replace(inputs, phase="probe"), run) if probing else None
    return whole_run(train, probe)


@dataclass(frozen=True)
class _Run:
    """How an estimate runs its steps (the arguments of :func:`estimate_memory` beyond the step's), checked."""

    steps: int
    fake: bool
    round_to: int
    world_size: int
    peak_detail: bool
    gpu: str | None

    def __post_init__(self) -> None:
        check_int("steps", self.steps, 1)
        check_int("world_size", self.world_size, 1)
        if self.gpu is not None:
            check_choice("gpu", self.gpu, GPUS)
        if self.world_size > 1 and not self.fake:
            raise MemoryEstimateError("world_size > 1 needs fake=True (a fake process group stands for the ranks)")

    @property
    def device(self) -> torch.device:
        """The device of the run: ``meta`` standing for CUDA, or the (fake) CPU of FSDP2 or a real run."""
        return torch.device("meta" if self.fake and self.world_size == 1 else "cpu")

    def tracker(self, step: TrainingStep) -> LiveBytesTracker:
        """The tracker of a run of ``step``: its weights, the states already on the device and each gradient
        counted (the cuBLAS workspaces of the GPU the run stands for; none on a real CPU)."""
        from grass_llm.distributed.fsdp2 import local_tensor

        gpu = self.gpu if self.fake else None
        tracker = LiveBytesTracker(
            round_to=self.round_to,
            device=self.device,
            origins=self.peak_detail,
            cublas_workspace=cublas_workspace_bytes(gpu) if gpu else 0,
            cublaslt_workspace=cublaslt_workspace_bytes(gpu) if gpu else 0,
        )
        named = [*step.model.named_parameters(), *step.model.named_buffers()]
        tracker.track([local_tensor(t) for _, t in named], "weights", names=[n for n, _ in named])
        # states already on the device before the first step (residency per period: the active layers')
        tracker.track(step.state_tensors(), "optimizer_states")
        tag_gradients(step.model, tracker)
        return tracker


def _estimate(model: Any, inputs: StepInputs, run: _Run) -> MemoryEstimate:
    """The estimate of one step (``inputs.phase``: train or probe)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = load_config(model)
    name = config_name(config) if not isinstance(model, (str, Path)) else str(model)
    cfg = inputs.train_config(
        name,
        probe_steps=run.steps + 1 if inputs.phase == "probe" else None,  # every step of the estimate probes
        defaults={"grass.offload": "period"} if run.world_size > 1 else None,  # what auto gives on CUDA
    )
    active_ids = inputs.active_ids(cfg, getattr(config, "num_hidden_layers", None))
    device = run.device
    mode = FakeTensorMode(allow_non_fake_inputs=True) if run.fake else None
    with fake_mode_patches(mode, device.type), fake_process_group(run.world_size) as mesh:
        step = TrainingStep(config, cfg, device, mode, active_ids, inputs.optimizer_impl, mesh)
        tracker = run.tracker(step)
        labels = tracker.label_modules(step.model) if run.peak_detail else contextlib.nullcontext()
        with mode or contextlib.nullcontext(), labels, tracker:
            for _ in range(run.steps):
                step.run(inputs.batch_size, inputs.seq_len, tracker)
        extra = _extras(step)
        extra["workspaces"] = [f"{lib} ({thread} thread)" for lib, thread in tracker.workspaces]
        if run.peak_detail:
            extra["peak_storages"] = tracker.peak_storages()
        others = _other_layers_states(step, device, run.round_to) if inputs.phase == "train" else 0
        opt = step.opt
        trainable = opt.trainable_parameters() if inputs.layer_wise else [p for g in opt.param_groups for p in g["params"]]
        return MemoryEstimate(
            model=name,
            method=inputs.method,
            batch_size=inputs.batch_size,
            seq_len=inputs.seq_len,
            dtype=inputs.dtype,
            active_layers=cfg.grass.active_layers if inputs.layer_wise else None,
            active_layer_ids=active_ids,
            rank=inputs.rank if inputs.lora else None,
            activation_checkpointing=inputs.activation_checkpointing,
            chunked_loss=inputs.chunked_loss,
            optimizer_impl=inputs.optimizer_impl,
            num_layers=int(getattr(config, "num_hidden_layers", None) or 0),
            total_params=sum(p.numel() for p in step.model.parameters()),
            trainable_params=sum(p.numel() for p in trainable),
            peak=tracker.peak,
            fake=run.fake,
            world_size=run.world_size,
            phase=inputs.phase,
            settings=dict(inputs.overrides or {}),
            gpu=run.gpu if run.fake else None,
            other_layers_states=others,
            extra=extra,
            **tracker.peak_breakdown(),
        )


def _other_layers_states(step: TrainingStep, device: torch.device, round_to: int) -> int:
    """Device bytes of the AdamW states of the trainable decoder layers ``step`` does not train, with
    ``offload=off`` and ``on_reactivation=keep`` (torch.optim's ``state``, kept once made): each parameter's
    state tensors as those of a trained parameter of its dtype. 0 for any other setting."""
    from grass_llm.distributed.fsdp2 import local_tensor

    opt = step.opt
    if not step.method.layer_wise or opt.residency != "off" or opt.config.on_reactivation != "keep":
        return 0

    def rounded(nbytes: int) -> int:
        return -(-nbytes // round_to) * round_to

    layouts: dict[torch.dtype, list[tuple[int, bool, int]]] = {}  # dtype -> (elem size, param-shaped, bytes)
    for p in opt.trainable_parameters():
        st = opt.state.get(p, {})
        states = [t for k, t in st.items() if k != "step" and torch.is_tensor(t) and t.device.type == device.type]
        if states:
            n = local_tensor(p).numel()
            layouts.setdefault(p.dtype, [(t.element_size(), t.numel() == n, t.nbytes) for t in states])
    if not layouts:
        return 0
    active = set(opt.active_layers)
    total = 0
    for group in opt.param_groups:
        if group.get("layer") is None or group["layer"] in active:
            continue
        for p in opt.units.trainable_of(group["params"]):
            n = local_tensor(p).numel()
            layout = layouts.get(p.dtype) or next(iter(layouts.values()))
            total += sum(rounded(n * size) if shaped else rounded(nbytes) for size, shaped, nbytes in layout)
    return total


def tag_gradients(model: torch.nn.Module, tracker: LiveBytesTracker) -> list:
    """Count each parameter's accumulated gradient as ``gradients`` in ``tracker`` (a hook on every
    parameter: GrassOptimizer switches ``requires_grad`` itself). Returns the hook handles."""
    from grass_llm.distributed.fsdp2 import local_tensor

    def retag_grad(p: torch.Tensor) -> None:
        if p.grad is not None:
            tracker.retag(local_tensor(p.grad), "gradients")

    handles = []
    for p in model.parameters():
        was = p.requires_grad
        p.requires_grad_(True)
        handles.append(p.register_post_accumulate_grad_hook(retag_grad))
        p.requires_grad_(was)
    return handles


def _extras(step: TrainingStep) -> dict[str, Any]:
    """What the estimate ran with: the offload and precision settings, host memory of the offloaded states."""
    opt = step.opt
    out: dict[str, Any] = {"optimizer": type(opt).__name__}
    off = getattr(opt, "offloader", None)
    if step.method.layer_wise:
        out.update(offload=off is not None, precision=opt.precision)
    if off is not None:
        out.update(
            offload_chunk_bytes=off.chunk_bytes,
            host_bytes_all_units=sum(off.unit_nbytes(u) for u in off.units()),
        )
    return out
