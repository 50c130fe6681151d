"""``grass-llm train``: fine-tune a causal LM with GRASS or a baseline (``grass_llm.recipes.methods``).

A recipe in the torchtune sense. :func:`train` reads a ``TrainConfig`` (YAML file + ``key=value``
overrides, see ``grass_llm.recipes.train_config``) and runs :class:`FinetuneRecipe`:

* ``setup()``: checks the input (config, data file, model path, ``out_dir``; bad input stops with
  exit code 2 before any training), finds the checkpoint to resume from, builds the model, the
  method's optimizer (``build_method``), the LR schedule (after GRASS probing) and the data, and
  restores the checkpoint;
* ``train_step()``: one optimizer step over ``grad_accum`` micro-batches (token-weighted loss over
  the whole step and all ranks); a step whose gradients are not finite is skipped and counted;
* ``log()``: one ``log.jsonl`` record per step (and TensorBoard), the progress bar;
* ``save_checkpoint()`` / ``save_final()``: atomic, checksummed checkpoints of finite weights only
  (``grass_llm.recipes.run_checkpoint``), the final model + tokenizer, the plots.

What the run guarantees (tests/test_faults.py drives each case through the CLI):

* it never writes into an ``out_dir`` that holds an earlier run unless told to: ``--resume``
  continues it, ``overwrite=true`` starts over (exit code 2 otherwise);
* ``--resume`` (anywhere on the command line; ``--resume=PATH`` for a given checkpoint) restores the
  weights, the optimizer (for GRASS: every layer's AdamW state, the MGN, the sampler and its RNG),
  the scheduler, the data position and the RNG states, so N steps + resume + N steps equals 2N steps
  bit for bit. It takes the settings from the checkpoint; settings given again that differ are
  applied if they can change safely (``RESUME_CHANGEABLE``: lr, max_steps, save_every, logging...)
  and recorded in the next checkpoint, any other difference is refused naming the field;
* a damaged (checksum mismatch) or incomplete checkpoint is never used and never deleted: it is set
  aside and the run resumes from the newest intact one, saying so;
* non-finite gradients: the step is skipped; ``max_nonfinite_steps`` in a row stop the run (exit code
  1) keeping the last checkpoint; non-finite weights are never saved;
* SIGINT / SIGTERM: the step in flight completes, a checkpoint is saved, the resume command is
  printed, exit code 130 / 143 (``grass_llm.recipes.interrupt``).

Run directory layout (``out_dir``, default ``runs/<method>``)::

    log.jsonl                  one record per optimizer step (grass_llm.runlog schema)
    tensorboard/               TensorBoard mirror of the log
    checkpoints/step-000120/   latest resumable checkpoint (model.safetensors, optimizer.pt, state.pt,
                               config.yaml, MANIFEST.json with their checksums, COMPLETE)
    final/                     final model + tokenizer (save_pretrained); LoRA: final/adapter too
    plots/                     PNG plots (grass_llm.plots)
    eval/                      where ``grass-llm eval --model RUN/final`` writes by default
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grass_llm.recipes.interrupt import Interrupted, StopSignals, signal_name
from grass_llm.recipes.train_config import (
    PER_INVOCATION,
    RESUME_CHANGEABLE,
    TrainConfig,
)

__all__ = [
    "DEMO_CONFIG",
    "FinetuneRecipe",
    "TrainFailed",
    "TrainInputError",
    "TrainResult",
    "train",
]

#: What ``grass-llm train`` runs without ``--config``: GRASS fine-tunes the tiny pretrained model
#: shipped with the package on the built-in arithmetic sample, on CPU, in well under a minute, and
#: prints its held-out accuracy before -> after. Same as ``configs/demo.yaml`` (tested).
DEMO_CONFIG: dict[str, Any] = {
    "model": "builtin:tiny-pretrained",
    "data": "builtin:arith",
    "method": "grass",
    "device": "cpu",
    "dtype": "fp32",
    "max_length": 96,
    "batch_size": 8,
    "grad_accum": 1,
    "lr": 5e-4,
    "warmup": 10,
    "schedule": "cosine",
    "max_steps": 200,
    "max_grad_norm": 1.0,
    "save_every": 50,
    "out_dir": "runs/demo",
    "eval_heldout": 64,
    "grass": {"active_layers": 2, "period": 10, "probe_steps": 20},
}

_STATE_VERSION = 2
# settings a resumed run must share with its checkpoint: every TrainConfig key but RESUME_CHANGEABLE
# (sections: only the method's own, grass or lora, is compared)
_SECTIONS = ("grass", "lora", "distributed")
# what overwrite=true deletes from an out_dir (the run's own outputs; nothing else is touched)
_RUN_OUTPUTS = ("log.jsonl", "tensorboard", "checkpoints", "final", "plots", "eval")
# exit codes
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class TrainInputError(ValueError):
    """Bad input found before training (data file, model path, out_dir, incompatible settings): exit code 2."""


class TrainFailed(RuntimeError):
    """The run stopped without finishing (divergence, non-finite weights, a write that failed): exit code 1.
    The message says why and what was kept."""


@dataclass
class TrainResult:
    """What a run produced."""

    run_dir: Path
    steps: int  # the global step reached
    total_steps: int
    final_loss: float | None
    checkpoint: Path | None
    final_dir: Path | None
    final_kind: str
    log_path: Path
    plots: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    start_step: int = 0  # the step this invocation started from (the checkpoint's, when resuming)
    skipped_steps: list[int] = field(
        default_factory=list
    )  # steps skipped (non-finite gradients) in this invocation
    heldout: tuple[float | None, float | None, int] | None = None  # (before %, after %, questions)
    interrupted: int | None = None  # the signal that stopped the run
    resume_command: str = ""

    @property
    def steps_run(self) -> int:
        """Optimizer steps taken by this invocation."""
        return self.steps - self.start_step

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.interrupted is None else 128 + self.interrupted


def _quiet(*args: Any, **kwargs: Any) -> None:
    """``print`` for ranks other than 0 under torchrun."""


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}%"


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


# ------------------------------------------------------------------------------------------------
# input checks (no model or tokenizer needed)
def _resolve_device(cfg: TrainConfig):
    import torch

    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainInputError(f"device={cfg.device!r} but no CUDA device is available; allowed: cpu, auto")
    return torch.device(cfg.device)


def _resolve_dtype(cfg: TrainConfig, device):
    import torch

    if cfg.dtype == "fp32":
        return torch.float32
    if cfg.dtype == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _threads(cfg: TrainConfig, device) -> int | None:
    """Torch's CPU threads for this run: ``threads``, else $OMP_NUM_THREADS, else 1 on CPU (None: leave
    torch's default)."""
    if cfg.threads is not None:
        return cfg.threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return 1 if device.type == "cpu" else None


