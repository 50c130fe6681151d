"""Will it fit? The fastest training settings whose whole-run peak fits a GPU's memory.

:func:`plan` answers the question every user of a memory-efficient fine-tuner asks first: "what runs on my
24 GB card, and how fast?". For one method and an effective batch of B rows of T tokens it considers

* the micro-batch: ``batch_size`` = m rows with ``grad_accum`` = B / m (every divisor m of B);
* ``activation_checkpointing``: ``none``, ``frozen`` (layer-wise methods only: recompute the frozen blocks
  that backward passes through) or ``full``;
* the GRASS state residency ``grass.offload`` (layer-wise methods only): ``off``, ``period`` or ``step``;

orders them by the speed model below (fastest first), and returns the first whose **whole-run peak** plus
the :class:`Margin` fits the budget. A configuration's whole-run peak is estimated by
:func:`grass_llm.memory.estimate.estimate_memory` (the code ``grass-llm train`` runs, on fake tensors):

* the training step with the worst-case active layers (``0 .. gamma-1``: activations are kept from the lowest
  active layer upward), one micro-batch of m rows;
* with ``grad_accum > 1``, plus the gradients of the trained parameters (they are kept from one micro-batch
  to the next; the estimate runs one micro-batch per step, so this is an upper bound, exact when the step's
  peak comes before its gradients exist, as it does for GRASS and LoRA);
* with ``grass.offload=off`` and ``on_reactivation=keep``, plus the AdamW states of every decoder layer the
  run will have trained (``off`` keeps each layer's state on the device from its first activation on);
* for the methods that probe (``grass``, ``grass-static``), the larger of that and the probing step.

**Speed model** (:class:`SpeedModel`, constants fitted to the H200 measurements in :data:`MEASUREMENTS`, see
``docs/fit.md``). One optimizer step takes::

    grad_accum * (t_micro + FLOPs(micro-batch) / R)      forward, backward and recomputation
    + update bytes / HBM bandwidth                        the AdamW update (memory bound)
    + streamed state bytes / B_stream                     offload=step: states in and out every step
    + resample state bytes / (B_copy * period)            offload=period: arriving and leaving units

FLOPs count the matmuls: forward ``2 x params x tokens`` per block plus causal attention, backward the
input gradient of every block it passes through (from the lowest active layer up; the expected lowest of
gamma uniformly drawn layers) and the weight gradient of the trained ones, and one more forward for each
recomputed block. ``t_micro`` is the fixed cost of a micro-batch (host dispatch and synchronisation, which no
batch size amortises): larger micro-batches are faster. Recomputation and transfers are costs; nothing is
assumed hidden except what the fit measured. The model orders the configurations of ONE method; it is not
a benchmark (tokens/s are printed as the model's, for an H200).

The chosen settings are ``grass-llm train`` keys (:attr:`FitPlan.settings`); ``memory_budget=`` in
``grass-llm train`` applies them before anything is built (:func:`apply_memory_budget`), and from Python
:meth:`FitPlan.apply` / :meth:`FitPlan.grass_config` / :meth:`FitPlan.training_arguments` do.

Estimates are expensive (seconds each for a 7B model), so the search estimates the fastest candidates first
and stops at the first that fits; a candidate whose lower bound (weights, plus the states it must hold)
already exceeds the budget is rejected without an estimate; the probing step, which no residency or (with
``grass.probe_checkpointing``) checkpointing mode changes, is estimated once per micro-batch size; and
every estimate is cached for the process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grass_llm.memory.budget import BudgetError, format_size, parse_budget
from grass_llm.memory.estimate import MemoryEstimate, MemoryEstimateError, estimate_memory, load_config

__all__ = [
    "KNOBS",
    "MEASUREMENTS",
    "SPEED_MODEL",
    "Candidate",
    "Evaluated",
    "FitError",
    "FitPlan",
    "Margin",
    "Measurement",
    "ModelShape",
    "SpeedModel",
    "add_cli_arguments",
    "apply_memory_budget",
    "calibrate",
    "cli_main",
    "cli_plan",
    "format_plan",
    "model_shape",
    "parse_budget",
    "plan",
    "plan_for_train_config",
]

#: The ``grass-llm train`` keys a plan chooses.
KNOBS = ("batch_size", "grad_accum", "activation_checkpointing", "grass.offload")
RESIDENCIES = ("off", "period", "step")
_CHECKPOINTING = ("none", "frozen", "full")
_GiB = 2**30


class FitError(ValueError):
    """An argument of the planner is invalid; the message names it and what is allowed."""


# ---------------------------------------------------------------------------------------------
# the margin
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Margin:
    """What a run needs on the device beyond the estimated peak (which, like ``torch.cuda.max_memory_allocated``,
    counts the caching allocator's live blocks only).

    ``context_bytes``: memory the process holds outside the caching allocator: the CUDA context and the
    loaded kernels (about 0.5 GiB for a torch process on a Hopper GPU with CUDA 12-13, lazy module loading),
    with room to spare for libraries' own buffers (cuDNN, NCCL). The cuBLAS workspaces that PyTorch takes
    through the caching allocator are in the estimate itself (its ``workspaces``).
    ``fragmentation``: the share of the peak the caching allocator holds in cached-but-free blocks that a
    request of another size cannot use (a few percent in steady training loops; PyTorch's
    ``expandable_segments`` lowers it). ``benchmarks/fit_check.py`` measures both on a GPU.
    """

    context_bytes: int = 3 * _GiB // 4
    fragmentation: float = 0.05

    def needed(self, peak: int) -> int:
        """Device memory a run with this estimated peak needs."""
        return math.ceil(peak * (1 + self.fragmentation)) + self.context_bytes

    def of(self, peak: int) -> int:
        """The margin added to ``peak``."""
        return self.needed(peak) - peak

    def describe(self) -> str:
        return (
            f"{self.context_bytes / _GiB:.2f} GiB + {self.fragmentation:.0%} of the peak (the CUDA context and "
            "kernels outside max_memory_allocated; allocator fragmentation)"
        )


# ---------------------------------------------------------------------------------------------
# the model's shape (what the speed model counts)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of a causal LM that the speed model needs (from its config, built on ``meta``)."""

    num_layers: int
    block_params: int  # of all decoder blocks together
    embedding_params: int
    head_params: int  # 0 when the head is tied to the embeddings
    head_matmul_params: int  # vocab x hidden: the logits' matmul, tied or not
    norm_params: int
    total_params: int
    attention_width: int  # query heads x head dim (the attention score and value matmuls)
    adapter_params: int = 0  # LoRA / DoRA adapters on the target modules at the rank

    @property
    def mean_block(self) -> float:
        return self.block_params / max(self.num_layers, 1)


def model_shape(
    config: Any, lora_targets: Sequence[str] = (), rank: int = 0, layers: Any = None
) -> ModelShape:
    """The :class:`ModelShape` of a transformers config (the model is built on ``meta``: no memory).
    ``lora_targets`` / ``rank``: count the adapters LoRA would add (``r x (in + out)`` per target linear)."""
    from transformers import AutoModelForCausalLM

    from grass_llm.layers import discover_layers

    config = config.__class__.from_dict(config.to_dict())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    groups = discover_layers(model, layers)
    head_module = model.get_output_embeddings()
    head_matmul = head_module.weight.numel() if head_module is not None else 0
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
    targets = set(lora_targets)
    adapters = 0
    if targets and rank:
        for block in groups.blocks:
            for name, module in block.named_modules():
                if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                    adapters += rank * (module.in_features + module.out_features)
    return ModelShape(
        num_layers=groups.num_layers,
        block_params=sum(groups.numel(i) for i in range(groups.num_layers)),
        embedding_params=sum(p.numel() for p in groups.embeddings),
        head_params=sum(p.numel() for p in groups.head),
        head_matmul_params=head_matmul,
        norm_params=sum(p.numel() for p in groups.norm),
        total_params=sum(p.numel() for p in model.parameters()),
        attention_width=heads * int(head_dim),
        adapter_params=adapters,
    )


# ---------------------------------------------------------------------------------------------
# the speed model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """What one optimizer step does, in the speed model's terms."""

    tokens_per_micro: int  # m x T
    seq_len: int
    grad_accum: int
    blocks_backward: float  # decoder blocks backward passes through (input gradients)
    blocks_weight_grad: float  # decoder blocks whose weight gradients are computed
    blocks_recomputed: float  # decoder blocks run forward again in backward (checkpointing)
    head_weight_grad: bool = False
    update_bytes: float = 0.0  # bytes the AdamW update reads and writes
    streamed_bytes: float = 0.0  # offload=step: state bytes to the device and back, every step
    resample_bytes: float = 0.0  # offload=period: state bytes moved per step, amortised over the period


@dataclass(frozen=True)
class SpeedModel:
    """Seconds of one optimizer step (see the module docstring). Constants: ``micro_batch_s``,
    ``matmul_flops`` and ``stream_bytes_per_s`` are the weighted least-squares fit of :data:`MEASUREMENTS`
    (:func:`calibrate`); ``copy_bytes_per_s`` is the measured rate of pinned host <-> device copies both ways
    at once, ``update_bytes_per_s`` the H200's HBM3e bandwidth (4.8 TB/s, its specification)."""

    micro_batch_s: float = 0.0624
    matmul_flops: float = 475e12
    stream_bytes_per_s: float = 75.5e9
    copy_bytes_per_s: float = 101e9
    update_bytes_per_s: float = 4.8e12

    @staticmethod
    def flops(shape: ModelShape, work: Work) -> float:
        """Matmul FLOPs of one micro-batch: forward, backward, recomputation, adapters."""
        n, t = work.tokens_per_micro, work.seq_len
        attention = 2.0 * n * t * shape.attention_width  # causal QK^T and PV of one block, forward
        block = 2.0 * shape.mean_block * n + attention
        head = 2.0 * shape.head_matmul_params * n
        forward = shape.num_layers * block + head
        backward = head + work.blocks_backward * (2.0 * shape.mean_block * n + 2.5 * attention)
        backward += work.blocks_weight_grad * 2.0 * shape.mean_block * n + (
            head if work.head_weight_grad else 0
        )
        adapters = 6.0 * shape.adapter_params * n
        return forward + backward + work.blocks_recomputed * block + adapters

    def breakdown(self, shape: ModelShape, work: Work) -> dict[str, float]:
        """Seconds of one optimizer step by cause (they sum to :meth:`seconds`)."""
        recompute = work.blocks_recomputed * (
            2.0 * shape.mean_block * work.tokens_per_micro
            + 2.0 * work.tokens_per_micro * work.seq_len * shape.attention_width
        )
        compute = self.flops(shape, work) - recompute
        a = work.grad_accum
        return {
            "micro_batches": a * self.micro_batch_s,
            "compute": a * compute / self.matmul_flops,
            "recompute": a * recompute / self.matmul_flops,
            "update": work.update_bytes / self.update_bytes_per_s,
            "streaming": work.streamed_bytes / self.stream_bytes_per_s,
            "resample": work.resample_bytes / self.copy_bytes_per_s,
        }

    def seconds(self, shape: ModelShape, work: Work) -> float:
        return sum(self.breakdown(shape, work).values())


SPEED_MODEL = SpeedModel()


@dataclass(frozen=True)
class Measurement:
    """One measured training (or probing) step on a GPU, for :func:`calibrate` and ``docs/fit.md``."""

    label: str
    shape: str  # key of _MEASURED_SHAPES
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
_MEASURED_SHAPES = {
    "LLaMA2-7B": ModelShape(32, 6476267520, 131072000, 131072000, 131072000, 4096, 6738415616, 4096, 224395264),
    "TinyLlama-1.1B": ModelShape(22, 968974336, 65536000, 65536000, 65536000, 2048, 1100048384, 2048, 67764224),
    "Gemma-2B": ModelShape(18, 1981882368, 524288000, 0, 524288000, 2048, 2506172416, 2048, 104988672),
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


def _update_bytes(weight_bytes: int, state_bytes: int) -> int:
    """Bytes an AdamW update moves per trained parameter: the weight and its gradient read, the weight
    written, every state tensor read and written."""
    return 3 * weight_bytes + 2 * state_bytes


def _measurement_work(m: Measurement) -> tuple[ModelShape, Work]:
    shape = _MEASURED_SHAPES[m.shape]
    n, L = m.batch_size * m.seq_len, shape.num_layers
    if m.method == "fft":
        work = Work(n, m.seq_len, 1, L, L, 0, True, _update_bytes(2, _STATE_TORCH) * shape.total_params)
    elif m.method == "lora":
        work = Work(n, m.seq_len, 1, L, 0, 0, False, _update_bytes(2, _STATE_TORCH) * shape.adapter_params)
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
            n, m.seq_len, 1, blocks, len(m.active), 0, lisa, _update_bytes(2, state) * trained, streamed
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


# ---------------------------------------------------------------------------------------------
# candidates and their evaluation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One configuration: the micro-batch, gradient accumulation, checkpointing and residency."""

    micro_batch: int
    grad_accum: int
    activation_checkpointing: str
    residency: str | None = None  # grass.offload of the layer-wise methods; None for the others

    @property
    def settings(self) -> dict[str, Any]:
        """The ``grass-llm train`` keys of this configuration."""
        out: dict[str, Any] = {
            "batch_size": self.micro_batch,
            "grad_accum": self.grad_accum,
            "activation_checkpointing": self.activation_checkpointing,
        }
        if self.residency is not None:
            out["grass.offload"] = self.residency
        return out

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.settings.items())


@dataclass
class Evaluated:
    """A candidate with its modelled speed and (when estimated) its peaks, in bytes."""

    candidate: Candidate
    step_seconds: float
    tokens_per_s: float
    speed_breakdown: dict[str, float]
    lower_bound: int  # the whole-run peak is at least this (weights and the states the run must hold)
    train_peak: int | None = (
        None  # the training step, worst-case layers (+ accumulated gradients, off's growth)
    )
    probe_peak: int | None = None  # the probing step (methods that probe)
    peak: int | None = None  # whole-run: the larger of the two; None when not estimated
    needed: int | None = None  # peak + margin
    verdict: str = "not estimated"  # chosen | too big | too big (lower bound) | not estimated

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["settings"] = self.candidate.settings
        return d


@dataclass
class FitPlan:
    """The planner's answer for one method: the chosen configuration (None: nothing fits) and the ones it
    rejected, in the speed model's order."""

    model: str
    method: str
    budget: int
    batch_size: int  # effective batch B (rows per optimizer step)
    seq_len: int
    margin: Margin
    candidates: list[Evaluated]  # every configuration, fastest first
    chosen: Evaluated | None
    seconds: float = 0.0  # time taken to plan
    estimates: int = 0  # estimates run (not counting cached ones)
    cached: int = 0  # estimates found in the cache

    @property
    def fits(self) -> bool:
        return self.chosen is not None

    @property
    def settings(self) -> dict[str, Any]:
        """The chosen ``grass-llm train`` keys (:data:`KNOBS`); :class:`FitError` when nothing fits."""
        return self._chosen().candidate.settings

    @property
    def rejected(self) -> list[Evaluated]:
        """The configurations faster than the chosen one (or all, when nothing fits) and why they were not."""
        return [e for e in self.candidates if e.verdict.startswith("too big")]

    @property
    def smallest(self) -> Evaluated | None:
        """The estimated configuration with the smallest whole-run peak."""
        known = [e for e in self.candidates if e.peak is not None]
        return min(known, key=lambda e: e.peak) if known else None

    def _chosen(self) -> Evaluated:
        if self.chosen is None:
            raise FitError(self.refusal())
        return self.chosen

    def refusal(self) -> str:
        """Why nothing fits, in one line (names the smallest peak found)."""
        small = self.smallest
        if small is None:
            bound = min(self.candidates, key=lambda e: e.lower_bound)
            return (
                f"nothing fits {format_size(self.budget)} for {self.method} on {self.model} at batch "
                f"{self.batch_size} x {self.seq_len}: even the weights and the states it must hold need "
                f"{format_size(bound.lower_bound)} + margin {format_size(self.margin.of(bound.lower_bound))}"
            )
        return (
            f"nothing fits {format_size(self.budget)} for {self.method} on {self.model} at batch "
            f"{self.batch_size} x {self.seq_len}: the smallest whole-run peak found is {format_size(small.peak)} "
            f"({small.candidate.describe()}) + margin {format_size(self.margin.of(small.peak))} = "
            f"{format_size(small.needed)}"
        )

    def train_args(self) -> list[str]:
        """The chosen settings as ``grass-llm train`` arguments (``key=value``)."""
        return [f"{k}={v}" for k, v in self.settings.items()]

    def apply(self, cfg: Any) -> Any:
        """``cfg`` (a ``grass_llm.recipes.train_config.TrainConfig``) with the chosen settings."""
        s = self.settings
        changes: dict[str, Any] = {k: s[k] for k in ("batch_size", "grad_accum", "activation_checkpointing")}
        if "grass.offload" in s:
            changes["grass"] = dataclasses.replace(cfg.grass, offload=s["grass.offload"])
        return dataclasses.replace(cfg, **changes)

    def grass_config(self, base: Any = None) -> Any:
        """A ``GrassConfig`` (``base``, default the defaults) with the chosen residency (``offload``)."""
        from grass_llm.config import GrassConfig

        base = GrassConfig() if base is None else base
        res = self.settings.get("grass.offload")
        return base if res is None else dataclasses.replace(base, offload=res)

    def training_arguments(self) -> dict[str, Any]:
        """Keyword arguments of ``transformers.TrainingArguments`` for the chosen micro-batch, accumulation
        and full checkpointing (``frozen``: call ``grass_llm.checkpoint_frozen_blocks(model)`` instead)."""
        s = self.settings
        return {
            "per_device_train_batch_size": s["batch_size"],
            "gradient_accumulation_steps": s["grad_accum"],
            "gradient_checkpointing": s["activation_checkpointing"] == "full",
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "method": self.method,
            "budget": self.budget,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "margin": dataclasses.asdict(self.margin),
            "fits": self.fits,
            "settings": self.chosen.candidate.settings if self.chosen else None,
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "candidates": [e.to_dict() for e in self.candidates],
            "seconds": self.seconds,
            "estimates": self.estimates,
            "cached": self.cached,
            "refusal": None if self.fits else self.refusal(),
        }


# ---------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------

#: (model, method, settings..., micro-batch, checkpointing, residency, phase) -> MemoryEstimate, per process
_ESTIMATES: dict[tuple, MemoryEstimate] = {}
#: config JSON -> ModelShape
_SHAPES: dict[tuple, ModelShape] = {}
_DTYPE_BYTES = {"bf16": 2, "fp32": 4}


@dataclass
class _Context:
    config: Any
    name: str
    method: str
    batch_size: int
    seq_len: int
    dtype: str
    rank: int
    active_layers: int | None
    chunked_loss: bool
    optimizer_impl: str
    overrides: dict[str, Any]
    tc: Any  # the resolved TrainConfig
    shape: ModelShape
    key: tuple
    stats: dict[str, int] = field(default_factory=lambda: {"estimates": 0, "cached": 0})

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
        return _DTYPE_BYTES[self.dtype]

    @property
    def adapter_bytes(self) -> int:
        return {"fp32": 4, "bf16": 2}.get(self.tc.lora.dtype, self.weight_bytes)

    def state_bytes_per_param(self, residency: str) -> int:
        """Bytes of a trained weight's AdamW state (moments + master or compensation) with ``residency``."""
        from grass_llm._optim.precision import PrecisionPolicy

        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]
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
        return (
            (s.embedding_params if g.train_embeddings else 0)
            + (s.head_params if g.train_head else 0)
            + (s.norm_params if g.train_norm else 0)
        )


