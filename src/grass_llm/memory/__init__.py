"""Peak device memory of a training step, without a GPU: ``tracker`` counts live storage bytes under a
dispatch mode, ``estimate`` runs a method's training steps on fake tensors and reports the peak
(``grass-llm memory``)."""

from grass_llm.memory.estimate import (
    METHODS,
    OPTIMIZER_IMPLS,
    MemoryEstimate,
    MemoryEstimateError,
    estimate_memory,
    format_table,
    load_config,
    measure_cuda_step,
)
from grass_llm.memory.tracker import CATEGORIES, LiveBytesTracker

__all__ = [
    "CATEGORIES",
    "METHODS",
    "OPTIMIZER_IMPLS",
    "LiveBytesTracker",
    "MemoryEstimate",
    "MemoryEstimateError",
    "estimate_memory",
    "format_table",
    "load_config",
    "measure_cuda_step",
]
