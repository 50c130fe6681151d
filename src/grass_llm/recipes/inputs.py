"""The input checks of ``grass-llm train`` that need no model or tokenizer: the data file, the model
name, ``out_dir``, the device, the CPU threads and the process layout. Bad input raises
``TrainInputError`` (exit code 2) before anything is loaded or trained."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from grass_llm.data import DataError, resolve_data_path
from grass_llm.models import looks_like_path
from grass_llm.recipes.errors import TrainInputError
from grass_llm.recipes.launch import Launch, resolve_strategy
from grass_llm.recipes.train_config import TrainConfig

__all__ = [
    "BUILTIN_MODELS",
    "check_inputs",
    "check_launch",
    "check_out_dir",
    "remove_created",
    "resolve_device",
    "threads",
]

BUILTIN_MODELS = ("builtin:tiny-pretrained", "builtin:tiny")


def check_inputs(cfg: TrainConfig) -> tuple[Path | None, list[Path]]:
    """File-system checks; returns the resolved data file (None: the built-in data) and the directories
    created for ``out_dir`` (outermost first; :func:`remove_created` takes them away again when the
    run ends without writing anything into them)."""
    data_file: Path | None = None
    if cfg.data.startswith("builtin:"):
        if cfg.data != "builtin:arith":
            raise TrainInputError(
                f"data={cfg.data!r} is unknown; allowed: builtin:arith or a JSON/JSONL file"
            )
    else:
        try:
            data_file = resolve_data_path(cfg.data, cfg.data_dir)
        except DataError as e:
            raise TrainInputError(f"data: {e}") from None
        if not data_file.is_file():
            raise TrainInputError(f"data: {data_file} is not a file")
    if cfg.model.startswith("builtin:"):
        if cfg.model not in BUILTIN_MODELS:
            raise TrainInputError(
                f"model={cfg.model!r} is unknown; allowed: {', '.join(BUILTIN_MODELS)}, a hub name or a path"
            )
    elif looks_like_path(cfg.model) and not Path(cfg.model).expanduser().exists():
        raise TrainInputError(f"model path {cfg.model!r} does not exist")
    return data_file, check_out_dir(cfg.run_dir)


def _in_the_way(run_dir: Path) -> str | None:
    """Why ``run_dir`` cannot be a directory: a dangling symbolic link or a file on its path (None: no
    such reason)."""
    for p in [*reversed(run_dir.parents), run_dir]:
        if p.is_symlink() and not p.exists():
            where = f"out_dir {str(run_dir)!r}" if p == run_dir else f"{str(p)!r} (in out_dir {str(run_dir)!r})"
            return (
                f"{where} is a symbolic link to {os.readlink(p)!r}, which does not exist; allowed: a "
                "directory (created if missing), or a link to one"
            )
        if p == run_dir and p.exists() and not p.is_dir():
            return f"out_dir {str(run_dir)!r} is a file; allowed: a directory (created if missing)"
    return None


def check_out_dir(run_dir: Path) -> list[Path]:
    """``out_dir`` must be a directory this process can write (created if missing); returns the
    directories this created, outermost first."""
    reason = _in_the_way(run_dir)
    if reason:
        raise TrainInputError(reason)
    created = [p for p in [*reversed(run_dir.parents), run_dir] if not p.exists() and not p.is_symlink()]
    probe = run_dir / f".grass-llm-write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except Exception as e:  # (OSError; a file system's own error)
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        remove_created(created)
        if isinstance(e, OSError):
            why = (e.strerror or str(e)) + (f" ({e.filename})" if e.filename and str(e.filename) != str(run_dir) else "")
        else:
            why = f"{type(e).__name__}: {e}"
        raise TrainInputError(f"out_dir {str(run_dir)!r} is not writable: {why}") from None
    return created


def remove_created(created: list[Path]) -> None:
    """Remove the directories :func:`check_out_dir` created, innermost first, as long as they are empty:
    a refused run leaves no empty ``out_dir`` behind."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            return


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainInputError(f"device={cfg.device!r} but no CUDA device is available; allowed: cpu, auto")
    return torch.device(cfg.device)


def threads(cfg: TrainConfig, device: torch.device) -> int | None:
    """Torch's CPU threads for this run: ``threads``, else $OMP_NUM_THREADS, else 1 on CPU (None: leave
    torch's default)."""
    if cfg.threads is not None:
        return cfg.threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return 1 if device.type == "cpu" else None


def check_launch(cfg: TrainConfig, launch: Launch) -> str:
    """The strategy (``single``, ``replicated`` or ``fsdp2``) for these processes; ``TrainInputError``
    when the settings do not fit them."""
    if cfg.batch_size % launch.world_size:
        raise TrainInputError(
            f"batch_size={cfg.batch_size} is the micro-batch over all {launch.world_size} processes and "
            f"must be divisible by their number; allowed: a multiple of {launch.world_size}"
        )
    try:
        strategy = resolve_strategy(cfg.distributed.strategy, launch)
    except ValueError as e:
        raise TrainInputError(str(e)) from None
    if strategy == "fsdp2" and cfg.distributed.shard_optimizer_states:
        raise TrainInputError(
            "distributed.shard_optimizer_states=true is for distributed.strategy=replicated; under fsdp2 "
            "(here from accelerate's FSDP2 config) the optimizer states are sharded like the weights already"
        )
    return strategy
