"""``TrainConfig``: every setting of ``grass-llm train``, with help text, validation and YAML loading.

One dataclass with three sections: ``grass`` (a :class:`grass_llm.GrassConfig`, the single definition of
every GRASS knob), ``lora`` and ``distributed``. A config is built from defaults, then a YAML file,
then ``key=value`` overrides; nested keys take dots (``grass.active_layers=4``). Unknown keys are an
error that names the key and close matches.

The method (``grass_llm.recipes.methods``) decides the rest: a layer-wise method's ``grass`` settings
are its preset (LISA: uniform policy, period 10, no probing, embeddings + head trained) overridden by
the ``grass.*`` keys given, except the settings that define the method (its policy; LISA: no probing,
embeddings and head trained), which the method sets; ``grass.max_grad_norm`` / ``grass.seed``
follow from the top-level ``max_grad_norm`` / ``seed``.

Method defaults follow the paper's Table 9 (TinyLlama, arithmetic reasoning): learning rate
GRASS 3e-5, LISA 5e-5, LoRA / DoRA 1e-4, FFT 1e-5; batch size 8; GRASS gamma=2, Ts=25, Tp=150;
LISA gamma=2, Ts=10; LoRA rank 128, alpha 256. Settings the paper does not give follow the
LLM-Adapters ``finetune.py`` recipe it builds on: 3 epochs, 256-token cutoff, 100 warmup steps,
linear decay, LoRA on q/k/v/up/down projections.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grass_llm.config import ConfigError, GrassConfig
from grass_llm.recipes.methods import METHODS, get_method

__all__ = [
    "CHECKPOINTING",
    "DTYPES",
    "SCHEDULES",
    "DistributedSection",
    "LoraSection",
    "TrainConfig",
    "TrainConfigError",
    "load_train_config",
]

DTYPES = ("auto", "bf16", "fp32")
CHECKPOINTING = ("none", "full", "frozen")
SCHEDULES = ("linear", "cosine", "constant")
#: GrassConfig keys that follow from top-level keys (``policy`` follows from the method)
_GRASS_FROM = {"max_grad_norm": "max_grad_norm", "seed": "seed"}


class TrainConfigError(ValueError):
    """A training setting is unknown or out of range. The message names the key and what is allowed."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class LoraSection:
    """LoRA / DoRA adapters, built with peft."""

    rank: int = field(default=128, metadata=_help("Adapter rank r."))
    alpha: float = field(default=256, metadata=_help("lora_alpha (the scale is alpha / rank)."))
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
        metadata=_help("Module names that get adapters (comma-separated on the command line)."),
    )
    dropout: float = field(default=0.0, metadata=_help("Dropout on the adapter input."))
    dtype: str = field(
        default="model", metadata=_help("Adapter weight dtype: model (same as the model), fp32, bf16.")
    )
    merge: bool = field(
        default=True,
        metadata=_help(
            "Also save the final model with the adapters merged in (final/), besides the adapter (final/adapter)."
        ),
    )


@dataclass
class DistributedSection:
    """Several processes (``torchrun`` / ``accelerate launch``)."""

    shard_optimizer_states: bool = field(
        default=False,
        metadata=_help(
            "Layer-wise methods: each rank keeps the AdamW states of a share of the units (ZeRO-1) and "
            "broadcasts their updated weights."
        ),
    )


