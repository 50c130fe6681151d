"""Where a run starts: the checkpoint ``--resume`` continues from (found, verified, damaged ones set
aside), what may differ from its settings, and the ``out_dir`` policy (an earlier run is continued with
``--resume``, replaced with ``overwrite=true``, or refused). Every refusal is a ``TrainInputError``."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grass_llm.recipes.errors import TrainInputError
from grass_llm.recipes.launch import Launch
from grass_llm.recipes.methods import get_method
from grass_llm.recipes.run_checkpoint import (
    CheckpointError,
    delete_checkpoints,
    find_resumable,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)
from grass_llm.recipes.train_config import PER_INVOCATION, RESUME_CHANGEABLE, TrainConfig
from grass_llm.run_layout import CHECKPOINT_DIR, FINAL_DIR, RUN_OUTPUTS

__all__ = ["SECTIONS", "Resume", "effective_lr", "open_resume", "resume_changes"]

# settings a resumed run must share with its checkpoint: every TrainConfig key but RESUME_CHANGEABLE
# (sections: only the method's own, grass or lora, is compared)
SECTIONS = ("grass", "lora", "distributed")

Say = Callable[[str], None]


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run resumes from: its ``path``, what ``load_checkpoint`` read (``ckpt``) and
    the settings changed on the command line (``changes``: ``{key: (old, new)}``)."""

    path: Path
    ckpt: dict[str, Any]
    changes: dict[str, tuple[Any, Any]]


def open_resume(cfg: TrainConfig, launch: Launch, device: torch.device, say: Say) -> Resume | None:
    """The checkpoint to resume from, loaded and checked against ``cfg`` (None: start at step 0, in an
    ``out_dir`` made ready for a new run)."""
    path = _checkpoint_to_resume(cfg, launch, device, say)
    if path is None:
        if cfg.resume is None:
            _prepare_out_dir(cfg, launch, say)
        # (--resume without a checkpoint: the run never saved one; its log is rewritten from step 0)
        return None
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise TrainInputError(f"cannot resume: {e}") from None
    step = int(ckpt["state"]["step"])
    changes = resume_changes(ckpt["state"]["config"], cfg, path, step)
    _check_newer_checkpoints(cfg, launch, path, step, say)
    return Resume(path, ckpt, changes)


def effective_lr(d: dict[str, Any]) -> float:
    """The learning rate of the settings ``d`` (a ``TrainConfig.to_dict()``): ``lr`` or the method's."""
    return d.get("lr") if d.get("lr") is not None else get_method(d["method"]).default_lr


def resume_changes(
    saved: dict[str, Any], cfg: TrainConfig, path: Path, step: int
) -> dict[str, tuple[Any, Any]]:
    """The settings that differ between the checkpoint (``saved``) and ``cfg``: ``{key: (old, new)}``
    for those that may change on resume; ``TrainInputError`` naming the others."""
    now = cfg.to_dict()
    method = get_method(cfg.method)
    compared = {k for k in now if k not in SECTIONS} | {"distributed"}
    if method.layer_wise:
        compared.add("grass")
    if method.adapters_only:
        compared.add("lora")
    changes: dict[str, tuple[Any, Any]] = {}
    refused: list[str] = []
    for key in sorted(compared, key=list(now).index):
        if key in PER_INVOCATION or key not in saved:
            continue  # per invocation, or a key this checkpoint's version did not have
        old, new = saved[key], now[key]
        if key == "lr":
            old, new = effective_lr(saved), cfg.learning_rate
        if old == new:
            continue
        if key in RESUME_CHANGEABLE:
            changes[key] = (old, new)
        elif isinstance(old, dict) and isinstance(new, dict):
            refused += [
                f"{key}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in new if old.get(k, new[k]) != new[k]
            ]
        else:
            refused.append(f"{key}: {old!r} -> {new!r}")
    if refused:
        raise TrainInputError(
            f"cannot resume from {path} with other settings than the checkpoint's: {'; '.join(refused)}. "
            f"Only these may change on resume: {', '.join(RESUME_CHANGEABLE)}"
        )
    if cfg.max_steps is not None and cfg.max_steps < step:
        raise TrainInputError(
            f"max_steps={cfg.max_steps} is below the step of the checkpoint {path} ({step}); allowed: >= {step}"
        )
    return changes


