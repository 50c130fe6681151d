"""Mean gradient norm (MGN, eq. 2 of the paper) per decoder layer, accumulated on the device.

For one optimizer step t the observation of layer l is ``sqrt(||g_l,t||^2 / N_l)``, where g_l,t is
the layer's gradient accumulated over the step's micro-batches (of the whole global batch) and N_l
its parameter count. The optimizer reads the squared norms (``grass_llm.optim``) and hands them in
with :meth:`ImportanceTracker.observe`. The MGN of a period is the mean of the observations made in
it; after the probing phase it is blended into the running estimate by the EMA of eq. 4, for the
layers observed in the period only.

Synchronisation invariant: ``observe`` only launches device kernels (``index_add_``, ``sqrt``) on
tensors that stay on the gradients' device; nothing reads a value back to the host. The single host
transfer happens in ``end_probe``/``end_period``, i.e. once per sampling period, where the sampler
needs the values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["ImportanceTracker"]


class ImportanceTracker:
    """MGN observations within a period, and the running MGN per layer (host, float64)."""

    def __init__(self, numels: Sequence[int], device: torch.device | str = "cpu") -> None:
        if not numels or any(n <= 0 for n in numels):
            raise ValueError(
                f"numels must be a non-empty list of positive parameter counts, got {list(numels)}"
            )
        self.num_layers = len(numels)
        self.device = torch.device(device)
        self._numel = torch.tensor(list(numels), dtype=torch.float32, device=self.device)
        self._period_sum = torch.zeros(self.num_layers, dtype=torch.float32, device=self.device)
        self._period_count = [0] * self.num_layers  # host ints: which layers were observed is host-known
        self.mgn = torch.zeros(self.num_layers, dtype=torch.float64)  # host copy, updated once a period
        self.initialized = False

    # -- within a period ------------------------------------------------------------------------
    def observe(self, sumsq: torch.Tensor, layers: Sequence[int]) -> None:
        """One step's observation of ``layers``: ``sumsq`` holds every layer's squared gradient norm
        ``||g_l||^2`` (1-D, ``num_layers``; entries of other layers are ignored)."""
        layers = sorted(set(int(i) for i in layers))
        if not layers:
            return
        idx = torch.tensor(layers, device=self.device)
        sq = sumsq.to(self.device, torch.float32)[idx]
        self._period_sum.index_add_(0, idx, (sq / self._numel[idx]).sqrt())
        for layer in layers:
            self._period_count[layer] += 1

    def to(self, device: torch.device | str) -> None:
        """Keep the on-device accumulators on ``device`` from now on (the model was moved)."""
        self.device = torch.device(device)
        self._numel = self._numel.to(self.device)
        self._period_sum = self._period_sum.to(self.device)

    # -- period boundaries (one host transfer each) ---------------------------------------------
    def period_mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean observation per layer, mask of layers observed) for the current period, on the host."""
        count = torch.tensor(self._period_count, dtype=torch.float64)
        total = self._period_sum.to("cpu", torch.float64)
        observed = count > 0
        mean = torch.where(observed, total / count.clamp_min(1), torch.zeros_like(total))
        return mean, observed

    def end_probe(self) -> torch.Tensor:
        """Initialise the MGN with the probing phase's means (eq. 2 over Tp steps)."""
        mean, _ = self.period_mean()
        self.mgn = mean
        self.initialized = True
        self._reset_period()
        return self.mgn

    def end_period(self, ema: float) -> torch.Tensor:
        """Eq. 4: ``m <- ema * m_period + (1 - ema) * m`` for the layers observed; others keep theirs."""
        mean, observed = self.period_mean()
        if not self.initialized:
            # no probing: layers not observed yet get the mean of the observed ones (a neutral prior),
            # not 0, which would starve them
            if bool(observed.any()):
                self.mgn = torch.where(observed, mean, mean[observed].mean())
                self.initialized = True
        else:
            self.mgn = torch.where(observed, ema * mean + (1.0 - ema) * self.mgn, self.mgn)
        self._reset_period()
        return self.mgn

    def current(self) -> torch.Tensor:
        """The MGN as the user sees it: the running estimate, or during probing the mean so far."""
        if self.initialized:
            return self.mgn.clone()
        return self.period_mean()[0]

    def _reset_period(self) -> None:
        self._period_sum.zero_()
        self._period_count = [0] * self.num_layers

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "mgn": self.mgn.clone(),
            "initialized": self.initialized,
            "period_sum": self._period_sum.detach().to("cpu", copy=True),
            "period_count": list(self._period_count),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; its tensors may be on any device (accelerate moves them)."""
        mgn = torch.as_tensor(state["mgn"]).to("cpu", torch.float64)
        if mgn.shape != (self.num_layers,):
            raise ValueError(
                f"importance state has {mgn.numel()} layers but the model has {self.num_layers} decoder layers"
            )
        self.mgn = mgn.clone()
        self.initialized = bool(state["initialized"])
        self._period_sum.copy_(torch.as_tensor(state["period_sum"]).to(self.device))
        self._period_count = [int(c) for c in state["period_count"]]
