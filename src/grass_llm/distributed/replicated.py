"""Replicated data parallelism on ``torch.distributed``, without DDP: the whole model on every rank,
the same layers trained everywhere, gradients all-reduced for the active layers only, optional ZeRO-1
sharding of the optimizer states. A :class:`~grass_llm.distributed.base.DataParallelBackend`.

``GrassOptimizer`` picks this up by itself under ``torchrun`` / ``accelerate launch`` (argument
``distributed="auto"``: on when a process group of more than one rank is initialised). The model is
**not** wrapped in ``DistributedDataParallel``: DDP reduces every parameter that required grad when it
was wrapped, in buckets it builds once, so it would reduce the whole model (frozen layers as zeros,
with ``find_unused_parameters=True``) every step, and its reducer reads the gradients that the
probing hooks free. GRASS knows which layers train and reduces only those (see docs/distributed.md).

What each rank does, and the invariant that keeps the ranks identical:

* **Sampling.** The sampler's seeded generator advances on every rank; the draw of rank 0 is
  broadcast and used everywhere (``broadcast_layers``). The MGN it samples from is the same on every
  rank and exact (eq. 2 of the global batch's gradient): in training it is read from the all-reduced
  gradients; during probing each layer's accumulated local gradient is all-reduced as soon as the
  layer's last gradient of the step exists (``reduce_probe_unit``; at most two layers in flight, the
  device gradients already freed), and its norm is read from the result.
* **Gradients (training).** A post-accumulate-grad hook on every parameter counts the gradients that
  are ready per unit (a decoder layer, ``embeddings``, ``norm``, ``head``). When the last trainable
  parameter of a unit has its gradient, the unit's gradients are flattened into one buffer (plus one
  presence flag per parameter), divided by the world size and all-reduced asynchronously, overlapped
  with the rest of the backward pass. A callback queued on the autograd engine waits for all of them
  at the end of the backward pass and copies the means back into ``.grad``. Only the trained units
  have gradients, so the traffic is ``gamma`` layers (+ the always-trained groups), not the model.
* **Gradient accumulation.** Under ``optimizer.no_sync()`` (or ``sync_gradients = False``) nothing
  is reduced; put it around every micro-batch but the last, as with DDP. Reducing every micro-batch
  is also correct (the mean is linear), only slower. If no backward pass was synchronised,
  ``step()`` reduces the trained units itself, without overlap.
* **ZeRO-1 (``shard_optimizer_states=True``).** Unit ``j`` (its index in ``param_groups``: layer ``i``
  is unit ``i``) is owned by rank ``j % world_size``. Every rank holds the reduced gradients (needed
  for the MGN and for clipping, which therefore agree everywhere) but only the owner keeps AdamW
  states and steps the unit; then the owner broadcasts the unit's new weights.
* **Checkpoints.** ``GrassOptimizer.state_dict()`` is world-size independent. With sharding it is a
  collective (call it on every rank): the states are gathered to rank 0, whose result is complete;
  the other ranks' results are marked partial and refused by ``load_state_dict``. Without sharding
  every rank's result is complete and no communication happens. Loading on any world size works:
  each rank loads the full state and, with sharding, drops the units it does not own.

Invariants (referenced as ``# R1`` ... next to the code that relies on them):

R1. Every rank runs the same model code on batches of the same shape, so the autograd engine makes
    the same gradients ready in the same order on every rank, and the collectives launched from the
    gradient hooks match across ranks.
R2. A unit's all-reduce buffer depends only on which of its parameters require grad (the same on
    every rank): one buffer per dtype, the gradients in parameter order (a missing one as zeros),
    then one presence flag per parameter. A parameter with a gradient on no rank keeps
    ``.grad = None``.
R3. A buffer in flight stays referenced (``_pending``, ``_probe_pending``) until its ``work.wait()``,
    so the caching allocator does not hand its memory out while the collective uses it.
R4. The end-of-backward callback is queued by the first synchronised hook of a backward pass; it
    launches the units whose gradients were only partly produced, in unit order, waits for every
    all-reduce and writes the means into ``.grad`` before the optimizer is told (``on_reduced``): no
    one reads a unit's gradient before it is the global batch's.
R5. Backward passes under ``no_sync()`` reduce nothing; ``reduce_gradients`` (in ``step()``) reduces
    the trained units no backward pass synchronised, in unit order, so again in the same order on
    every rank.
R6. Probing keeps at most two layers' all-reduces in flight and completes them in launch order.
R7. ZeRO-1: unit ``j`` is owned by rank ``j % world_size`` on every rank, and ``broadcast_updates``
    gets the units in ``param_groups`` order on every rank, so the broadcasts match.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from grass_llm.distributed.base import DataParallelBackend, collective_device

__all__ = ["ReplicatedBackend"]


@dataclass
class _Pending:
    """One in-flight all-reduce of one unit's gradients of one dtype."""

    work: Any
    flat: torch.Tensor  # (sum numel + len(params),): gradients / world, then presence flags / world
    params: list[nn.Parameter]
    unit: int