def _checkpoint_to_resume(cfg: TrainConfig, launch: Launch, device: torch.device, say: Say) -> Path | None:
    """The checkpoint to resume from (None: start at step 0). ``resume=auto`` passes over damaged
    or incomplete checkpoints (rank 0 sets them aside) and says so."""
    if cfg.resume is None:
        return None
    if cfg.resume != "auto":
        return _given_checkpoint(cfg.resume)
    run_dir = cfg.run_dir
    issues: list[Any] = []
    if launch.is_main:
        path, issues = find_resumable(run_dir, set_aside=True)
    launch.barrier()  # invariant: rank 0 has set damaged checkpoints aside before the others look
    if not launch.is_main:
        path, _ = find_resumable(run_dir, set_aside=False)
    for issue in issues:
        where = f"set aside as {issue.moved_to}" if issue.moved_to else "left in place"
        reason = (
            issue.reason
            if issue.reason.startswith(("damaged", "incomplete"))
            else f"unusable: {issue.reason}"
        )
        say(f"resume: checkpoint {issue.path} is {reason}; {where} (not deleted)")
    root = run_dir / CHECKPOINT_DIR
    # (rank 0 alone saw what it set aside: every rank must take its decision)
    (none_intact,) = launch.sum([launch.is_main and path is None and bool(issues)], device)
    if none_intact:
        raise TrainInputError(
            f"cannot resume: no intact checkpoint in {root} (see above; nothing was deleted). Resume from "
            "another checkpoint with --resume=PATH, or start over with overwrite=true"
        )
    if path is None:
        if (run_dir / FINAL_DIR).exists() or list_checkpoints(run_dir):
            raise TrainInputError(
                f"cannot resume: {run_dir} holds a final model but no checkpoint; start over with "
                "overwrite=true, or choose another out_dir"
            )
        say(f"resume: no checkpoint in {root}; starting at step 0")
        return None
    if issues:
        say(f"resume: resuming from the newest intact checkpoint, {path}")
    return path


def _given_checkpoint(resume: str) -> Path:
    """``--resume=PATH``: the checkpoint, verified; a damaged one names the newest intact one beside it."""
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise TrainInputError(f"resume checkpoint {resume!r} does not exist")
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        intact = (
            find_resumable(path.parent.parent, set_aside=False)[0]
            if path.parent.name == CHECKPOINT_DIR
            else None
        )
        hint = f"; the newest intact checkpoint beside it is {intact}" if intact and intact != path else ""
        raise TrainInputError(f"cannot resume: {e}{hint}") from None
    return path


def _check_newer_checkpoints(cfg: TrainConfig, launch: Launch, path: Path, step: int, say: Say) -> None:
    """Resuming from an older checkpoint into a run dir that holds newer ones would mix two runs:
    refused unless ``overwrite=true``, which deletes the newer ones."""
    run_dir = cfg.run_dir
    newer = [d for s, d in list_checkpoints(run_dir) if s > step and (d / "COMPLETE").is_file()]
    if not newer:
        return
    names = ", ".join(str(d) for d in newer)
    if not cfg.overwrite:
        raise TrainInputError(
            f"cannot resume from {path} (step {step}) in {run_dir}: it holds newer checkpoints ({names}), "
            "which the run would mix with this one. Resume into another out_dir, or add overwrite=true "
            "to delete the newer checkpoints"
        )
    launch.barrier()  # invariant: every rank has listed the newer checkpoints before any is deleted
    if launch.is_main:
        for d in newer:
            shutil.rmtree(d)
        say(f"overwrite=true: deleted the newer checkpoints {names}")
    launch.barrier()


def _prepare_out_dir(cfg: TrainConfig, launch: Launch, say: Say) -> None:
    """A new run needs an out_dir without an earlier run in it, or ``overwrite=true`` (which deletes
    the earlier run's outputs, and nothing else)."""
    run_dir = cfg.run_dir
    found = [n for n in RUN_OUTPUTS if (run_dir / n).exists()]
    if found and not cfg.overwrite:
        raise TrainInputError(
            f"out_dir {str(run_dir)!r} holds an earlier run ({', '.join(found)}); continue it with "
            "--resume, start over with overwrite=true (deletes it), or choose another out_dir"
        )
    if found and launch.is_main:
        for name in found:
            target = run_dir / name
            if name == CHECKPOINT_DIR and target.is_dir():
                delete_checkpoints(run_dir)  # (only what is named like a checkpoint)
            elif target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
        say(f"overwrite=true: deleted the earlier run in {run_dir} ({', '.join(found)})")
    launch.barrier()  # invariant: no rank writes into out_dir while rank 0 clears it
