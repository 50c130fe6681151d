"""Run checkpoints of ``grass-llm train``: atomic save, find the latest, load, resume checks.

A checkpoint is a directory ``RUN/checkpoints/step-NNNNNN/`` with ``model.pt`` (the weights, or the
adapters), ``optimizer.pt``, ``state.pt`` (step, scheduler, data position, RNG states, config),
``config.yaml`` and a ``COMPLETE`` marker written last. (Activation checkpointing, the other meaning
of the word, is ``grass_llm.activation_checkpointing``.)
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_DIR",
    "CheckpointError",
    "find_latest_checkpoint",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_DIR = "checkpoints"
STEP_PREFIX = "step-"
_TMP_SUFFIX = ".tmp"
_COMPLETE = "COMPLETE"
FILES = ("model", "optimizer", "state")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or unreadable; the message names the path."""


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"{STEP_PREFIX}{step:06d}"


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``run_dir/checkpoints``, or None."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for d in root.iterdir():
        if not d.name.startswith(STEP_PREFIX) or d.name.endswith(_TMP_SUFFIX):
            continue
        if not (d / _COMPLETE).is_file():
            continue
        try:
            step = int(d.name[len(STEP_PREFIX) :])
        except ValueError:
            continue
        if best is None or step > best[0]:
            best = (step, d)
    return None if best is None else best[1]


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, step: int, payload: dict[str, Any], config_yaml: str) -> Path:
    """Write ``checkpoints/step-N`` atomically: a temp dir, fsync'd, then ``os.replace``.

    ``payload`` maps ``model`` / ``optimizer`` / ``state`` to what is saved in their files.
    Invariant: a directory named ``step-N`` (without ``.tmp``) holding ``COMPLETE`` is complete. The
    previous checkpoint is deleted only after the new one has been renamed into place, so a crash at
    any moment leaves at least one complete checkpoint.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(run_dir, step)
    tmp = root / (final.name + _TMP_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name in FILES:
        _write(tmp / f"{name}.pt", lambda f, name=name: torch.save(payload[name], f))
    _write(tmp / "config.yaml", lambda f: f.write(config_yaml.encode()))
    _write(tmp / _COMPLETE, lambda f: f.write(f"{step}\n".encode()))
    _fsync_dir(tmp)
    if final.exists():  # same step saved twice (end of run right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in root.iterdir():
        if old != final and old.name.startswith(STEP_PREFIX):
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    """``{"model", "optimizer", "state"}`` of a complete checkpoint (CPU tensors, weights_only)."""
    if not (path / _COMPLETE).is_file():
        raise CheckpointError(f"{path} is not a complete grass-llm checkpoint (no {_COMPLETE} marker)")
    out = {}
    for name in FILES:
        try:
            out[name] = torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint file {path / (name + '.pt')}: {e}") from None
    return out


def rng_state(device: torch.device) -> dict[str, Any]:
    """Python's and torch's RNG states (and the CUDA device's)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