class ReplicatedBackend(DataParallelBackend):
    """Synchronises a ``GrassOptimizer`` across the ranks of a process group (no DDP needed).

    Args:
        process_group: the group to synchronise over (default: the world).
        shard_optimizer_states: ZeRO-1: each rank keeps the AdamW states of the units it owns
            (unit ``j`` -> rank ``j % world_size``), steps them and broadcasts their weights.

    Create it after ``torch.distributed.init_process_group`` and pass it as
    ``GrassOptimizer(model, cfg, distributed=ReplicatedBackend(shard_optimizer_states=True))``; one
    instance serves one optimizer.
    """

    def __init__(self, process_group: Any = None, shard_optimizer_states: bool = False) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ReplicatedBackend needs torch.distributed.init_process_group() first")
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.shard_optimizer_states = bool(shard_optimizer_states)
        #: accelerate-style switch: ``False`` skips the gradient all-reduce (non-final micro-batches)
        self.sync_gradients = True
        self.gradients_final_in_hooks = False  # they are final after the all-reduce
        self.probe_needs_whole_units = True
        self._probe_pending: list[tuple[int, Any, torch.Tensor, Callable]] = []
        self._params: list[list[nn.Parameter]] | None = None  # per unit, trainable parameters
        self._on_reduced: Callable[[list[int]], None] | None = None
        self._trained: frozenset[int] = frozenset()
        self._hooks: list[Any] = []
        self._counts: dict[int, int] = {}  # unit -> gradients ready in this backward pass
        self._launched: set[int] = set()  # units whose all-reduce started in this backward pass
        self._reduced: set[int] = set()  # units reduced since the last step()
        self._pending: list[_Pending] = []
        self._callback_queued = False
        self._warned_order = False

    def __repr__(self) -> str:
        return (
            f"ReplicatedBackend(rank={self.rank}, world_size={self.world_size}, "
            f"shard_optimizer_states={self.shard_optimizer_states})"
        )

    def _global_rank(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    # ------------------------------------------------------------------------------------------
    # wiring
    def attach(
        self, units: Sequence[Sequence[nn.Parameter]], on_reduced: Callable[[list[int]], None] | None = None
    ) -> None:
        """Install a gradient-ready hook on every trainable parameter (module docstring)."""
        if self._params is not None:
            raise RuntimeError(
                "this ReplicatedBackend is already attached to an optimizer; create one per optimizer"
            )
        self._params = [list(ps) for ps in units]
        self._on_reduced = on_reduced
        for j, params in enumerate(self._params):
            for p in params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(j)))

    def set_trained(self, unit_ids: Collection[int]) -> None:
        self._trained = frozenset(unit_ids)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------------------------------
    # gradient accumulation
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Skip the gradient all-reduce for the backward passes inside (all micro-batches but the last)."""
        previous = self.sync_gradients
        self.sync_gradients = False
        try:
            yield
        finally:
            self.sync_gradients = previous

    # ------------------------------------------------------------------------------------------
    # gradient all-reduce
    def _make_hook(self, unit: int):
        def hook(p: torch.Tensor) -> None:
            if unit not in self._trained:  # probing, or a unit not trained now
                return
            if not self.sync_gradients:  # R5
                if unit in self._reduced and not self._warned_order:
                    # (a warning, not an error: a step skipped without step(), e.g. on inf, looks the same)
                    warnings.warn(
                        "a backward pass under no_sync() followed a synchronised one before step(): the "
                        "ranks' gradients diverge. Use no_sync() for every micro-batch but the last.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    self._warned_order = True
                return
            if not self._callback_queued:
                # R4: runs once the whole backward pass is done, on the engine's thread (as DDP does)
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
                self._callback_queued = True
            n = self._counts.get(unit, 0) + 1
            self._counts[unit] = n
            if n == sum(q.requires_grad for q in self._params[unit]):
                self._launch(unit)

        return hook

    def _by_dtype(self, unit: int) -> dict[torch.dtype, list[nn.Parameter]]:
        """The unit's parameters that require grad, grouped by dtype (in parameter order)."""
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in self._params[unit]:
            if p.requires_grad:
                by_dtype.setdefault(p.dtype, []).append(p)
        return by_dtype

    def _launch(self, unit: int) -> None:
        """Start the all-reduce (mean) of one unit's gradients: one buffer per dtype.

        Missing gradients count as zeros; the presence flags appended to the buffer tell which
        parameters had a gradient on some rank (R2)."""
        for dtype, ps in self._by_dtype(unit).items():  # R2
            parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps]
            flags = torch.tensor([p.grad is not None for p in ps], dtype=dtype, device=ps[0].device)
            flat = torch.cat([*parts, flags])
            flat.div_(self.world_size)  # pre-divide, as DDP does (gloo has no AVG)
            work = dist.all_reduce(flat, group=self.group, async_op=True)  # R1: same order on every rank
            self._pending.append(_Pending(work, flat, ps, unit))  # R3
        self._launched.add(unit)

    def _complete(self) -> None:
        """Wait for the in-flight all-reduces, write the mean gradients back into ``.grad`` and tell
        the optimizer which units are final."""
        units = sorted({item.unit for item in self._pending})
        for item in self._pending:
            item.work.wait()
            n = len(item.params)
            present = (item.flat[-n:] > 0).tolist()
            values = item.flat[:-n].split([p.numel() for p in item.params])
            for p, v, here in zip(item.params, values, present):
                if not here:
                    p.grad = None
                elif p.grad is None:
                    p.grad = v.view_as(p).clone()
                else:
                    p.grad.copy_(v.view_as(p))
        self._pending = []
        if units and self._on_reduced is not None:
            self._on_reduced(units)

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        for unit in sorted(self._counts):  # R4: in unit order, on every rank
            if unit not in self._launched:  # some trainable parameter got no gradient in this pass
                self._launch(unit)
        self._complete()
        self._reduced |= self._launched
        self._launched = set()
        self._counts = {}

    def reduce_gradients(self, unit_ids: Sequence[int]) -> None:
        """Called by ``step()`` before it reads gradients: make sure every trained unit is reduced.

        Normally the end-of-backward callback did it; units never synchronised since the last step
        (all micro-batches under ``no_sync()``) are reduced now, in unit order."""
        self._complete()
        for unit in sorted(unit_ids):  # R5
            if unit not in self._reduced:
                self._launch(unit)
        self._complete()
        self._reduced = set()
        self._launched = set()

    # ------------------------------------------------------------------------------------------
    # MGN and sampling
    def reduce_sumsq_(self, sumsq: torch.Tensor) -> None:
        """Nothing to do: training reads norms of all-reduced gradients, probing of all-reduced layers."""

    def reduce_probe_unit(
        self, unit_id: int, grads: Sequence[torch.Tensor], on_sumsq: Callable[[int, torch.Tensor], None]
    ) -> None:
        """Start the all-reduce (mean, fp32) of one layer's accumulated probing gradient; its squared
        norm reaches ``on_sumsq`` when it completes. Every rank reduces the layers in the same order
        with the same layout (missing gradients as zeros), as for training (R1, R2)."""
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads]).div_(self.world_size)
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._probe_pending.append((unit_id, work, flat, on_sumsq))  # R3
        while len(self._probe_pending) > 2:  # R6: bounds the probing buffers on the device to 2 layers
            self._finish_probe_one()

    def _finish_probe_one(self) -> None:
        unit_id, work, flat, on_sumsq = self._probe_pending.pop(0)
        work.wait()
        on_sumsq(unit_id, torch.linalg.vector_norm(flat).double().square())

    def finish_probe_reductions(self) -> None:
        while self._probe_pending:
            self._finish_probe_one()

    def broadcast_layers(self, layers: Sequence[int]) -> list[int]:
        t = torch.tensor(list(layers), dtype=torch.int64, device=collective_device(self.group))
        dist.broadcast(t, src=self._global_rank(0), group=self.group)
        return [int(i) for i in t.tolist()]

    # ------------------------------------------------------------------------------------------
    # ZeRO-1
    def owner(self, unit_id: int) -> int:
        """The rank that keeps the optimizer states of unit ``unit_id`` and steps it."""
        return unit_id % self.world_size

    def owns(self, unit_id: int) -> bool:
        """Whether this rank steps the unit (always, without sharding)."""
        return not self.shard_optimizer_states or self.owner(unit_id) == self.rank

    def broadcast_updates(self, unit_ids: Sequence[int]) -> None:
        """After the owners stepped their units: every rank receives the new weights.

        ``unit_ids`` comes in the same order on every rank (``param_groups`` order, R7)."""
        if not self.shard_optimizer_states or self.world_size == 1:
            return
        pending = []
        for unit in unit_ids:
            src = self._global_rank(self.owner(unit))
            for ps in self._by_dtype(unit).values():
                flat = torch.cat([p.detach().reshape(-1) for p in ps])
                work = dist.broadcast(flat, src=src, group=self.group, async_op=True)
                pending.append((work, flat, ps, src))  # R3
        for work, flat, ps, src in pending:
            work.wait()
            if src != self._global_rank(self.rank):
                with torch.no_grad():
                    for p, v in zip(ps, flat.split([p.numel() for p in ps])):
                        p.copy_(v.view_as(p))

    # ------------------------------------------------------------------------------------------
    # checkpoints
    def consolidate_state_dict(self, sd: dict[str, Any]) -> dict[str, Any]:
        """Gather the sharded states into rank 0's state dict (collective when sharding).

        Rank 0's result holds the states of every unit (on the CPU) and is world-size independent;
        the other ranks' results are marked ``grass.partial_shard`` so that loading them fails."""
        if not self.shard_optimizer_states or self.world_size == 1:
            return sd
        local = {
            idx: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in st.items()}
            for idx, st in sd["state"].items()
        }
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(local, gathered, dst=self._global_rank(0), group=self.group)
        if self.rank == 0:
            merged: dict[int, Any] = {}
            for part in gathered or []:
                merged.update(part)
            sd["state"] = dict(sorted(merged.items()))
        else:
            sd["grass"]["partial_shard"] = {"rank": self.rank, "world_size": self.world_size}
        return sd
