"""Data-parallel GRASS on ``torch.distributed``, without DDP: same layers on every rank, gradients
all-reduced for the active layers only, optional ZeRO-1 sharding of the optimizer states.

``GrassOptimizer`` picks this up by itself under ``torchrun`` / ``accelerate launch`` (argument
``distributed="auto"``: on when a process group of more than one rank is initialised). The model is
**not** wrapped in ``DistributedDataParallel``: DDP reduces every parameter that required grad when it
was wrapped, in buckets it builds once, so it would reduce the whole model (frozen layers as zeros,
with ``find_unused_parameters=True``) every step, and its reducer reads the gradients that the
probing hooks free. GRASS knows which layers train and reduces only those (see docs/distributed.md).

What each rank does, and the invariant that keeps the ranks identical:

* **Sampling.** The sampler's seeded generator advances on every rank; the draw of rank 0 is
  broadcast and used everywhere (``_SyncedLayerSampler``). The MGN it samples from is the same on
  every rank: in training it is read from all-reduced gradients, and the period sums are all-reduced
  (mean) before the probabilities are computed; during probing the per-step squared norms are.
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

Collective-order invariant: every rank runs the same model code on batches of the same shape, so
the autograd engine makes the same gradients ready in the same order on every rank, and the
collectives launched from hooks match across ranks. A unit whose gradients are only partly produced
is reduced at the end of the backward pass, in unit order, with zeros for the missing gradients; a
parameter that has a gradient on no rank keeps ``.grad = None``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from grass_llm.importance import ImportanceTracker
from grass_llm.sampling import LayerSampler

if TYPE_CHECKING:
    from grass_llm.optim import GrassOptimizer

__all__ = ["GrassDistributed", "resolve_distributed"]


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def resolve_distributed(distributed: Any, model: nn.Module) -> GrassDistributed | None:
    """The ``distributed`` argument of ``GrassOptimizer`` -> a ``GrassDistributed`` or ``None``.

    ``"auto"``: on when ``torch.distributed`` is initialised with more than one rank. ``True``: on
    (the process group must be initialised). ``None``/``False``: off. A ``GrassDistributed``: used.
    """
    if _is_ddp(model):
        raise TypeError(
            "GrassOptimizer got a DistributedDataParallel model. Pass the unwrapped model and do not wrap it "
            "in DDP: GRASS all-reduces the gradients of the active layers itself (DDP would reduce every "
            "layer and reads the gradients that the probing phase frees). See docs/distributed.md."
        )
    if isinstance(distributed, GrassDistributed):
        return distributed
    if distributed is None or distributed is False:
        return None
    initialized = dist.is_available() and dist.is_initialized()
    if distributed is True:
        if not initialized:
            raise RuntimeError("distributed=True needs torch.distributed.init_process_group() first")
        return GrassDistributed()
    if distributed == "auto":
        return GrassDistributed() if initialized and dist.get_world_size() > 1 else None
    raise ValueError(
        f"distributed={distributed!r} is invalid; allowed: 'auto', True, False, None or a GrassDistributed"
    )


@dataclass
class _Pending:
    """One in-flight all-reduce of one unit's gradients of one dtype."""

    work: Any
    flat: torch.Tensor  # (sum numel + len(params),): gradients / world, then presence flags / world
    params: list[nn.Parameter]


