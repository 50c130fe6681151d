"""Measurement on a real CUDA device: the GPU an estimate stands for (:func:`cuda_gpu`), and the peak of
the same training steps as an estimate's, as ``torch.cuda.max_memory_allocated`` (:func:`measure_cuda_step`)."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

import torch

from grass_llm.memory.inputs import MemoryEstimateError, StepInputs
from grass_llm.memory.step import build_step

__all__ = ["cuda_gpu", "measure_cuda_step"]


def cuda_gpu(device: torch.device | str | int | None = None) -> str:
    """The ``gpu`` of :func:`~grass_llm.memory.estimate.estimate_memory` that stands for a CUDA ``device``: ``hopper`` for compute
    capability 9.0 (the GPUs on which PyTorch's cuBLAS workspaces are 32 MiB), else ``other``."""
    return "hopper" if torch.cuda.get_device_capability(device) == (9, 0) else "other"


def measure_cuda_step(
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
    device: str = "cuda",
    phase: str = "train",
) -> int:
    """Run the same training steps on a real CUDA device; return ``torch.cuda.max_memory_allocated``.

    The model is randomly initialised from its config (no weights are downloaded) and the method built
    with the same ``TrainConfig`` as :func:`~grass_llm.memory.estimate.estimate_memory` (the arguments are
    :class:`~grass_llm.memory.inputs.StepInputs`'); ``phase="probe"`` measures probing steps;
    ``phase="run"`` a whole run in one: :data:`~grass_llm.memory.inputs.RUN_PROBE_STEPS` probing steps (a
    method that probes), then ``steps`` training steps with the worst layers, the peak over all of them.
    (With ``offload=off`` a real run also accumulates the states of the layers it trains later, which a few
    steps cannot show: :func:`~grass_llm.memory.result.whole_run` adds them to the estimate.) Garbage is
    collected before and after, so measurements in one process do not count each other's memory (the first
    one in a process also allocates the cuBLAS workspaces, which stay and are counted, as the estimate counts
    them). Raises :class:`MemoryEstimateError` without CUDA.
    """
    if not torch.cuda.is_available():
        raise MemoryEstimateError("measure_cuda_step needs a CUDA device; torch.cuda.is_available() is False")
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
    return _measure(model, inputs, steps, torch.device(device))


def _measure(model: Any, inputs: StepInputs, steps: int, dev: torch.device) -> int:
    """:func:`measure_cuda_step` of checked ``inputs``."""
    # what earlier work left to the garbage collector (reference cycles: a model with frozen-block checkpointing,
    # the chunked loss's hook on the head) is freed first, or it would count in this measurement
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    step = build_step(model, inputs, dev)
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    probing = step.cfg.grass.probe_steps if step.method.layer_wise and inputs.phase == "run" else 0
    for _ in range(probing + steps):
        step.run(inputs.batch_size, inputs.seq_len)
    torch.cuda.synchronize(dev)
    peak = int(torch.cuda.max_memory_allocated(dev))
    del step
    gc.collect()  # (the cycles above: freed now, not at the garbage collector's next pass)
    torch.cuda.empty_cache()
    return peak
