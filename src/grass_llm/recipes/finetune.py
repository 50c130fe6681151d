"""``grass-llm train``: fine-tune a causal LM with GRASS or a baseline (``grass_llm.recipes.methods``).

A recipe in the torchtune sense. :func:`train` reads a ``TrainConfig`` (YAML file + ``key=value``
overrides, see ``grass_llm.recipes.train_config``) and runs :class:`FinetuneRecipe`, which coordinates
the modules beside it:

* ``setup()``: checks the input (``inputs``: config, data file, model path, ``out_dir``; bad input
  stops with exit code 2 before any training), finds the checkpoint to resume from (``resume``),
  builds the model, the method's optimizer, the LR schedule (after GRASS probing) and the data
  (``build``: a ``TrainObjects``), and restores the checkpoint (``state``);
* ``train_step()``: one optimizer step over ``grad_accum`` micro-batches (``step``: token-weighted loss
  over the whole step and all ranks); a step whose gradients are not finite is skipped and counted;
* ``log()``: one ``log.jsonl`` record per step (and TensorBoard), the progress bar (``reporting``);
* ``save_checkpoint()`` / ``save_final()``: atomic, checksummed checkpoints of finite weights only
  (``state``, ``grass_llm.recipes.run_checkpoint``), the final model + tokenizer (``final``);
* ``heldout_accuracy()``: the demo's held-out arithmetic accuracy before and after (``heldout``).

The plots (``out_dir/plots``) are drawn by ``grass-llm train`` (``grass_llm.recipes.train_cli``) through
:func:`train`'s ``finish``, while the run still holds its out_dir; from Python, ``grass_llm.plots.plot_run(result.run_dir)``.

What the run guarantees (tests/test_faults.py drives each case through the CLI):

* one run per ``out_dir``: the run holds its lock (``grass_llm.recipes.run_lock``); another process
  on it stops with exit code 2 naming the holder;
* it never writes into an ``out_dir`` that holds an earlier run unless told to: ``--resume``
  continues it, ``overwrite=true`` starts over (exit code 2 otherwise). Nothing is deleted before its
  replacement is complete: ``overwrite=true`` sets the earlier run aside (``replaced-run-N``) once the
  run is built and deletes it when the run is complete (``grass_llm.recipes.resume``); checkpoints and
  the final model are written beside and renamed into place, and a failed write leaves no partial file;
* the training data's content is fingerprinted in every checkpoint: ``--resume`` on changed data is
  refused unless ``allow_data_change=true``;
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
  printed, exit code 130 / 143 (``grass_llm.recipes.interrupt``); during setup the run stops at once
  (even when third-party code swallowed the stop), and an ``out_dir`` it created is removed again.

The run directory's layout (``out_dir``, default ``runs/<method>``) is ``grass_llm.run_layout``'s.
"""

from __future__ import annotations

import contextlib
import shlex
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grass_llm._tensor import resolve_dtype
from grass_llm.recipes.build import Batches, TrainObjects, build
from grass_llm.recipes.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, TrainFailed, TrainInputError
from grass_llm.recipes.final import unsharded_model, write_final
from grass_llm.recipes.heldout import heldout_accuracy
from grass_llm.recipes.inputs import check_inputs, check_launch, remove_created, resolve_device, threads
from grass_llm.recipes.interrupt import Interrupted, StopSignals, signal_name
from grass_llm.recipes.launch import Launch, from_env
from grass_llm.recipes.reporting import Reporter, pct
from grass_llm.recipes.resume import Resume, delete_replaced, open_resume, resume_changes, set_aside
from grass_llm.recipes.run_checkpoint import checkpoint_path
from grass_llm.recipes.run_lock import RunDirBusy, RunDirLock
from grass_llm.recipes.state import Progress, RecipeCheckpointer
from grass_llm.recipes.step import StepOutput, train_step
from grass_llm.recipes.train_config import TrainConfig, config_yaml
from grass_llm.run_layout import CHECKPOINT_DIR, FINAL_DIR, LOG_FILENAME

