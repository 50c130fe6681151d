"""Peak device memory of a training step, without a GPU (``grass-llm memory``).

``tracker`` counts live storage bytes under a dispatch mode (torch only, with ``origins`` and
``workspaces``: the library may use it); ``estimate`` runs the training steps ``grass-llm train`` would run,
on fake tensors, and reports the peak (its parts: ``inputs``, ``model``, ``fake``, ``step``, ``result``,
``cuda``, ``report``); ``fit`` chooses the fastest settings whose peak fits a budget (``budget`` reads the
sizes); ``cli`` is ``grass-llm memory``. The names below are imported on first
access (PEP 562), so importing ``grass_llm.memory.tracker`` does not load the estimator (nor transformers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> module of grass_llm.memory that defines it
_EXPORTS = {
    "CATEGORIES": "tracker",
    "LiveBytesTracker": "tracker",
    "MemoryEstimateError": "inputs",
    "OPTIMIZER_IMPLS": "inputs",
    "methods": "inputs",
    "load_config": "model",
    "TrainingStep": "step",
    "training_step": "step",
    "MemoryEstimate": "result",
    "whole_run": "result",
    "estimate_memory": "estimate",
    "measure_cuda_step": "cuda",
    "format_table": "report",
}

__all__ = [
    "CATEGORIES",
    "OPTIMIZER_IMPLS",
    "LiveBytesTracker",
    "MemoryEstimate",
    "MemoryEstimateError",
    "TrainingStep",
    "estimate_memory",
    "format_table",
    "load_config",
    "measure_cuda_step",
    "methods",
    "training_step",
    "whole_run",
]

if TYPE_CHECKING:
    from grass_llm.memory.cuda import measure_cuda_step
    from grass_llm.memory.estimate import estimate_memory
    from grass_llm.memory.inputs import OPTIMIZER_IMPLS, MemoryEstimateError, methods
    from grass_llm.memory.model import load_config
    from grass_llm.memory.report import format_table
    from grass_llm.memory.result import MemoryEstimate, whole_run
    from grass_llm.memory.step import TrainingStep, training_step
    from grass_llm.memory.tracker import CATEGORIES, LiveBytesTracker


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'grass_llm.memory' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"grass_llm.memory.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
