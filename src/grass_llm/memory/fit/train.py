"""``grass-llm train memory_budget=``: the plan for a ``TrainConfig`` (:func:`plan_for_train_config`) and its
settings applied before anything is built or written (:func:`apply_memory_budget`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from grass_llm.memory.budget import format_size, parse_budget
from grass_llm.memory.fit.plans import FitError, FitPlan
from grass_llm.memory.fit.report import gib
from grass_llm.memory.fit.search import plan
from grass_llm.memory.model import builtin_config

__all__ = ["apply_memory_budget", "plan_for_train_config"]

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
    try:  # a bare number is GiB here as in every message (plan() itself reads an int as bytes)
        budget = parse_budget("memory_budget", cfg.memory_budget)
    except ValueError as e:
        raise FitError(str(e)) from None
    return plan(
        _planning_config(cfg),
        budget,
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
    probe = f", probing {gib(c.probe_peak)}" if c.probe_peak is not None else ""
    say(
        f"memory_budget={cfg.memory_budget} ({format_size(budget)}): {' '.join(p.train_args())} "
        f"(whole-run peak {gib(c.peak)}: training {gib(c.train_peak)}{probe}; + margin "
        f"{gib(p.margin.of(c.peak))} = {gib(c.needed)}; planned in {p.seconds:.1f} s)"
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
    return builtin_config(cfg.model, cfg) if cfg.model.startswith("builtin:") else cfg.model
