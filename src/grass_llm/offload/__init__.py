"""Optimizer state in host memory, on the device only while it is needed (GRASS paper, section 3.3).

``layout``: where each piece of a unit's state sits in its flat buffer; ``offloader``: the
:class:`LayerStateOffloader`, which moves those buffers (streaming per step, or kept per period) and
states the synchronisation invariants it relies on.
"""

from grass_llm.offload.layout import STATE_KEYS
from grass_llm.offload.offloader import LayerStateOffloader

__all__ = ["STATE_KEYS", "LayerStateOffloader"]
