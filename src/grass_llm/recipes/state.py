"""The recipe's checkpoints: what ``state.pt`` records of a run (a :class:`Progress`, the scheduler, the
data position, the RNG states, the settings), writing a checkpoint of finite weights only (plain, or
sharded under FSDP2), and restoring one on resume (any world size, changed settings applied).

The files and their atomicity are ``grass_llm.recipes.run_checkpoint``'s; this module decides what goes
into them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grass_llm.recipes.build import Batches, TrainObjects
from grass_llm.recipes.errors import TrainFailed, TrainInputError
from grass_llm.recipes.launch import Launch
from grass_llm.recipes.resume import Resume, check_data, effective_lr
from grass_llm.recipes.run_checkpoint import (
    SHARDED_DIR,
    CheckpointWriteError,
    begin_checkpoint,
    checkpoint_path,
    describe_error,
    file_digests,
    finish_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from grass_llm.recipes.train_config import TrainConfig, config_yaml

__all__ = ["STATE_VERSION", "Progress", "RecipeCheckpointer", "nonfinite"]

STATE_VERSION = 2


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint (with the objects' own states)."""

    step: int = 0  # the global optimizer step reached
    start_step: int = 0  # the step this invocation started from
    tokens_seen: int = 0
    heldout_before: float | None = None  # held-out accuracy (%) before training
    history: list[dict[str, Any]] = field(default_factory=list)  # resumes that changed settings
    last_checkpoint: Path | None = None  # the newest checkpoint of the run (not saved)

    def kept(self) -> str:
        """What a failed run leaves behind, for its error message."""
        if self.last_checkpoint is None:
            return "No checkpoint was written in this run."
        if not self.last_checkpoint.is_dir():
            return f"The last checkpoint, {self.last_checkpoint}, is gone (deleted from outside the run)."
        return f"The last checkpoint is {self.last_checkpoint}."