def _context(
    model: Any,
    method: str,
    batch_size: int,
    seq_len: int,
    dtype: str,
    rank: int,
    active_layers: int | None,
    chunked_loss: bool,
    optimizer_impl: str,
    overrides: dict[str, Any] | None,
) -> _Context:
    from grass_llm.memory.estimate import methods
    from grass_llm.recipes.train_config import TrainConfig, TrainConfigError, nest

    if method not in methods():
        raise FitError(f"method={method!r} is invalid; allowed: {', '.join(methods())}")
    for name, value, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 2), ("rank", rank, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise FitError(f"{name}={value!r} is invalid; allowed: an integer >= {low}")
    if dtype not in _DTYPE_BYTES:
        raise FitError(f"dtype={dtype!r} is invalid; allowed: {', '.join(_DTYPE_BYTES)}")
    overrides = dict(overrides or {})
    for key in KNOBS:
        if key in overrides:
            raise FitError(
                f"{key} is what the plan chooses; allowed: leave it out (restrict the search with "
                "micro_batches=, checkpointing= or residencies=; the effective batch is batch_size)"
            )
    try:
        config = load_config(model)
    except MemoryEstimateError as e:
        raise FitError(str(e)) from None
    name = str(model) if isinstance(model, (str, Path)) else (getattr(config, "_name_or_path", "") or "model")
    settings = {"model": name, **overrides, "method": method, "dtype": dtype, "max_length": max(seq_len, 8)}
    settings.setdefault("lora.rank", rank)
    settings.setdefault("lora.alpha", 2 * rank)
    if active_layers is not None:
        settings["grass.active_layers"] = active_layers
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a method overriding a key given to all methods
            tc = TrainConfig.from_dict(nest(settings))
    except TrainConfigError as e:
        raise FitError(str(e)) from None
    shape_key = (config.to_json_string(), tuple(tc.lora.target_modules), tc.lora.rank, tc.grass.layers)
    if shape_key not in _SHAPES:
        targets = tc.lora.target_modules if method in ("lora", "dora") else ()
        _SHAPES[shape_key] = model_shape(config, targets, tc.lora.rank, tc.grass.layers)
    shape = _SHAPES[shape_key]
    if tc.layer_wise and tc.grass.active_layers > shape.num_layers:
        raise FitError(
            f"active_layers={tc.grass.active_layers} is larger than the model's {shape.num_layers} decoder "
            f"layers; allowed: 1..{shape.num_layers}"
        )
    key = (
        config.to_json_string(),
        name,
        method,
        dtype,
        rank,
        active_layers,
        chunked_loss,
        optimizer_impl,
        json.dumps(overrides, sort_keys=True, default=str),
    )
    return _Context(
        config,
        name,
        method,
        batch_size,
        seq_len,
        dtype,
        rank,
        active_layers,
        chunked_loss,
        optimizer_impl,
        overrides,
        tc,
        shape,
        key,
    )


def _estimate(
    ctx: _Context, micro: int, checkpointing: str, residency: str | None, phase: str
) -> MemoryEstimate:
    """The estimator's peak of one training (probing) step of ``micro`` rows, cached for the process. The
    probing step does not depend on the residency (probing updates nothing), nor, with probe_checkpointing
    (every block recomputed while probing), on the checkpointing mode: one estimate serves them all."""
    if phase == "probe":
        residency = None
        if ctx.tc.grass.probe_checkpointing:
            checkpointing = "none"
    key = (*ctx.key, micro, ctx.seq_len, checkpointing, residency, phase)
    found = _ESTIMATES.get(key)
    if found is not None:
        ctx.stats["cached"] += 1
        return found
    # the sampling period changes no step's memory; the estimate's two steps must stay inside one period (at a
    # period's end the MGN is read from fake tensors, which have no values)
    overrides = {k: v for k, v in ctx.overrides.items() if k != "grass.period"}
    if residency is not None:
        overrides["grass.offload"] = residency
    try:
        est = estimate_memory(
            ctx.config,
            ctx.method,
            active_layers=ctx.active_layers,
            rank=ctx.rank,
            batch_size=micro,
            seq_len=ctx.seq_len,
            dtype=ctx.dtype,
            activation_checkpointing=checkpointing,
            chunked_loss=ctx.chunked_loss,
            optimizer_impl=ctx.optimizer_impl,
            overrides=overrides,
            phase=phase,
        )
    except MemoryEstimateError as e:
        raise FitError(str(e)) from None
    ctx.stats["estimates"] += 1
    _ESTIMATES[key] = est
    return est


def _candidates(
    ctx: _Context,
    micro_batches: Sequence[int] | None,
    checkpointing: Sequence[str] | None,
    residencies: Sequence[str] | None,
) -> list[Candidate]:
    B = ctx.batch_size
    divisors = [m for m in range(B, 0, -1) if B % m == 0]
    if micro_batches is not None:
        bad = [m for m in micro_batches if m not in divisors]
        if bad:
            raise FitError(
                f"micro_batches={list(micro_batches)!r} is invalid; allowed: divisors of batch_size={B} "
                f"({', '.join(map(str, divisors))})"
            )
        divisors = [m for m in divisors if m in micro_batches]
    modes = list(_CHECKPOINTING if ctx.layer_wise else ("none", "full"))
    if checkpointing is not None:
        bad = [c for c in checkpointing if c not in modes]
        if bad:
            raise FitError(
                f"activation_checkpointing={bad[0]!r} is invalid for method={ctx.method}; allowed: {', '.join(modes)}"
            )
        modes = [c for c in modes if c in checkpointing]
    places: list[str | None] = [None]
    if ctx.layer_wise:
        places = list(RESIDENCIES)
        if residencies is not None:
            bad = [r for r in residencies if r not in RESIDENCIES]
            if bad:
                raise FitError(f"grass.offload={bad[0]!r} is invalid; allowed: {', '.join(RESIDENCIES)}")
            places = [r for r in places if r in residencies]
    elif residencies is not None:
        raise FitError(
            f"grass.offload is for the layer-wise methods; method={ctx.method} has no GRASS states"
        )
    return [Candidate(m, B // m, c, r) for m in divisors for c in modes for r in places]


def _work(ctx: _Context, cand: Candidate) -> Work:
    """What a training step of ``cand`` does (the expected lowest active layer for the layer-wise methods)."""
    s, L = ctx.shape, ctx.shape.num_layers
    n = cand.micro_batch * ctx.seq_len
    wb = ctx.weight_bytes
    if not ctx.layer_wise:
        lora = ctx.method in ("lora", "dora")
        trained = s.adapter_params if lora else s.total_params
        elem = ctx.adapter_bytes if lora else wb
        update = _update_bytes(elem, 2 * elem) * trained  # torch AdamW: moments in the weights' dtype
        recompute = L if cand.activation_checkpointing == "full" else 0
        return Work(n, ctx.seq_len, cand.grad_accum, L, 0 if lora else L, recompute, not lora, update)
    g, gamma = ctx.tc.grass, ctx.gamma
    # backward runs from the lowest active layer up: expected (L - gamma) / (gamma + 1) for gamma of L drawn
    # uniformly (GRASS draws by the MGN: the uniform draw is the model's assumption), or through every block
    # when the embeddings train
    lowest = 0.0 if g.train_embeddings else (L - gamma) / (gamma + 1)
    backward = L - lowest
    recompute = {"none": 0.0, "frozen": backward - gamma, "full": backward}[cand.activation_checkpointing]
    trained = gamma * s.mean_block + ctx.always_trained()
    state = ctx.state_bytes_per_param(cand.residency)
    update = _update_bytes(wb, state) * trained
    streamed = 2 * state * trained if cand.residency == "step" else 0.0
    resample = 2 * state * gamma * s.mean_block / g.period if cand.residency == "period" else 0.0
    return Work(
        n, ctx.seq_len, cand.grad_accum, backward, gamma, recompute, g.train_head, update, streamed, resample
    )


def _lower_bound(ctx: _Context, cand: Candidate) -> int:
    """Bytes every step of ``cand`` holds at least: the weights, and the states and gradients the method keeps
    on the device through the optimizer step."""
    s, wb = ctx.shape, ctx.weight_bytes
    weights = s.total_params * wb
    if ctx.method == "fft":
        return 4 * weights  # weights, gradients and two moments (torch AdamW's, in the weights' dtype)
    if ctx.method in ("lora", "dora"):
        return weights + 4 * s.adapter_params * ctx.adapter_bytes
    if cand.residency == "step":
        return weights
    trained_blocks = s.block_params if cand.residency == "off" and _grows(ctx) else ctx.gamma * s.mean_block
    return int(weights + ctx.state_bytes_per_param(cand.residency) * (trained_blocks + ctx.always_trained()))


def _grows(ctx: _Context) -> bool:
    """``offload=off`` keeps a layer's state from its first activation on (unless each is reset on leaving)."""
    return ctx.tc.grass.on_reactivation == "keep"


def _off_growth(ctx: _Context, est: MemoryEstimate) -> int:
    """offload=off: the states of the decoder layers the estimate did not train, which a run accumulates."""
    if not _grows(ctx):
        return 0
    s = ctx.shape
    active_block_params = est.trainable_params - ctx.always_trained()
    return int(ctx.state_bytes_per_param("off") * max(s.block_params - active_block_params, 0))


def _accumulated_gradients(ctx: _Context, est: MemoryEstimate) -> int:
    """Gradients of the trained parameters, kept from one micro-batch to the next."""
    lora = ctx.method in ("lora", "dora")
    return int(est.trainable_params * (ctx.adapter_bytes if lora else ctx.weight_bytes))


def _evaluate(ctx: _Context, e: Evaluated, budget: int, margin: Margin) -> bool:
    """Estimate ``e``'s whole-run peak as far as needed to tell whether it fits; True when it does."""
    cand = e.candidate
    if margin.needed(e.lower_bound) > budget:
        e.verdict = "too big (lower bound)"
        return False
    est = _estimate(ctx, cand.micro_batch, cand.activation_checkpointing, cand.residency, "train")
    train = est.peak
    if cand.grad_accum > 1:
        train += _accumulated_gradients(ctx, est)
    if cand.residency == "off":
        train += _off_growth(ctx, est)
    e.train_peak = e.peak = train
    e.needed = margin.needed(train)
    if e.needed > budget:
        e.verdict = "too big"
        return False
    if ctx.probes:
        probe = _estimate(ctx, cand.micro_batch, cand.activation_checkpointing, None, "probe").peak
        e.probe_peak = probe
        e.peak = max(train, probe)
        e.needed = margin.needed(e.peak)
        if e.needed > budget:
            e.verdict = "too big"
            return False
    e.verdict = "chosen"
    return True


def plan(
    model: Any,
    budget: int | float | str,
    method: str = "grass",
    *,
    batch_size: int = 1,
    seq_len: int = 1024,
    dtype: str = "bf16",
    rank: int = 128,
    active_layers: int | None = None,
    chunked_loss: bool = True,
    optimizer_impl: str = "auto",
    overrides: dict[str, Any] | None = None,
    margin: Margin | None = None,
    micro_batches: Sequence[int] | None = None,
    checkpointing: Sequence[str] | None = None,
    residencies: Sequence[str] | None = None,
    speed: SpeedModel = SPEED_MODEL,
) -> FitPlan:
    """The fastest configuration of ``method`` whose whole-run peak + ``margin`` fits ``budget``.

    Args:
        model: a ``PretrainedConfig``, a config.json path or directory, or a cached hub name.
        budget: device memory, in bytes (an int), or as written (``"24GiB"``, ``"24GB"``, ``24.0`` GiB).
        method: a ``grass-llm train`` method.
        batch_size: the effective batch B (rows per optimizer step), kept as micro-batch x grad_accum.
        seq_len: tokens per row (``max_length``).
        dtype, rank, active_layers, chunked_loss, optimizer_impl, overrides: as in
            :func:`grass_llm.memory.estimate.estimate_memory` (``overrides``: more ``grass-llm train`` keys;
            not the keys the plan chooses, :data:`KNOBS`).
        margin: what the device needs beyond the estimated peak (default :class:`Margin`).
        micro_batches, checkpointing, residencies: restrict the search to these values.
        speed: the speed model that orders the configurations.

    Returns a :class:`FitPlan`; ``plan.chosen`` is None when nothing fits (``plan.refusal()`` says why).
    """
    t0 = time.perf_counter()
    if isinstance(budget, bool) or not isinstance(budget, int):
        try:
            budget = parse_budget("budget", budget)
        except BudgetError as e:
            raise FitError(str(e)) from None
    elif budget < 1:
        raise FitError(
            f"budget={budget!r} is invalid; allowed: a number of bytes > 0, or a size such as 24GiB"
        )
    margin = Margin() if margin is None else margin
    ctx = _context(
        model,
        method,
        batch_size,
        seq_len,
        dtype,
        rank,
        active_layers,
        chunked_loss,
        optimizer_impl,
        overrides,
    )
    order = {c: i for i, c in enumerate(_CHECKPOINTING)}
    evaluated = []
    for cand in _candidates(ctx, micro_batches, checkpointing, residencies):
        work = _work(ctx, cand)
        seconds = speed.seconds(ctx.shape, work)
        evaluated.append(
            Evaluated(
                cand,
                seconds,
                batch_size * seq_len / seconds,
                speed.breakdown(ctx.shape, work),
                _lower_bound(ctx, cand),
            )
        )
    # fastest first; ties (none in practice) by less recomputation, then the larger micro-batch
    evaluated.sort(
        key=lambda e: (e.step_seconds, order[e.candidate.activation_checkpointing], -e.candidate.micro_batch)
    )
    chosen = None
    for e in evaluated:
        if _evaluate(ctx, e, budget, margin):
            chosen = e
            break
    return FitPlan(
        model=ctx.name,
        method=method,
        budget=budget,
        batch_size=batch_size,
        seq_len=seq_len,
        margin=margin,
        candidates=evaluated,
        chosen=chosen,
        seconds=time.perf_counter() - t0,
        estimates=ctx.stats["estimates"],
        cached=ctx.stats["cached"],
    )


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------


def _gib(n: int | None) -> str:
    return "-" if n is None else format_size(n)


def format_plan(p: FitPlan) -> str:
    """One method's plan: the chosen settings, then every configuration considered up to it (Markdown)."""
    head = f"## {p.method}: " + (f"fits, {' '.join(p.train_args())}" if p.fits else "nothing fits")
    lines = [head, ""]
    if p.fits:
        c = p.chosen
        probe = f", probing {_gib(c.probe_peak)}" if c.probe_peak is not None else ""
        lines.append(
            f"whole-run peak {_gib(c.peak)} (training {_gib(c.train_peak)}{probe}) + margin "
            f"{_gib(p.margin.of(c.peak))} = {_gib(c.needed)} <= {_gib(p.budget)}; "
            f"model: {c.tokens_per_s:,.0f} tokens/s on an H200"
        )
    else:
        lines.append(p.refusal())
    lines += [
        "",
        "| # | micro x accum | checkpointing | residency | training peak | probing peak | peak + margin "
        "| model tokens/s | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, e in enumerate(p.candidates, 1):
        if e.verdict == "not estimated":
            continue
        c = e.candidate
        need = _gib(e.needed) if e.needed is not None else f">= {_gib(p.margin.needed(e.lower_bound))}"
        lines.append(
            f"| {i} | {c.micro_batch} x {c.grad_accum} | {c.activation_checkpointing} | {c.residency or '-'} | "
            f"{_gib(e.train_peak)} | {_gib(e.probe_peak)} | {need} | {e.tokens_per_s:,.0f} | {e.verdict} |"
        )
    rest = sum(e.verdict == "not estimated" for e in p.candidates)
    if rest:
        lines.append(f"\n{rest} slower configuration{'s' if rest != 1 else ''} not estimated.")
    return "\n".join(lines)


def _header(budget: int, batch_size: int, seq_len: int, margin: Margin) -> str:
    return (
        f"Will it fit {format_size(budget)}? The fastest configuration whose whole-run peak + margin fits, per "
        f"method; effective batch {batch_size} x {seq_len} tokens (micro-batch x gradient accumulation).\n"
        f"margin: {margin.describe()}.\n"
        "peaks: grass-llm memory's estimates (the training step with the worst-case layers, the probing step). "
        "tokens/s: the speed model of docs/fit.md (fitted to H200 measurements); it orders the configurations "
        "of a method."
    )


# ---------------------------------------------------------------------------------------------
# grass-llm memory --budget
# ---------------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """``grass-llm memory``: the estimator's options (:mod:`grass_llm.memory.estimate`) and ``--budget``."""
    from grass_llm.memory.estimate import add_cli_arguments as estimator_arguments

    estimator_arguments(parser)
    parser.description += (
        " With --budget SIZE: the fastest settings that fit SIZE instead (micro-batch x grad_accum keeping "
        "--batch-size, activation_checkpointing, grass.offload; KEY=VALUE activation_checkpointing=... or "
        "grass.offload=... restricts the search to that value; docs/fit.md)."
    )
    parser.add_argument(
        "--budget",
        metavar="SIZE",
        default=None,
        help="device memory to fit (24GiB, 24GB, 24 GiB, or a number of GiB): print, per method, the fastest "
        "configuration whose whole-run peak + margin fits and the faster ones rejected with their peaks; "
        "exit 2 when no method fits",
    )


def cli_main(args: argparse.Namespace) -> int:
    """Run ``grass-llm memory``: the estimator's table, or with ``--budget`` the plans (:func:`cli_plan`)."""
    if args.budget is None:
        from grass_llm.memory.estimate import cli_main as estimator_main

        return estimator_main(args)
    return cli_plan(args)


def cli_plan(args: argparse.Namespace) -> int:
    """``grass-llm memory --budget SIZE``: print each method's plan; exit code 0 when at least one method
    fits, 2 when none does (or on bad input)."""
    from grass_llm.memory.estimate import _methods, _overrides

    t0 = time.perf_counter()
    try:
        budget = parse_budget("--budget", args.budget)
        chosen = _methods(args.method or [])
        overrides = _overrides(args.overrides or [])
        if args.world_size != 1:
            raise FitError("--budget plans one device; allowed: --world-size 1")
        if args.measure:
            raise FitError(
                "--measure cannot be combined with --budget (benchmarks/fit_check.py measures a plan)"
            )
        restrict: dict[str, Any] = {}
        given = overrides.pop("activation_checkpointing", None)
        if given is None and args.activation_checkpointing != "none":
            given = args.activation_checkpointing
        if given is not None:
            restrict["checkpointing"] = [given]
        if "grass.offload" in overrides:
            restrict["residencies"] = [_residency(overrides.pop("grass.offload"))]
        for key in ("batch_size", "grad_accum"):
            if key in overrides:
                raise FitError(
                    f"{key} is what --budget chooses; allowed: the effective batch as --batch-size"
                )
        plans = []
        for method in chosen:
            kw = dict(restrict)
            if "residencies" in kw and method not in _layer_wise_methods():
                kw.pop("residencies")
            plans.append(
                plan(
                    args.model,
                    budget,
                    method,
                    batch_size=args.batch_size,
                    seq_len=args.seq_len,
                    dtype=args.dtype,
                    rank=args.rank,
                    active_layers=args.active_layers,
                    optimizer_impl=args.optimizer_impl,
                    overrides=overrides,
                    **kw,
                )
            )
    except (FitError, BudgetError, MemoryEstimateError) as err:
        print(f"grass-llm memory: error: {err}", file=sys.stderr)
        return 2
    margin = plans[0].margin
    print(_header(budget, args.batch_size, args.seq_len, margin))
    for p in plans:
        print()
        print(format_plan(p))
    estimates = sum(p.estimates for p in plans)
    cached = sum(p.cached for p in plans)
    print(
        f"\nplanned in {time.perf_counter() - t0:.1f} s: {estimates} estimate{'s' if estimates != 1 else ''}"
        f" ({cached} reused)"
    )
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([p.to_dict() for p in plans], indent=2) + "\n")
        print(f"wrote {path}")
    if not any(p.fits for p in plans):
        print(f"grass-llm memory: nothing fits {format_size(budget)}", file=sys.stderr)
        return 2
    return 0


def _residency(value: Any) -> str:
    """``grass.offload`` as the planner names it (true / false are step / off; auto is period on CUDA)."""
    aliases = {"true": "step", "false": "off", "auto": "period"}
    mapped = aliases.get(str(value).lower(), value)
    if mapped not in RESIDENCIES:
        raise FitError(f"grass.offload={value!r} is invalid; allowed: {', '.join(RESIDENCIES)}")
    return mapped


def _layer_wise_methods() -> set[str]:
    from grass_llm.recipes.methods import METHODS

    return {name for name, m in METHODS.items() if m.layer_wise}


# ---------------------------------------------------------------------------------------------
# grass-llm train memory_budget=
# ---------------------------------------------------------------------------------------------

#: keys of ``grass-llm train`` passed on to the estimates (what changes memory); the others (data, paths,
#: schedule...) do not, and the keys the plan chooses are its own
_PASSED_TOP = ("compact_activations", "max_grad_norm")  # (chunked_loss: an argument of the estimate)
_NOT_PASSED_GRASS = ("offload", "probe_steps", "policy", "seed", "max_grad_norm", "active_layers")


def plan_for_train_config(cfg: Any) -> FitPlan:
    """The plan ``memory_budget`` makes for a ``TrainConfig``: its method, effective batch
    (``batch_size x grad_accum``), ``max_length`` and every setting that changes memory (``grass.*``,
    ``lora.*``, ``compact_activations``, ``chunked_loss``, ``max_grad_norm``), for a CUDA device (dtype
    ``auto`` is bf16). :class:`FitError` when it cannot plan."""
    if cfg.memory_budget is None:
        raise FitError("memory_budget is not set; allowed: a size such as 24GiB")
    d = cfg.to_dict()
    overrides: dict[str, Any] = {k: d[k] for k in _PASSED_TOP}
    if cfg.layer_wise:
        overrides.update({f"grass.{k}": v for k, v in d["grass"].items() if k not in _NOT_PASSED_GRASS})
    if cfg.method in ("lora", "dora"):
        overrides.update({f"lora.{k}": v for k, v in d["lora"].items() if k not in ("rank", "merge")})
    return plan(
        _planning_config(cfg),
        cfg.memory_budget,
        cfg.method,
        batch_size=cfg.batch_size * cfg.grad_accum,
        seq_len=cfg.max_length,
        dtype="fp32" if cfg.dtype == "fp32" else "bf16",  # auto: bf16 on a CUDA device that has it
        rank=cfg.lora.rank,
        active_layers=cfg.grass.active_layers if cfg.layer_wise else None,
        chunked_loss=cfg.chunked_loss,
        overrides=overrides,
    )


def apply_memory_budget(cfg: Any, device: torch.device, say: Callable[[str], None] = print) -> Any:
    """``grass-llm train``'s ``memory_budget``: ``cfg`` with the planned settings (:data:`KNOBS`) applied,
    before anything is built or written. Prints the choice.

    The plan is for a CUDA device (the estimate models one). On another device the same settings are applied,
    so that a run rehearsed on the CPU is the one the GPU will run, and a line says the budget bounds nothing
    there. A run resumed from a checkpoint keeps the checkpoint's settings (chosen when it started) and plans
    nothing. Raises ``TrainInputError`` (exit code 2, nothing written) when nothing fits or under several
    processes.
    """
    import os

    from grass_llm.recipes.errors import TrainInputError

    if cfg.memory_budget is None:
        return cfg
    budget = parse_budget("memory_budget", cfg.memory_budget)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainInputError(
            f"memory_budget={cfg.memory_budget} plans one process on one device; allowed under torchrun / "
            "accelerate: none (set batch_size, grad_accum, activation_checkpointing, grass.offload instead)"
        )
    resumed = _resumed_checkpoint(cfg)
    if resumed is not None:
        cfg = _knobs_of_checkpoint(cfg, resumed)
        say(
            f"memory_budget={cfg.memory_budget}: resuming from {resumed}, with the settings chosen when the run "
            f"started: {' '.join(_knob_values(cfg))}"
        )
        return cfg
    try:
        p = plan_for_train_config(cfg)
    except FitError as e:
        raise TrainInputError(f"memory_budget={cfg.memory_budget}: cannot plan: {e}") from None
    if not p.fits:
        raise TrainInputError(f"memory_budget={cfg.memory_budget}: {p.refusal()}; nothing was written")
    c = p.chosen
    probe = f", probing {_gib(c.probe_peak)}" if c.probe_peak is not None else ""
    say(
        f"memory_budget={cfg.memory_budget} ({format_size(budget)}): {' '.join(p.train_args())} "
        f"(whole-run peak {_gib(c.peak)}: training {_gib(c.train_peak)}{probe}; + margin "
        f"{_gib(p.margin.of(c.peak))} = {_gib(c.needed)}; planned in {p.seconds:.1f} s)"
    )
    if device.type != "cuda":
        say(
            f"memory_budget: the plan is for a CUDA device; this run is on {device.type}, where the budget "
            "bounds nothing (the settings are applied so that the run is the one a GPU would run)"
        )
    return p.apply(cfg)


def _knob_values(cfg: Any) -> list[str]:
    out = [
        f"batch_size={cfg.batch_size}",
        f"grad_accum={cfg.grad_accum}",
        f"activation_checkpointing={cfg.activation_checkpointing}",
    ]
    if cfg.layer_wise:
        out.append(f"grass.offload={cfg.grass.offload}")
    return out


def _knobs_of_checkpoint(cfg: Any, path: Path) -> Any:
    """``cfg`` with the planned keys of the checkpoint at ``path`` (the command line that resumes may repeat the
    first invocation's batch_size, which the plan had replaced). Unreadable: ``cfg`` (train reports it)."""
    from grass_llm.recipes.run_checkpoint import CheckpointError, read_checkpoint_config

    try:
        saved = read_checkpoint_config(path)
    except CheckpointError:
        return cfg
    changes = {k: saved[k] for k in ("batch_size", "grad_accum", "activation_checkpointing") if k in saved}
    offload = (saved.get("grass") or {}).get("offload")
    if cfg.layer_wise and offload is not None:
        changes["grass"] = dataclasses.replace(cfg.grass, offload=offload)
    return dataclasses.replace(cfg, **changes)


def _resumed_checkpoint(cfg: Any) -> Path | None:
    """The checkpoint ``--resume`` will continue from (None: the run starts at step 0)."""
    if cfg.resume is None:
        return None
    if cfg.resume != "auto":
        return Path(cfg.resume).expanduser()
    from grass_llm.recipes.run_checkpoint import find_resumable

    if not cfg.run_dir.is_dir():
        return None
    return find_resumable(cfg.run_dir, set_aside=False)[0]


def _planning_config(cfg: Any) -> Any:
    """The transformers config of ``cfg.model``: a built-in model's (built as the run builds it, tiny), else a
    config.json path or directory, or a hub name in the local cache (never downloaded)."""
    if cfg.model.startswith("builtin:"):
        from grass_llm.recipes.build import load_model

        model, _ = load_model(cfg, torch.float32, torch.device("cpu"))
        config = model.config
        config._name_or_path = cfg.model
        return config
    return cfg.model