def _threads_text(n: int) -> str:
    return f"{n} CPU thread" + ("s" if n != 1 else "")


BUILTIN_MODELS = ("builtin:tiny-pretrained", "builtin:tiny")


def _check_inputs(cfg: TrainConfig) -> Path | None:
    """File-system checks that need no model or tokenizer; returns the resolved data file."""
    from grass_llm.data import DataError, resolve_data_path
    from grass_llm.models import looks_like_path

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
    _check_out_dir(cfg.run_dir)
    return data_file


def _check_out_dir(run_dir: Path) -> None:
    """``out_dir`` must be a directory this process can write (created if missing)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainInputError(
            f"out_dir {str(run_dir)!r} is a file; allowed: a directory (created if missing)"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".grass-llm-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TrainInputError(
            f"out_dir {str(run_dir)!r} is not writable: {e.strerror or e}"
            + (f" ({e.filename})" if e.filename and str(e.filename) != str(run_dir) else "")
        ) from None


def _effective_lr(d: dict[str, Any]) -> float:
    from grass_llm.recipes.methods import get_method

    return d.get("lr") if d.get("lr") is not None else get_method(d["method"]).default_lr


def resume_changes(
    saved: dict[str, Any], cfg: TrainConfig, path: Path, step: int
) -> dict[str, tuple[Any, Any]]:
    """The settings that differ between the checkpoint (``saved``) and ``cfg``: ``{key: (old, new)}``
    for those that may change on resume; ``TrainInputError`` naming the others."""
    from grass_llm.recipes.methods import get_method

    now = cfg.to_dict()
    method = get_method(cfg.method)
    compared = {k for k in now if k not in _SECTIONS} | {"distributed"}
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
            old, new = _effective_lr(saved), cfg.learning_rate
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


# ------------------------------------------------------------------------------------------------
# data
class _Batches:
    """Endless micro-batches, epoch after epoch, resumable through ``state_dict`` (a data.Batcher)."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self._it = None

    def next(self):
        if self._it is None:
            self._it = self.loader.forever()
        return next(self._it)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.loader.load_state_dict(state)
        except ValueError as e:
            raise TrainInputError(f"cannot resume the data position: {e}") from None
        self._it = None


def _build_data(cfg: TrainConfig, tokenizer, data_file: Path | None):
    """Records -> tokenised examples -> a resumable ``data.Batcher``. DataError -> TrainInputError."""
    from grass_llm import data as D

    try:
        records = D.builtin_sample() if data_file is None else D.load_records(data_file)
        loader = D.build_loader(
            records,
            tokenizer,
            max_length=cfg.max_length,
            batch_size=cfg.batch_size,
            train_on_response_only=cfg.train_on_response_only,
            packing=cfg.packing,
            group_by_length=cfg.group_by_length,
            seed=cfg.seed,
        )
    except D.DataError as e:
        raise TrainInputError(str(e)) from None
    if len(loader) == 0:
        raise TrainInputError(f"data {cfg.data!r} gives no batch (batch_size={cfg.batch_size})")
    return loader


def _load_model_and_tokenizer(cfg: TrainConfig, dtype, device):
    import torch

    from grass_llm.models import (
        ModelLoadError,
        load_model_and_tokenizer,
        load_tiny_pretrained,
        tiny_llama,
    )

    if cfg.model == "builtin:tiny-pretrained":
        from grass_llm.data import builtin_tokenizer

        tokenizer = builtin_tokenizer()
        try:
            model = load_tiny_pretrained(dtype)
        except ModelLoadError as e:
            raise TrainInputError(str(e)) from None
        if cfg.max_length > model.config.max_position_embeddings:
            raise TrainInputError(
                f"max_length={cfg.max_length} is longer than builtin:tiny-pretrained's "
                f"{model.config.max_position_embeddings} positions; allowed: <= {model.config.max_position_embeddings}"
            )
    elif cfg.model == "builtin:tiny":
        from grass_llm.data import builtin_tokenizer

        tokenizer = builtin_tokenizer()
        model = tiny_llama(
            len(tokenizer),
            max_positions=max(512, cfg.max_length),
            seed=cfg.seed,
            dtype=dtype,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    else:
        torch.manual_seed(cfg.seed)
        try:
            model, tokenizer = load_model_and_tokenizer(cfg.model, dtype)
        except ModelLoadError as e:
            raise TrainInputError(str(e)) from None
    model.config.use_cache = False
    return model.to(device), tokenizer


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed)


# ------------------------------------------------------------------------------------------------
# metrics
def _memory(device) -> tuple[int | None, int | None]:
    """(peak CUDA bytes allocated since the last reset or None, process RSS bytes or None)."""
    import torch

    cuda = None
    if device.type == "cuda":
        cuda = int(torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
    rss = None
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        with contextlib.suppress(ImportError):
            import resource

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
                1 if sys.platform == "darwin" else 1024
            )
    return cuda, rss


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


