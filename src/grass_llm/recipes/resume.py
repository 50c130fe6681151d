"""Where a run starts: the checkpoint ``--resume`` continues from (found, verified, damaged ones set
aside), what may differ from its settings, and the ``out_dir`` policy (an earlier run is continued with
``--resume``, replaced with ``overwrite=true``, or refused). Every refusal is a ``TrainInputError``.

Nothing is deleted before its replacement is complete: :func:`open_resume` only decides (and refuses);
what ``overwrite=true`` replaces (an earlier run's outputs, or checkpoints newer than the one resumed)
is set aside into ``out_dir/replaced-run-N/`` by :func:`set_aside` once the run has been built and
restored, and deleted by :func:`delete_replaced` once the run is complete (its final model written).
A run stopped before that leaves the earlier one in ``replaced-run-N/``. A model or data file inside
what would be replaced is refused: a run never replaces its own input."""

from __future__ import annotations

import os
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
    MODEL_FILE,
    CheckpointError,
    checkpoint_entries,
    find_resumable,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)
from grass_llm.recipes.train_config import PER_INVOCATION, RESUME_CHANGEABLE, TrainConfig
from grass_llm.run_layout import CHECKPOINT_DIR, FINAL_DIR, REPLACED_PREFIX, is_run_dir, run_outputs

__all__ = [
    "SECTIONS",
    "Resume",
    "Start",
    "check_data",
    "check_resume_path",
    "delete_replaced",
    "effective_lr",
    "open_resume",
    "resume_changes",
    "set_aside",
]

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


@dataclass(frozen=True)
class Start:
    """How a run starts: the checkpoint it resumes from (None: step 0), and what ``overwrite=true``
    sets aside once the run is built (``replace``: paths in ``out_dir``)."""

    resume: Resume | None
    replace: list[Path]
    what: str = "the earlier run's"  # (for the message)


def open_resume(
    cfg: TrainConfig, launch: Launch, device: torch.device, say: Say, inputs: tuple[Path, ...] = ()
) -> Start:
    """The checkpoint to resume from, loaded and checked against ``cfg``, and what ``overwrite=true``
    will replace (refused when one of ``inputs``, the run's model and data files, is inside it).
    Changes nothing but setting damaged checkpoints aside."""
    path = _checkpoint_to_resume(cfg, launch, device, say)
    if path is None:
        # (--resume without a checkpoint: the run never saved one; its log is rewritten from step 0)
        replace = _earlier_run(cfg) if cfg.resume is None else []
        _check_inputs_kept(cfg, replace, inputs)
        return Start(None, replace)
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise TrainInputError(f"cannot resume: {e}") from None
    step = int(ckpt["state"]["step"])
    changes = resume_changes(ckpt["state"]["config"], cfg, path, step)
    replace = _newer_checkpoints(cfg, path, step)
    _check_inputs_kept(cfg, replace, inputs)
    return Start(Resume(path, ckpt, changes), replace, "the newer checkpoints")


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


def check_data(saved: dict[str, Any] | None, now: dict[str, Any], cfg: TrainConfig, path: Path) -> bool:
    """Whether the training data's content changed since the checkpoint ``path`` (``saved``: its data
    identity, None for a checkpoint that predates it); a change is refused unless ``allow_data_change``."""
    if not saved or saved.get("fingerprint") == now["fingerprint"]:
        return False
    if not cfg.allow_data_change:
        raise TrainInputError(
            f"cannot resume from {path}: the training data changed since it was saved ({saved.get('source')}: "
            f"{saved.get('records')} records, fingerprint {str(saved.get('fingerprint'))[:12]}; now "
            f"{now['source']}: {now['records']} records, fingerprint {now['fingerprint'][:12]}). Resume with "
            "the data the run was trained on, or add allow_data_change=true to continue on this data"
        )
    return True


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


def check_resume_path(resume: str) -> Path:
    """``--resume=PATH`` must exist and may be a checkpoint: a PATH that is none says what it is and
    where the run's checkpoints are (``TrainInputError``). Not verified here."""
    path = Path(resume).expanduser()
    if not path.exists():
        raise TrainInputError(f"resume checkpoint {resume!r} does not exist")
    what = _not_a_checkpoint(path)
    if what:
        raise TrainInputError(f"cannot resume from {resume!r}: {what}")
    return path


def _given_checkpoint(resume: str) -> Path:
    """``--resume=PATH``: the checkpoint, verified; a damaged one names the newest intact one beside it,
    and a PATH that is no checkpoint says what it is and where the run's checkpoints are."""
    path = check_resume_path(resume)
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


