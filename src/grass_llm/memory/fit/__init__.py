"""Will it fit? The fastest training settings whose whole-run peak fits a GPU's memory.

:func:`plan` answers the question every user of a memory-efficient fine-tuner asks first: "what runs on my
24 GB card, and how fast?". For one method and an effective batch of B rows of T tokens it considers

* the micro-batch: ``batch_size`` = m rows with ``grad_accum`` = B / m (every divisor m of B);
* ``activation_checkpointing``: ``none``, ``frozen`` (layer-wise methods only: recompute the frozen blocks
  that backward passes through) or ``full``;
* the GRASS state residency ``grass.offload`` (layer-wise methods only): ``off``, ``period`` or ``step``;

orders them by the speed model below (fastest first), and returns the first whose **whole-run peak** plus
the :class:`Margin` fits the budget. A configuration's whole-run peak is estimated by
:func:`grass_llm.memory.estimate.estimate_memory` (the code ``grass-llm train`` runs, on fake tensors):

* the training step with the worst-case active layers (``0 .. gamma-1``: activations are kept from the lowest
  active layer upward), one micro-batch of m rows;
* with ``grad_accum > 1``, plus the gradients of the trained parameters (they are kept from one micro-batch
  to the next; the estimate runs one micro-batch per step, so this is an upper bound, exact when the step's
  peak comes before its gradients exist, as it does for GRASS and LoRA);
* with ``grass.offload=off`` and ``on_reactivation=keep``, plus the AdamW states of every decoder layer the
  run will have trained (``off`` keeps each layer's state on the device from its first activation on);
* for the methods that probe (``grass``, ``grass-static``), the larger of that and the probing step.

**Speed model** (:class:`SpeedModel`, constants fitted to the H200 measurements in :data:`MEASUREMENTS`, see
``docs/fit.md``). One optimizer step takes::

    grad_accum * (t_micro + FLOPs(micro-batch) / R)      forward, backward and recomputation
    + update bytes / HBM bandwidth                        the AdamW update (memory bound)
    + streamed state bytes / B_stream                     offload=step: states in and out every step
    + resample state bytes / (B_copy * period)            offload=period: arriving and leaving units

FLOPs count the matmuls: forward ``2 x params x tokens`` per block plus causal attention, backward the
input gradient of every block it passes through (from the lowest active layer up; the expected lowest of
gamma uniformly drawn layers) and the weight gradient of the trained ones, and one more forward for each
recomputed block. ``t_micro`` is the fixed cost of a micro-batch (host dispatch and synchronisation, which no
batch size amortises): larger micro-batches are faster. Recomputation and transfers are costs; nothing is
assumed hidden except what the fit measured. The model orders the configurations of ONE method; it is not
a benchmark (tokens/s are printed as the model's, for an H200).

The chosen settings are ``grass-llm train`` keys (:attr:`FitPlan.settings`); ``memory_budget=`` in
``grass-llm train`` applies them before anything is built (:func:`apply_memory_budget`), and from Python
:meth:`FitPlan.apply` / :meth:`FitPlan.grass_config` / :meth:`FitPlan.training_arguments` do.

Estimates are expensive (seconds each for a 7B model), so the search estimates the fastest candidates first
and stops at the first that fits; a candidate whose lower bound (weights, plus the states it must hold)
already exceeds the budget is rejected without an estimate; the probing step, which no residency or (with
``grass.probe_checkpointing``) checkpointing mode changes, is estimated once per micro-batch size; and
every estimate is cached for the process.

The parts: :mod:`~grass_llm.memory.fit.margin` (:class:`Margin`), :mod:`~grass_llm.memory.fit.speed` (the
speed model), :mod:`~grass_llm.memory.fit.measurements` (what it is fitted to), :mod:`~grass_llm.memory.fit.plans`
(:class:`FitPlan` and its candidates), :mod:`~grass_llm.memory.fit.context` (a plan's resolved inputs),
:mod:`~grass_llm.memory.fit.peaks` (a candidate's work, bound and estimated peaks),
:mod:`~grass_llm.memory.fit.search` (:func:`plan`), :mod:`~grass_llm.memory.fit.report` (:func:`format_plan`),
:mod:`~grass_llm.memory.fit.train` (``memory_budget=``). ``grass-llm memory --budget`` is
:mod:`grass_llm.memory.cli`.
"""

from __future__ import annotations

import importlib
from typing import Any

from grass_llm.memory.budget import format_size, parse_budget
from grass_llm.memory.fit.margin import Margin
from grass_llm.memory.fit.measurements import (
    MEASURED_SHAPES,
    MEASUREMENTS,
    Measurement,
    calibrate,
    modelled_tokens_per_s,
)
from grass_llm.memory.fit.plans import KNOBS, RESIDENCIES, Candidate, Evaluated, FitError, FitPlan
from grass_llm.memory.fit.report import format_plan
from grass_llm.memory.fit.search import plan
from grass_llm.memory.fit.speed import SPEED_MODEL, ModelShape, SpeedModel, Work, model_shape
from grass_llm.memory.fit.train import apply_memory_budget, plan_for_train_config

__all__ = [
    "KNOBS",
    "MEASURED_SHAPES",
    "MEASUREMENTS",
    "RESIDENCIES",
    "SPEED_MODEL",
    "Candidate",
    "Evaluated",
    "FitError",
    "FitPlan",
    "Margin",
    "Measurement",
    "ModelShape",
    "SpeedModel",
    "Work",
    "add_cli_arguments",
    "apply_memory_budget",
    "calibrate",
    "cli_main",
    "cli_plan",
    "format_plan",
    "format_size",
    "model_shape",
    "modelled_tokens_per_s",
    "parse_budget",
    "plan",
    "plan_for_train_config",
]

#: ``grass-llm memory``'s command line, which ``grass_llm.cli`` finds here (its module is
#: :mod:`grass_llm.memory.cli`; imported on first access, since that module imports this package's parts)
_COMMAND_LINE = {"add_cli_arguments": "add_cli_arguments", "cli_main": "cli_main", "cli_plan": "plan_main"}


def __getattr__(name: str) -> Any:
    if name not in _COMMAND_LINE:
        raise AttributeError(f"module 'grass_llm.memory.fit' has no attribute {name!r}")
    return getattr(importlib.import_module("grass_llm.memory.cli"), _COMMAND_LINE[name])
