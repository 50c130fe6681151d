"""Run checkpoints of ``grass-llm train``: atomic save with a checksum manifest, verified load, the
search for the newest intact checkpoint, and rotation that deletes only what it can account for.

A checkpoint is a directory ``RUN/checkpoints/step-NNNNNN/`` holding

* ``model.safetensors``: the weights (or, for adapter methods, the trainable adapter weights);
* ``optimizer.pt``, ``state.pt``: the optimizer state, and the step / scheduler / data position /
  RNG states / config (nested Python data with tensors, ``torch.save``, loadable with
  ``weights_only=True``);
* ``config.yaml``: the settings, for people;
* or, for a run sharded with FSDP2, ``sharded/`` (every rank's shards of the weights and optimizer
  states, ``torch.distributed.checkpoint``, loadable on any number of processes) and ``state.pt``;
* ``MANIFEST.json``: the SHA-256 and size of every file above;
* ``COMPLETE``: the marker, written last.

Invariants (what a crash, a kill or a flipped byte can and cannot do):

* a directory named ``step-N`` (no suffix) is renamed into place only after every file, the manifest
  and the marker are written and fsync'd in ``step-N.tmp``; so a ``step-N`` without ``COMPLETE`` was
  not written by an interrupted save (it was damaged or copied partially) and is never used;
* a checkpoint is used only if every file matches the manifest (:func:`verify_checkpoint`);
* rotation after a save deletes only complete checkpoints of a LOWER step and ``.tmp`` leftovers of
  interrupted saves: a checkpoint that does not verify, an incomplete one, a newer one, or anything
  that is not named like a checkpoint is left alone; :func:`find_resumable` moves damaged ones aside
  (``step-N.corrupt`` / ``step-N.incomplete``) instead of deleting them.

(Activation checkpointing, the other meaning of the word, is ``grass_llm.activation_checkpointing``.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grass_llm._text import one_line
from grass_llm.distributed.sharded_checkpoint import OPTIMIZER_FILE as SHARDED_OPTIMIZER_FILE
from grass_llm.run_layout import CHECKPOINT_DIR

__all__ = [
    "CHECKPOINT_DIR",
    "SHARDED_DIR",
    "CheckpointError",
    "CheckpointIssue",
    "CheckpointWriteError",
    "begin_checkpoint",
    "checkpoint_entries",
    "checkpoint_path",
    "describe_error",
    "file_digests",
    "file_mode",
    "find_latest_checkpoint",
    "find_resumable",
    "finish_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_checkpoint_config",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "verify_checkpoint",
]

STEP_PREFIX = "step-"
FORMAT = 2
_TMP_SUFFIX = ".tmp"
_COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
MODEL_FILE = "model.safetensors"
TORCH_FILES = ("optimizer", "state")
#: a sharded checkpoint's model + optimizer (torch.distributed.checkpoint, every rank's shards)
SHARDED_DIR = "sharded"
_NAME = re.compile(rf"^{STEP_PREFIX}(\d+)$")  # a checkpoint
_TMP = re.compile(rf"^{STEP_PREFIX}(\d+)\.tmp$")  # an interrupted save
_ANY = re.compile(rf"^{STEP_PREFIX}\d+(\..+)?$")  # either, or one set aside (.corrupt, .incomplete...)


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, damaged or unreadable; the message names the path and why."""


@dataclass(frozen=True)
class CheckpointIssue:
    """A checkpoint that was passed over: where it is now and why."""

    path: Path
    step: int
    reason: str
    moved_to: Path | None = None


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"{STEP_PREFIX}{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Every ``step-N`` directory (complete or not, intact or not) under ``run_dir/checkpoints``, newest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _NAME.match(d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    return sorted(found, reverse=True)


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step that has its ``COMPLETE`` marker, or None (not verified:
    see :func:`find_resumable`)."""
    for _, d in list_checkpoints(run_dir):
        if (d / _COMPLETE).is_file():
            return d
    return None


# ------------------------------------------------------------------------------------------------
# writing
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, an unwritable directory, a writer's own error such
    as ``torch.save``'s ``RuntimeError`` or safetensors' ``SafetensorError``); the message names the file.
    What the failed save had written is removed; every earlier checkpoint is as it was."""


