"""Which layers train: the MGN (``grass_llm.importance``), the sampler (``grass_llm.sampling``) and the
schedule around them: ``probe_steps`` probing steps, then a draw every ``period`` steps.

Only completed steps count: a skipped step (non-finite gradients, an overflow, no backward pass) advances
neither probing nor the period. At the end of probing the MGN is initialised from the probing means; at
the end of each period the trained layers' MGN is blended in by EMA (eq. 4), then new layers are drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from grass_llm.config import GrassConfig
from grass_llm.importance import ImportanceTracker
from grass_llm.sampling import LayerSampler

__all__ = ["LayerSelector"]


class LayerSelector:
    """The MGN, the sampler and the probing / period schedule of one optimizer."""

    def __init__(
        self,
        config: GrassConfig,
        numels: Sequence[int],
        device: torch.device,
        broadcast: Callable[[Sequence[int]], list[int]] | None = None,
    ) -> None:
        self.config = config
        self.num_layers = len(numels)
        self.tracker = ImportanceTracker(numels, device=device)
        self.sampler = LayerSampler(
            self.num_layers, config.active_layers, config.policy, config.temperature, config.seed, broadcast=broadcast
        )
        self.probe_done = 0
        self.period_pos = 0
        #: decoder layers training now ([] while probing)
        self.active: list[int] = []

    @property
    def probing(self) -> bool:
        return self.probe_done < self.config.probe_steps

    def start(self) -> list[int]:
        """The layers that train at the first step: [] when the run starts by probing, else a draw."""
        return [] if self.probing else self._finish_probe()

    def observe(self, sumsq: torch.Tensor, layers: Sequence[int]) -> None:
        """One completed step's squared gradient norms (1-D, per layer) of ``layers``."""
        self.tracker.observe(sumsq, layers)

    def end_step(self) -> list[int] | None:
        """Count a completed step; the new active set when this step ended probing or a period, else None."""
        if self.probing:
            self.probe_done += 1
            return self._finish_probe() if not self.probing else None
        self.period_pos += 1
        if self.period_pos < self.config.period:
            return None
        self.sampler.end_period(self.tracker.end_period(self.config.ema))
        self.period_pos = 0
        return self.sampler.draw()

    def _finish_probe(self) -> list[int]:
        if self.config.probe_steps > 0:
            self.sampler.end_probe(self.tracker.end_probe())
        self.period_pos = 0
        return self.sampler.draw()

    def force(self, layers: Sequence[int]) -> list[int]:
        """Train ``layers`` until the end of the current period (``GrassOptimizer.activate``)."""
        if self.probing:
            raise RuntimeError("activate() during probing: the active layers are set when probing ends")
        chosen = sorted({int(i) for i in layers})
        if not chosen or chosen[0] < 0 or chosen[-1] >= self.num_layers:
            raise ValueError(
                f"layers={list(layers)!r} is invalid; allowed: a non-empty set of layers in 0..{self.num_layers - 1}"
            )
        return chosen

    def to(self, device: torch.device) -> None:
        self.tracker.to(device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "probe_done": self.probe_done,
            "period_pos": self.period_pos,
            "active": list(self.active),
            "importance": self.tracker.state_dict(),
            "sampler": self.sampler.state_dict(),
        }

    def validate_state(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless ``state`` (the ``grass`` entry of a state dict) fits this selector."""
        for key in ("probe_done", "period_pos", "active", "importance", "sampler"):
            if key not in state:
                raise ValueError(f"state_dict's 'grass' entry has no {key!r}: it is incomplete")
        if any(not 0 <= int(i) < self.num_layers for i in state["active"]):
            raise ValueError(f"state_dict's active layers {list(state['active'])} are outside 0..{self.num_layers - 1}")
        for name, part in (("importance", state["importance"]), ("sampler", state["sampler"])):
            key = "mgn" if name == "importance" else "probabilities"
            if key not in part or torch.as_tensor(part[key]).shape != (self.num_layers,):
                raise ValueError(f"state_dict's {name} state does not have {self.num_layers} layers")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state["importance"])
        self.sampler.load_state_dict(state["sampler"])
        self.probe_done = int(state["probe_done"])
        self.period_pos = int(state["period_pos"])
        self.active = [] if self.probing else sorted(int(i) for i in state["active"])
