"""Peak device memory of a training step, without a GPU: ``tracker`` counts live storage bytes under a
dispatch mode, ``estimate`` runs the training steps ``grass-llm train`` would run, on fake tensors, and
reports the peak (``grass-llm memory``)."""

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
)
from grass_llm.memory.tracker import CATEGORIES, LiveBytesTracker

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
]
