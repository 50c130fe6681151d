"""Layer-sampling policies: which decoder layers train in the next period.

* ``grass``: adaptive. ``p = softmax(m_hat / tau)`` recomputed every period from the current MGN,
  where ``m_hat = m / mean(m)``. Dividing by the mean makes the probabilities invariant to the loss
  scale (every gradient, hence every MGN, scales by the same factor) and gives ``tau`` a meaning
  that does not depend on the model or the data: a layer with twice the mean MGN gets
  ``exp(1 / tau)`` times the weight of an average layer.
* ``static``: GRASS*, the same softmax computed once from the probing MGN and then kept.
* ``uniform``: LISA's uniform sampling.

Draws use a dedicated, seeded CPU ``torch.Generator``, so they are reproducible, independent of the
global RNG and of the device, and resumable from ``state_dict``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from grass_llm.config import POLICIES

__all__ = ["LayerSampler", "mgn_probabilities"]


def mgn_probabilities(mgn: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax((m / mean(m)) / temperature)`` in float64; uniform when the MGN carries no signal."""
    m = mgn.detach().to("cpu", torch.float64)
    n = m.numel()
    finite = torch.isfinite(m)
    if not bool(finite.all()):
        warnings.warn(
            "non-finite MGN values; their layers get the largest finite MGN", RuntimeWarning, stacklevel=2
        )
        fill = m[finite].max() if bool(finite.any()) else torch.tensor(0.0, dtype=torch.float64)
        m = torch.where(finite, m, fill)
    mean = m.mean()
    if not bool(mean > 0):
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    return torch.softmax(m / mean / temperature, dim=0)


class LayerSampler:
    """Draws ``k`` distinct layers out of ``num_layers`` according to a policy."""

    def __init__(
        self, num_layers: int, k: int, policy: str = "grass", temperature: float = 1.0, seed: int = 0
    ):
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r} is unknown; allowed: {', '.join(POLICIES)}")
        if not 1 <= k <= num_layers:
            raise ValueError(f"k={k} must be in 1..{num_layers}")
        self.num_layers = num_layers
        self.k = k
        self.policy = policy
        self.temperature = temperature
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.probabilities = torch.full((num_layers,), 1.0 / num_layers, dtype=torch.float64)
        self.fixed = policy == "uniform"

    def update(self, mgn: torch.Tensor) -> torch.Tensor:
        """Recompute the probabilities from the MGN (grass: always; static: the first time only)."""
        if not self.fixed:
            self.probabilities = mgn_probabilities(mgn, self.temperature)
            if self.policy == "static":
                self.fixed = True
        return self.probabilities

    def draw(self) -> list[int]:
        """``k`` distinct layers, sorted. Every layer keeps a probability > 0 so the draw never returns
        a zero-weight layer while a positive one is left (``torch.multinomial`` would, silently)."""
        if self.k == self.num_layers:
            return list(range(self.num_layers))
        p = self.probabilities.clamp_min(torch.finfo(torch.float64).tiny)
        idx = torch.multinomial(p / p.sum(), self.k, replacement=False, generator=self.generator)
        return sorted(idx.tolist())

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "probabilities": self.probabilities.clone(),
            "fixed": self.fixed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        probs = torch.as_tensor(state["probabilities"], dtype=torch.float64)
        if probs.shape != (self.num_layers,):
            raise ValueError(f"sampler state has {probs.numel()} layers, the model has {self.num_layers}")
        self.generator.set_state(state["generator"])
        self.probabilities = probs.clone()
        self.fixed = bool(state["fixed"])