# ------------------------------------------------------------------------------------------------
# the recipe
def train(
    cfg: TrainConfig, signals: StopSignals | None = None, resume_args: list[str] | None = None
) -> TrainResult:
    """Run the training job described by ``cfg``.

    Bad input raises ``TrainInputError`` before training; a run that cannot finish raises
    ``TrainFailed``; with ``signals`` (installed by the CLI), SIGINT / SIGTERM end the run after the
    step in flight with a checkpoint (``TrainResult.interrupted``), or raise ``Interrupted`` while
    nothing can be saved yet (setup) or on a second signal.
    """
    import torch

    t_start = time.perf_counter()
    data_file = _check_inputs(cfg)
    device = _resolve_device(cfg)
    from grass_llm.recipes.launch import from_env

    launch, device = from_env(device)  # torchrun / accelerate: one process per device
    threads_before = torch.get_num_threads()
    threads = _threads(cfg, device)
    if threads is not None:
        torch.set_num_threads(threads)
    recipe = None
    try:
        recipe = FinetuneRecipe(cfg, launch, device, signals, resume_args)
        recipe.setup(data_file)
        return recipe.run(t_start)
    except Interrupted as e:
        e.detail = recipe.where_stopped() if recipe is not None else ""
        raise
    finally:
        torch.set_num_threads(threads_before)
        launch.close()


@dataclass
class _StepOutput:
    phase: str
    loss: float
    lr: float
    active: list[int]
    tokens: int
    seconds: float
    skipped: bool = False
    signal: int | None = None