def describe_error(e: BaseException, path: str | os.PathLike[str] | None = None) -> str:
    """What went wrong, in a few words: an OSError's text and file (``No space left on device
    (RUN/final.tmp/config.json)``; the file left out when it is ``path``), else the exception's type
    and message on one line."""
    if isinstance(e, OSError) and e.strerror:
        name = os.fsdecode(e.filename) if e.filename else None
        return e.strerror + (f" ({name})" if name and name != os.fspath(path or "") else "")
    text = one_line(e, limit=None, empty="")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def file_mode() -> int:
    """The mode a new file gets from this process's umask (0644 under the usual 022): writers that
    create their files 0600 (safetensors) are brought in line with the rest."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


class _Recording:
    """A file whose ``write`` remembers the ``OSError`` it raised: ``torch.save``'s writer turns that
    error (a full disk) into a ``RuntimeError`` about stream positions, which names no cause."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _write(path: Path, write) -> None:
    """Write ``path`` with ``write(file)``, fsync'd; any failure is a ``CheckpointWriteError`` naming it
    and its cause."""
    f = None
    try:
        with open(path, "wb") as raw:
            f = _Recording(raw)
            write(f)
            raw.flush()
            os.fsync(raw.fileno())
    except Exception as e:
        cause = f.error if f is not None and f.error is not None else e
        raise CheckpointWriteError(f"cannot write {path}: {describe_error(cause, path)}") from e


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
        os.chmod(path, file_mode())  # (save_file creates it 0600)
        with open(path, "rb") as f:  # save_file does not fsync
            os.fsync(f.fileno())
    except Exception as e:
        raise CheckpointWriteError(f"cannot write {path}: {describe_error(e, path)}") from e


def begin_checkpoint(run_dir: Path, step: int, create: bool = True) -> Path:
    """The empty temporary directory ``checkpoints/step-N.tmp`` a save writes into (created by one
    process, ``create``; the others only take its path)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    tmp = root / (checkpoint_path(run_dir, step).name + _TMP_SUFFIX)
    if not create:
        return tmp
    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():  # an earlier save of this step was interrupted
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def file_digests(root: Path, pattern: str = "**/*") -> dict[str, dict[str, Any]]:
    """``{path relative to root: {"sha256", "bytes"}}`` of the files under ``root`` matching ``pattern``
    (what a rank computes for the shards it wrote, to hand to :func:`finish_checkpoint`)."""
    return {
        str(f.relative_to(root)): {"sha256": _sha256(f), "bytes": f.stat().st_size}
        for f in sorted(root.glob(pattern))
        if f.is_file()
    }


def finish_checkpoint(
    run_dir: Path,
    step: int,
    tmp: Path,
    payload: dict[str, Any],
    config_yaml: str,
    known: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write the rest of ``payload`` into ``tmp``, the manifest of every file in it, the marker, then
    rename it to ``step-N`` and rotate. ``known``: digests of files other ranks wrote into ``tmp`` and
    hashed themselves (:func:`file_digests`); they are listed whether or not this process sees them yet."""
    root = Path(run_dir) / CHECKPOINT_DIR
    final = checkpoint_path(run_dir, step)
    try:
        _write_files(tmp, step, payload, config_yaml, known or {})
        _put_in_place(root, tmp, final)
    except BaseException as e:
        # a failed (or interrupted) save leaves nothing behind that could fill the disk further; what
        # was in place before is untouched (the rename is the last step)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, CheckpointWriteError):
            raise CheckpointWriteError(f"cannot write the checkpoint {final}: {describe_error(e)}") from e
        raise
    _fsync_dir(root)
    _rotate(root, step)
    return final


