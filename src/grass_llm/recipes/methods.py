"""The fine-tuning methods, one registry entry each: how a method builds (model, optimizer), what it
trains, which parameters its checkpoints hold, and how its final model is saved.

``grass-llm train``, ``grass-llm memory`` and the benchmarks all build a method through
:func:`build_method`, so "LoRA r=128" or "LISA" means one thing everywhere, and the memory
estimate steps exactly what training would run.

Built in:

* ``grass``: ``GrassOptimizer`` with the paper's adaptive policy (probing, MGN softmax, EMA);
* ``grass-static``: GRASS*, probabilities fixed after probing;
* ``lisa``: uniform sampling, no probing, embeddings and head always trained, period 10 (LISA);
* ``badam``: block coordinate descent in BAdam's style: one layer at a time in a random order per
  cycle, switched every 50 steps, its AdamW state reset at each switch;
* ``fft``: ``torch.optim.AdamW`` over every parameter;
* ``lora`` / ``dora``: peft adapters, ``torch.optim.AdamW`` over them.

Where a new baseline goes: one :class:`Method` passed to :func:`register_method`. A layer-wise
method is a ``GrassConfig`` preset (with a new sampling policy in ``grass_llm.sampling`` if it needs
one); any other method gives its own ``optimizer`` (and ``wrap``, if it changes the model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from grass_llm._tensor import DTYPES
from grass_llm.run_layout import ADAPTER_DIR

if TYPE_CHECKING:
    from grass_llm.config import GrassConfig
    from grass_llm.distributed.base import DataParallelBackend

__all__ = [
    "METHODS",
    "LoraSettings",
    "Method",
    "MethodError",
    "MethodSettings",
    "build_method",
    "get_method",
    "register_method",
    "wrap_lora",
]


@runtime_checkable
class LoraSettings(Protocol):
    """The LoRA / DoRA settings a method reads (``TrainConfig.lora``)."""

    rank: int
    alpha: float
    target_modules: Sequence[str]
    dropout: float
    dtype: str  # model, fp32 or bf16
    merge: bool


@runtime_checkable
class MethodSettings(Protocol):
    """What a method reads of the run's settings: a ``grass_llm.recipes.train_config.TrainConfig``
    satisfies it. (A protocol, so that the dependency runs ``train_config -> methods`` only.)"""

    method: str
    model: str
    weight_decay: float
    grass: GrassConfig
    lora: LoraSettings

    @property
    def learning_rate(self) -> float: ...


class MethodError(ValueError):
    """A method cannot be built with the given settings; the message names the setting."""


@dataclass(frozen=True)
class Method:
    """One fine-tuning method.

    Attributes:
        name: the ``method`` key of ``grass-llm train``.
        summary: one line for ``--help`` and docs.
        trains: what the method updates.
        default_lr: learning rate when ``lr`` is not set (the paper's Table 9 for TinyLlama arithmetic).
        grass: for layer-wise methods, the ``GrassConfig`` defaults of the method (``grass.*`` keys
            given in the config override them); ``None`` for other methods.
        grass_fixed: the settings that define the method (its sampling policy; LISA: no probing,
            embeddings and head trained). They win over any ``grass.*`` value given, with a warning.
        wrap: ``(model, cfg) -> model``: what the method does to the model before the optimizer is built
            (peft adapters); ``None``: nothing.
        optimizer: ``(model, cfg) -> optimizer`` for the model's trainable parameters. ``None`` for
            layer-wise methods, which all build a ``GrassOptimizer`` from ``cfg.grass``.
        adapters_only: checkpoints hold only the trainable parameters (adapters), not the model.
        save_final: ``(model, final_dir, cfg) -> (directory to load, description)``.
    """

    name: str
    summary: str
    trains: str
    default_lr: float
    grass: dict[str, Any] | None = None
    grass_fixed: dict[str, Any] = field(default_factory=dict)
    wrap: Callable[[nn.Module, MethodSettings], nn.Module] | None = None
    optimizer: Callable[[nn.Module, MethodSettings], torch.optim.Optimizer] | None = None
    adapters_only: bool = False
    save_final: Callable[[nn.Module, Path, MethodSettings], tuple[Path, str]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def layer_wise(self) -> bool:
        """Built on ``GrassOptimizer`` (trains sampled decoder layers, synchronises itself)."""
        return self.grass is not None


#: name -> Method, in registration order.
METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (``grass-llm train method=<name>``); returns it."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    if (method.grass is None) == (method.optimizer is None):
        raise ValueError(f"method {method.name!r}: give exactly one of grass (layer-wise) and optimizer")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; ``MethodError`` lists the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(f"method={name!r} is unknown; allowed: {', '.join(METHODS)}") from None


def build_method(
    model: nn.Module,
    cfg: MethodSettings,
    backend: DataParallelBackend | str | None = "auto",
    shard: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``(model, optimizer)`` for ``cfg.method``; the model may come back wrapped (peft).

    ``shard`` (e.g. ``grass_llm.distributed.fsdp2.apply_fsdp2``) runs after the method's ``wrap`` and
    before the optimizer is built over the (sharded) parameters. ``backend``: the layer-wise methods'
    data-parallel backend (``GrassOptimizer``'s ``distributed``; ``"auto"`` picks FSDP2 for a sharded
    model, one process otherwise unless a process group of several ranks is initialised).
    """
    method = get_method(cfg.method)
    if method.wrap is not None:
        model = method.wrap(model, cfg)
    if shard is not None:
        model = shard(model)
    if not method.layer_wise:
        return model, method.optimizer(model, cfg)
    from grass_llm.config import ConfigError
    from grass_llm.optim import GrassOptimizer

    try:
        opt = GrassOptimizer(
            model, cfg.grass, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, distributed=backend
        )
    except ConfigError as e:
        raise MethodError(f"grass.{e}") from None
    return model, opt


# ------------------------------------------------------------------------------------------------
# builders
def _adamw(model: nn.Module, cfg: MethodSettings) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over the trainable parameters, with GrassOptimizer's weight-decay convention
    (none on biases and norm weights) so that the baselines compare like for like; the fused kernel on
    CUDA (what the HF Trainer uses by default: no temporaries the size of the model)."""
    from grass_llm.optim import no_weight_decay_ids

    no_decay = no_weight_decay_ids(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in no_decay]},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    fused = True if params and params[0].device.type == "cuda" else None
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused)


def _fft_optimizer(model: nn.Module, cfg: MethodSettings) -> torch.optim.AdamW:
    for p in model.parameters():
        p.requires_grad_(True)
    return _adamw(model, cfg)


def wrap_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    target_modules: list[str],
    dropout: float = 0.0,
    use_dora: bool = False,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """peft LoRA / DoRA adapters on ``target_modules``, cast to ``dtype`` (default: the model's)."""
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=dropout,
        use_dora=use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        # autocast_adapter_dtype=False keeps the adapters in the model dtype; cast explicitly below
        model = get_peft_model(model, peft_cfg, autocast_adapter_dtype=False)
    except ValueError as e:
        raise MethodError(f"lora.target_modules={list(target_modules)!r}: {e}") from None
    if dtype is not None:
        for p in model.parameters():
            if p.requires_grad and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model


def _wrap_lora(model: nn.Module, cfg: MethodSettings) -> nn.Module:
    lo = cfg.lora
    model_dtype = next(model.parameters()).dtype
    dtype = model_dtype if lo.dtype == "model" else DTYPES[lo.dtype]
    return wrap_lora(model, lo.rank, lo.alpha, lo.target_modules, lo.dropout, cfg.method == "dora", dtype)


# ------------------------------------------------------------------------------------------------
# final models
def _save_full(model: nn.Module, final: Path, cfg: MethodSettings) -> tuple[Path, str]:
    model.save_pretrained(final)
    return final, "full model + tokenizer"


def _save_adapter(model: nn.Module, final: Path, cfg: MethodSettings) -> tuple[Path, str]:
    adapter = final / ADAPTER_DIR
    model.save_pretrained(adapter)
    _record_base(model, adapter, final, cfg.model)
    if cfg.lora.merge:
        model.merge_and_unload().save_pretrained(final)
        return final, f"merged {cfg.method} model + tokenizer; adapter alone in {final / ADAPTER_DIR}"
    return final / ADAPTER_DIR, f"{cfg.method} adapter + tokenizer (load on top of {cfg.model})"


#: in an adapter directory: the base model, when it cannot be loaded by name (a built-in model)
BASE_DIR = "base"


def _record_base(model: nn.Module, adapter: Path, final: Path, base: str) -> None:
    """Record in ``adapter/adapter_config.json`` a base the adapter can be loaded from: a local base by
    its absolute path, a hub base by its name, a built-in base (which no loader knows by name) saved
    beside the adapter in ``adapter/base`` (the base weights, before the adapters) and recorded by the
    absolute path it has once ``final`` (written as ``final.tmp``) is in place."""
    import json

    local = Path(base).expanduser()
    if base.startswith("builtin:"):
        plain = {
            k.replace(".base_layer.", "."): v
            for k, v in model.get_base_model().state_dict().items()
            if ".lora_" not in k
        }
        model.get_base_model().save_pretrained(adapter / BASE_DIR, state_dict=plain)
        placed = final.with_name(final.name.removesuffix(".tmp"))
        recorded = str((placed / ADAPTER_DIR / BASE_DIR).resolve())
    elif local.exists():
        recorded = str(local.resolve())
    else:
        return  # a hub name: peft recorded it
    config = adapter / "adapter_config.json"
    data = json.loads(config.read_text())
    data["base_model_name_or_path"] = recorded
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


for _method in (
    Method(
        "grass",
        "GRASS: layers sampled by their mean gradient norm (probing, softmax, EMA)",
        "gamma sampled decoder layers (+ groups switched on in grass.train_*)",
        3e-5,
        grass={},
        grass_fixed={"policy": "grass"},
        save_final=_save_full,
    ),
    Method(
        "grass-static",
        "GRASS*: probabilities fixed after probing",
        "gamma sampled decoder layers (+ groups switched on in grass.train_*)",
        3e-5,
        grass={},
        grass_fixed={"policy": "static"},
        save_final=_save_full,
    ),
    Method(
        "lisa",
        "LISA: uniform layer sampling, embeddings and head always trained",
        "gamma uniformly sampled decoder layers + embeddings + head",
        5e-5,
        grass={"period": 10},
        grass_fixed={"policy": "uniform", "probe_steps": 0, "train_embeddings": True, "train_head": True},
        save_final=_save_full,
    ),
    Method(
        "badam",
        "BAdam-style block coordinate descent: one layer at a time, random order per cycle",
        "one decoder layer at a time, every layer once per cycle, AdamW state reset at each switch",
        1e-5,
        grass={"active_layers": 1, "period": 50},
        grass_fixed={"policy": "cyclic", "probe_steps": 0, "on_reactivation": "reset"},
        save_final=_save_full,
    ),
    Method(
        "fft",
        "full fine-tuning with AdamW",
        "every parameter",
        1e-5,
        optimizer=_fft_optimizer,
        save_final=_save_full,
    ),
    Method(
        "lora",
        "LoRA adapters (peft)",
        "low-rank adapters on lora.target_modules",
        1e-4,
        wrap=_wrap_lora,
        optimizer=_adamw,
        adapters_only=True,
        save_final=_save_adapter,
    ),
    Method(
        "dora",
        "DoRA adapters (peft)",
        "weight-decomposed low-rank adapters on lora.target_modules",
        1e-4,
        wrap=_wrap_lora,
        optimizer=_adamw,
        adapters_only=True,
        save_final=_save_adapter,
    ),
):
    register_method(_method)
