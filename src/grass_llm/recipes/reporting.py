"""What a run shows and records: lines on rank 0's stdout (above the progress bar), the announcement of
the run, the progress bar, and one ``log.jsonl`` record per step (``grass_llm.runlog``, mirrored to
TensorBoard)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from grass_llm.recipes.build import TrainObjects
from grass_llm.recipes.errors import TrainFailed
from grass_llm.recipes.launch import Launch
from grass_llm.recipes.run_checkpoint import describe_error
from grass_llm.recipes.step import StepOutput
from grass_llm.recipes.train_config import TrainConfig
from grass_llm.runlog import RunLogger, RunLogWriteError

__all__ = ["Reporter", "fmt_bytes", "memory", "pct"]


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}%"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def memory(device: torch.device) -> tuple[int | None, int | None]:
    """(peak CUDA bytes allocated since the last reset or None, process RSS bytes or None)."""
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

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return cuda, rss


def _quiet(*args: Any, **kwargs: Any) -> None:
    """``print`` for ranks other than 0 under torchrun."""


class Reporter:
    """Rank 0's output of a run: ``say`` / ``note`` lines, the progress bar and the run log."""

    def __init__(
        self, cfg: TrainConfig, launch: Launch, device: torch.device, kept: Callable[[], str] | None = None
    ) -> None:
        self.cfg, self.launch, self.device = cfg, launch, device
        self.kept = kept or (lambda: "")  # what a failed run leaves, for its error message
        self.say = print if launch.is_main else _quiet
        self.pbar: Any = None
        self.logger: RunLogger | None = None

    def note(self, msg: str) -> None:
        """A line on stdout above the progress bar (rank 0)."""
        if not self.launch.is_main:
            return
        if self.pbar is not None and not getattr(self.pbar, "disable", True):
            self.pbar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)

    def announce(self, objs: TrainObjects, dtype: torch.dtype) -> None:
        cfg, launch, model, device = self.cfg, self.launch, objs.model, self.device
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        threads = torch.get_num_threads()
        self.say(
            f"grass-llm train: {cfg.method} on {cfg.model} ({objs.num_layers} layers, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {dtype}, {device}"
            + (f", {threads} CPU thread" + ("s" if threads != 1 else "") if device.type == "cpu" else "")
            + f"); data {cfg.data}: {len(objs.loader)} batches of {cfg.batch_size}/epoch; {objs.total_steps} steps"
            + (f" ({cfg.probe_steps} probing)" if cfg.probe_steps else "")
            + ("" if objs.method.layer_wise else f"; {n_trainable / 1e6:.2f}M trainable")
            + (
                f"; {launch.world_size} processes x {cfg.batch_size // launch.world_size} rows"
                if launch.distributed
                else ""
            )
        )

    def open_log(self, step: int) -> None:
        """Open the run log on rank 0, without the records after ``step`` (those of an earlier try)."""
        if self.launch.is_main:
            try:
                self.logger = RunLogger(self.cfg.run_dir, tensorboard=self.cfg.tensorboard, resume_from=step)
            except (OSError, RuntimeError) as e:  # (a full disk; tensorboard's writer)
                self._failed(
                    RunLogWriteError(f"cannot write the run log in {self.cfg.run_dir}: {describe_error(e)}")
                )

    def _failed(self, e: OSError) -> None:
        """A log that cannot be written ends the run (exit code 1), saying what is kept."""
        kept = f" {self.kept()}" if self.kept() else ""
        raise TrainFailed(f"{e}.{kept} Make room (or fix the out_dir), then continue with --resume")

    def open_bar(self, step: int, total: int) -> None:
        """The progress bar (rank 0 shows it, on stderr)."""
        from tqdm.auto import tqdm

        self.pbar = tqdm(
            total=total,
            initial=step,
            desc=self.cfg.method,
            dynamic_ncols=True,
            file=sys.stderr,
            disable=not self.launch.is_main,
        )

    def log(self, out: StepOutput, step: int, tokens_seen: int, objs: TrainObjects) -> None:
        """The step's record (``log.jsonl``, TensorBoard) and the progress bar."""
        cuda_mem, rss = memory(self.device)
        record: dict[str, Any] = {
            "step": step,
            "phase": out.phase,
            "loss": out.loss,
            "lr": out.lr,
            "active_layers": [] if out.phase == "probe" else out.active,
            "tokens": out.tokens,
            "tokens_per_s": out.tokens / out.seconds if out.seconds > 0 else 0.0,
            "memory_bytes": cuda_mem,
            "rss_bytes": rss,
            "tokens_seen": tokens_seen,
            "skipped": out.skipped,
        }
        layer_wise = objs.method.layer_wise
        if layer_wise:
            record["importance"] = objs.optimizer.importance
            record["probabilities"] = objs.optimizer.probabilities
        if self.logger is not None:
            try:
                self.logger.log(record)
            except RunLogWriteError as e:
                self._failed(e)
        layers = "probe" if out.phase == "probe" else ",".join(map(str, out.active))
        self.pbar.update(1)
        self.pbar.set_postfix(
            loss=f"{out.loss:.3f}",
            tok_s=f"{record['tokens_per_s']:.0f}",
            layers=layers if layer_wise else "all",
            mem=fmt_bytes(cuda_mem if cuda_mem is not None else rss),
            refresh=False,
        )

    def close(self) -> None:
        if self.pbar is not None:
            self.pbar.close()
        if self.logger is not None:
            self.logger.close()