def _not_a_checkpoint(path: Path) -> str | None:
    """What ``path`` is when it is not a checkpoint directory (``step-N`` under ``checkpoints/``), with
    where the run's checkpoints are; None when it may be one."""

    def newest(run: Path) -> str:
        found = find_resumable(run, set_aside=False)[0]
        if found is not None:
            return f"its newest intact checkpoint is {found}"
        return f"it has no intact checkpoint in {run / CHECKPOINT_DIR}"

    continue_run = "continue that run with --resume out_dir={}, or give one of its checkpoints as --resume=PATH"
    if not path.is_dir():
        return "it is a file; a checkpoint is a directory checkpoints/step-N of a run directory"
    if is_run_dir(path) and not (path / "COMPLETE").exists():
        return f"it is a run directory, not a checkpoint; {newest(path)}. " + continue_run.format(path)
    if path.name == CHECKPOINT_DIR and is_run_dir(path.parent):
        return (
            f"it is the checkpoints directory of the run {path.parent}; {newest(path.parent)}. "
            + continue_run.format(path.parent)
        )
    if path.name == FINAL_DIR and (path / "config.json").is_file():
        run = path.parent
        hint = f"; {newest(run)}. " + continue_run.format(run) if is_run_dir(run) else ""
        return "it is a final model, not a checkpoint (train from it with model=PATH)" + hint
    if (path / "config.json").is_file():
        return "it is a model directory, not a checkpoint (train from it with model=PATH)"
    if not any((path / n).exists() for n in ("COMPLETE", "MANIFEST.json", "state.pt", MODEL_FILE)):
        return "it holds no checkpoint files; a checkpoint is a directory checkpoints/step-N of a run directory"
    return None


def _newer_checkpoints(cfg: TrainConfig, path: Path, step: int) -> list[Path]:
    """Resuming from an older checkpoint into a run dir that holds newer ones would mix two runs:
    refused unless ``overwrite=true``, which replaces the newer ones (returned)."""
    run_dir = cfg.run_dir
    newer = [d for s, d in list_checkpoints(run_dir) if s > step and (d / "COMPLETE").is_file()]
    if newer and not cfg.overwrite:
        names = ", ".join(str(d) for d in newer)
        raise TrainInputError(
            f"cannot resume from {path} (step {step}) in {run_dir}: it holds newer checkpoints ({names}), "
            "which the run would mix with this one. Resume into another out_dir, or add overwrite=true "
            "to replace the newer checkpoints (set aside until this run is complete, then deleted)"
        )
    return newer


def _earlier_run(cfg: TrainConfig) -> list[Path]:
    """A new run needs an out_dir without an earlier run in it, or ``overwrite=true``: the earlier run's
    outputs it will replace (nothing else in out_dir is touched)."""
    run_dir = cfg.run_dir
    found = run_outputs(run_dir)
    if found and not cfg.overwrite:
        raise TrainInputError(
            f"out_dir {str(run_dir)!r} holds an earlier run ({', '.join(found)}); continue it with "
            "--resume, start over with overwrite=true (replaces it), or choose another out_dir"
        )
    # (earlier runs already set aside stay where they are until this run is complete; in checkpoints/
    # only what is named like a checkpoint is the run's)
    replace = []
    for n in found:
        if n == CHECKPOINT_DIR and (run_dir / n).is_dir():
            replace += checkpoint_entries(run_dir)
        elif not n.startswith(REPLACED_PREFIX):
            replace.append(run_dir / n)
    return replace


def _check_inputs_kept(cfg: TrainConfig, replace: list[Path], inputs: tuple[Path, ...]) -> None:
    """A run never replaces its own model or data: refused when one is inside what it would replace."""
    for given in inputs:
        where = given.expanduser().resolve()
        for target in replace:
            if where == target.resolve() or target.resolve() in where.parents:
                raise TrainInputError(
                    f"overwrite=true would replace {target}, which holds this run's input {given}; copy it "
                    f"out of {cfg.run_dir} first, or choose another out_dir (nothing was changed)"
                )


def set_aside(run_dir: Path, start: Start, launch: Launch, say: Say) -> Path | None:
    """Move ``replace`` (paths in ``run_dir``) into a new ``run_dir/replaced-run-N/`` (same relative
    paths; renames, so nothing is copied or lost), on rank 0; returns that directory."""
    replace = start.replace
    if not replace:
        return None
    aside = None
    launch.barrier()  # invariant: every rank has built and restored the run before anything moves
    if launch.is_main:
        n = 1
        while (run_dir / f"{REPLACED_PREFIX}{n}").exists():
            n += 1
        aside = run_dir / f"{REPLACED_PREFIX}{n}"
        for target in replace:
            dest = aside / target.relative_to(run_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(target, dest)
        names = ", ".join(str(t.relative_to(run_dir)) for t in replace)
        say(
            f"overwrite=true: set {start.what} {names} aside in {aside}; deleted once this run is complete"
        )
    launch.barrier()  # invariant: no rank writes into out_dir while rank 0 moves the earlier run
    return aside


def delete_replaced(run_dir: Path, say: Say) -> None:
    """The run is complete (its final model written): delete what ``overwrite=true`` set aside."""
    for d in sorted(run_dir.glob(f"{REPLACED_PREFIX}*")):
        if d.is_dir() and d.name[len(REPLACED_PREFIX) :].isdigit():
            shutil.rmtree(d, ignore_errors=True)
            say(f"overwrite=true: this run is complete; deleted what was set aside in {d}")