def nonfinite(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state`` that are not finite."""
    return [n for n, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _write_failed(path: Path, e: BaseException, kept: str) -> str:
    """The message of a checkpoint that could not be written: which file and why, what is kept, what to do."""
    what = str(e) if isinstance(e, CheckpointWriteError) else f"cannot write the checkpoint {path}: {describe_error(e)}"
    return (
        f"{what}. Nothing of this checkpoint was kept. {kept} Make room (or fix the permissions), then "
        "continue with --resume"
    )


class RecipeCheckpointer:
    """Saves and restores a run's checkpoints (module docstring)."""

    def __init__(self, cfg: TrainConfig, launch: Launch, device: torch.device, objs: TrainObjects, fsdp: bool):
        self.cfg, self.launch, self.device, self.objs, self.fsdp = cfg, launch, device, objs, fsdp

    # -- saving ----------------------------------------------------------------------------------
    def save(self, progress: Progress, batches: Batches) -> Path:
        """Save a checkpoint from rank 0 (every rank builds the payload: with ZeRO-1 sharding the
        optimizer's ``state_dict()`` is a collective). Returns its path on every rank once complete.
        Non-finite weights are never saved (``TrainFailed``): the last checkpoint stays the newest."""
        objs, step = self.objs, progress.step
        model_state = None if self.fsdp else self.model_state()
        bad = self.weights_nonfinite(model_state)
        if bad:
            n = len(objs.model.state_dict()) if model_state is None else len(model_state)
            raise TrainFailed(
                f"the weights after step {step} are not finite ({len(bad)} of {n} tensors, "
                f"e.g. {bad[0]}); they were not saved. {progress.kept()}"
            )
        state = {
            "version": STATE_VERSION,
            "step": step,
            "tokens_seen": progress.tokens_seen,
            "scheduler": objs.scheduler.state_dict(),
            "data": batches.state_dict(),
            "data_identity": objs.data.to_dict(),
            "rng": rng_state(self.device),
            "config": self.cfg.to_dict(),
            "history": progress.history,
            "heldout_before": progress.heldout_before,
        }
        path = checkpoint_path(self.cfg.run_dir, step)
        if self.fsdp:
            self._save_sharded(step, state, progress.kept)
        else:
            # (on every rank: with ZeRO-1 the optimizer's state_dict() is a collective)
            payload = {"model": model_state, "optimizer": objs.optimizer.state_dict(), "state": state}
            if self.launch.is_main:
                try:
                    save_checkpoint(self.cfg.run_dir, step, payload, config_yaml(self.cfg, progress.history))
                except OSError as e:
                    raise TrainFailed(_write_failed(path, e, progress.kept())) from None
        self.launch.barrier()  # invariant: no rank goes on (or exits) before the checkpoint is complete
        progress.last_checkpoint = path
        return path

    def _save_sharded(self, step: int, state: dict[str, Any], kept: Callable[[], str]) -> None:
        """Every rank writes its shards into ``step-N.tmp/sharded`` (torch.distributed.checkpoint), then
        rank 0 adds ``state.pt``, the manifest of every rank's files and the marker, and renames it into
        place: a rank killed at any moment leaves every earlier checkpoint as it was."""
        from torch.distributed.checkpoint.api import CheckpointException

        from grass_llm.distributed.sharded_checkpoint import save_sharded_checkpoint

        launch, run_dir = self.launch, self.cfg.run_dir
        try:
            tmp = begin_checkpoint(run_dir, step, create=launch.is_main)
            launch.barrier()  # invariant: the empty step-N.tmp exists before any rank writes into it
            save_sharded_checkpoint(tmp / SHARDED_DIR, self.objs.model, self.objs.optimizer)  # (ends with a barrier)
            # each rank hashes the shards it wrote (DCP names them __<rank>_<n>.distcp), rank 0 lists them
            mine = file_digests(tmp, f"{SHARDED_DIR}/__{launch.rank}_*.distcp")
            digests = launch.gather_object(mine)
            if launch.is_main:
                missing = [r for r, d in enumerate(digests) if not d]
                if missing:
                    raise OSError(f"ranks {missing} wrote no shard into {tmp / SHARDED_DIR}")
                known = {k: v for d in digests for k, v in d.items()}
                history = state["history"]
                finish_checkpoint(run_dir, step, tmp, {"state": state}, config_yaml(self.cfg, history), known)
        except (OSError, CheckpointException) as e:
            raise TrainFailed(_write_failed(checkpoint_path(run_dir, step), e, kept())) from None

    # -- the model's state (the whole model, or the adapters) -------------------------------------
    def model_state(self) -> dict[str, Any]:
        model = self.objs.model
        if self.objs.method.adapters_only:
            return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        return {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}

    def weights_nonfinite(self, model_state: dict[str, Any] | None = None) -> list[str]:
        """Names of saved tensors that are not finite (``model_state``: :meth:`model_state` if already
        taken); under FSDP2 a collective: each rank checks its shards."""
        if not self.fsdp:
            return nonfinite(self.model_state() if model_state is None else model_state)
        from grass_llm.distributed.fsdp2 import local_tensor

        bad = nonfinite({n: local_tensor(t) for n, t in self.objs.model.state_dict().items()})
        (n_bad,) = self.launch.sum([len(bad)], self.device)
        return bad or ["(a shard on another rank)"] * int(n_bad)

    def _load_model_state(self, state: dict[str, Any]) -> None:
        model, adapters_only = self.objs.model, self.objs.method.adapters_only
        if self.fsdp:  # full tensors of an unsharded run -> this rank's shards
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            options = StateDictOptions(full_state_dict=True, strict=not adapters_only)
            set_model_state_dict(model, state, options=options)
            return
        if adapters_only:
            params = dict(model.named_parameters())
            missing = [n for n in state if n not in params]
            if missing:
                raise TrainInputError(f"checkpoint adapters do not match the model: {missing[:3]} ...")
            with torch.no_grad():
                for n, t in state.items():
                    params[n].copy_(t)
            return
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise TrainInputError(f"checkpoint does not match the model; missing {result.missing_keys[:3]} ...")

    # -- restoring -------------------------------------------------------------------------------
    def restore(self, resume: Resume, progress: Progress, batches: Batches, say: Callable[[str], None]) -> None:
        """Load ``resume``'s checkpoint into the objects, ``progress`` and ``batches``; a setting changed
        on resume is applied from here on (and recorded in ``progress.history``). A checkpoint that does
        not fit this run (its data, model or optimizer state) is refused (``TrainInputError``); nothing on
        disk has changed by then (``grass_llm.recipes.resume``)."""
        ckpt, state = resume.ckpt, resume.ckpt["state"]
        data_changed = check_data(state.get("data_identity"), self.objs.data.to_dict(), self.cfg, resume.path)
        try:
            self._load_weights_and_optimizer(ckpt)
            self._restore_schedule(state, resume.changes)
        except TrainInputError:
            raise
        except (ValueError, RuntimeError, KeyError, TypeError) as e:
            raise TrainInputError(f"cannot resume from {resume.path}: it does not fit this run: {e}") from None
        moved = batches.load_state_dict(state["data"], data_changed)
        if data_changed:
            progress_note = moved or "continuing at the saved data position"
            say(f"resume: the training data changed since {resume.path} (allow_data_change=true): {progress_note}")
        progress.step = progress.start_step = int(state["step"])
        progress.tokens_seen = int(state["tokens_seen"])
        progress.heldout_before = state.get("heldout_before")
        progress.history = list(state.get("history", []))
        set_rng_state(state["rng"], self.device)
        progress.last_checkpoint = resume.path
        changes = {k: list(v) for k, v in resume.changes.items()}
        if data_changed:
            saved, now = state["data_identity"], self.objs.data.to_dict()
            changes["data"] = [saved["fingerprint"][:12], now["fingerprint"][:12]]
        if changes:
            progress.history.append({"step": progress.step, "changes": changes})

    def _load_weights_and_optimizer(self, ckpt: dict[str, Any]) -> None:
        objs = self.objs
        if "sharded" in ckpt:  # written by an FSDP2 run: DCP reshards to this run's processes
            from grass_llm.distributed.sharded_checkpoint import load_sharded_checkpoint

            load_sharded_checkpoint(ckpt["sharded"], objs.model, objs.optimizer)
            return
        self._load_model_state(ckpt["model"])
        optimizer_state = ckpt["optimizer"]
        if self.fsdp and not objs.method.layer_wise:  # (GrassOptimizer shards full states itself)
            from grass_llm.distributed.sharded_checkpoint import shard_like_params

            optimizer_state = shard_like_params(optimizer_state, objs.optimizer)
        objs.optimizer.load_state_dict(optimizer_state)

    def _restore_schedule(self, state: dict[str, Any], changes: dict[str, Any]) -> None:
        """The scheduler's position from the checkpoint; its shape (max_steps / epochs) and peak (lr)
        from the current settings when those changed; the optimizer's LR from the scheduler."""
        scheduler, optimizer = self.objs.scheduler, self.objs.optimizer
        schedule = [dict(f.__dict__) for f in scheduler.lr_lambdas]  # from the current settings
        scheduler.load_state_dict(state["scheduler"])
        if {"lr", "max_steps", "epochs"} & set(changes):
            for f, d in zip(scheduler.lr_lambdas, schedule):
                f.__dict__.update(d)
            scale = self.cfg.learning_rate / effective_lr(state["config"])
            scheduler.base_lrs = [b * scale for b in scheduler.base_lrs]
            t = scheduler.last_epoch
            scheduler._last_lr = [b * f(t) for b, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                group["initial_lr"] = base
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
