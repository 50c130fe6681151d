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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grass_llm.config import ConfigError, GrassConfig
from grass_llm.recipes.config_values import (
    TrainConfigError,
    build_dataclass,
    check_bool,
    check_choice,
    check_int,
    check_non_negative,
    check_positive,
    deep_update,
    dotted_help,
    nest,
    parse_scalar,
    read_yaml_mapping,
    unknown_key,
)
from grass_llm.recipes.methods import METHODS, get_method

# (the names memory/estimate.py and older code import from here)
_nest, _parse_scalar = nest, parse_scalar

__all__ = [
    "CHECKPOINTING",
    "DTYPES",
    "PER_INVOCATION",
    "RESUME_CHANGEABLE",
    "SCHEDULES",
    "STRATEGIES",
    "DistributedSection",
    "LoraSection",
    "TrainConfig",
    "TrainConfigError",
    "config_yaml",
    "load_train_config",
]

DTYPES = ("auto", "bf16", "fp32")
CHECKPOINTING = ("none", "full", "frozen")
#: Settings that may differ between a checkpoint and the run resuming from it: they are applied from
#: the resume on (and recorded in the next checkpoint). Any other difference is refused.
RESUME_CHANGEABLE = (
    "lr",
    "max_steps",
    "epochs",
    "save_every",
    "max_nonfinite_steps",
    "tensorboard",
    "plots",
    "eval_heldout",
    "threads",
    "device",
    "data_dir",
    "out_dir",
    "activation_checkpointing",
    "compact_activations",
    "chunked_loss",
    "distributed",
)
#: Settings of one invocation, never taken from the checkpoint being resumed.
PER_INVOCATION = ("resume", "overwrite", "stop_at_step", "allow_data_change")
SCHEDULES = ("linear", "cosine", "constant")
STRATEGIES = ("auto", "replicated", "fsdp2")
#: GrassConfig keys that follow from top-level keys (``policy`` follows from the method)
_GRASS_FROM = {"max_grad_norm": "max_grad_norm", "seed": "seed"}


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

    strategy: str = field(
        default="auto",
        metadata=_help(
            "replicated: every rank holds the whole model (GRASS synchronises the active layers itself; DDP "
            "for fft / lora / dora); fsdp2: torch's fully_shard shards every decoder block and the root over "
            "the ranks, for models whose weights do not fit one device (the optimizer states are sharded "
            "like the weights; checkpoints are sharded, resumable on any number of processes); auto: fsdp2 "
            "under `accelerate launch` with an FSDP2 config (ACCELERATE_USE_FSDP=true, FSDP_VERSION=2), "
            "replicated otherwise. No effect on one process."
        ),
    )
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
            "Hub name or local directory of a causal LM; builtin:tiny-pretrained = a tiny Llama (8 layers) "
            "pretrained on the built-in arithmetic corpus, shipped with the package (the demo's model); "
            "builtin:tiny = the same shape, randomly initialised. Both use the built-in tokenizer (no download)."
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
    memory_budget: str | float | None = field(
        default=None,
        metadata=_help(
            "Device memory to fit, e.g. 24GiB, 24GB or a number of GiB: before anything is built, the fastest "
            "batch_size x grad_accum (keeping their product), activation_checkpointing and grass.offload whose "
            "estimated whole-run peak + margin fits are chosen, printed and recorded in the run's config "
            "(grass_llm.memory.fit, docs/fit.md); nothing fits: exit code 2, nothing written. Planned for a "
            "CUDA device (on CPU the same settings are applied); a resumed run keeps its checkpoint's. "
            "null: off."
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
        metadata=_help(
            "Resume from a checkpoint directory, or auto (the newest intact one in out_dir; none there: "
            "start). Same as --resume / --resume=PATH."
        ),
    )
    overwrite: bool = field(
        default=False,
        metadata=_help(
            "Start over in an out_dir that holds an earlier run, replacing its log, checkpoints, final model, "
            "plots, TensorBoard events and eval results: they are set aside in out_dir/replaced-run-N once "
            "the new run starts and deleted once it is complete. Without it such an out_dir is refused "
            "(continue the run with --resume instead)."
        ),
    )
    allow_data_change: bool = field(
        default=False,
        metadata=_help(
            "On --resume, continue although the training data's content differs from the checkpoint's "
            "(its fingerprint is saved in every checkpoint; without this a changed dataset is refused)."
        ),
    )
    max_nonfinite_steps: int = field(
        default=10,
        metadata=_help(
            "A step whose gradients are not finite (NaN/Inf) is skipped (no weight, optimizer or MGN "
            "change) and counted; after this many in a row the run stops with exit code 1, keeping the "
            "last checkpoint. 0: never stop."
        ),
    )
    threads: int | None = field(
        default=None,
        metadata=_help(
            "CPU threads of torch (intra-op). Default: $OMP_NUM_THREADS if set, else 1 for a model on "
            "CPU (fastest for small models, and no 10x slowdown when another process shares the cores), "
            "torch's default for a model on GPU."
        ),
    )
    eval_heldout: int = field(
        default=0,
        metadata=_help(
            "With data=builtin:arith (ignored for other data): answer this many held-out arithmetic "
            "questions (none in the training sample) by greedy decoding before and after training, and print "
            "the accuracy (LLM-Adapters' answer rule). 0: off."
        ),
    )
    tensorboard: bool = field(
        default=True, metadata=_help("Mirror the log to TensorBoard (out_dir/tensorboard).")
    )
    plots: bool = field(
        default=True,
        metadata=_help(
            "Draw the run's plots at the end (out_dir/plots; grass-llm train draws them, train() from Python "
            "leaves them to grass_llm.plots.plot_run)."
        ),
    )
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
                setattr(self, name, build_dataclass(cls, getattr(self, name), _unknown_key, prefix=f"{name}."))
        check_choice("method", self.method, tuple(METHODS))
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
        check_choice("method", self.method, tuple(METHODS))
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("activation_checkpointing", self.activation_checkpointing, CHECKPOINTING)
        if self.activation_checkpointing == "frozen" and not self.layer_wise:
            raise TrainConfigError(
                f"activation_checkpointing=frozen is invalid for method={self.method} (it recomputes the blocks a "
                "layer-wise method leaves frozen); allowed: none, full"
            )
        for name in ("model", "data"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TrainConfigError(
                    f"{name}={getattr(self, name)!r} is invalid; allowed: a non-empty string"
                )
        if not (self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")):
            raise TrainConfigError(f"device={self.device!r} is invalid; allowed: auto, cpu, cuda, cuda:N")
        check_int("max_length", self.max_length, 8)
        check_int("batch_size", self.batch_size, 1)
        check_int("grad_accum", self.grad_accum, 1)
        check_int("save_every", self.save_every, 0)
        check_int("max_nonfinite_steps", self.max_nonfinite_steps, 0)
        check_int("eval_heldout", self.eval_heldout, 0)
        if self.threads is not None:
            check_int("threads", self.threads, 1)
        if self.memory_budget is not None:
            from grass_llm.memory.budget import BudgetError, parse_budget

            try:
                parse_budget("memory_budget", self.memory_budget)
            except BudgetError as e:
                raise TrainConfigError(str(e)) from None

        check_int("seed", self.seed, 0)
        if self.max_steps is not None:
            check_int("max_steps", self.max_steps, 1)
        if self.stop_at_step is not None:
            check_int("stop_at_step", self.stop_at_step, 1)
        check_positive("epochs", self.epochs)
        if self.lr is not None:
            check_positive("lr", self.lr)
        check_non_negative("warmup", self.warmup)
        check_non_negative("weight_decay", self.weight_decay)
        if self.max_grad_norm is not None:
            check_positive("max_grad_norm", self.max_grad_norm)
        if self.packing and self.group_by_length:
            raise TrainConfigError("packing and group_by_length are both true; allowed: at most one of them")
        for name in (
            "train_on_response_only",
            "packing",
            "group_by_length",
            "chunked_loss",
            "compact_activations",
        ):
            check_bool(name, getattr(self, name))
        check_bool("tensorboard", self.tensorboard)
        check_bool("overwrite", self.overwrite)
        check_bool("allow_data_change", self.allow_data_change)
        check_bool("plots", self.plots)
        check_bool("distributed.shard_optimizer_states", self.distributed.shard_optimizer_states)
        check_choice("distributed.strategy", self.distributed.strategy, STRATEGIES)
        if self.distributed.strategy == "fsdp2" and self.distributed.shard_optimizer_states:
            raise TrainConfigError(
                "distributed.shard_optimizer_states=true is for distributed.strategy=replicated; under fsdp2 "
                "the optimizer states are sharded like the weights already. Allowed: one of the two"
            )
        lo = self.lora
        check_int("lora.rank", lo.rank, 1)
        check_positive("lora.alpha", lo.alpha)
        check_non_negative("lora.dropout", lo.dropout)
        if lo.dropout >= 1:
            raise TrainConfigError(f"lora.dropout={lo.dropout!r} is invalid; allowed: a float in [0, 1)")
        check_choice("lora.dtype", lo.dtype, ("model", "fp32", "bf16"))
        check_bool("lora.merge", lo.merge)
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
        return build_dataclass(cls, nest(data), _unknown_key, raw_sections=(GrassConfig,))

    @classmethod
    def keys(cls) -> list[str]:
        """Every settable key, nested ones dotted (``grass.active_layers``)."""
        return list(dotted_help(cls))

    @classmethod
    def help(cls) -> dict[str, str]:
        """Dotted key -> help text."""
        return dotted_help(cls)


# -- loading ------------------------------------------------------------------------------------
def load_train_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults, then ``base`` (a dict), then the YAML file at ``path``, then ``key=value`` overrides."""
    merged: dict[str, Any] = nest(dict(base or {}))
    if path is not None:
        deep_update(merged, nest(read_yaml_mapping(path)))
    for item in overrides or []:
        if "=" not in item:
            raise TrainConfigError(
                f"override {item!r} is invalid; allowed: key=value (e.g. grass.active_layers=4)"
            )
        key, value = item.split("=", 1)
        deep_update(merged, nest({key.strip(): parse_scalar(value)}))
    return TrainConfig.from_dict(merged)


def _unknown_key(full: str) -> str:
    return unknown_key(full, TrainConfig.keys())


def config_yaml(cfg: TrainConfig, history: list[dict[str, Any]] | None = None) -> str:
    """The resolved settings as YAML (what ``--print-config`` prints and checkpoints record), with a
    comment per resume that changed settings."""
    import yaml

    head = "".join(
        f"# resumed at step {h['step']} with changes: "
        + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in h["changes"].items())
        + "\n"
        for h in history or []
    )
    return head + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
