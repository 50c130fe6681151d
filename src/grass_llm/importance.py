"""Mean gradient norm (MGN, eq. 2 of the paper) per decoder layer, accumulated on the device.

For one optimizer step t the observation of layer l is ``sqrt(||g_l,t||^2 / N_l)``, where g_l,t is
the layer's gradient accumulated over the step's micro-batches and N_l its parameter count. The MGN
of a period is the mean of the observations made in it; after the probing phase it is blended into
the running estimate by the EMA of eq. 4, for the layers observed in the period only.

Synchronisation invariant: ``observe_*`` only launch device kernels (``torch._foreach_norm``,
``index_add_``, in-place adds) on tensors that stay on the gradients' device; nothing reads a value
back to the host. The single host transfer happens in ``end_probe``/``end_period``, i.e. once per
sampling period, where the sampler needs the values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["ImportanceTracker"]


class ImportanceTracker:
    """Accumulates per-layer squared gradient norms within a step and MGN observations within a period.

    ``reduce_sumsq`` (data parallelism, see ``grass_llm.distributed``) turns this rank's per-layer
    squared norms into the global ones in place, before the root of eq. 2 is taken: a sum over the
    shards of a sharded gradient, a mean over ranks for unreduced gradients, nothing for gradients
    already all-reduced.
    """

    def __init__(
        self,
        numels: Sequence[int],
        device: torch.device | str = "cpu",
        reduce_sumsq: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        if not numels or any(n <= 0 for n in numels):
            raise ValueError(
                f"numels must be a non-empty list of positive parameter counts, got {list(numels)}"
            )
        self.num_layers = len(numels)
        self.device = torch.device(device)
        self._numel = torch.tensor(list(numels), dtype=torch.float32, device=self.device)
        self._step_sumsq = torch.zeros(self.num_layers, dtype=torch.float32, device=self.device)
        self._period_sum = torch.zeros(self.num_layers, dtype=torch.float32, device=self.device)
        self._period_count = [0] * self.num_layers  # host ints: which layers were observed is host-known
        self.mgn = torch.zeros(self.num_layers, dtype=torch.float64)  # host copy, updated once a period
        self.initialized = False
        self._reduce = reduce_sumsq

    # -- within a step --------------------------------------------------------------------------
    def add_sumsq(self, layer: int, grad: torch.Tensor) -> None:
        """Add ``||grad||^2`` (computed in fp32) to ``layer``'s running sum for the current step."""
        norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
        self._step_sumsq[layer].add_(norm.square().to(self.device, non_blocking=True))

    def observe_grads(self, grads: Mapping[int, Sequence[torch.Tensor]], scale: float = 1.0) -> None:
        """Observe the step's gradients of the given layers with one fused norm over all tensors."""
        self.add_grads(grads)
        self.observe_step(list(grads), scale=scale)

    def add_grads(self, grads: Mapping[int, Sequence[torch.Tensor]]) -> None:
        """Add the squared norms of the given layers' gradients to the current step (one fused norm);
        ``observe_step`` turns them into observations."""
        flat: list[torch.Tensor] = []
        index: list[int] = []
        for layer, gs in grads.items():
            flat.extend(gs)
            index.extend([layer] * len(gs))
        if not flat:
            return
        by_device: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[int]]] = {}
        for g, i in zip(flat, index):
            ts, ix = by_device.setdefault((g.device, g.dtype), ([], []))
            ts.append(g)
            ix.append(i)
        for (device, _), (ts, ix) in by_device.items():
            norms = torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float32))  # (n_tensors,)
            idx = torch.tensor(ix, device=device)
            sumsq = torch.zeros(self.num_layers, dtype=torch.float32, device=device)
            sumsq.index_add_(0, idx, norms.square())
            self._step_sumsq.add_(sumsq.to(self.device, non_blocking=True))

    def observe_step(self, layers: Sequence[int], scale: float = 1.0) -> None:
        """Turn the current step's squared norms of ``layers`` into MGN observations and reset them.

        ``scale`` multiplies the squared norm before the root; the probing phase uses it to put
        micro-batch gradients read in hooks on the scale of an accumulated gradient (see optim.py).
        """
        if self._reduce is not None:
            self._reduce(self._step_sumsq)  # invariant: every rank calls observe_step at the same steps
        if layers:
            idx = torch.tensor(sorted(set(layers)), device=self.device)
            obs = (self._step_sumsq[idx] * scale / self._numel[idx]).sqrt()
            self._period_sum.index_add_(0, idx, obs)
            for layer in set(layers):
                self._period_count[layer] += 1
        self._step_sumsq.zero_()

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
            "step_sumsq": self._step_sumsq.detach().to("cpu", copy=True),
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
        self._step_sumsq.copy_(torch.as_tensor(state["step_sumsq"]).to(self.device))
