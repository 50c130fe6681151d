"""``GrassConfig``: every knob of GRASS, with help text, validation and dict round-trips.

Defaults follow the paper (arXiv:2604.07808, section 4 and appendix A): gamma = 2 active layers,
a sampling period Ts = 25 steps, a probing phase Tp = 150 steps. The paper does not state the
temperature or the EMA factor; we default to tau = 1.0 on the *normalised* MGN scale (see
``temperature``) and alpha = 0.5.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from grass_llm.sampling import POLICIES

__all__ = ["ConfigError", "GrassConfig"]

_REACTIVATION = ("keep", "reset")
_ROUNDING = ("kahan", "stochastic", "nearest")
_OFFLOAD = ("auto", "period", "step", "off")


class ConfigError(ValueError):
    """A configuration value is out of range. The message names the field and what is allowed."""


@dataclass
class GrassConfig:
    """Configuration of GRASS layer sampling and of the layer-wise optimizer.

    Every field carries its help text in ``metadata["help"]``; the CLI builds its options from it.
    """

    active_layers: int = field(
        default=2,
        metadata={"help": "gamma: number of decoder layers trained at a time (paper default 2)."},
    )
    period: int = field(
        default=25,
        metadata={
            "help": "Ts: optimizer steps between two resamplings of the active layers (paper default 25)."
        },
    )
    probe_steps: int | None = field(
        default=None,
        metadata={
            "help": "Tp: probing steps at the start (forward+backward through all layers, no update) that "
            "initialise the MGN. Default: the policy's (150, the paper's, for grass/static; 0 for uniform "
            "and cyclic, which do not use the MGN)."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "tau in softmax(m / tau). m is the MGN divided by its mean over layers, so tau is "
            "independent of the loss scale: a layer with twice the mean MGN gets exp(1/tau) times the "
            "weight of an average one."
        },
    )
    ema: float = field(
        default=0.5,
        metadata={"help": "alpha in eq. 4: weight of the newly observed MGN of a trained layer, in (0, 1]."},
    )
    policy: str = field(
        default="grass",
        metadata={
            "help": "grass (adaptive), static (GRASS*: probabilities fixed after probing), uniform (LISA), "
            "cyclic (BAdam-style block coordinate descent); see grass_llm.sampling for adding one."
        },
    )
    train_embeddings: bool = field(
        default=False, metadata={"help": "Always train the input (and position) embeddings."}
    )
    train_head: bool = field(
        default=False,
        metadata={
            "help": "Always train the output head (lm_head); a head tied to the embeddings trains both."
        },
    )
    train_norm: bool = field(
        default=False,
        metadata={
            "help": "Always train the parameters outside the decoder blocks that are not embeddings or head "
            "(final norm and similar)."
        },
    )
    on_reactivation: str = field(
        default="keep",
        metadata={
            "help": "keep: a layer sampled again resumes its earlier AdamW state (paper); reset: start afresh."
        },
    )
    max_grad_norm: float | None = field(
        default=None,
        metadata={
            "help": "Clip the gradient norm of the trainable parameters to this value inside step() "
            "(after the MGN is read, so importance sees the raw gradient). None: no clipping."
        },
    )
    offload: bool | str = field(
        default="auto",
        metadata={
            "help": "Where the AdamW states live. period: every layer's state in host memory, the active "
            "layers' kept on the device while they stay active (moved only when the active set changes, "
            "overlapping compute); step: every layer's state in host memory, streamed through two 32 MiB "
            "device slots at every step (the paper's scheme, the least device memory, the most traffic); "
            "off: on the device (a layer's state is created when it first trains and kept). auto: period on "
            "CUDA, off elsewhere. true / false: step / off."
        },
    )
    overlap: bool = field(
        default=True,
        metadata={
            "help": "With offload on CUDA: copy states on a separate stream and prefetch the next layer's "
            "state while the current one steps. False: copies on the compute stream (for profiling)."
        },
    )
    fp32_optimizer_states: bool = field(
        default=False,
        metadata={
            "help": "Keep AdamW moments in fp32 even for bf16/fp16 weights (the update is then computed in "
            "fp32). Default False: moments in the weights' dtype, the paper's pure-bf16 setting."
        },
    )
    fp32_master_weights: bool | str = field(
        default="auto",
        metadata={
            "help": "Keep an fp32 master copy of every trained bf16/fp16 weight in the optimizer state and "
            "copy it into the weight after each update, so no update is lost to rounding. auto: on when "
            "states stream per step (offload=step: the masters then live in host memory and cost no device "
            "memory), else update_rounding applies; True: always; False: never."
        },
    )
    update_rounding: str = field(
        default="kahan",
        metadata={
            "help": "How an update is written into a bf16/fp16 weight that has no fp32 master. kahan: a "
            "compensation buffer in the weight's dtype (2 bytes per trained parameter, in the optimizer "
            "state) carries each rounding error into the next update; stochastic: stochastic rounding "
            "(bf16 only, no extra memory; counter-based random bits, reproducible); nearest: round to "
            "nearest, so an update below half a bf16 step is lost (the paper's pure-bf16 setting). fp32 "
            "weights are always updated exactly. benchmarks/bf16_updates.py measures the three."
        },
    )
    fused_update: bool = field(
        default=False,
        metadata={
            "help": "On CUDA, update bf16/fp16 weights that carry a Kahan compensation or fp32 masters with one "
            "fused Triton kernel (each element read and written once) instead of PyTorch's multi-pass AdamW; "
            "the same arithmetic up to fp32 rounding, checked against PyTorch's once per process (a failure or "
            "a disagreement falls back to it). Needs Triton (CUDA builds of torch bring it). Off by default: "
            "tested in Triton's CPU interpreter, not yet timed on a GPU."
        },
    )
    probe_checkpointing: bool = field(
        default=True,
        metadata={
            "help": "While probing, recompute each decoder block's activations in backward (non-reentrant "
            "activation checkpointing): a probing step runs backward through every block and would otherwise "
            "keep every block's activations, more than a training step needs. The MGN is unchanged; a probing "
            "step costs one more forward pass of the blocks. False: keep them (faster probing, more memory)."
        },
    )
    step_in_backward: bool = field(
        default=False,
        metadata={
            "help": "Update each trained unit (layer, embeddings, norm, head) from a gradient-ready hook as "
            "soon as backward has produced all its gradients, and free them at once: the update (and, with "
            "offload, its state transfers) overlaps the rest of backward and at most one unit's gradients "
            "are alive. step() then only does the bookkeeping. Same numbers as stepping after backward. "
            "With gradient accumulation, run every micro-batch's backward but the last under "
            "optimizer.no_sync(). Cannot be combined with max_grad_norm (clipping needs every gradient "
            "before any update)."
        },
    )
    layers: str | None = field(
        default=None,
        metadata={
            "help": "Dotted module path of the decoder blocks (an nn.ModuleList), e.g. model.layers; None: "
            "found by introspection (the language model's decoder blocks)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the layer-sampling generator."})

    def __post_init__(self) -> None:
        if self.probe_steps is None and self.policy in POLICIES:
            self.probe_steps = POLICIES[self.policy].default_probe_steps
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self, num_layers: int | None = None) -> None:
        """Raise ``ConfigError`` naming the first bad field. ``num_layers`` bounds ``active_layers``."""
        if not isinstance(self.policy, str) or self.policy not in POLICIES:
            raise ConfigError(f"policy={self.policy!r} is unknown; allowed: {', '.join(POLICIES)}")
        _int_at_least("active_layers", self.active_layers, 1)
        if num_layers is not None and self.active_layers > num_layers:
            raise ConfigError(
                f"active_layers={self.active_layers} is larger than the model's {num_layers} decoder layers; "
                f"allowed: 1..{num_layers}"
            )
        _int_at_least("period", self.period, 1)
        _int_at_least("probe_steps", self.probe_steps, 0)
        _int_at_least("seed", self.seed, 0)
        if not _is_real(self.temperature) or not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature={self.temperature!r} is invalid; allowed: a finite float > 0")
        if not _is_real(self.ema) or not (0 < self.ema <= 1):
            raise ConfigError(f"ema={self.ema!r} is invalid; allowed: a float in (0, 1]")
        if self.on_reactivation not in _REACTIVATION:
            raise ConfigError(f"on_reactivation={self.on_reactivation!r} is unknown; allowed: keep, reset")
        if self.max_grad_norm is not None and (
            not _is_real(self.max_grad_norm)
            or not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm))
        ):
            raise ConfigError(
                f"max_grad_norm={self.max_grad_norm!r} is invalid; allowed: None or a float > 0"
            )
        if not (self.offload in _OFFLOAD or isinstance(self.offload, bool)):
            raise ConfigError(f"offload={self.offload!r} is invalid; allowed: {', '.join(_OFFLOAD)}, true, false")
        if not (self.fp32_master_weights == "auto" or isinstance(self.fp32_master_weights, bool)):
            raise ConfigError(
                f"fp32_master_weights={self.fp32_master_weights!r} is invalid; allowed: 'auto', True, False"
            )
        if self.update_rounding not in _ROUNDING:
            raise ConfigError(
                f"update_rounding={self.update_rounding!r} is unknown; allowed: {', '.join(_ROUNDING)}"
            )
        for name in (
            "train_embeddings",
            "train_head",
            "train_norm",
            "overlap",
            "fp32_optimizer_states",
            "fused_update",
            "probe_checkpointing",
            "step_in_backward",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid; allowed: true or false")
        if self.layers is not None and (not isinstance(self.layers, str) or not self.layers.strip()):
            raise ConfigError(
                f"layers={self.layers!r} is invalid; allowed: None or a dotted module path such as model.layers"
            )
        if self.step_in_backward and self.max_grad_norm is not None:
            raise ConfigError(
                f"step_in_backward=True cannot be combined with max_grad_norm={self.max_grad_norm!r}: clipping "
                "needs the norm of every gradient before the first update; allowed: max_grad_norm=None"
            )

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GrassConfig:
        """Build from a dict. Unknown keys (e.g. from a newer version) are ignored with a warning."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"GrassConfig: ignoring unknown keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_at_least(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name}={value!r} is invalid; allowed: an integer >= {low}")
