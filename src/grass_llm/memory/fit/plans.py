"""A plan and its parts: the configurations considered (:class:`Candidate`), each with its modelled speed and
peaks (:class:`Evaluated`), and the planner's answer for one method (:class:`FitPlan`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from grass_llm.memory.budget import format_size
from grass_llm.memory.fit.margin import Margin

__all__ = ["CHECKPOINTING", "KNOBS", "RESIDENCIES", "Candidate", "Evaluated", "FitError", "FitPlan"]

#: The ``grass-llm train`` keys a plan chooses.
KNOBS = ("batch_size", "grad_accum", "activation_checkpointing", "grass.offload")
#: ``grass.offload`` of the layer-wise methods a plan chooses from
RESIDENCIES = ("off", "period", "step")
#: ``activation_checkpointing`` modes, least recomputation first
CHECKPOINTING = ("none", "frozen", "full")


class FitError(ValueError):
    """An argument of the planner is invalid; the message names it and what is allowed."""


@dataclass(frozen=True)
class Candidate:
    """One configuration: the micro-batch, gradient accumulation, checkpointing and residency."""

    micro_batch: int
    grad_accum: int
    activation_checkpointing: str
    residency: str | None = None  # grass.offload of the layer-wise methods; None for the others

    @property
    def settings(self) -> dict[str, Any]:
        """The ``grass-llm train`` keys of this configuration."""
        out: dict[str, Any] = {
            "batch_size": self.micro_batch,
            "grad_accum": self.grad_accum,
            "activation_checkpointing": self.activation_checkpointing,
        }
        if self.residency is not None:
            out["grass.offload"] = self.residency
        return out

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.settings.items())


@dataclass
class Evaluated:
    """A candidate with its modelled speed and (when estimated) its peaks, in bytes."""

    candidate: Candidate
    step_seconds: float
    tokens_per_s: float
    speed_breakdown: dict[str, float]
    lower_bound: int  # the whole-run peak is at least this (weights and the states the run must hold)
    train_peak: int | None = (
        None  # the training step, worst-case layers (+ accumulated gradients, off's growth)
    )
    probe_peak: int | None = None  # the probing step (methods that probe)
    peak: int | None = None  # whole-run: the larger of the two; None when not estimated
    needed: int | None = None  # peak + margin
    verdict: str = "not estimated"  # chosen | too big | too big (lower bound) | not estimated

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["settings"] = self.candidate.settings
        return d


@dataclass
class FitPlan:
    """The planner's answer for one method: the chosen configuration (None: nothing fits) and the ones it
    rejected, in the speed model's order."""

    model: str
    method: str
    budget: int
    batch_size: int  # effective batch B (rows per optimizer step)
    seq_len: int
    margin: Margin
    candidates: list[Evaluated]  # every configuration, fastest first
    chosen: Evaluated | None
    seconds: float = 0.0  # time taken to plan
    estimates: int = 0  # estimates run (not counting cached ones)
    cached: int = 0  # estimates found in the cache

    @property
    def fits(self) -> bool:
        return self.chosen is not None

    @property
    def settings(self) -> dict[str, Any]:
        """The chosen ``grass-llm train`` keys (:data:`KNOBS`); :class:`FitError` when nothing fits."""
        return self._chosen().candidate.settings

    @property
    def rejected(self) -> list[Evaluated]:
        """The configurations faster than the chosen one (or all, when nothing fits) and why they were not."""
        return [e for e in self.candidates if e.verdict.startswith("too big")]

    @property
    def smallest(self) -> Evaluated | None:
        """The estimated configuration with the smallest whole-run peak."""
        known = [e for e in self.candidates if e.peak is not None]
        return min(known, key=lambda e: e.peak) if known else None

    def _chosen(self) -> Evaluated:
        if self.chosen is None:
            raise FitError(self.refusal())
        return self.chosen

    def refusal(self) -> str:
        """Why nothing fits, in one line (names the smallest peak found)."""
        small = self.smallest
        if small is None:
            bound = min(self.candidates, key=lambda e: e.lower_bound)
            return (
                f"nothing fits {format_size(self.budget)} for {self.method} on {self.model} at batch "
                f"{self.batch_size} x {self.seq_len}: even the weights and the states it must hold need "
                f"{format_size(bound.lower_bound)} + margin {format_size(self.margin.of(bound.lower_bound))}"
            )
        return (
            f"nothing fits {format_size(self.budget)} for {self.method} on {self.model} at batch "
            f"{self.batch_size} x {self.seq_len}: the smallest whole-run peak found is {format_size(small.peak)} "
            f"({small.candidate.describe()}) + margin {format_size(self.margin.of(small.peak))} = "
            f"{format_size(small.needed)}"
        )

    def train_args(self) -> list[str]:
        """The chosen settings as ``grass-llm train`` arguments (``key=value``)."""
        return [f"{k}={v}" for k, v in self.settings.items()]

    def apply(self, cfg: Any) -> Any:
        """``cfg`` (a ``grass_llm.recipes.train_config.TrainConfig``) with the chosen settings."""
        s = self.settings
        changes: dict[str, Any] = {k: s[k] for k in ("batch_size", "grad_accum", "activation_checkpointing")}
        if "grass.offload" in s:
            changes["grass"] = dataclasses.replace(cfg.grass, offload=s["grass.offload"])
        return dataclasses.replace(cfg, **changes)

    def grass_config(self, base: Any = None) -> Any:
        """A ``GrassConfig`` (``base``, default the defaults) with the chosen residency (``offload``)."""
        from grass_llm.config import GrassConfig

        base = GrassConfig() if base is None else base
        res = self.settings.get("grass.offload")
        return base if res is None else dataclasses.replace(base, offload=res)

    def training_arguments(self) -> dict[str, Any]:
        """Keyword arguments of ``transformers.TrainingArguments`` for the chosen micro-batch, accumulation
        and full checkpointing (``frozen``: call ``grass_llm.checkpoint_frozen_blocks(model)`` instead)."""
        s = self.settings
        return {
            "per_device_train_batch_size": s["batch_size"],
            "gradient_accumulation_steps": s["grad_accum"],
            "gradient_checkpointing": s["activation_checkpointing"] == "full",
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "method": self.method,
            "budget": self.budget,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "margin": dataclasses.asdict(self.margin),
            "fits": self.fits,
            "settings": self.chosen.candidate.settings if self.chosen else None,
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "candidates": [e.to_dict() for e in self.candidates],
            "seconds": self.seconds,
            "estimates": self.estimates,
            "cached": self.cached,
            "refusal": None if self.fits else self.refusal(),
        }
