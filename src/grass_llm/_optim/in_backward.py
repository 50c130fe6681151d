"""``step_in_backward``: each trained unit is updated from its gradient-ready hooks as soon as backward has
produced all its gradients, which are freed at once (at most one unit's gradients are alive, and with
offload the state transfers overlap the rest of backward). ``step()`` then only does the bookkeeping.

Invariants:
B1. A unit's trainable parameters are exactly those that require grad (the optimizer sets the flags), and
    each one's hook fires once per backward pass, so counting ready gradients tells when a unit is done.
B2. Freeing a gradient right after queueing its update is safe: the update's kernels are queued on the
    same stream, and the caching allocator keeps the memory until they have run.
B3. The bookkeeping (:meth:`InBackwardStepper.reset`) is cleared at the end of every ``step()``, whatever the
    step's outcome, so a backward after a skipped step starts afresh.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from grass_llm._optim.units import UnitTable

__all__ = ["InBackwardStepper"]


class InBackwardStepper:
    """Counts ready gradients per unit during backward and updates a unit when all of its are there."""

    def __init__(
        self,
        units: UnitTable,
        groups: Callable[[], list[dict[str, Any]]],
        trained: Callable[[], list[dict[str, Any]]],
        update: Callable[[dict[str, Any], str | None], None],
        finite: Callable[[list[int]], bool],
    ) -> None:
        self.units = units
        self._groups = groups
        self._trained = trained
        self._update = update  # (group, unit whose state to prefetch next) -> None
        self._finite = finite  # trainable rows -> whether their squared norms are finite (one host sync)
        self.reset()

    def reset(self) -> None:
        """Forget this step's counts (B3)."""
        self.ready: dict[int, int] = {}  # unit -> gradients ready in this backward
        self.stepped: set[int] = set()  # units updated in backward since step()

    def count(self, j: int) -> None:
        """A trainable gradient of unit ``j`` is ready (training, last micro-batch)."""
        group = self._groups()[j]
        if j in self.stepped:
            raise RuntimeError(
                f"step_in_backward: a second backward pass reached {group['unit']!r} before step(); with "
                "gradient accumulation run every micro-batch but the last under optimizer.no_sync()"
            )
        n = self.ready.get(j, 0) + 1
        self.ready[j] = n
        if n == sum(q.requires_grad for q in self.units.trainable_of(group["params"])):  # B1
            self._step_unit(j)

    @torch.no_grad()
    def _step_unit(self, j: int) -> None:
        group = self._groups()[j]
        self.stepped.add(j)
        rows = [self.units.row[id(q)] for q in self.units.trainable_of(group["params"]) if q.grad is not None]
        # a unit with a non-finite gradient is not updated (units updated earlier in this backward stay
        # updated; step() then counts the step as skipped)
        if rows and not self._finite(rows):
            for q in group["params"]:
                q.grad = None
            return
        later = [g for g in self.order() if self.units.index[g["unit"]] not in self.stepped]
        self._update(group, later[0]["unit"] if later else None)  # its copy-in overlaps this update
        for q in group["params"]:
            q.grad = None  # B2

    def order(self, trained: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """The trained units in the order backward usually completes them: head, norm, the active layers
        from the top down, embeddings (only used to choose what to prefetch)."""
        trained = trained if trained is not None else self._trained()
        n = self.units.num_layers
        rank = {"head": -2, "norm": -1, "embeddings": n}
        return sorted(trained, key=lambda g: rank[g["unit"]] if g["layer"] is None else n - 1 - g["layer"])
