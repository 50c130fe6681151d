"""The GPU measurements the speed model rests on (:data:`MEASUREMENTS`), the fit of its constants to them
(:func:`calibrate`) and what the model says each should have run at (:func:`modelled_tokens_per_s`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from grass_llm.memory.fit.speed import SPEED_MODEL, ModelShape, SpeedModel, Work, update_bytes

__all__ = ["MEASURED_SHAPES", "MEASUREMENTS", "Measurement", "calibrate", "modelled_tokens_per_s"]


@dataclass(frozen=True)
class Measurement:
    """One measured training (or probing) step on a GPU, for :func:`calibrate` and ``docs/fit.md``."""

    label: str
    shape: str  # key of MEASURED_SHAPES
    method: str  # fft, lora, grass (layer-wise), lisa, probe
    batch_size: int
    tokens_per_s: float
    residency: str = "off"  # layer-wise: where the states were (step: streamed every step)
    active: tuple[int, ...] = ()  # layer-wise: the active layers
    fitted: bool = True  # used by calibrate (False: shown for comparison only)
    source: str = ""
    seq_len: int = 1024


#: LLaMA2-7B, TinyLlama-1.1B and Gemma-2B as measured (``model_shape`` of benchmarks/common.py's configs,
#: LoRA r=128 on q, k, v, up, down; tests/test_fit.py checks them).
# fmt: off
MEASURED_SHAPES = {
    "LLaMA2-7B": ModelShape(32, 6476267520, 131072000, 131072000, 131072000, 4096, 6738415616, 4096, 224395264),
    "TinyLlama-1.1B": ModelShape(22, 968974336, 65536000, 65536000, 65536000, 2048, 1100048384, 2048, 67764224),
    "Gemma-2B": ModelShape(18, 1981882368, 524288000, 0, 524288000, 2048, 2506172416, 2048, 104988672, tied_head=True),
}
_NEW = "H200, 2026-12-04, period residency (issue #19), one fresh process per row"
_OLD = "H200, 2026-12-04, main at f8bc263 (../shared/gpu-runs/2026-12-04-h200)"
_7B, _TINY = "LLaMA2-7B", "TinyLlama-1.1B"
#: The GPU measurements the speed model rests on (tokens/s of one training step, bf16, 1024 tokens a row):
#: (label, shape, method, batch, tokens/s, residency, active layers, used by the fit, source)
MEASUREMENTS: tuple[Measurement, ...] = (
    Measurement("LoRA r128", _7B, "lora", 4, 12976, source=_NEW),
    Measurement("FFT", _7B, "fft", 4, 9795, source=_NEW),
    Measurement("GRASS layers 10,20", _7B, "grass", 4, 14963, "period", (10, 20), source=_NEW),
    Measurement("GRASS layers 0,1", _7B, "grass", 4, 12796, "period", (0, 1), source=_NEW),
    Measurement("GRASS offload=step, layers 10,20", _7B, "grass", 4, 11502, "step", (10, 20), source=_OLD),
    Measurement("GRASS offload=step, layers 0,1", _7B, "grass", 4, 10268, "step", (0, 1), source=_OLD),
    Measurement("GRASS offload=off, layers 10,20", _7B, "grass", 4, 14465, "off", (10, 20), source=_OLD),
    Measurement("GRASS offload=off, layers 0,1", _7B, "grass", 4, 12698, "off", (0, 1), source=_OLD),
    Measurement("GRASS probing step", _7B, "probe", 4, 8862, source=_NEW),
    Measurement("LISA offload=step, layers 0,1", _7B, "lisa", 4, 8402, "step", (0, 1), source=_OLD),
    Measurement("FFT", _TINY, "fft", 1, 14867, source=_OLD),
    Measurement("LoRA r128", _TINY, "lora", 1, 11231, source=_OLD),
    Measurement("GRASS offload=off, layers 0,1", _TINY, "grass", 1, 12950, "off", (0, 1), source=_OLD),
    Measurement("GRASS offload=step, layers 0,1", _TINY, "grass", 1, 12408, "step", (0, 1), source=_OLD),
    Measurement("LISA (default settings), layers 0,1", _7B, "lisa", 1, 3361, "period", (0, 1), False, _NEW),
    Measurement("LISA (default settings), layers 0,1", _TINY, "lisa", 1, 7941, "period", (0, 1), False, _NEW),
    Measurement("LISA (default settings), layers 0,1", "Gemma-2B", "lisa", 1, 2657, "period", (0, 1), False, _NEW),
)
# fmt: on

#: bytes of a trained bf16 weight's AdamW state in the measured runs: torch AdamW's two bf16 moments; GRASS's
#: moments + fp32 master with offload=step, + Kahan compensation otherwise
_STATE_TORCH, _STATE_STEP, _STATE_KEPT = 4, 8, 6


def _measurement_work(m: Measurement) -> tuple[ModelShape, Work]:
    shape = MEASURED_SHAPES[m.shape]
    n, L = m.batch_size * m.seq_len, shape.num_layers
    if m.method == "fft":
        work = Work(n, m.seq_len, 1, L, L, 0, True, update_bytes(2, _STATE_TORCH) * shape.total_params)
    elif m.method == "lora":
        work = Work(n, m.seq_len, 1, L, 0, 0, False, update_bytes(2, _STATE_TORCH) * shape.adapter_params)
    elif m.method == "probe":
        work = Work(n, m.seq_len, 1, L, L, L)  # backward through every block, every block recomputed
    else:
        lisa = m.method == "lisa"
        trained = len(m.active) * shape.mean_block + (
            shape.embedding_params + shape.head_params if lisa else 0
        )
        state = _STATE_STEP if m.residency == "step" else _STATE_KEPT
        streamed = 2 * state * trained if m.residency == "step" else 0
        blocks = L if lisa else L - min(m.active)
        work = Work(
            n, m.seq_len, 1, blocks, len(m.active), 0, lisa, update_bytes(2, state) * trained, streamed
        )
    shape = dataclasses.replace(shape, adapter_params=shape.adapter_params if m.method == "lora" else 0)
    return shape, work


def calibrate(
    measurements: Sequence[Measurement] = MEASUREMENTS, hbm_bytes_per_s: float = 4.8e12
) -> SpeedModel:
    """The :class:`SpeedModel` whose ``micro_batch_s``, ``matmul_flops`` and ``stream_bytes_per_s`` fit the
    step times of the ``fitted`` measurements best (least squares on relative error; the update's time,
    memory bound at ``hbm_bytes_per_s``, is subtracted first)."""
    rows, target = [], []
    for m in measurements:
        if not m.fitted:
            continue
        shape, work = _measurement_work(m)
        seconds = m.batch_size * m.seq_len / m.tokens_per_s
        w = 1.0 / seconds
        rows.append(
            [
                w * work.grad_accum,
                w * work.grad_accum * SpeedModel.flops(shape, work),
                w * work.streamed_bytes,
            ]
        )
        target.append(w * (seconds - work.update_bytes / hbm_bytes_per_s))
    a = torch.tensor(rows, dtype=torch.float64)
    b = torch.tensor(target, dtype=torch.float64).unsqueeze(1)
    t_micro, per_flop, per_byte = torch.linalg.lstsq(a, b).solution.squeeze(1).tolist()
    return SpeedModel(
        micro_batch_s=t_micro,
        matmul_flops=1.0 / per_flop,
        stream_bytes_per_s=1.0 / per_byte,
        update_bytes_per_s=hbm_bytes_per_s,
    )


def modelled_tokens_per_s(m: Measurement, model: SpeedModel = SPEED_MODEL) -> float:
    """What ``model`` says the measurement ``m`` should have run at."""
    shape, work = _measurement_work(m)
    return m.batch_size * m.seq_len / model.seconds(shape, work)
