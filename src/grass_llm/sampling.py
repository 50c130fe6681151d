"""Layer-sampling policies: which decoder layers train in the next period.

A policy decides how the sampling probabilities follow the MGN and how layers are drawn:

* ``grass``: adaptive (the paper). ``p = softmax(m_hat / tau)`` recomputed at the end of probing and
  of every period from the current MGN, where ``m_hat = m / mean(m)``. Dividing by the mean makes the
  probabilities invariant to the loss scale (every gradient, hence every MGN, scales by the same
  factor) and gives ``tau`` a meaning that does not depend on the model or the data: a layer with
  twice the mean MGN gets ``exp(1 / tau)`` times the weight of an average layer.
* ``static``: GRASS*, the same softmax computed once from the probing MGN and then kept.
* ``uniform``: LISA's uniform sampling.
* ``cyclic``: block coordinate descent in the style of BAdam: the layers are visited ``k`` at a time
  in a random order, every layer once per cycle, with a new order every cycle.

Where a new policy goes: subclass :class:`SamplingPolicy` here and add it with
:func:`register_policy`; ``GrassConfig(policy=...)`` then accepts its name.

Draws use a dedicated, seeded CPU ``torch.Generator``, so they are reproducible, independent of the
global RNG and of the device, and resumable from ``state_dict``. In data-parallel runs the draw of
rank 0 is used everywhere (``broadcast``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "POLICIES",
    "LayerSampler",
    "SamplingPolicy",
    "mgn_probabilities",
    "register_policy",
]


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


class SamplingPolicy:
    """How the probabilities follow the MGN and how ``k`` layers are drawn. The base class samples
    uniformly and ignores the MGN (LISA); subclasses override the hooks they need.

    ``default_probe_steps`` is the probing length ``GrassConfig`` uses when none is given.
    """

    name = "uniform"
    default_probe_steps = 0

    def on_probe_end(self, sampler: LayerSampler, mgn: torch.Tensor) -> None:
        """The probing phase ended with ``mgn`` (not called when there is no probing)."""

    def on_period_end(self, sampler: LayerSampler, mgn: torch.Tensor) -> None:
        """A sampling period ended; ``mgn`` holds its EMA update (eq. 4)."""

    def draw(self, sampler: LayerSampler) -> list[int]:
        """``k`` distinct layers from ``sampler.probabilities``. Every layer keeps a probability > 0, so
        the draw never returns a zero-weight layer while a positive one is left (``torch.multinomial``
        would, silently)."""
        p = sampler.probabilities.clamp_min(torch.finfo(torch.float64).tiny)
        idx = torch.multinomial(p / p.sum(), sampler.k, replacement=False, generator=sampler.generator)
        return idx.tolist()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class UniformPolicy(SamplingPolicy):
    """LISA: uniform probabilities, no probing."""


class AdaptivePolicy(SamplingPolicy):
    """GRASS: softmax of the normalised MGN after probing and after every period."""

    name = "grass"
    default_probe_steps = 150

    def on_probe_end(self, sampler: LayerSampler, mgn: torch.Tensor) -> None:
        sampler.probabilities = mgn_probabilities(mgn, sampler.temperature)

    on_period_end = on_probe_end


class StaticPolicy(SamplingPolicy):
    """GRASS*: the softmax of the probing MGN, kept for the whole run. Without probing: the MGN of
    the first period."""

    name = "static"
    default_probe_steps = 150

    def __init__(self) -> None:
        self.fixed = False

    def on_probe_end(self, sampler: LayerSampler, mgn: torch.Tensor) -> None:
        if not self.fixed:
            sampler.probabilities = mgn_probabilities(mgn, sampler.temperature)
            self.fixed = True

    on_period_end = on_probe_end

    def state_dict(self) -> dict[str, Any]:
        return {"fixed": self.fixed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.fixed = bool(state.get("fixed", False))


class CyclicPolicy(SamplingPolicy):
    """BAdam-style block coordinate descent: a random order of the layers per cycle, ``k`` at a time."""

    name = "cyclic"

    def __init__(self) -> None:
        self.order: list[int] = []

    def draw(self, sampler: LayerSampler) -> list[int]:
        if len(self.order) < sampler.k:
            perm = torch.randperm(sampler.num_layers, generator=sampler.generator).tolist()
            self.order += [i for i in perm if i not in self.order]
        out, self.order = self.order[: sampler.k], self.order[sampler.k :]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"order": list(self.order)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.order = [int(i) for i in state.get("order", [])]


#: name -> policy class. ``GrassConfig.policy`` takes these names.
POLICIES: dict[str, type[SamplingPolicy]] = {}


def register_policy(cls: type[SamplingPolicy]) -> type[SamplingPolicy]:
    """Make ``cls`` available as ``GrassConfig(policy=cls.name)``; returns ``cls`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, SamplingPolicy)):
        raise TypeError(f"{cls!r} is not a SamplingPolicy subclass")
    if cls.name in POLICIES and POLICIES[cls.name] is not cls:
        raise ValueError(f"a sampling policy named {cls.name!r} is already registered")
    POLICIES[cls.name] = cls
    return cls


for _cls in (AdaptivePolicy, StaticPolicy, UniformPolicy, CyclicPolicy):
    register_policy(_cls)


class LayerSampler:
    """Draws ``k`` distinct layers out of ``num_layers`` according to a policy.

    ``broadcast`` (data parallelism) maps this rank's draw to the one every rank uses (rank 0's);
    every rank still advances its own generator, so any rank's ``state_dict`` is the same.
    """

    def __init__(
        self,
        num_layers: int,
        k: int,
        policy: str = "grass",
        temperature: float = 1.0,
        seed: int = 0,
        broadcast: Callable[[Sequence[int]], list[int]] | None = None,
    ):
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r} is unknown; allowed: {', '.join(POLICIES)}")
        if not 1 <= k <= num_layers:
            raise ValueError(f"k={k} must be in 1..{num_layers}")
        self.num_layers = num_layers
        self.k = k
        self.policy = POLICIES[policy]()
        self.temperature = temperature
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.probabilities = torch.full((num_layers,), 1.0 / num_layers, dtype=torch.float64)
        self._broadcast = broadcast

    def end_probe(self, mgn: torch.Tensor) -> torch.Tensor:
        """Let the policy see the probing MGN; returns the probabilities."""
        self.policy.on_probe_end(self, mgn)
        return self.probabilities

    def end_period(self, mgn: torch.Tensor) -> torch.Tensor:
        """Let the policy see the MGN after a period's EMA update; returns the probabilities."""
        self.policy.on_period_end(self, mgn)
        return self.probabilities

    def draw(self) -> list[int]:
        """``k`` distinct layers, sorted (every layer when ``k`` is the number of layers)."""
        if self.k == self.num_layers:
            layers = list(range(self.num_layers))
        else:
            layers = self.policy.draw(self)
        if self._broadcast is not None:
            layers = self._broadcast(layers)
        return sorted(int(i) for i in layers)

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "probabilities": self.probabilities.clone(),
            "policy": self.policy.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`, whatever device its tensors were moved to (accelerate moves an
        optimizer's whole state to the GPU; the generator takes only a CPU byte tensor)."""
        probs = torch.as_tensor(state["probabilities"]).to("cpu", torch.float64)
        if probs.shape != (self.num_layers,):
            raise ValueError(f"sampler state has {probs.numel()} layers, the model has {self.num_layers}")
        self.generator.set_state(torch.as_tensor(state["generator"]).to("cpu", torch.uint8))
        self.probabilities = probs.clone()
        policy_state = dict(state.get("policy", {}))
        if "fixed" in state:  # saved before policies kept their own state
            policy_state.setdefault("fixed", state["fixed"])
        self.policy.load_state_dict(policy_state)