class GrassDistributed:
    """Synchronises a ``GrassOptimizer`` across the ranks of a process group (no DDP needed).

    Args:
        process_group: the group to synchronise over (default: the world).
        shard_optimizer_states: ZeRO-1: each rank keeps the AdamW states of the units it owns
            (unit ``j`` -> rank ``j % world_size``), steps them and broadcasts their weights.

    Create it after ``torch.distributed.init_process_group`` and pass it as
    ``GrassOptimizer(model, cfg, distributed=GrassDistributed(shard_optimizer_states=True))``; one
    instance serves one optimizer.
    """

    def __init__(self, process_group: Any = None, shard_optimizer_states: bool = False) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("GrassDistributed needs torch.distributed.init_process_group() first")
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.shard_optimizer_states = bool(shard_optimizer_states)
        #: accelerate-style switch: ``False`` skips the gradient all-reduce (non-final micro-batches)
        self.sync_gradients = True
        self._opt: GrassOptimizer | None = None
        self._params: list[list[nn.Parameter]] = []  # per unit, in param_groups order, user-frozen excluded
        self._unit_index: dict[str, int] = {}
        self._hooks: list[Any] = []
        self._counts: dict[int, int] = {}  # unit -> gradients ready in this backward pass
        self._launched: set[int] = set()  # units whose all-reduce started in this backward pass
        self._reduced: set[int] = set()  # units reduced since the last step()
        self._pending: list[_Pending] = []
        self._callback_queued = False
        self._warned_order = False

    # ------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (
            f"GrassDistributed(rank={self.rank}, world_size={self.world_size}, "
            f"shard_optimizer_states={self.shard_optimizer_states})"
        )

    def _global_rank(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def _small_device(self) -> torch.device:
        """Where small host-side values (the draw) travel: NCCL needs CUDA tensors."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ------------------------------------------------------------------------------------------
    # wiring, called once by GrassOptimizer.__init__ before the first draw
    def attach(self, opt: GrassOptimizer) -> None:
        """Replace the optimizer's tracker and sampler by rank-synchronised ones and install the hooks."""
        if self._opt is not None:
            raise RuntimeError(
                "this GrassDistributed is already attached to an optimizer; create one per optimizer"
            )
        self._opt = opt
        old_tracker = opt.importance_tracker
        tracker = _SyncedImportanceTracker(
            [opt.groups.numel(i) for i in range(opt.num_layers)], device=old_tracker.device, comm=self
        )
        tracker.load_state_dict(old_tracker.state_dict())
        opt.importance_tracker = tracker
        cfg = opt.config
        sampler = _SyncedLayerSampler(
            opt.num_layers, cfg.active_layers, cfg.policy, cfg.temperature, cfg.seed, comm=self
        )
        sampler.load_state_dict(opt.sampler.state_dict())
        opt.sampler = sampler

        frozen = opt._user_frozen
        self._params = [[p for p in g["params"] if id(p) not in frozen] for g in opt.param_groups]
        self._unit_index = {g["unit"]: j for j, g in enumerate(opt.param_groups)}
        # invariant: these hooks are registered before the probing hooks, so they run first and see
        # the gradient; during probing they return at once and the probing hook frees it
        for j, params in enumerate(self._params):
            for p in params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(j)))

    def detach(self) -> None:
        """Remove the gradient hooks (the optimizer then must not be stepped any more)."""
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
            opt = self._opt
            if opt is None or opt.probing:
                return
            if not self.sync_gradients:
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
                # runs once the whole backward pass is done, on the engine's thread (as DDP does)
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
                self._callback_queued = True
            n = self._counts.get(unit, 0) + 1
            self._counts[unit] = n
            if n == sum(q.requires_grad for q in self._params[unit]):
                self._launch(unit)

        return hook

    def _launch(self, unit: int) -> None:
        """Start the all-reduce (mean) of one unit's gradients: one buffer per dtype.

        Missing gradients count as zeros; the presence flags appended to the buffer tell which
        parameters had a gradient on some rank. Invariant: the buffer layout depends only on which
        parameters require grad, which is the same on every rank."""
        params = [p for p in self._params[unit] if p.requires_grad]
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        for dtype, ps in by_dtype.items():
            parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps]
            flags = torch.tensor([p.grad is not None for p in ps], dtype=dtype, device=ps[0].device)
            flat = torch.cat([*parts, flags])
            flat.div_(self.world_size)  # pre-divide, as DDP does (gloo has no AVG)
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            # invariant: flat stays referenced in _pending until work.wait(), so its memory is not reused
            self._pending.append(_Pending(work, flat, ps))
        self._launched.add(unit)

    def _complete(self) -> None:
        """Wait for the in-flight all-reduces and write the mean gradients back into ``.grad``."""
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

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        for unit in sorted(self._counts):
            if unit not in self._launched:  # some trainable parameter got no gradient in this pass
                self._launch(unit)
        self._complete()
        self._reduced |= self._launched
        self._launched = set()
        self._counts = {}

    def reduce_gradients(self, groups: Iterable[Mapping[str, Any]]) -> None:
        """Called by ``step()`` before it reads gradients: make sure every trained unit is reduced.

        Normally the end-of-backward callback did it; units never synchronised since the last step
        (all micro-batches under ``no_sync()``) are reduced now, in unit order."""
        self._complete()
        for unit in sorted(self._unit_index[g["unit"]] for g in groups):
            if unit not in self._reduced:
                self._launch(unit)
        self._complete()
        self._reduced = set()
        self._launched = set()

    # ------------------------------------------------------------------------------------------
    # ZeRO-1
    def owner(self, unit: str) -> int:
        """The rank that keeps the optimizer states of ``unit`` and steps it."""
        return self._unit_index[unit] % self.world_size

    def owns(self, group: Mapping[str, Any]) -> bool:
        """Whether this rank steps ``group`` (always, without sharding)."""
        return not self.shard_optimizer_states or self.owner(group["unit"]) == self.rank

    def broadcast_updates(self, groups: Iterable[Mapping[str, Any]]) -> None:
        """After the owners stepped their units: every rank receives the new weights.

        Invariant: ``groups`` comes in the same order on every rank (``param_groups`` order)."""
        if not self.shard_optimizer_states or self.world_size == 1:
            return
        pending = []
        for g in groups:
            src = self._global_rank(self.owner(g["unit"]))
            params = [p for p in self._params[self._unit_index[g["unit"]]] if p.requires_grad]
            by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
            for p in params:
                by_dtype.setdefault(p.dtype, []).append(p)
            for ps in by_dtype.values():
                flat = torch.cat([p.detach().reshape(-1) for p in ps])
                work = dist.broadcast(flat, src=src, group=self.group, async_op=True)
                pending.append((work, flat, ps, src))
        for work, flat, ps, src in pending:
            work.wait()
            if src != self._global_rank(self.rank):
                with torch.no_grad():
                    for p, v in zip(ps, flat.split([p.numel() for p in ps])):
                        p.copy_(v.view_as(p))

    def drop_unowned_states(self) -> None:
        """After ``load_state_dict``: keep only the states of the units this rank owns (ZeRO-1)."""
        opt = self._opt
        if opt is None or not self.shard_optimizer_states:
            return
        for g in opt.param_groups:
            if not self.owns(g):
                for p in g["params"]:
                    opt.state.pop(p, None)

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

    # ------------------------------------------------------------------------------------------
    # small collectives for the tracker and the sampler
    def all_reduce_mean_(self, t: torch.Tensor) -> None:
        """In-place mean over ranks, summed in float64 so that equal values come back bit-identical."""
        buf = t.to(torch.float64)
        dist.all_reduce(buf, group=self.group)
        t.copy_(buf.div_(self.world_size))

    def broadcast_layers(self, layers: Sequence[int]) -> list[int]:
        t = torch.tensor(list(layers), dtype=torch.int64, device=self._small_device())
        dist.broadcast(t, src=self._global_rank(0), group=self.group)
        return sorted(int(i) for i in t.tolist())