class FinetuneRecipe:
    """One training run: ``setup`` then ``run`` (``train_step`` + ``log`` per step, ``save_*``)."""

    def __init__(
        self,
        cfg: TrainConfig,
        launch,
        device,
        signals: StopSignals | None = None,
        resume_args: list[str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.launch = launch
        self.device = device
        self.signals = signals
        self.say = print if launch.is_main else _quiet
        self.run_dir = cfg.run_dir
        self.resume_args = resume_args  # the CLI's arguments (None: called from Python)
        self.step = 0
        self.start_step = 0
        self.tokens_seen = 0
        self.last_ckpt: Path | None = None
        self.phase = "setup"
        self.skipped: list[int] = []  # steps skipped in this invocation
        self.streak = 0  # consecutive skipped steps
        self.save_pending = False
        self.history: list[dict[str, Any]] = []  # resumes that changed settings
        self.heldout_before: float | None = None
        self.heldout_n = cfg.eval_heldout if cfg.data == "builtin:arith" else 0
        self.pbar = None

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, data_file: Path | None) -> None:
        import torch

        cfg, launch = self.cfg, self.launch
        if cfg.batch_size % launch.world_size:
            raise TrainInputError(
                f"batch_size={cfg.batch_size} is the micro-batch over all {launch.world_size} processes and "
                f"must be divisible by their number; allowed: a multiple of {launch.world_size}"
            )
        self.dtype = _resolve_dtype(cfg, self.device)
        from grass_llm.recipes.launch import resolve_strategy

        try:
            self.strategy = resolve_strategy(cfg.distributed.strategy, launch)
        except ValueError as e:
            raise TrainInputError(str(e)) from None
        self.fsdp = self.strategy == "fsdp2"
        if self.fsdp and cfg.distributed.shard_optimizer_states:
            raise TrainInputError(
                "distributed.shard_optimizer_states=true is for distributed.strategy=replicated; under fsdp2 "
                "(here from accelerate's FSDP2 config) the optimizer states are sharded like the weights already"
            )
        resume_path = self._resume_path()
        from grass_llm.recipes.run_checkpoint import CheckpointError, load_checkpoint

        ckpt = None
        if resume_path is not None:
            try:
                ckpt = load_checkpoint(resume_path)
            except CheckpointError as e:
                raise TrainInputError(f"cannot resume: {e}") from None
            step = int(ckpt["state"]["step"])
            self.changes = resume_changes(ckpt["state"]["config"], cfg, resume_path, step)
            self._check_newer_checkpoints(resume_path, step)
        elif cfg.resume is None:
            self._prepare_out_dir()
        # (--resume without a checkpoint: the run never saved one; its log is rewritten from step 0)

        _seed_everything(cfg.seed)
        # FSDP2: the model is read into host memory and fully_shard moves each rank's shards to the device
        load_on = torch.device("cpu") if self.fsdp else self.device
        model, self.tokenizer = _load_model_and_tokenizer(cfg, self.dtype, load_on)
        self.loader = _build_data(cfg, self.tokenizer, data_file)
        self._setup_model_and_optimizer(model)
        self._setup_schedule()
        self.batches = _Batches(self.loader)
        if ckpt is not None:
            self._restore(ckpt, resume_path)
        elif self.heldout_n:
            self.heldout_before = self.heldout_accuracy()
            self.say(
                f"held-out accuracy before training: {_pct(self.heldout_before)} "
                f"({self.heldout_n} arithmetic questions not in the training data)"
            )

    def _resume_path(self) -> Path | None:
        """The checkpoint to resume from (None: start at step 0). ``resume=auto`` passes over damaged
        or incomplete checkpoints (rank 0 sets them aside) and says so."""
        cfg, launch = self.cfg, self.launch
        if cfg.resume is None:
            return None
        from grass_llm.recipes.run_checkpoint import (
            CHECKPOINT_DIR,
            CheckpointError,
            find_resumable,
            list_checkpoints,
            verify_checkpoint,
        )

        if cfg.resume != "auto":
            path = Path(cfg.resume).expanduser()
            if not path.is_dir():
                raise TrainInputError(f"resume checkpoint {cfg.resume!r} does not exist")
            try:
                verify_checkpoint(path)
            except CheckpointError as e:
                intact = (
                    find_resumable(path.parent.parent, set_aside=False)[0]
                    if path.parent.name == CHECKPOINT_DIR
                    else None
                )
                hint = (
                    f"; the newest intact checkpoint beside it is {intact}"
                    if intact and intact != path
                    else ""
                )
                raise TrainInputError(f"cannot resume: {e}{hint}") from None
            return path
        issues: list[Any] = []
        if launch.is_main:
            path, issues = find_resumable(self.run_dir, set_aside=True)
        launch.barrier()  # invariant: rank 0 has set damaged checkpoints aside before the others look
        if not launch.is_main:
            path, _ = find_resumable(self.run_dir, set_aside=False)
        for issue in issues:
            where = f"set aside as {issue.moved_to}" if issue.moved_to else "left in place"
            reason = (
                issue.reason
                if issue.reason.startswith(("damaged", "incomplete"))
                else f"unusable: {issue.reason}"
            )
            self.say(f"resume: checkpoint {issue.path} is {reason}; {where} (not deleted)")
        root = self.run_dir / CHECKPOINT_DIR
        # (rank 0 alone saw what it set aside: every rank must take its decision)
        (none_intact,) = launch.sum([launch.is_main and path is None and bool(issues)], self.device)
        if none_intact:
            raise TrainInputError(
                f"cannot resume: no intact checkpoint in {root} (see above; nothing was deleted). Resume from "
                "another checkpoint with --resume=PATH, or start over with overwrite=true"
            )
        if path is None:
            leftovers = [d for _, d in list_checkpoints(self.run_dir)]
            if (self.run_dir / "final").exists() or leftovers:
                raise TrainInputError(
                    f"cannot resume: {self.run_dir} holds a final model but no checkpoint; start over with "
                    "overwrite=true, or choose another out_dir"
                )
            self.say(f"resume: no checkpoint in {root}; starting at step 0")
            return None
        if issues:
            self.say(f"resume: resuming from the newest intact checkpoint, {path}")
        return path

    def _check_newer_checkpoints(self, path: Path, step: int) -> None:
        """Resuming from an older checkpoint into a run dir that holds newer ones would mix two runs:
        refused unless ``overwrite=true``, which deletes the newer ones."""
        from grass_llm.recipes.run_checkpoint import list_checkpoints

        newer = [d for s, d in list_checkpoints(self.run_dir) if s > step and (d / "COMPLETE").is_file()]
        if not newer:
            return
        names = ", ".join(str(d) for d in newer)
        if not self.cfg.overwrite:
            raise TrainInputError(
                f"cannot resume from {path} (step {step}) in {self.run_dir}: it holds newer checkpoints ({names}), "
                "which the run would mix with this one. Resume into another out_dir, or add overwrite=true "
                "to delete the newer checkpoints"
            )
        self.launch.barrier()  # invariant: every rank has listed the newer checkpoints before any is deleted
        if self.launch.is_main:
            for d in newer:
                shutil.rmtree(d)
            self.say(f"overwrite=true: deleted the newer checkpoints {names}")
        self.launch.barrier()

    def _prepare_out_dir(self) -> None:
        """A new run needs an out_dir without an earlier run in it, or ``overwrite=true`` (which deletes
        the earlier run's outputs, and nothing else)."""
        found = [n for n in _RUN_OUTPUTS if (self.run_dir / n).exists()]
        if found and not self.cfg.overwrite:
            raise TrainInputError(
                f"out_dir {str(self.run_dir)!r} holds an earlier run ({', '.join(found)}); continue it with "
                "--resume, start over with overwrite=true (deletes it), or choose another out_dir"
            )
        if found and self.launch.is_main:
            for name in found:
                target = self.run_dir / name
                if name == "checkpoints":
                    for d in target.iterdir():
                        if re.match(r"^step-\d+(\..+)?$", d.name):
                            shutil.rmtree(d) if d.is_dir() else d.unlink()
                    with contextlib.suppress(OSError):
                        target.rmdir()  # only if nothing else is in it
                elif target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            self.say(f"overwrite=true: deleted the earlier run in {self.run_dir} ({', '.join(found)})")
        self.launch.barrier()  # invariant: no rank writes into out_dir while rank 0 clears it

    def _setup_model_and_optimizer(self, model) -> None:
        cfg, launch = self.cfg, self.launch
        from grass_llm.layers import LayerDiscoveryError, discover_layers
        from grass_llm.loss import chunked_loss_for
        from grass_llm.recipes.methods import MethodError, build_method, get_method

        self.method = get_method(cfg.method)
        try:
            self.num_layers = discover_layers(model, cfg.grass.layers).num_layers
        except LayerDiscoveryError as e:
            raise TrainInputError(f"model {cfg.model!r}: {e}") from None
        # (of the unwrapped model: under FSDP2 the final model is rebuilt from them)
        self.hf_config, self.generation_config = model.config, getattr(model, "generation_config", None)
        backend, shard = None, None  # one process: GrassOptimizer's LocalBackend
        if self.fsdp:  # every rank holds a shard of each block; GRASS picks its FSDP2Backend
            from grass_llm.distributed.fsdp2 import apply_fsdp2

            backend = "auto"
            shard = functools.partial(apply_fsdp2, layers=cfg.grass.layers)
        elif launch.distributed and self.method.layer_wise:
            from grass_llm.distributed import ReplicatedBackend

            # GrassOptimizer's own data-parallel sync (no DDP): active layers only
            backend = ReplicatedBackend(shard_optimizer_states=cfg.distributed.shard_optimizer_states)
        self._enable_activation_checkpointing(model)
        try:
            self.model, self.optimizer = build_method(model, cfg, backend, shard=shard)
        except MethodError as e:
            raise TrainInputError(str(e)) from None
        self.loss_fn = chunked_loss_for(self.model) if cfg.chunked_loss else None
        # what the loop calls: the model, or its DDP wrapper (fft / lora / dora replicated on several ranks)
        self.fwd = self.model
        if launch.distributed and not self.fsdp and not self.method.layer_wise:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.fwd = DistributedDataParallel(self.model, device_ids=ids)
        # all micro-batches but the last run without gradient all-reduce / reduce-scatter
        if self.method.layer_wise:
            self.no_sync = self.optimizer.no_sync
        elif self.fsdp:
            self.no_sync = self._fsdp_no_sync
        else:
            self.no_sync = getattr(self.fwd, "no_sync", contextlib.nullcontext)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def _fsdp_no_sync(self):
        """FSDP2's gradient accumulation without communication (fft / lora / dora): the unsharded
        gradients stay on each rank until the last micro-batch reduce-scatters them."""
        from grass_llm.distributed.fsdp2 import fsdp_root

        root = fsdp_root(self.model)
        root.set_requires_gradient_sync(False, recurse=True)
        try:
            yield
        finally:
            root.set_requires_gradient_sync(True, recurse=True)

    def _enable_activation_checkpointing(self, model) -> None:
        from grass_llm.activation_checkpointing import apply_activation_checkpointing

        mode = self.cfg.activation_checkpointing
        try:
            apply_activation_checkpointing(model, mode, self.cfg.grass.layers)
        except TypeError as e:
            raise TrainInputError(f"activation_checkpointing={mode}: {e}") from None

    def _setup_schedule(self) -> None:
        cfg = self.cfg
        steps_per_epoch = max(len(self.loader) // cfg.grad_accum, 1)
        self.total_steps = (
            cfg.max_steps if cfg.max_steps is not None else max(math.ceil(cfg.epochs * steps_per_epoch), 1)
        )
        probe = cfg.probe_steps
        if probe >= self.total_steps:
            warnings.warn(
                f"grass.probe_steps={probe} >= the run's {self.total_steps} optimizer steps: no weight will "
                "change; lower grass.probe_steps or raise max_steps / epochs",
                UserWarning,
                stacklevel=2,
            )
        from grass_llm.schedule import build_lr_scheduler, resolve_warmup

        self.scheduler = build_lr_scheduler(
            self.optimizer,
            "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule,
            num_warmup_steps=resolve_warmup(cfg.warmup, max(self.total_steps - probe, 1)),
            num_training_steps=self.total_steps,
            delay_steps=probe,
        )

    def _restore(self, ckpt: dict[str, Any], path: Path) -> None:
        from grass_llm.recipes.run_checkpoint import set_rng_state

        state = ckpt["state"]
        if "sharded" in ckpt:  # written by an FSDP2 run: DCP reshards to this run's processes
            from grass_llm.distributed.sharded_checkpoint import load_sharded_checkpoint

            load_sharded_checkpoint(ckpt["sharded"], self.model, self.optimizer)
        else:
            self._load_model_state(ckpt["model"])
            optimizer_state = ckpt["optimizer"]
            if self.fsdp and not self.method.layer_wise:  # (GrassOptimizer shards full states itself)
                from grass_llm.distributed.sharded_checkpoint import shard_like_params

                optimizer_state = shard_like_params(optimizer_state, self.optimizer)
            self.optimizer.load_state_dict(optimizer_state)
        schedule = [dict(f.__dict__) for f in self.scheduler.lr_lambdas]  # from the current settings
        self.scheduler.load_state_dict(state["scheduler"])
        if {"lr", "max_steps", "epochs"} & set(self.changes):
            # the schedule follows the current max_steps / epochs, and its peak the current lr
            for f, d in zip(self.scheduler.lr_lambdas, schedule):
                f.__dict__.update(d)
            scale = self.cfg.learning_rate / _effective_lr(state["config"])
            self.scheduler.base_lrs = [b * scale for b in self.scheduler.base_lrs]
            t = self.scheduler.last_epoch
            self.scheduler._last_lr = [
                b * f(t) for b, f in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas)
            ]
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["initial_lr"] = base
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.batches.load_state_dict(state["data"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.start_step = self.step
        self.heldout_before = state.get("heldout_before")
        self.history = list(state.get("history", []))
        set_rng_state(state["rng"], self.device)
        self.last_ckpt = path
        self.say(f"resumed from {path} at step {self.step}")
        if self.changes:
            self.history.append({"step": self.step, "changes": {k: list(v) for k, v in self.changes.items()}})
            shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in self.changes.items())
            self.say(f"resume: changed settings, applied from step {self.step} on: {shown}")

    # -- model state (the whole model, or the adapters) -----------------------------------------
    def _model_state(self) -> dict[str, Any]:
        if self.method.adapters_only:
            return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return {n: t.detach().cpu().clone() for n, t in self.model.state_dict().items()}

    def _load_model_state(self, state: dict[str, Any]) -> None:
        import torch

        if self.fsdp:  # full tensors of an unsharded run -> this rank's shards
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            options = StateDictOptions(full_state_dict=True, strict=not self.method.adapters_only)
            set_model_state_dict(self.model, state, options=options)
            return
        if self.method.adapters_only:
            params = dict(self.model.named_parameters())
            missing = [n for n in state if n not in params]
            if missing:
                raise TrainInputError(f"checkpoint adapters do not match the model: {missing[:3]} ...")
            with torch.no_grad():
                for n, t in state.items():
                    params[n].copy_(t)
            return
        result = self.model.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise TrainInputError(
                f"checkpoint does not match the model; missing {result.missing_keys[:3]} ..."
            )

    def _nonfinite(self, state: dict[str, Any]) -> list[str]:
        import torch

        return [n for n, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]

    def _weights_nonfinite(self, model_state: dict[str, Any] | None = None) -> list[str]:
        """Names of saved tensors that are not finite (``model_state``: ``_model_state()`` if already
        taken); under FSDP2 a collective: each rank checks its shards."""
        if not self.fsdp:
            return self._nonfinite(self._model_state() if model_state is None else model_state)
        from grass_llm.distributed.fsdp2 import local_tensor

        bad = self._nonfinite({n: local_tensor(t) for n, t in self.model.state_dict().items()})
        (n_bad,) = self.launch.sum([len(bad)], self.device)
        return bad or ["(a shard on another rank)"] * int(n_bad)

    def _unsharded_model(self):
        """Rank 0: the FSDP2 model's full weights in an unsharded copy on the CPU (other ranks: None).
        A collective: FSDP2 all-gathers each parameter."""
        import torch
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from transformers import AutoModelForCausalLM

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.model, options=options)  # (on rank 0 only)
        if not self.launch.is_main:
            return None
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(self.hf_config, dtype=self.dtype)
        if self.method.wrap is not None:
            plain = self.method.wrap(plain, self.cfg)
        plain.load_state_dict(full, strict=True, assign=True)
        if self.generation_config is not None:  # (from_config would rebuild it from config.json)
            base = plain.get_base_model() if hasattr(plain, "get_base_model") else plain
            base.generation_config = copy.deepcopy(self.generation_config)
        return plain

    # -- one optimizer step ---------------------------------------------------------------------
    def train_step(self) -> _StepOutput:
        """Forward + backward over ``grad_accum`` micro-batches, then step the optimizer and schedule.

        The loss is token-weighted over the whole step: every micro-batch's summed loss / all label
        tokens. With N ranks the gradient all-reduce takes the mean, so each rank divides by (tokens of
        all ranks) / N: the mean of the ranks' gradients is then the gradient of the global token mean.
        A step whose gradients are not finite changes nothing (``GrassOptimizer`` skips it itself; for
        the others the recipe does not call ``step()``) and is reported as ``skipped``.
        """
        import torch

        from grass_llm.loss import causal_lm_loss

        cfg, launch, device, opt = self.cfg, self.launch, self.device, self.optimizer
        t0 = time.perf_counter()
        micro = [launch.shard(self.batches.next()) for _ in range(cfg.grad_accum)]
        n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        if launch.distributed:
            (n_all,) = launch.sum([n_items], device)
            n_items_t = torch.tensor(max(n_all, 1.0) / launch.world_size, device=device)
        else:
            n_items_t = torch.tensor(max(n_items, 1), device=device)
        layer_wise = self.method.layer_wise
        phase = "probe" if layer_wise and opt.probing else "train"
        active = opt.active_layers if layer_wise else list(range(self.num_layers))
        lr = opt.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=device, dtype=torch.float32)
        tokens = 0
        for i, b in enumerate(micro):
            b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
            tokens += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
            with self.no_sync() if i + 1 < len(micro) else contextlib.nullcontext():
                loss = causal_lm_loss(self.fwd, b, self.loss_fn, n_items_t, cfg.compact_activations)
                loss.backward()
            loss_sum += loss.detach().float()
        if layer_wise:
            opt.step()
            skipped = bool(getattr(opt, "last_step_skipped", False))
        else:
            if cfg.max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in self.trainable if p.grad is not None])
            if hasattr(norm, "full_tensor"):  # FSDP2: the norm over every rank's shards
                norm = norm.full_tensor()
            skipped = not bool(torch.isfinite(norm))  # the same on every rank: gradients are all-reduced
            if not skipped:
                opt.step()
        self.scheduler.step()
        opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += tokens
        received = self.signals.received if self.signals is not None else None
        # one all-reduce: the loss, the tokens, and whether any rank was asked to stop
        loss_all, tokens_all, n_int, n_term = launch.sum(
            [float(loss_sum), tokens, received == signal.SIGINT, received == signal.SIGTERM], device
        )
        # (another rank's signal: SIGTERM, the scheduler's, wins over SIGINT)
        signum = received or (signal.SIGTERM if n_term else signal.SIGINT if n_int else None)
        # loss: the global token mean
        return _StepOutput(
            phase,
            loss_all / launch.world_size,
            lr,
            active,
            int(tokens_all),
            time.perf_counter() - t0,
            skipped,
            signum if signum else None,
        )

    # -- logging --------------------------------------------------------------------------------
    def log(self, out: _StepOutput) -> None:
        cuda_mem, rss = _memory(self.device)
        record: dict[str, Any] = {
            "step": self.step,
            "phase": out.phase,
            "loss": out.loss,
            "lr": out.lr,
            "active_layers": [] if out.phase == "probe" else out.active,
            "tokens": out.tokens,
            "tokens_per_s": out.tokens / out.seconds if out.seconds > 0 else 0.0,
            "memory_bytes": cuda_mem,
            "rss_bytes": rss,
            "tokens_seen": self.tokens_seen,
            "skipped": out.skipped,
        }
        if self.method.layer_wise:
            record["importance"] = self.optimizer.importance
            record["probabilities"] = self.optimizer.probabilities
        if self.logger is not None:
            self.logger.log(record)
        layers = "probe" if out.phase == "probe" else ",".join(map(str, out.active))
        self.pbar.update(1)
        self.pbar.set_postfix(
            loss=f"{out.loss:.3f}",
            tok_s=f"{record['tokens_per_s']:.0f}",
            layers=layers if self.method.layer_wise else "all",
            mem=_fmt_bytes(cuda_mem if cuda_mem is not None else rss),
            refresh=False,
        )

    def note(self, msg: str) -> None:
        """A line on stdout above the progress bar (rank 0)."""
        if not self.launch.is_main:
            return
        if self.pbar is not None and not getattr(self.pbar, "disable", True):
            self.pbar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)

    def _announce(self) -> None:
        cfg, launch, model = self.cfg, self.launch, self.model
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        micro = len(self.loader)
        import torch

        self.say(
            f"grass-llm train: {cfg.method} on {cfg.model} ({self.num_layers} layers, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {self.dtype}, {self.device}"
            + (f", {_threads_text(torch.get_num_threads())}" if self.device.type == "cpu" else "")
            + f"); data {cfg.data}: {micro} batches of {cfg.batch_size}/epoch; {self.total_steps} steps"
            + (f" ({cfg.probe_steps} probing)" if cfg.probe_steps else "")
            + ("" if self.method.layer_wise else f"; {n_trainable / 1e6:.2f}M trainable")
            + (
                f"; {launch.world_size} processes x {cfg.batch_size // launch.world_size} rows"
                if launch.distributed
                else ""
            )
        )

    # -- evaluation -----------------------------------------------------------------------------
    def heldout_accuracy(self) -> float:
        """Accuracy (%) on ``eval_heldout`` built-in arithmetic questions that are not in the training
        sample: greedy decoding (``grass_llm.evaluate``), LLM-Adapters' last-number rule."""
        import torch

        from grass_llm.data import builtin_heldout, format_prompt
        from grass_llm.evaluate import NUMBER_TOLERANCE, extract_number, generate_responses

        records = builtin_heldout(self.heldout_n)
        prompts = [format_prompt(r, with_response=False) for r in records]
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self.model.config.use_cache = True
            try:
                responses = generate_responses(
                    self.model, self.tokenizer, prompts, batch_size=64, max_new_tokens=40
                )
            finally:
                self.model.config.use_cache = False
        correct = 0
        for rec, resp in zip(records, responses):
            pred = extract_number(resp)
            correct += pred is not None and abs(pred - float(rec["answer"])) <= NUMBER_TOLERANCE
        return 100.0 * correct / len(records)

    # -- saving ---------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Save a checkpoint from rank 0 (every rank builds the payload: with ZeRO-1 sharding the
        optimizer's ``state_dict()`` is a collective). Returns its path on every rank once complete.
        Non-finite weights are never saved (``TrainFailed``): the last checkpoint stays the newest."""
        from grass_llm.recipes.run_checkpoint import checkpoint_path, rng_state, save_checkpoint

        model_state = None if self.fsdp else self._model_state()
        bad = self._weights_nonfinite(model_state)
        if bad:
            n = len(self.model.state_dict()) if model_state is None else len(model_state)
            raise TrainFailed(
                f"the weights after step {self.step} are not finite ({len(bad)} of {n} tensors, "
                f"e.g. {bad[0]}); they were not saved. {self._kept()}"
            )
        state = {
            "version": _STATE_VERSION,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "scheduler": self.scheduler.state_dict(),
            "data": self.batches.state_dict(),
            "rng": rng_state(self.device),
            "config": self.cfg.to_dict(),
            "history": self.history,
            "heldout_before": self.heldout_before,
        }
        path = checkpoint_path(self.run_dir, self.step)
        self.phase = f"saving the checkpoint of step {self.step}"
        if self.fsdp:
            self._save_sharded_checkpoint(state)
        else:
            # (on every rank: with ZeRO-1 the optimizer's state_dict() is a collective)
            payload = {"model": model_state, "optimizer": self.optimizer.state_dict(), "state": state}
            if self.launch.is_main:
                try:
                    save_checkpoint(self.run_dir, self.step, payload, config_yaml(self.cfg, self.history))
                except OSError as e:
                    raise TrainFailed(f"cannot write the checkpoint {path}: {e}. {self._kept()}") from None
        self.launch.barrier()  # invariant: no rank goes on (or exits) before the checkpoint is complete
        self.last_ckpt = path
        self.save_pending = False
        return path

    def _save_sharded_checkpoint(self, state: dict[str, Any]) -> None:
        """Every rank writes its shards into ``step-N.tmp/sharded`` (torch.distributed.checkpoint), then
        rank 0 adds ``state.pt``, the manifest of every rank's files and the marker, and renames it into
        place: a rank killed at any moment leaves every earlier checkpoint as it was."""
        from torch.distributed.checkpoint.api import CheckpointException

        from grass_llm.distributed.sharded_checkpoint import save_sharded_checkpoint
        from grass_llm.recipes.run_checkpoint import (
            SHARDED_DIR,
            begin_checkpoint,
            file_digests,
            finish_checkpoint,
        )

        launch = self.launch
        try:
            tmp = begin_checkpoint(self.run_dir, self.step, create=launch.is_main)
            launch.barrier()  # invariant: the empty step-N.tmp exists before any rank writes into it
            save_sharded_checkpoint(tmp / SHARDED_DIR, self.model, self.optimizer)  # (ends with a barrier)
            # each rank hashes the shards it wrote (DCP names them __<rank>_<n>.distcp), rank 0 lists them
            mine = file_digests(tmp, f"{SHARDED_DIR}/__{launch.rank}_*.distcp")
            digests = launch.gather_object(mine)
            if launch.is_main:
                missing = [r for r, d in enumerate(digests) if not d]
                if missing:
                    raise OSError(f"ranks {missing} wrote no shard into {tmp / SHARDED_DIR}")
                known = {k: v for d in digests for k, v in d.items()}
                yaml = config_yaml(self.cfg, self.history)
                finish_checkpoint(self.run_dir, self.step, tmp, {"state": state}, yaml, known)
        except (OSError, CheckpointException) as e:
            raise TrainFailed(
                f"cannot write the checkpoint of step {self.step}: {e}. {self._kept()}"
            ) from None

    def _kept(self) -> str:
        if self.last_ckpt is None:
            return "No checkpoint was written in this run."
        return f"The last checkpoint is {self.last_ckpt}."

    def save_final(self) -> tuple[Path, str]:
        """The final model (the method's ``save_final``) + tokenizer in ``RUN/final``, written in a
        temporary directory first and then renamed into place."""
        bad = self._weights_nonfinite()
        if bad:
            raise TrainFailed(f"the final weights are not finite ({bad[0]}, ...); not saved. {self._kept()}")
        model = self._unsharded_model() if self.fsdp else self.model  # (FSDP2: a collective)
        final = self.run_dir / "final"
        if not self.launch.is_main:
            return final, ""
        tmp = self.run_dir / "final.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            from transformers.utils import logging as hf_logging

            bar = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # transformers' "Writing model shards" bar
            try:
                self.tokenizer.save_pretrained(tmp)
                out, kind = self.method.save_final(model, tmp, self.cfg)
                if self.method.adapters_only:
                    self.tokenizer.save_pretrained(tmp / "adapter")
            finally:
                if bar:
                    hf_logging.enable_progress_bar()
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as e:
            raise TrainFailed(f"cannot write the final model in {final}: {e}. {self._kept()}") from None
        out = final / out.relative_to(tmp)
        return out, kind.replace(str(tmp), str(final))

    def resume_command(self, drop: tuple[str, ...] = ()) -> str:
        """The command that continues this run: this invocation's arguments (minus the ``drop`` keys) and
        ``--resume``; from Python, ``--resume=`` the last checkpoint."""
        if self.resume_args is None:
            target = self.last_ckpt if self.last_ckpt is not None else self.run_dir / "checkpoints"
            return shlex.join(["grass-llm", "train", f"--resume={target}"])
        keep = [w for w in self.resume_args if "=" not in w or w.split("=", 1)[0].strip() not in drop]
        cmd = shlex.join(["grass-llm", "train", *keep, "--resume"])
        if self.launch.distributed:
            return f"the same torchrun / accelerate command with --resume ({cmd.replace('grass-llm train', '...')})"
        return cmd

    def where_stopped(self) -> str:
        """For a stop by a second signal (or during setup): where it stopped and what is saved."""
        if self.phase == "setup":
            return " during setup, before the first step: nothing was trained or saved in this invocation"
        saved = f"the last checkpoint is {self.last_ckpt}" if self.last_ckpt else "no checkpoint was written"
        return f" again while {self.phase}: stopped at once without it; {saved}. Continue with: {self.resume_command()}"

    # -- the loop -------------------------------------------------------------------------------
    def run(self, t_start: float) -> TrainResult:
        cfg, launch = self.cfg, self.launch
        from tqdm.auto import tqdm

        from grass_llm.runlog import RunLogger

        self.logger = (
            RunLogger(self.run_dir, tensorboard=cfg.tensorboard, resume_from=self.step)
            if launch.is_main
            else None
        )
        self._announce()
        self.model.train()
        last_loss: float | None = None
        end = self.total_steps if cfg.stop_at_step is None else min(cfg.stop_at_step, self.total_steps)
        self.pbar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=cfg.method,
            dynamic_ncols=True,
            file=sys.stderr,
            disable=not launch.is_main,
        )
        stop: int | None = None
        deferred = self.signals.deferred() if self.signals is not None else contextlib.nullcontext()
        with deferred, warnings.catch_warnings():
            # skipped steps are reported by the loop (_count_skipped), step by step
            warnings.filterwarnings(
                "ignore", message="GrassOptimizer skipped a step", category=RuntimeWarning
            )
            try:
                self.phase = "training"
                while self.step < end:
                    out = self.train_step()
                    last_loss = out.loss
                    self.log(out)
                    self._count_skipped(out)
                    if out.signal:
                        stop = out.signal
                        break
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step < end:
                        self.save_pending = True
                    if self.save_pending and not self.streak:
                        self.save_checkpoint()  # (deferred while steps are being skipped)
                    self.phase = "training"
            finally:
                self.pbar.close()
                if self.logger is not None:
                    self.logger.close()
            if stop is not None:
                self.note(f"{signal_name(stop)} received: saving a checkpoint of step {self.step} ...")
            if self.last_ckpt is None or self.last_ckpt.name != f"step-{self.step:06d}":
                self.save_checkpoint()
            final_dir, final_kind, plots = (
                None,
                f"not written: stopped at step {self.step} of {self.total_steps}",
                [],
            )
            heldout = None
            # replicated: every rank holds the same weights and rank 0 writes them; FSDP2: every rank
            # takes part (the weights are gathered, the held-out questions run on the sharded model)
            if stop is None and (launch.is_main or self.fsdp):
                if self.step == self.total_steps:  # (stop_at_step: the run goes on after --resume)
                    self.phase = "writing the final model"
                    final_dir, final_kind = self.save_final()
                    if self.heldout_n and not self._stop_requested():
                        self.phase = "evaluating"
                        heldout = (self.heldout_before, self.heldout_accuracy(), self.heldout_n)
                if launch.is_main and cfg.plots and self._signal() is None:
                    self.phase = "drawing the plots"
                    plots = _plots(self.run_dir)
            elif self.heldout_n:
                heldout = (self.heldout_before, None, self.heldout_n)
            launch.barrier()
            stop = stop or self._signal()
        return TrainResult(
            run_dir=self.run_dir,
            steps=self.step,
            total_steps=self.total_steps,
            final_loss=last_loss,
            checkpoint=self.last_ckpt,
            final_dir=final_dir,
            final_kind=final_kind,
            log_path=self.run_dir / "log.jsonl",
            plots=plots,
            seconds=time.perf_counter() - t_start,
            start_step=self.start_step,
            skipped_steps=list(self.skipped),
            heldout=heldout,
            interrupted=stop,
            resume_command=self.resume_command(),
        )

    def _signal(self) -> int | None:
        return self.signals.received if self.signals is not None else None

    def _stop_requested(self) -> bool:
        """A signal on this rank, or (FSDP2, where every rank must go on together) on any rank."""
        if not self.fsdp:
            return self._signal() is not None
        (n,) = self.launch.sum([self._signal() is not None], self.device)
        return n > 0

    def _count_skipped(self, out: _StepOutput) -> None:
        """Count a skipped step; too many in a row stop the run (``TrainFailed``), keeping the last
        checkpoint (no checkpoint is written while steps are being skipped)."""
        if not out.skipped:
            self.streak = 0
            return
        self.skipped.append(self.step)
        self.streak += 1
        if len(self.skipped) <= 10:
            self.note(
                f"step {self.step}: gradients not finite (loss {out.loss:.4g}); step skipped, weights unchanged"
            )
        elif len(self.skipped) == 11:
            self.note("more steps with non-finite gradients: skipped and counted, not shown")
        limit = self.cfg.max_nonfinite_steps
        if limit and self.streak >= limit:
            raise TrainFailed(
                f"stopped at step {self.step}: {self.streak} steps in a row had non-finite gradients "
                f"(steps {self.step - self.streak + 1}-{self.step}, max_nonfinite_steps={limit}); the run is "
                f"diverging. Nothing was saved after step {self.step - self.streak}. {self._kept()} "
                f"Continue from it with a lower learning rate: {self.resume_command(drop=('lr',))} lr=<lower>"
            )


def _plots(run_dir: Path) -> list[Path]:
    try:
        from grass_llm.plots import plot_run
    except ImportError as e:
        warnings.warn(f"plots skipped: {e}", UserWarning, stacklevel=2)
        return []
    try:
        return [Path(p) for p in plot_run(run_dir)]
    except Exception as e:  # plotting must never fail a finished run
        warnings.warn(f"plots skipped: {type(e).__name__}: {e}", UserWarning, stacklevel=2)
        return []
