"""Per-step run log: one JSON object per optimizer step in ``RUN_DIR/log.jsonl``.

The training loop writes it with ``RunLogger``; ``grass-llm plot`` reads it back with ``read_log``.

Record schema (one line per optimizer step, in step order)::

    {
      "step": int,               # global optimizer step just taken, 1-based (the first step logs 1)
      "phase": "probe"|"train",  # probing (MGN measured on every layer, no weight changes) or training
      "loss": float,             # training loss of the step (mean over its micro-batches); NaN allowed
      "lr": float,               # learning rate applied to the decoder layers in the step
      "active_layers": [int],    # decoder layers whose weights the step updated (0-based, ascending)
      "importance": [float],     # current MGN per decoder layer (length = number of decoder layers)
      "probabilities": [float],  # current sampling probability per decoder layer (sums to 1)
      "tokens": int,             # tokens processed in this step (all micro-batches, all ranks)
      "tokens_per_s": float,     # throughput of this step
      "memory_bytes": int|null,  # peak device memory allocated in the step; null on CPU
      "time": float              # wall clock (``time.time()``) when the record was written
    }

Only ``step`` (a non-negative int) and ``phase`` are required; every other key is optional, and keys
not listed above are allowed and kept as they are. ``RunLogger.log`` fills in ``time`` when it is
missing and turns tensors and numpy scalars into plain JSON numbers and lists. Non-finite floats are
written as ``NaN``/``Infinity`` (Python's ``json`` reads them back).

Resuming: ``RunLogger(run_dir, resume_from=step)`` (or ``truncate_after(step)`` on an open logger)
drops every record with ``step > step`` before appending, so a run resumed from the checkpoint taken
after ``step`` steps has no duplicate or stale lines. A final line cut short by a crash (no trailing
newline) is repaired the same way. A damaged line elsewhere (a flipped byte, an edit) is dropped with a
warning when the log is rewritten, and the file as it was is kept beside it as ``log.jsonl.damaged``
(nothing is lost).

Writing fails with :class:`RunLogWriteError` (an ``OSError``) naming the file: a full disk, or the log
deleted while the run writes it (its ``out_dir`` removed); the TensorBoard mirror's failures too. With ``tensorboard=True`` the scalars are mirrored to a
``torch.utils.tensorboard.SummaryWriter`` in ``RUN_DIR/tensorboard``, opened with
``purge_step=step + 1`` on resume so TensorBoard drops the stale events too.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from grass_llm.run_layout import LOG_FILENAME, TENSORBOARD_DIR

__all__ = ["LOG_FILENAME", "PHASES", "RunLogError", "RunLogWriteError", "RunLogger", "read_log"]

PHASES = ("probe", "train")
# per-decoder-layer lists mirrored to TensorBoard as one scalar series per layer
_PER_LAYER_KEYS = ("importance", "probabilities")
_NOT_MIRRORED = ("step", "time")


class RunLogError(ValueError):
    """A run log that cannot be read: a malformed line, or a record without step/phase."""


class RunLogWriteError(OSError):
    """The run log (or its TensorBoard mirror) cannot be written; the message names the file and why."""


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}"


def _to_json(value: Any) -> Any:
    """Plain JSON value for tensors, numpy arrays/scalars, tuples and nested containers."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if hasattr(value, "tolist"):  # torch.Tensor, numpy array or numpy scalar
        return _to_json(value.tolist())
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    raise TypeError(f"cannot write a value of type {type(value).__name__} to the run log: {value!r}")