__all__ = [
    "DEMO_CONFIG",
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_OK",
    "FinetuneRecipe",
    "TrainFailed",
    "TrainInputError",
    "TrainResult",
    "config_yaml",
    "resume_changes",
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
    plots: list[Path] = field(default_factory=list)  # drawn by grass-llm train (train()'s finish)
    seconds: float = 0.0
    start_step: int = 0  # the step this invocation started from (the checkpoint's, when resuming)
    skipped_steps: list[int] = field(default_factory=list)  # steps skipped (non-finite gradients) in this invocation
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


def train(
    cfg: TrainConfig,
    signals: StopSignals | None = None,
    resume_args: list[str] | None = None,
    finish: Callable[[TrainResult], TrainResult] | None = None,
) -> TrainResult:
    """Run the training job described by ``cfg``.

    Bad input raises ``TrainInputError`` before training; a run that cannot finish raises
    ``TrainFailed``; with ``signals`` (installed by the CLI), SIGINT / SIGTERM end the run after the
    step in flight with a checkpoint (``TrainResult.interrupted``), or raise ``Interrupted`` while
    nothing can be saved yet (setup) or on a second signal. ``finish`` (the main process only; ``grass-llm
    train`` draws the plots with it) runs on the result while the out_dir's lock is still held, so no other
    run can take the directory before it is done; an ``Interrupted`` it raises keeps its own ``detail``.
    """
    t_start = time.perf_counter()
    if cfg.memory_budget is not None:  # the fastest settings that fit, chosen before anything is written
        from grass_llm.memory.fit import apply_memory_budget

        cfg = apply_memory_budget(cfg, resolve_device(cfg))
    data_file, created = check_inputs(cfg)
    lock = RunDirLock(cfg.run_dir)
    launch = None
    threads_before = torch.get_num_threads()
    recipe = None
    try:
        launch, device = from_env(resolve_device(cfg))  # torchrun / accelerate: one process per device
        n_threads = threads(cfg, device)
        if n_threads is not None:
            torch.set_num_threads(n_threads)
        _lock(lock, launch, device)
        recipe = FinetuneRecipe(cfg, launch, device, signals, resume_args)
        recipe.setup(data_file)
        if signals is not None:
            signals.check()  # (a stop raised during setup that third-party code swallowed)
        result = recipe.run(t_start)
        recipe = None  # (the run is over: a stop in ``finish`` says where it stopped itself)
        if finish is not None and launch.is_main:
            result = finish(result)
        return result
    except Interrupted as e:
        if recipe is not None:
            e.detail = recipe.where_stopped()
        raise
    except Exception:
        if signals is None or signals.raised is None:
            raise
        # a failure after a stop was raised is its consequence (third-party code converted it): the stop
        stop = Interrupted(signals.raised, again=signals.received is not None)
        stop.detail = recipe.where_stopped() if recipe is not None else ""
        raise stop from None
    finally:
        torch.set_num_threads(threads_before)
        lock.release()
        remove_created(created)  # (a run that wrote nothing leaves no empty out_dir behind)
        if launch is not None:
            launch.close()


def _lock(lock: RunDirLock, launch: Launch, device: torch.device) -> None:
    """Rank 0 takes the out_dir's lock for the run (``grass_llm.recipes.run_lock``); every rank learns
    whether it got it. Held by another process: ``TrainInputError`` naming it (exit code 2)."""
    busy = None
    if launch.is_main:
        try:
            lock.acquire()
        except RunDirBusy as e:
            busy = e
    (n_busy,) = launch.sum([busy is not None], device)
    if busy is not None:
        raise TrainInputError(f"{busy}; wait for it to end, or choose another out_dir (nothing was changed)")
    if n_busy:
        raise TrainInputError(f"out_dir {str(lock.run_dir)!r} is in use by another process (see rank 0)")
    if lock.took_over and launch.is_main:
        print(f"out_dir: took over the lock left by pid {lock.took_over['pid']}, which is no longer running")


def stopped_detail(phase: str, last_checkpoint: Path | None, resume_command: str) -> str:
    """For a stop by a second signal (or during setup): where it stopped and what is saved."""
    if phase == "setup":
        return " during setup, before the first step: nothing was trained or saved in this invocation"
    saved = f"the last checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
    return f" again while {phase}: stopped at once without it; {saved}. Continue with: {resume_command}"


class FinetuneRecipe:
    """One training run: ``setup`` then ``run`` (``train_step`` + ``log`` per step, ``save_*``)."""

    def __init__(
        self,
        cfg: TrainConfig,
        launch: Launch,
        device: torch.device,
        signals: StopSignals | None = None,
        resume_args: list[str] | None = None,
    ) -> None:
        self.cfg, self.launch, self.device, self.signals = cfg, launch, device, signals
        self.progress = Progress()
        self.report = Reporter(cfg, launch, device, kept=self.progress.kept)
        self.say = self.report.say
        self.resume_args = resume_args  # the CLI's arguments (None: called from Python)
        self.phase = "setup"
        self.skipped: list[int] = []  # steps skipped in this invocation
        self.streak = 0  # consecutive skipped steps
        self.save_pending = False
        self.heldout_n = cfg.eval_heldout if cfg.data == "builtin:arith" else 0
        self.objs: TrainObjects | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.objs.model

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, data_file: Path | None) -> None:
        cfg = self.cfg
        self.fsdp = check_launch(cfg, self.launch) == "fsdp2"
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        local_model = Path(cfg.model).expanduser()
        inputs = tuple(p for p in (data_file, local_model if local_model.exists() else None) if p is not None)
        start = open_resume(cfg, self.launch, self.device, self.say, inputs)
        self.objs = build(cfg, self.launch, self.device, self.dtype, self.fsdp, data_file)
        self.batches = Batches(self.objs.loader)
        self.checkpointer = RecipeCheckpointer(cfg, self.launch, self.device, self.objs, self.fsdp)
        if start.resume is not None:
            self._restore(start.resume)
        elif self.heldout_n:
            self.progress.heldout_before = self.heldout_accuracy()
            self.say(
                f"held-out accuracy before training: {pct(self.progress.heldout_before)} "
                f"({self.heldout_n} arithmetic questions not in the training data)"
            )
        # everything is built and checked: only now is anything of an earlier run replaced (set aside)
        deferred = self.signals.deferred() if self.signals is not None else contextlib.nullcontext()
        with deferred:
            set_aside(cfg.run_dir, start, self.launch, self.say)

    def _restore(self, resume: Resume) -> None:
        self.checkpointer.restore(resume, self.progress, self.batches, self.say)
        step = self.progress.step
        self.say(f"resumed from {resume.path} at step {step}")
        if resume.changes:
            shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in resume.changes.items())
            self.say(f"resume: changed settings, applied from step {step} on: {shown}")

    # -- one step, its record ---------------------------------------------------------------------
    def train_step(self) -> StepOutput:
        """One optimizer step (``grass_llm.recipes.step.train_step``); the progress moves on."""
        out = train_step(self.objs, self.batches, self.cfg, self.launch, self.device, self.signals)
        self.progress.step += 1
        self.progress.tokens_seen += out.local_tokens
        return out

    def log(self, out: StepOutput) -> None:
        self.report.log(out, self.progress.step, self.progress.tokens_seen, self.objs)

    def note(self, msg: str) -> None:
        self.report.note(msg)

    def heldout_accuracy(self) -> float:
        """Accuracy (%) on ``eval_heldout`` built-in arithmetic questions not in the training sample."""
        return heldout_accuracy(self.objs.model, self.objs.tokenizer, self.device, self.heldout_n)

    # -- saving ---------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """A checkpoint of the current step (``RecipeCheckpointer.save``); its path, on every rank."""
        self.phase = f"saving the checkpoint of step {self.progress.step}"
        path = self.checkpointer.save(self.progress, self.batches)
        self.save_pending = False
        return path

    def save_final(self) -> tuple[Path, str]:
        """The final model (the method's ``save_final``) + tokenizer in ``RUN/final``; non-finite
        weights are never written (``TrainFailed``)."""
        bad = self.checkpointer.weights_nonfinite()
        if bad:
            raise TrainFailed(
                f"the final weights are not finite ({bad[0]}, ...); not saved. {self.progress.kept()}"
            )
        model = unsharded_model(self.objs, self.cfg, self.launch, self.dtype) if self.fsdp else self.objs.model
        if not self.launch.is_main:  # (FSDP2: the other ranks took part in gathering the weights)
            return self.cfg.run_dir / FINAL_DIR, ""
        return write_final(self.objs, self.cfg, model, self.progress.kept())

    def resume_command(self, drop: tuple[str, ...] = ()) -> str:
        """The command that continues this run: this invocation's arguments (minus the ``drop`` keys) and
        ``--resume``; from Python, ``--resume=`` the last checkpoint."""
        if self.resume_args is None:
            last = self.progress.last_checkpoint
            target = last if last is not None else self.cfg.run_dir / CHECKPOINT_DIR
            return shlex.join(["grass-llm", "train", f"--resume={target}"])
        keep = [w for w in self.resume_args if "=" not in w or w.split("=", 1)[0].strip() not in drop]
        cmd = shlex.join(["grass-llm", "train", *keep, "--resume"])
        if self.launch.distributed:
            return f"the same torchrun / accelerate command with --resume ({cmd.replace('grass-llm train', '...')})"
        return cmd

    def where_stopped(self) -> str:
        """For a stop by a second signal (or during setup): where it stopped and what is saved."""
        return stopped_detail(self.phase, self.progress.last_checkpoint, self.resume_command())

    # -- the loop -------------------------------------------------------------------------------
    def run(self, t_start: float) -> TrainResult:
        total = self.objs.total_steps
        self.report.open_log(self.progress.step)
        self.report.announce(self.objs, self.dtype)
        self.objs.model.train()
        self.report.open_bar(self.progress.step, total)
        deferred = self.signals.deferred() if self.signals is not None else contextlib.nullcontext()
        with deferred, warnings.catch_warnings():
            # skipped steps are reported by the loop (_count_skipped), step by step
            warnings.filterwarnings("ignore", message="GrassOptimizer skipped a step", category=RuntimeWarning)
            stop, last_loss = self._loop()
            final_dir, final_kind, heldout = self._finish(stop)
            self.launch.barrier()
            stop = stop or self._signal()
        return TrainResult(
            run_dir=self.cfg.run_dir,
            steps=self.progress.step,
            total_steps=total,
            final_loss=last_loss,
            checkpoint=self.progress.last_checkpoint,
            final_dir=final_dir,
            final_kind=final_kind,
            log_path=self.cfg.run_dir / LOG_FILENAME,
            seconds=time.perf_counter() - t_start,
            start_step=self.progress.start_step,
            skipped_steps=list(self.skipped),
            heldout=heldout,
            interrupted=stop,
            resume_command=self.resume_command(),
        )

    def _loop(self) -> tuple[int | None, float | None]:
        """Steps until the end (``stop_at_step``, else the run's last step) or a stop signal; returns
        (the signal or None, the last loss). Checkpoints every ``save_every`` steps."""
        cfg, progress = self.cfg, self.progress
        total = self.objs.total_steps
        end = total if cfg.stop_at_step is None else min(cfg.stop_at_step, total)
        last_loss = None
        try:
            self.phase = "training"
            while progress.step < end:
                out = self.train_step()
                last_loss = out.loss
                self.log(out)
                self._count_skipped(out)
                if out.signal:
                    return out.signal, last_loss
                if cfg.save_every and progress.step % cfg.save_every == 0 and progress.step < end:
                    self.save_pending = True
                if self.save_pending and not self.streak:
                    self.save_checkpoint()  # (deferred while steps are being skipped)
                self.phase = "training"
        finally:
            self.report.close()
        return None, last_loss

    def _finish(self, stop: int | None) -> tuple[Path | None, str, tuple[float | None, float | None, int] | None]:
        """The last checkpoint, and at the run's end the final model and the held-out accuracy;
        returns (final model directory, its description, held-out result)."""
        step, total = self.progress.step, self.objs.total_steps
        if stop is not None:
            self.note(f"{signal_name(stop)} received: saving a checkpoint of step {step} ...")
        last = self.progress.last_checkpoint
        if last is None or last.name != checkpoint_path(self.cfg.run_dir, step).name:
            self.save_checkpoint()
        final_dir, final_kind = None, f"not written: stopped at step {step} of {total}"
        heldout = None
        # replicated: every rank holds the same weights and rank 0 writes them; FSDP2: every rank
        # takes part (the weights are gathered, the held-out questions run on the sharded model)
        if stop is None and (self.launch.is_main or self.fsdp):
            if step == total:  # (stop_at_step: the run goes on after --resume)
                self.phase = "writing the final model"
                final_dir, final_kind = self.save_final()
                if self.launch.is_main:  # the run is complete: what overwrite=true replaced can go
                    delete_replaced(self.cfg.run_dir, self.note)
                if self.heldout_n and not self._stop_requested():
                    self.phase = "evaluating"
                    heldout = (self.progress.heldout_before, self.heldout_accuracy(), self.heldout_n)
        elif self.heldout_n:
            heldout = (self.progress.heldout_before, None, self.heldout_n)
        return final_dir, final_kind, heldout

    def _signal(self) -> int | None:
        return self.signals.received if self.signals is not None else None

    def _stop_requested(self) -> bool:
        """A signal on this rank, or (FSDP2, where every rank must go on together) on any rank."""
        if not self.fsdp:
            return self._signal() is not None
        (n,) = self.launch.sum([self._signal() is not None], self.device)
        return n > 0

    def _count_skipped(self, out: StepOutput) -> None:
        """Count a skipped step; too many in a row stop the run (``TrainFailed``), keeping the last
        checkpoint (no checkpoint is written while steps are being skipped)."""
        if not out.skipped:
            self.streak = 0
            return
        step = self.progress.step
        self.skipped.append(step)
        self.streak += 1
        if len(self.skipped) <= 10:
            self.note(f"step {step}: gradients not finite (loss {out.loss:.4g}); step skipped, weights unchanged")
        elif len(self.skipped) == 11:
            self.note("more steps with non-finite gradients: skipped and counted, not shown")
        limit = self.cfg.max_nonfinite_steps
        if limit and self.streak >= limit:
            raise TrainFailed(
                f"stopped at step {step}: {self.streak} steps in a row had non-finite gradients "
                f"(steps {step - self.streak + 1}-{step}, max_nonfinite_steps={limit}); the run is "
                f"diverging. Nothing was saved after step {step - self.streak}. {self.progress.kept()} "
                f"Continue from it with a lower learning rate: {self.resume_command(drop=('lr',))} lr=<lower>"
            )