class _SyncedImportanceTracker(ImportanceTracker):
    """``ImportanceTracker`` whose MGN is the same on every rank.

    Training: the gradients it observes are all-reduced already, so every rank makes the same
    observations; the period sums are still averaged over ranks at period end (one collective per
    period, float64, a no-op on equal values) so that the probabilities cannot drift apart.

    Probing: the hooks read the *local* micro-batch gradients, which are never reduced. With W ranks,
    k micro-batches and ``g_ri`` the gradient of micro-batch i on rank r (loss divided by k), the
    global gradient is ``g = (1/W) sum_r sum_i g_ri``; the estimate of ``||g||^2`` is
    ``(k/W) sum_r sum_i ||g_ri||^2``, i.e. the rank mean of the single-process estimate
    ``k sum_i ||g_ri||^2``. It equals ``||g||^2`` when all the ``g_ri`` agree and is an upper estimate
    otherwise (Cauchy-Schwarz), the same estimator as for micro-batches on one process. The square
    root of eq. 2 is taken per step, after the mean, so the per-step sums must be reduced before it:
    one asynchronous all-reduce of ``num_layers`` floats per probing step, awaited at the next step
    (buffering the probing steps to reduce them once would make a mid-probe ``state_dict()`` a
    collective, which hangs trainers that save on rank 0 only).
    """

    def __init__(self, numels: Sequence[int], device: torch.device | str, comm: GrassDistributed) -> None:
        super().__init__(numels, device=device)
        self._comm = comm
        self._reduced_input = False
        self._inflight: list[tuple[Any, torch.Tensor, list[int], float]] = []

    def observe_grads(self, grads: Mapping[int, Sequence[torch.Tensor]], scale: float = 1.0) -> None:
        self._reduced_input = True  # training: the gradients are all-reduced means already
        try:
            super().observe_grads(grads, scale=scale)
        finally:
            self._reduced_input = False

    def observe_step(self, layers: Sequence[int], scale: float = 1.0) -> None:
        if self._reduced_input or self._comm.world_size == 1:
            super().observe_step(layers, scale=scale)
            return
        self._finish_inflight()
        # invariant: every rank launches this collective once per probing step, in step()
        buf = self._step_sumsq.to(torch.float64)
        work = dist.all_reduce(buf, group=self._comm.group, async_op=True)
        self._inflight.append((work, buf, list(layers), scale))
        self._step_sumsq.zero_()

    def _finish_inflight(self) -> None:
        for work, buf, layers, scale in self._inflight:
            work.wait()
            local = self._step_sumsq
            # the parent's observation formula applied to the rank mean of the step's squared norms
            self._step_sumsq = buf.div_(self._comm.world_size).to(local.dtype)
            try:
                super().observe_step(layers, scale=scale)
            finally:
                self._step_sumsq = local
        self._inflight = []

    def period_mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._finish_inflight()
        return super().period_mean()

    def end_period(self, ema: float) -> torch.Tensor:
        self._finish_inflight()
        # invariant: end_period runs in step() at the same step on every rank
        self._comm.all_reduce_mean_(self._period_sum)
        return super().end_period(ema)

    def state_dict(self) -> dict[str, Any]:
        self._finish_inflight()
        return super().state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._finish_inflight()
        super().load_state_dict(state)


class _SyncedLayerSampler(LayerSampler):
    """``LayerSampler`` whose draw is rank 0's: every rank advances its generator (so any rank's
    ``state_dict`` is the same), then rank 0's layers are broadcast and used."""

    def __init__(self, *args: Any, comm: GrassDistributed, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._comm = comm

    def draw(self) -> list[int]:
        return self._comm.broadcast_layers(super().draw())