def _check_record(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise RunLogError(f"{where}: expected a JSON object, got {type(record).__name__}")
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise RunLogError(f"{where}: 'step' must be a non-negative integer, got {step!r}")
    if record.get("phase") not in PHASES:
        raise RunLogError(f"{where}: 'phase' must be one of {PHASES}, got {record.get('phase')!r}")


def _write_beside(path: Path, write: Any, binary: bool = False) -> None:
    """Write ``path`` through ``path.tmp`` (fsync'd, then renamed): what was at ``path`` is replaced only
    by a complete file, and a failed write leaves no ``.tmp`` behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _log_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / LOG_FILENAME


def read_log(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of ``RUN_DIR/log.jsonl`` in file order (an empty list for an empty file).

    Blank lines are skipped. An unterminated final line that does not parse (a record being written
    by a live run, or cut short by a crash) is skipped with a warning; any other malformed line raises
    ``RunLogError`` naming the file and the 1-based line number. A missing file raises
    ``FileNotFoundError`` naming it.
    """
    path = _log_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no run log at {path} (is {Path(run_dir)} a grass-llm run directory?)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise RunLogError(f"{path}: bad line {line}: not UTF-8 text (byte {exc.start})") from None
    lines = text.split("\n")  # the last element is "" when the file ends with a newline
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # unterminated final line
                warnings.warn(
                    f"{path}: skipping incomplete final line {number}", RuntimeWarning, stacklevel=2
                )
                break
            raise RunLogError(f"{path}: bad line {number}: {exc.msg} (column {exc.colno})") from None
        _check_record(record, f"{path}: bad line {number}")
        records.append(record)
    return records


class RunLogger:
    """Appends one JSON record per optimizer step to ``RUN_DIR/log.jsonl`` (schema: module docstring).

    The file is opened for append, line-buffered, and flushed after every record, so a crash loses at
    most the record being written and a reader (``grass-llm plot``) sees every finished step.

    Args:
        run_dir: the run directory; created if missing.
        tensorboard: also mirror the scalars to TensorBoard in ``RUN_DIR/tensorboard`` (needs the
            ``tensorboard`` package; imported only when this is true).
        resume_from: the step of the checkpoint being resumed; records after it are dropped first.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        tensorboard: bool = False,
        resume_from: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = _log_path(self.run_dir)
        self.tensorboard = tensorboard
        self._file: Any = None
        self._tb: Any = None
        if resume_from is not None:
            self._rewrite(keep_through=resume_from)
        else:
            self._repair_tail()
        self._open(purge_step=None if resume_from is None else resume_from + 1)

    # -- writing -------------------------------------------------------------------------------
    def log(self, record: Mapping[str, Any] | None = None, /, **fields: Any) -> dict[str, Any]:
        """Write one record (``record`` updated with ``fields``) and return it as written."""
        if self._file is None:
            raise RuntimeError(f"RunLogger for {self.path} is closed")
        out = _to_json({**(record or {}), **fields})
        _check_record(out, "RunLogger.log")
        out.setdefault("time", time.time())
        try:
            self._file.write(json.dumps(out, separators=(",", ":")) + "\n")
            self._file.flush()
            deleted = os.fstat(self._file.fileno()).st_nlink == 0
        except Exception as e:  # (OSError: a full disk; anything a file system raises)
            raise RunLogWriteError(f"cannot write the run log {self.path}: {_reason(e)}") from None
        if deleted:
            raise RunLogWriteError(f"the run log {self.path} was deleted while the run wrote it (out_dir removed?)")
        if self._tb is not None:
            try:
                self._mirror(out)
            except Exception as e:  # (tensorboard's writer: OSError, or its own errors from its thread)
                raise RunLogWriteError(
                    f"cannot write the TensorBoard events in {self.run_dir / TENSORBOARD_DIR}: {_reason(e)}"
                ) from None
        return out

    def _mirror(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for key, value in record.items():
            if key in _NOT_MIRRORED or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
            elif key in _PER_LAYER_KEYS and isinstance(value, list):
                for layer, v in enumerate(value):
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        self._tb.add_scalar(f"{key}/layer_{layer:02d}", v, step)
        if isinstance(record.get("active_layers"), list):
            self._tb.add_scalar("num_active_layers", len(record["active_layers"]), step)
        self._tb.flush()

    # -- resume --------------------------------------------------------------------------------
    def truncate_after(self, step: int) -> int:
        """Drop every record with ``step > step`` and keep appending; returns how many were dropped."""
        self._close_handles()
        dropped = self._rewrite(keep_through=step)
        self._open(purge_step=step + 1)
        return dropped

    def _rewrite(self, keep_through: int | None) -> int:
        """Atomically rewrite the log without records after ``keep_through`` (None: keep all) or a
        torn final line; returns how many lines were dropped."""
        if not self.path.exists():
            return 0
        kept: list[str] = []
        dropped = 0
        damaged: list[str] = []
        for record, line, problem in self._scan():
            if problem:
                damaged.append(problem)
            if record is None or (keep_through is not None and record["step"] > keep_through):
                dropped += 1
            else:
                kept.append(line)
        if damaged:  # keep the file as it was before dropping anything of it
            copy = self.path.with_name(self.path.name + ".damaged")
            original = self.path.read_bytes()
            _write_beside(copy, lambda f: f.write(original), binary=True)
            warnings.warn(
                f"{self.path}: {'; '.join(damaged[:3])}{' ...' if len(damaged) > 3 else ''}: dropped "
                f"{'it' if len(damaged) == 1 else f'{len(damaged)} such lines'}; the log as it was is kept in {copy}",
                RuntimeWarning,
                stacklevel=3,
            )
        _write_beside(self.path, lambda f: f.writelines(line + "\n" for line in kept))
        return dropped

    def _repair_tail(self) -> None:
        """Make the file end with a newline so that appending does not glue two records together."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
        if self._rewrite(keep_through=None):
            warnings.warn(f"{self.path}: dropped an incomplete final line", RuntimeWarning, stacklevel=3)

    def _scan(self) -> list[tuple[dict[str, Any] | None, str, str | None]]:
        """(record, line, problem) of each line of the current file; record is None for a torn final
        line (problem None: an interrupted write) or a damaged line (problem says what is wrong)."""
        lines = self.path.read_text(encoding="utf-8", errors="replace").split("\n")
        out: list[tuple[dict[str, Any] | None, str, str | None]] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                _check_record(record, f"line {number}")
            except (json.JSONDecodeError, RunLogError) as exc:
                if number == len(lines):  # no trailing newline: the write was cut short
                    out.append((None, line, None))
                    continue
                why = f"{exc.msg} (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else str(exc)
                out.append((None, line, f"line {number} is not a valid record: {why.removeprefix(f'line {number}: ')}"))
                continue
            out.append((record, line, None))
        return out

    # -- file handles --------------------------------------------------------------------------
    def _open(self, purge_step: int | None) -> None:
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed in close())
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # pragma: no cover - tensorboard is in the [hf] extra
                self._file.close()
                self._file = None
                raise ImportError(
                    "RunLogger(tensorboard=True) needs the tensorboard package: pip install tensorboard"
                ) from exc
            self._tb = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=purge_step)

    def _close_handles(self) -> None:
        # (every record was flushed when written: a failure to close loses nothing, and must not hide
        # the error that ends a run)
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        if self._tb is not None:
            with contextlib.suppress(Exception):
                self._tb.close()
            self._tb = None

    def close(self) -> None:
        """Flush and close the log (and the TensorBoard writer). Safe to call twice."""
        self._close_handles()

    @property
    def closed(self) -> bool:
        return self._file is None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunLogger({str(self.run_dir)!r}, tensorboard={self.tensorboard})"
