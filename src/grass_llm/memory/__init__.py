"""Peak device memory of a training step, without a GPU (``grass-llm memory``).

``tracker`` counts live storage bytes under a dispatch mode (torch only: the library may use it);
``estimate`` runs the training steps ``grass-llm train`` would run, on fake tensors, and reports the peak;
``fit`` chooses the fastest settings whose peak fits a budget. The names below are imported on first
access (PEP 562), so importing ``grass_llm.memory.tracker`` does not load the estimator (nor transformers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> module of grass_llm.memory that defines it
_EXPORTS = {
    "CATEGORIES": "tracker",
    "LiveBytesTracker": "tracker",
    "OPTIMIZER_IMPLS": "estimate",
    "MemoryEstimate": "estimate",
    "MemoryEstimateError": "estimate",
    "TrainingStep": "estimate",
    "estimate_memory": "estimate",
    "format_table": "estimate",
    "load_config": "estimate",
    "measure_cuda_step": "estimate",
    "methods": "estimate",
    "training_step": "estimate",
    "whole_run": "estimate",
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
    from grass_llm.memory.estimate import (
        OPTIMIZER_IMPLS,
        MemoryEstimate,
        MemoryEstimateError,
        TrainingStep,
        estimate_memory,
        format_table,
        load_config,
        measure_cuda_step,
        methods,
        training_step,
        whole_run,
    )
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
