"""Small tensor helpers shared across the library (torch only)."""

from __future__ import annotations

import torch

__all__ = ["all_finite"]


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite (one host sync). True on fake and ``meta`` tensors, which hold
    no values: ``grass-llm memory`` steps the optimizer on them."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t) or bool(torch.isfinite(t).all())
