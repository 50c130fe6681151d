"""Small torch helpers that several layers share, each defined once here (torch only, layer L0).

* :func:`flat_params` / :func:`param_index`: an optimizer's parameters in ``state_dict`` order (the
  integer keys of ``state_dict()["state"]`` index this list);
* :data:`DTYPES` / :func:`resolve_dtype`: the weight dtypes a user may name (``bf16``, ``fp32``, or
  ``auto``: bf16 on a CUDA device that has it, else fp32), for ``grass-llm train``, ``eval`` and
  ``memory`` alike;
* :func:`all_finite`: whether a tensor holds only finite values (true on the value-less tensors of
  ``grass-llm memory``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["DTYPES", "all_finite", "flat_params", "param_index", "resolve_dtype"]

#: dtype names -> torch dtypes (``auto`` is resolved by :func:`resolve_dtype`).
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}


def flat_params(param_groups: Iterable[Mapping[str, Any]]) -> list[torch.Tensor]:
    """Every parameter of ``param_groups`` in order: position ``i`` is state ``i`` of ``state_dict()``."""
    return [p for g in param_groups for p in g["params"]]


def param_index(param_groups: Iterable[Mapping[str, Any]]) -> dict[int, int]:
    """``id(parameter) -> its index`` in :func:`flat_params` (its key in ``state_dict()["state"]``)."""
    return {id(p): i for i, p in enumerate(flat_params(param_groups))}


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``bf16`` / ``fp32`` -> that dtype; ``auto`` or None -> bf16 on a CUDA ``device`` that supports
    it, else fp32. ``ValueError`` names any other value and the allowed ones."""
    if name in DTYPES:
        return DTYPES[name]
    if name not in (None, "auto"):
        raise ValueError(f"dtype={name!r} is unknown; allowed: auto, {', '.join(DTYPES)}")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite (one host sync). True on fake and ``meta`` tensors, which hold
    no values: ``grass-llm memory`` steps the optimizer on them."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t) or bool(torch.isfinite(t).all())