@dataclass
class TrainConfig:
    """Settings of ``grass-llm train``. Every field's help text is in ``metadata["help"]``."""

    model: str = field(
        default="builtin:tiny",
        metadata=_help(
            "Hub name or local directory of a causal LM; builtin:tiny = a tiny random Llama built in memory "
            "with the built-in tokenizer (no download)."
        ),
    )
    method: str = field(
        default="grass",
        metadata=_help(
            "Fine-tuning method: "
            + "; ".join(f"{m.name} ({m.summary})" for m in METHODS.values())
            + ". See grass_llm.recipes.methods."
        ),
    )
    dtype: str = field(
        default="auto", metadata=_help("Weight dtype: bf16, fp32, or auto (bf16 on a CUDA GPU that has it).")
    )
    data: str = field(
        default="builtin:arith",
        metadata=_help(
            "Training data: an LLM-Adapters JSON/JSONL file (instruction/input/output records), or "
            "builtin:arith (a small built-in arithmetic sample)."
        ),
    )
    data_dir: str | None = field(
        default=None,
        metadata=_help(
            "Directory that a relative `data` path is resolved against when it does not exist as given "
            "(default: $GRASS_DATA_DIR)."
        ),
    )
    max_length: int = field(default=256, metadata=_help("Token cutoff per example (or per packed row)."))
    train_on_response_only: bool = field(
        default=True, metadata=_help("Compute the loss on the response tokens only, not on the prompt.")
    )
    packing: bool = field(default=False, metadata=_help("Pack several examples into each row."))
    group_by_length: bool = field(
        default=False, metadata=_help("Batch examples of similar length together (less padding).")
    )
    batch_size: int = field(
        default=8,
        metadata=_help(
            "Examples (rows) per micro-batch, over all processes: under torchrun each of N ranks takes "
            "batch_size / N of them, so the same config trains the same way on any number of GPUs."
        ),
    )
    grad_accum: int = field(
        default=1, metadata=_help("Micro-batches per optimizer step (effective batch = batch_size * this).")
    )
    lr: float | None = field(
        default=None,
        metadata=_help(
            "Peak learning rate. Default per method (Table 9): "
            + ", ".join(f"{m.name} {m.default_lr:g}" for m in METHODS.values())
        ),
    )
    warmup: float = field(
        default=100,
        metadata=_help(
            "Warmup optimizer steps (a value < 1 is a fraction of the training steps). For GRASS the "
            "schedule starts after probing."
        ),
    )
    schedule: str = field(default="linear", metadata=_help(f"LR decay: {', '.join(SCHEDULES)}."))
    max_steps: int | None = field(
        default=None, metadata=_help("Optimizer steps to run (probing included); overrides epochs.")
    )
    stop_at_step: int | None = field(
        default=None,
        metadata=_help(
            "End this invocation after this global step with a checkpoint (no final model); the LR schedule "
            "still spans the whole run. For jobs with a time limit: continue with --resume."
        ),
    )
    epochs: float = field(default=3, metadata=_help("Passes over the data when max_steps is not set."))
    weight_decay: float = field(default=0.0, metadata=_help("Decoupled (AdamW) weight decay."))
    max_grad_norm: float | None = field(
        default=1.0,
        metadata=_help("Clip the gradient norm of the trained parameters (null: no clipping)."),
    )
    activation_checkpointing: str = field(
        default="none",
        metadata=_help(
            "Recompute activations in backward to save memory: none; full (every decoder block, "
            "non-reentrant); frozen (layer-wise methods: only the frozen blocks above the lowest trained "
            "one, which pass the gradient on but train nothing; see grass_llm.checkpoint_frozen_blocks)."
        ),
    )
    compact_activations: bool = field(
        default=True,
        metadata=_help(
            "Store saved activations compactly with bit-identical gradients: exact fp32 upcasts of bf16 "
            "tensors (RMSNorm) in bf16, SiLU/GELU outputs recomputed in backward "
            "(grass_llm.activation_checkpointing.compact_saved_activations)."
        ),
    )
    chunked_loss: bool = field(
        default=True,
        metadata=_help(
            "Compute the cross-entropy in chunks of tokens without the full fp32 logits (grass_llm.loss; "
            "same loss as the model's own). false: the model's own loss."
        ),
    )
    seed: int = field(default=0, metadata=_help("Seed of the model init, data order, dropout and sampling."))
    device: str = field(default="auto", metadata=_help("auto (cuda if available), cpu, cuda, cuda:N."))
    out_dir: str | None = field(
        default=None, metadata=_help("Run directory (checkpoints, log.jsonl, plots); default runs/<method>.")
    )
    save_every: int = field(
        default=500,
        metadata=_help("Save a resumable checkpoint every N optimizer steps (0: only at the end)."),
    )
    resume: str | None = field(
        default=None,
        metadata=_help("Resume from a checkpoint directory, or auto (the latest one in out_dir, if any)."),
    )
    tensorboard: bool = field(default=True, metadata=_help("Mirror the log to TensorBoard (out_dir/tb)."))
    plots: bool = field(default=True, metadata=_help("Draw the run's plots at the end."))
    grass: GrassConfig = field(
        default_factory=dict,  # type: ignore[assignment]  # resolved into a GrassConfig in __post_init__
        metadata=_help("GRASS settings of the layer-wise methods (grass_llm.GrassConfig)."),
    )
    lora: LoraSection = field(default_factory=LoraSection, metadata=_help("LoRA / DoRA settings."))
    distributed: DistributedSection = field(
        default_factory=DistributedSection, metadata=_help("Several processes.")
    )

    def __post_init__(self) -> None:
        for name, cls in (("lora", LoraSection), ("distributed", DistributedSection)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, _build(cls, getattr(self, name), prefix=f"{name}."))
        _choice("method", self.method, tuple(METHODS))
        self.grass = self._resolve_grass(self.grass)
        self.validate()

    def _resolve_grass(self, given: GrassConfig | dict[str, Any]) -> GrassConfig:
        """The method's defaults, the keys given (a ``GrassConfig`` counts as complete), then the
        method's defining settings."""
        values = given.to_dict() if isinstance(given, GrassConfig) else dict(given)
        for key, source in _GRASS_FROM.items():
            if key in values and values[key] != getattr(self, source):
                raise TrainConfigError(
                    f"grass.{key}={values[key]!r} conflicts with {source}={getattr(self, source)!r}: "
                    f"grass.{key} follows from {source}; set {source} instead"
                )
        method = get_method(self.method)
        for key, value in method.grass_fixed.items():
            if key in values and values[key] != value:
                warnings.warn(
                    f"method={self.method} sets grass.{key}={value!r} (given: {values[key]!r})",
                    UserWarning,
                    stacklevel=4,
                )
        values = {**(method.grass or {}), **values, **method.grass_fixed}
        values.update(max_grad_norm=self.max_grad_norm, seed=self.seed)
        try:
            return GrassConfig(**values)
        except ConfigError as e:
            raise TrainConfigError(f"grass.{e}") from None

    # -- derived values ---------------------------------------------------------------------------
    @property
    def learning_rate(self) -> float:
        """``lr``, or the method's Table 9 default."""
        return self.lr if self.lr is not None else get_method(self.method).default_lr

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path("runs") / self.method

    @property
    def layer_wise(self) -> bool:
        return get_method(self.method).layer_wise

    @property
    def probe_steps(self) -> int:
        return self.grass.probe_steps if self.layer_wise else 0

    # -- validation -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``TrainConfigError`` naming the first bad key and what is allowed."""
        _choice("method", self.method, tuple(METHODS))
        _choice("dtype", self.dtype, DTYPES)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("activation_checkpointing", self.activation_checkpointing, CHECKPOINTING)
        for name in ("model", "data"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TrainConfigError(
                    f"{name}={getattr(self, name)!r} is invalid; allowed: a non-empty string"
                )
        if not (self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")):
            raise TrainConfigError(f"device={self.device!r} is invalid; allowed: auto, cpu, cuda, cuda:N")
        _int("max_length", self.max_length, 8)
        _int("batch_size", self.batch_size, 1)
        _int("grad_accum", self.grad_accum, 1)
        _int("save_every", self.save_every, 0)
        _int("seed", self.seed, 0)
        if self.max_steps is not None:
            _int("max_steps", self.max_steps, 1)
        if self.stop_at_step is not None:
            _int("stop_at_step", self.stop_at_step, 1)
        _positive("epochs", self.epochs)
        if self.lr is not None:
            _positive("lr", self.lr)
        _non_negative("warmup", self.warmup)
        _non_negative("weight_decay", self.weight_decay)
        if self.max_grad_norm is not None:
            _positive("max_grad_norm", self.max_grad_norm)
        if self.packing and self.group_by_length:
            raise TrainConfigError("packing and group_by_length are both true; allowed: at most one of them")
        for name in (
            "train_on_response_only",
            "packing",
            "group_by_length",
            "chunked_loss",
            "compact_activations",
        ):
            _bool(name, getattr(self, name))
        _bool("tensorboard", self.tensorboard)
        _bool("plots", self.plots)
        _bool("distributed.shard_optimizer_states", self.distributed.shard_optimizer_states)
        lo = self.lora
        _int("lora.rank", lo.rank, 1)
        _positive("lora.alpha", lo.alpha)
        _non_negative("lora.dropout", lo.dropout)
        if lo.dropout >= 1:
            raise TrainConfigError(f"lora.dropout={lo.dropout!r} is invalid; allowed: a float in [0, 1)")
        _choice("lora.dtype", lo.dtype, ("model", "fp32", "bf16"))
        _bool("lora.merge", lo.merge)
        if not lo.target_modules or not all(isinstance(m, str) and m for m in lo.target_modules):
            raise TrainConfigError(
                f"lora.target_modules={lo.target_modules!r} is invalid; allowed: a non-empty list of module names"
            )

    # -- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a (possibly nested, possibly dotted) dict; unknown keys raise ``TrainConfigError``."""
        return _build(cls, _nest(data), prefix="")

    @classmethod
    def keys(cls) -> list[str]:
        """Every settable key, nested ones dotted (``grass.active_layers``)."""
        out = []
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            sub = _section_class(hints[f.name])
            if sub is None:
                out.append(f.name)
            else:
                out.extend(f"{f.name}.{g.name}" for g in dataclasses.fields(sub))
        return out

    @classmethod
    def help(cls) -> dict[str, str]:
        """Dotted key -> help text."""
        out = {}
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            sub = _section_class(hints[f.name])
            if sub is None:
                out[f.name] = f.metadata.get("help", "")
            else:
                out.update(
                    {f"{f.name}.{g.name}": g.metadata.get("help", "") for g in dataclasses.fields(sub)}
                )
        return out


# -- loading ------------------------------------------------------------------------------------
def load_train_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults, then ``base`` (a dict), then the YAML file at ``path``, then ``key=value`` overrides."""
    merged: dict[str, Any] = _nest(dict(base or {}))
    if path is not None:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise TrainConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise TrainConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise TrainConfigError(f"config file {str(p)!r} must hold a mapping of key: value")
        _deep_update(merged, _nest(loaded))
    for item in overrides or []:
        if "=" not in item:
            raise TrainConfigError(
                f"override {item!r} is invalid; allowed: key=value (e.g. grass.active_layers=4)"
            )
        key, value = item.split("=", 1)
        _deep_update(merged, _nest({key.strip(): _parse_scalar(value)}))
    return TrainConfig.from_dict(merged)


def _parse_scalar(text: str) -> Any:
    """A command-line value: YAML scalars/lists (``4``, ``true``, ``null``, ``[a, b]``), else the text."""
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _nest(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise TrainConfigError(f"config key {key!r} is invalid; allowed: a string")
        if isinstance(value, dict):
            value = _nest(value)
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"config key {key!r}: {part!r} is not a section")
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            _deep_update(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return out


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def _section_class(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _build(cls: type, data: dict[str, Any], prefix: str, construct: bool = True) -> Any:
    """``cls(**data)`` with every value coerced to its field's type (``construct=False``: the dict)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            full = prefix + key
            known = TrainConfig.keys()
            close = difflib.get_close_matches(full, known, n=3, cutoff=0.6)
            if full.startswith("lisa."):  # the section of earlier versions
                close = [f"grass.{full[5:]}"]
            if full == "gradient_checkpointing":  # the key of earlier versions
                close = ["activation_checkpointing=full"]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise TrainConfigError(
                f"unknown config key {full!r}{hint} (run `grass-llm train -h` for the list)"
            )
        sub = _section_class(hints[key])
        if sub is not None:
            if not isinstance(value, dict):
                raise TrainConfigError(
                    f"{prefix}{key} is a section; set its keys, e.g. {prefix}{key}.<name>=..."
                )
            kwargs[key] = _build(sub, value, prefix=f"{prefix}{key}.", construct=sub is not GrassConfig)
        else:
            kwargs[key] = _coerce(prefix + key, value, hints[key])
    return cls(**kwargs) if construct else kwargs


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert a YAML / command-line value to the field's type, or raise naming the key."""
    args = typing.get_args(tp)
    optional = type(None) in args
    base = [a for a in args if a is not type(None)] if args and typing.get_origin(tp) is not list else [tp]
    target = base[0] if len(base) == 1 else tp
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and optional):
        if optional or tp is Any:
            return None
        raise TrainConfigError(f"{name}=null is invalid; allowed: a value of type {_type_name(target)}")
    if target is Any:
        return value
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise TrainConfigError(f"{name}={value!r} is invalid; allowed: true or false")
    if target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise TrainConfigError(f"{name}={value!r} is invalid; allowed: an integer")
    if target is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-5 as a string
            except ValueError:
                pass
        raise TrainConfigError(f"{name}={value!r} is invalid; allowed: a number")
    if typing.get_origin(target) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise TrainConfigError(f"{name}={value!r} is invalid; allowed: a list of strings (or a,b,c)")
    if target is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TrainConfigError(f"{name}={value!r} is invalid; allowed: a string")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise TrainConfigError(f"{name}={value!r} is unknown{hint}; allowed: {', '.join(allowed)}")


def _int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise TrainConfigError(f"{name}={value!r} is invalid; allowed: an integer >= {low}")


def _real(name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise TrainConfigError(f"{name}={value!r} is invalid; allowed: a finite number")
    return float(value)


def _positive(name: str, value: Any) -> None:
    if _real(name, value) <= 0:
        raise TrainConfigError(f"{name}={value!r} is invalid; allowed: a number > 0")


def _non_negative(name: str, value: Any) -> None:
    if _real(name, value) < 0:
        raise TrainConfigError(f"{name}={value!r} is invalid; allowed: a number >= 0")


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TrainConfigError(f"{name}={value!r} is invalid; allowed: true or false")
