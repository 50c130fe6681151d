"""grass-llm: GRASS, gradient-based adaptive layer-wise importance sampling for LLM fine-tuning."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module; imported on first access (PEP 562), so that `grass-llm --version` / `-h` and the CLI's
# signal handlers come up without importing torch first
_EXPORTS = {
    "checkpoint_frozen_blocks": "grass_llm.activation_checkpointing",
    "enable_gradient_checkpointing": "grass_llm.activation_checkpointing",
    "ConfigError": "grass_llm.config",
    "GrassConfig": "grass_llm.config",
    "ImportanceTracker": "grass_llm.importance",
    "LayerDiscoveryError": "grass_llm.layers",
    "LayerGroups": "grass_llm.layers",
    "discover_layers": "grass_llm.layers",
    "ChunkedCausalLMLoss": "grass_llm.loss",
    "chunked_cross_entropy": "grass_llm.loss",
    "GrassOptimizer": "grass_llm.optim",
    "POLICIES": "grass_llm.sampling",
    "LayerSampler": "grass_llm.sampling",
    "SamplingPolicy": "grass_llm.sampling",
    "mgn_probabilities": "grass_llm.sampling",
    "register_policy": "grass_llm.sampling",
}

__all__ = [
    "POLICIES",
    "ChunkedCausalLMLoss",
    "ConfigError",
    "GrassConfig",
    "GrassOptimizer",
    "ImportanceTracker",
    "LayerDiscoveryError",
    "LayerGroups",
    "LayerSampler",
    "SamplingPolicy",
    "__version__",
    "checkpoint_frozen_blocks",
    "chunked_cross_entropy",
    "discover_layers",
    "enable_gradient_checkpointing",
    "mgn_probabilities",
    "register_policy",
]

if TYPE_CHECKING:
    from grass_llm.activation_checkpointing import checkpoint_frozen_blocks, enable_gradient_checkpointing
    from grass_llm.config import ConfigError, GrassConfig
    from grass_llm.importance import ImportanceTracker
    from grass_llm.layers import LayerDiscoveryError, LayerGroups, discover_layers
    from grass_llm.loss import ChunkedCausalLMLoss, chunked_cross_entropy
    from grass_llm.optim import GrassOptimizer
    from grass_llm.sampling import (
        POLICIES,
        LayerSampler,
        SamplingPolicy,
        mgn_probabilities,
        register_policy,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'grass_llm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
