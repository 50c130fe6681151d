"""The optimizer's units: one param group per decoder layer, then ``embeddings`` / ``norm`` / ``head``.

Unit ``j`` is ``param_groups[j]`` (its dict carries ``"unit"``: ``layer.<i>`` or the group's name, and
``"layer"``: ``i`` or None); the loss-scale probe's group comes last and is not a unit. Every parameter of
a unit that the user did not freeze before the optimizer was built is *trainable* and has a row in the
per-parameter squared-norm vector (``row``); :meth:`UnitTable.layer_sumsq` turns that vector into the
per-layer sums of eq. 2 (the one definition). Index tensors live on the parameters' device, so reading
them never syncs the host (and runs on the meta tensors of ``grass-llm memory``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from grass_llm.layers import LayerGroups

__all__ = ["EXTRA_UNITS", "UnitTable", "no_weight_decay_ids"]

#: the units outside the decoder blocks, in param-group order after the layers
EXTRA_UNITS = ("embeddings", "norm", "head")

# parameter names that take no weight decay by default (transformers' Trainer convention)
_NO_DECAY_NAMES = [
    re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
]


def no_weight_decay_ids(model: nn.Module) -> set[int]:
    """``id`` of the parameters that take no weight decay by default: biases and normalisation weights
    (parameters of ``*Norm*`` modules, or named like them), the transformers Trainer's convention."""
    out = set()
    for mname, module in model.named_modules():
        norm_module = isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if norm_module or any(r.search(full.lower()) for r in _NO_DECAY_NAMES):
                out.add(id(p))
    return out


class UnitTable:
    """Which parameter belongs to which unit and layer, and which are trainable.

    Args:
        groups: the model's parameter groups (``grass_llm.layers.discover_layers``).
        user_frozen: ``id`` of the parameters frozen before any GRASS optimizer touched the model (they
            stay frozen and are never trained).
    """

    def __init__(self, groups: LayerGroups, user_frozen: set[int]) -> None:
        self.groups = groups
        self.num_layers = groups.num_layers
        self.user_frozen = user_frozen
        self.specs: list[tuple[str, int | None, list[nn.Parameter]]] = [
            (f"layer.{i}", i, list(ps)) for i, ps in enumerate(groups.block_params)
        ]
        self.specs += [(name, None, list(getattr(groups, name))) for name in EXTRA_UNITS if getattr(groups, name)]
        self.index = {name: j for j, (name, _, _) in enumerate(self.specs)}
        self.unit_of = {id(p): j for j, (_, _, ps) in enumerate(self.specs) for p in ps}
        self.layer_of = {id(p): i for i, ps in enumerate(groups.block_params) for p in ps}
        trained = [p for _, _, ps in self.specs for p in ps if id(p) not in user_frozen]
        #: the trainable parameters, in unit order; ``row[id(p)]`` is p's entry in the squared-norm vector
        self.trainable = trained
        self.row = {id(p): k for k, p in enumerate(trained)}
        if not any(id(p) in self.row for ps in groups.block_params for p in ps):
            raise ValueError(
                "every parameter of the decoder blocks is frozen (requires_grad=False): nothing to train"
            )
        #: per layer, its trainable parameters (probing reads and reduces whole layers)
        self.layer_params = [[p for p in ps if id(p) in self.row] for ps in groups.block_params]
        self._rows: list[int] = [k for k, p in enumerate(trained) if id(p) in self.layer_of]
        self._row_layers = [self.layer_of[id(trained[k])] for k in self._rows]
        self.device = torch.device("cpu")
        self.block_rows = torch.tensor(self._rows, dtype=torch.long)
        self.block_layers = torch.tensor(self._row_layers, dtype=torch.long)

    def param_groups(self) -> list[dict[str, Any]]:
        """The units as torch.optim param groups (hyper-parameters come from the optimizer's defaults)."""
        return [{"params": ps, "unit": name, "layer": layer} for name, layer, ps in self.specs]

    def to(self, device: torch.device) -> None:
        """Keep the index tensors on ``device`` (where the squared norms live)."""
        self.device = device
        self.block_rows = self.block_rows.to(device)
        self.block_layers = self.block_layers.to(device)

    def zeros(self) -> torch.Tensor:
        """A fresh per-parameter squared-norm vector (float64: GradScaler-scaled squares must not overflow)."""
        return torch.zeros(len(self.trainable), dtype=torch.float64, device=self.device)

    def layer_sumsq(self, param_sumsq: torch.Tensor) -> torch.Tensor:
        """Per-layer sums (1-D, ``num_layers``) of a per-parameter squared-norm vector."""
        out = torch.zeros(self.num_layers, dtype=torch.float64, device=param_sumsq.device)
        return out.index_add_(0, self.block_layers, param_sumsq.index_select(0, self.block_rows))

    def trainable_of(self, params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        return [p for p in params if id(p) in self.row]

    def unit_name(self, j: int) -> str:
        return self.specs[j][0]