def _write_files(tmp: Path, step: int, payload: dict[str, Any], config_yaml: str, known: dict[str, Any]) -> None:
    """Every file of a checkpoint into ``tmp``, the manifest, then the marker; all fsync'd."""
    if "model" in payload:
        _save_safetensors(payload["model"], tmp / MODEL_FILE)
    for name in TORCH_FILES:
        if name in payload:
            _write(tmp / f"{name}.pt", lambda f, name=name: torch.save(payload[name], f))
    _write(tmp / "config.yaml", lambda f: f.write(config_yaml.encode()))
    files = sorted({str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file()} - set(known))
    entries = {n: {"sha256": _sha256(tmp / n), "bytes": (tmp / n).stat().st_size} for n in files}
    manifest = {"format": FORMAT, "step": step, "files": dict(sorted({**entries, **known}.items()))}
    _write(tmp / MANIFEST, lambda f: f.write((json.dumps(manifest, indent=1) + "\n").encode()))
    _write(tmp / _COMPLETE, lambda f: f.write(f"{step}\n".encode()))
    for f in tmp.rglob("*"):  # (the files other ranks wrote, too)
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for d in {tmp, *(f.parent for f in tmp.rglob("*") if f.is_file())}:
        _fsync_dir(d)


def _put_in_place(root: Path, tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final``; a checkpoint of the same step already there (resumed
    from a copy of it) is replaced only once the new one is in place."""
    if final.exists():
        old = root / (final.name + ".replaced" + _TMP_SUFFIX)
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)  # (put the earlier one back)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_checkpoint(run_dir: Path, step: int, payload: dict[str, Any], config_yaml: str) -> Path:
    """Write ``checkpoints/step-N`` atomically (a temp dir, fsync'd, then ``os.replace``), then rotate.

    ``payload`` maps ``model`` (name -> CPU tensor, saved as safetensors), ``optimizer`` and ``state``
    (saved with ``torch.save``). The previous checkpoints are deleted only after the new one is in
    place, and only those this function can account for (module docstring), so a crash at any moment
    leaves every complete checkpoint that was there, or the new one. (A sharded checkpoint: every rank
    writes its shards into :func:`begin_checkpoint`'s directory, then rank 0 :func:`finish_checkpoint`.)
    """
    return finish_checkpoint(run_dir, step, begin_checkpoint(run_dir, step), payload, config_yaml)


def _rotate(root: Path, step: int) -> None:
    """Delete complete checkpoints older than ``step`` and leftovers of interrupted saves; nothing else."""
    for d in root.iterdir():
        m = _NAME.match(d.name)
        superseded = m is not None and int(m.group(1)) < step and (d / _COMPLETE).is_file()
        leftover = _TMP.match(d.name) is not None or d.name.endswith(".replaced" + _TMP_SUFFIX)
        if superseded or leftover:
            shutil.rmtree(d, ignore_errors=True)


def checkpoint_entries(run_dir: str | Path) -> list[Path]:
    """Every entry of ``run_dir/checkpoints`` named like a checkpoint (``step-N``, and ``step-N.<suffix>``:
    leftovers of saves, checkpoints set aside): what ``overwrite=true`` replaces there. Anything else in
    that directory is not the run's and is left alone."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if _ANY.match(d.name))


# ------------------------------------------------------------------------------------------------
# reading
# checkpoints verified by this process: path -> (name, size, mtime) of each file (hash each file once)
_VERIFIED: dict[str, tuple[tuple[str, int, int], ...]] = {}


def _fingerprint(path: Path, names: list[str]) -> tuple[tuple[str, int, int], ...]:
    out = []
    for n in [MANIFEST, *names]:
        st = (path / n).stat()
        out.append((n, st.st_size, st.st_mtime_ns))
    return tuple(out)


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The manifest of ``path`` after checking that the checkpoint is complete and every file matches
    its size and SHA-256. Raises ``CheckpointError`` saying what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    if not (path / _COMPLETE).is_file():
        raise CheckpointError(f"{path} is incomplete (no {_COMPLETE} marker)")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} has no {MANIFEST} (written by grass-llm < 0.2, or damaged); cannot verify it"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / MANIFEST} is unreadable: {e}") from None
    with contextlib.suppress(OSError):
        if _VERIFIED.get(str(path.resolve())) == _fingerprint(path, list(files)):
            return manifest
    for name, entry in files.items():
        f = path / name
        try:  # (a file can vanish meanwhile: another process rotating its checkpoints)
            if not f.is_file():
                raise CheckpointError(f"{path} is damaged: {name} is missing")
            size = f.stat().st_size
            if size != entry.get("bytes"):
                raise CheckpointError(
                    f"{path} is damaged: {name} has {size} bytes, the manifest says {entry.get('bytes')}"
                )
            if _sha256(f) != entry.get("sha256"):
                raise CheckpointError(f"{path} is damaged: {name} does not match its checksum")
        except OSError as e:
            raise CheckpointError(f"{path} is unreadable: {name}: {e.strerror or e}") from None
    sharded = f"{SHARDED_DIR}/.metadata" in files
    required = {"state.pt"} | (
        {f"{SHARDED_DIR}/{SHARDED_OPTIMIZER_FILE}"} if sharded else {MODEL_FILE, "optimizer.pt"}
    )
    missing = required - set(files)
    if missing:
        raise CheckpointError(f"{path} is damaged: the manifest lists no {sorted(missing)}")
    with contextlib.suppress(OSError):
        _VERIFIED[str(path.resolve())] = _fingerprint(path, list(files))
    return manifest


def load_checkpoint(path: Path, verify: bool = True) -> dict[str, Any]:
    """``{"model", "optimizer", "state"}`` of a checkpoint (CPU tensors; ``weights_only`` loading),
    verified against its manifest first unless ``verify=False``. A sharded checkpoint gives
    ``{"sharded": directory, "state"}``: load its model and optimizer with
    ``grass_llm.distributed.sharded_checkpoint.load_sharded_checkpoint`` (any number of processes)."""
    from safetensors.torch import load_file

    path = Path(path)
    if verify:
        verify_checkpoint(path)
    out: dict[str, Any] = {}
    if (path / SHARDED_DIR / ".metadata").is_file():
        out["sharded"] = path / SHARDED_DIR
        try:
            out["state"] = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint file {path / 'state.pt'}: {e}") from None
        return out
    try:
        out["model"] = load_file(str(path / MODEL_FILE))
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint file {path / MODEL_FILE}: {e}") from None
    for name in TORCH_FILES:
        try:
            out[name] = torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint file {path / (name + '.pt')}: {e}") from None
    return out


def read_checkpoint_config(path: Path) -> dict[str, Any]:
    """The settings a checkpoint was written with (``state.pt``'s ``config``; verified first)."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)["config"]
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint file {path / 'state.pt'}: {e}") from None


def find_resumable(run_dir: str | Path, set_aside: bool = True) -> tuple[Path | None, list[CheckpointIssue]]:
    """The newest checkpoint under ``run_dir/checkpoints`` that verifies, and the newer ones passed over.

    Each passed-over checkpoint (incomplete or damaged) is renamed ``step-N.incomplete`` /
    ``step-N.corrupt`` when ``set_aside`` (so that it is neither used, nor overwritten, nor deleted by
    rotation), never deleted. Returns ``(None, issues)`` when no checkpoint verifies.
    """
    issues: list[CheckpointIssue] = []
    for step, d in list_checkpoints(run_dir):
        try:
            verify_checkpoint(d)
            return d, issues
        except CheckpointError as e:
            moved = None
            if set_aside:
                kind = "incomplete" if not (d / _COMPLETE).is_file() else "corrupt"
                target = d.with_name(f"{d.name}.{kind}")
                n = 1
                while target.exists():
                    n += 1
                    target = d.with_name(f"{d.name}.{kind}{n}")
                try:
                    os.replace(d, target)
                    moved = target
                except OSError:
                    moved = None
            reason = str(e).removeprefix(f"{d} is ").removeprefix(f"{d}: ")
            issues.append(CheckpointIssue(d, step, reason, moved))
    return None, issues


# ------------------------------------------------------------------------------------------------
# RNG
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
