"""grass-llm: GRASS, gradient-based adaptive layer-wise importance sampling for LLM fine-tuning."""

from grass_llm.activation_checkpointing import checkpoint_frozen_blocks, enable_gradient_checkpointing
from grass_llm.config import ConfigError, GrassConfig
from grass_llm.importance import ImportanceTracker
from grass_llm.layers import LayerDiscoveryError, LayerGroups, discover_layers
from grass_llm.loss import ChunkedCausalLMLoss, chunked_cross_entropy
from grass_llm.optim import GrassOptimizer
from grass_llm.sampling import POLICIES, LayerSampler, SamplingPolicy, mgn_probabilities, register_policy

__version__ = "0.1.0"

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
