"""Layer-wise optimizer-state offloading (GRASS paper, section 3.3).

GRASS steps only a few decoder layers ("units") per iteration, but every unit that may be
sampled later needs its AdamW state kept somewhere. :class:`LayerStateOffloader` keeps the
state of *all* units in host memory and materialises on the device only the unit being
stepped plus at most one prefetched unit::

    off = LayerStateOffloader(torch.device("cuda"))
    for uid, layer in enumerate(layers):
        off.register(uid, list(layer.parameters()), fp32_states=True, fp32_master=True)

    off.prefetch(active[0])
    for i, uid in enumerate(active):
        state = off.acquire(uid)                 # compute stream waits for the H2D copy
        if i + 1 < len(active):
            off.prefetch(active[i + 1])          # H2D of the next unit overlaps this step
        adamw_step(params[uid], state["exp_avg"], state["exp_avg_sq"], state.get("master"))
        off.release(uid)                         # D2H write-back after the step, async
    off.synchronize()                            # only before touching host state (checkpoint)

The module is torch-only and knows nothing about models or optimizers; it moves tensors.

Memory layout
-------------
Each unit's state is one flat ``uint8`` host buffer (pinned when the device is CUDA), carved
into aligned typed views: all ``exp_avg`` tensors, then all ``exp_avg_sq``, then the fp32
``master`` copies. A unit therefore moves with a single ``copy_`` per direction instead of
one small copy per tensor.

The device side is a pool of exactly two *slots*: flat ``uint8`` buffers sized to the
largest registered unit, with the same layout. Why a pool instead of allocating per unit:
the peak is the same (two of the largest unit is also the worst case of per-unit
allocation), but a pool makes the bound explicit (``device_bytes() <= 2 * max unit``),
never fragments the caching allocator with a stream of differently sized blocks, and makes
the freeing rules trivial (see invariant S5). The price is that a small unit occupies a
slot sized for the largest one; GRASS units are identical decoder layers, so nothing is
lost in the common case.

A slot is in one of four states::

    FREE ──prefetch──> PREFETCHED ──acquire──> ACQUIRED ──release──> RELEASED
                           ^                                            │
                           └──────── prefetch/acquire, same unit ───────┘  (cache hit)
    RELEASED or PREFETCHED ──prefetch of another unit──> PREFETCHED (evicted, reused)

A RELEASED slot still holds a valid copy of its unit (it was just written back), so
acquiring the same unit again before the slot is reused costs no transfer at all. This is
the common case in GRASS, where the active layer set is kept for a whole resampling period.

Synchronisation invariants (CUDA; the CPU path runs every copy eagerly and needs none)
-------------------------------------------------------------------------------------
S1. One copy stream carries every transfer, in both directions, in issue order. So a H2D
    copy into a slot runs after any earlier D2H copy out of that slot, and a H2D copy out
    of a host buffer runs after any earlier D2H write-back into it, with no event between
    them. Two streams (one per direction) would buy nothing here: with two slots the next
    H2D into a slot has to wait for the D2H out of that same slot anyway.
S2. ``acquire`` makes the caller's (compute) stream wait on the slot's ``copy_done`` event,
    the last event recorded on the copy stream after a copy touching that slot. The compute
    stream therefore never reads a slot before its H2D copy landed, and never overwrites a
    slot (cache hit) while its previous D2H write-back is still reading it.
S3. ``release`` records an event on the caller's stream and makes the copy stream wait on
    it before the D2H copy: the write-back reads the state only after every kernel the
    caller queued on the state before ``release`` has run. ``release`` must therefore be
    called on the stream that ran the update (or one ordered after it).
S4. Host buffers are touched by the CPU (``state_dict``, ``load_state_dict``, lazy
    initialisation) only after ``synchronize()`` waited on every slot's ``copy_done``
    event (event waits, never ``torch.cuda.synchronize()``), or, for lazy
    (re-)initialisation, on a buffer never copied yet or after waiting on the unit's
    ``last_copy`` event (its latest transfer; later ones would need a slot holding it).
S5. Slot buffers are allocated while the copy stream is current, so the caching allocator
    files them under the copy stream and recycles a freed slot block only for a later
    allocation on the copy stream. Every compute-stream use of a slot is bracketed by S2
    and S3, which the copy stream is ordered after, so a slot buffer can be dropped (grown,
    or freed by ``free_device_buffers``) with no ``record_stream`` and no host wait. The
    views handed out by ``acquire`` alias a slot and are valid only until ``release``.
    With ``overlap=False`` transfers and slots live on the caller's stream; S1-S5 hold
    as long as the caller keeps to one stream, and ``free_device_buffers`` also waits.
S6. A PREFETCHED slot that was never acquired equals its host buffer, so evicting it needs
    no write-back; the new H2D copy is ordered after the old one by S1.
S7. A unit lives in at most one slot, so two copies of one host buffer are never in flight.

Not thread-safe: drive one offloader from one Python thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch

__all__ = ["STATE_KEYS", "LayerStateOffloader"]

#: Per-unit state tensors, in layout order. ``master`` exists only with ``fp32_master=True``.
STATE_KEYS = ("exp_avg", "exp_avg_sq", "master")

# Byte alignment of every view inside a flat buffer: a multiple of every element size and
# of the 16-byte vector loads used by fused/foreach optimizer kernels.
_ALIGN = 64

_FREE, _PREFETCHED, _ACQUIRED, _RELEASED = "free", "prefetched", "acquired", "released"


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclasses.dataclass(frozen=True)
class _View:
    key: str
    index: int
    offset: int
    dtype: torch.dtype
    shape: torch.Size

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


@dataclasses.dataclass
class _Unit:
    params: list[torch.Tensor]
    views: list[_View]
    nbytes: int
    host: torch.Tensor | None = None  # flat uint8 buffer, allocated once on first use
    initialized: bool = False  # host holds valid state (zeros + master copy, or loaded)
    last_copy: Any = None  # torch.cuda.Event of the last copy into or out of ``host`` (S4)


@dataclasses.dataclass
class _Slot:
    buf: torch.Tensor | None = None  # flat uint8 device buffer, reused across units
    unit_id: Hashable | None = None
    state: str = _FREE
    copy_done: Any = None  # torch.cuda.Event of the last copy touching this slot (S2)
    tick: int = 0  # when it last changed hands; lower = older eviction candidate


def _typed_view(flat: torch.Tensor, v: _View) -> torch.Tensor:
    return flat[v.offset : v.offset + v.nbytes].view(v.dtype).view(v.shape)


class LayerStateOffloader:
    """Keep per-unit AdamW state in host memory; stage one or two units on the device.

    Args:
        device: where the optimizer step runs. ``cuda`` (any index) uses pinned host
            buffers, a dedicated copy stream and events; ``cpu`` keeps the same copy-in /
            copy-out code path with separate "device" buffers and eager copies, so the
            bookkeeping and numerics can be tested bit for bit without a GPU.
        pin_memory: ``"auto"`` or ``True``: pin host buffers when ``device`` is CUDA (pinning
            needs CUDA and only helps transfers to it). ``False``: pageable host buffers;
            transfers then stage through the driver and overlap poorly.
        overlap: CUDA only. ``True`` runs transfers on a dedicated copy stream so they
            overlap compute; ``False`` runs them on the caller's current stream (simpler
            to profile and debug, no overlap). Ignored on CPU.

    The API is a lease protocol: ``register`` every unit once, then per step
    ``prefetch`` (optional, for overlap) -> ``acquire`` -> update the returned tensors in
    place on the current stream -> ``release``. At most two units are on the device; at
    most two can be acquired at the same time.
    """

    def __init__(
        self, device: torch.device | str, pin_memory: bool | str = "auto", overlap: bool = True
    ) -> None:
        device = torch.device(device)
        if pin_memory not in ("auto", True, False):
            raise ValueError(f"pin_memory must be 'auto', True or False, got {pin_memory!r}")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {device} requested but CUDA is not available")
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
        elif device.type != "cpu":
            raise ValueError(f"unsupported device {device}: expected 'cpu' or 'cuda'")
        self.device = device
        self._cuda = device.type == "cuda"
        self._pin = self._cuda and pin_memory is not False
        # torch.cuda.Stream() raises without CUDA: only built on the CUDA path.
        self._copy_stream = torch.cuda.Stream(device=device) if self._cuda and overlap else None
        self._units: dict[Hashable, _Unit] = {}
        self._slots = [_Slot(), _Slot()]
        self._tick = 0

    # ------------------------------------------------------------------ registration
    def register(
        self,
        unit_id: Hashable,
        params: Sequence[torch.Tensor],
        *,
        fp32_states: bool = False,
        fp32_master: bool = False,
    ) -> None:
        """Declare a unit and the layout of its state. Allocates nothing yet.

        ``exp_avg``/``exp_avg_sq`` get each parameter's shape and dtype (``float32`` with
        ``fp32_states``); ``master`` (``fp32_master`` only) is a float32 copy of the
        parameter, taken from its value at the unit's first use. The host buffer is
        allocated on first use and reused for the offloader's lifetime.
        """
        if unit_id in self._units:
            raise ValueError(f"unit {unit_id!r} is already registered")
        params = [p.detach() for p in params]
        if not params:
            raise ValueError(f"unit {unit_id!r} has no parameters")
        views: list[_View] = []
        offset = 0
        layout = [("exp_avg", fp32_states), ("exp_avg_sq", fp32_states)]
        if fp32_master:
            layout.append(("master", True))
        for key, fp32 in layout:
            for i, p in enumerate(params):
                if not p.is_floating_point():
                    raise TypeError(f"unit {unit_id!r}: parameter {i} has non-float dtype {p.dtype}")
                view = _View(key, i, offset, torch.float32 if fp32 else p.dtype, p.shape)
                views.append(view)
                offset += _align(view.nbytes)
        self._units[unit_id] = _Unit(params=params, views=views, nbytes=offset)

    def units(self) -> tuple[Hashable, ...]:
        """Registered unit ids, in registration order."""
        return tuple(self._units)

    def unit_nbytes(self, unit_id: Hashable) -> int:
        """Bytes one copy of the unit's state takes (host buffer = one device slot's need)."""
        return self._unit(unit_id).nbytes

    # ------------------------------------------------------------------ lease protocol
    def prefetch(self, unit_id: Hashable) -> None:
        """Start copying ``unit_id``'s state to the device, asynchronously on CUDA.

        No-op if the unit is already on the device (prefetched, acquired, or released and
        not yet evicted). Otherwise it takes a free slot, else the least recently released
        one, else the older prefetched-but-unacquired one (that prefetch is wasted but no
        state is lost, S6). Raises if both slots are acquired.
        """
        unit = self._unit(unit_id)
        slot = self._slot_of(unit_id)
        if slot is not None:
            if slot.state == _RELEASED:
                # Cache hit: the slot is a valid copy. acquire() still waits on copy_done,
                # i.e. the pending write-back that reads this slot (S2).
                slot.state = _PREFETCHED
            return
        slot = self._victim()
        self._ensure_host(unit_id, unit)
        self._ensure_capacity(slot, unit.nbytes)
        with self._copy_ctx():
            # S1: ordered after any earlier D2H out of this slot or into this host buffer.
            slot.buf[: unit.nbytes].copy_(unit.host, non_blocking=self._cuda)
            slot.copy_done = unit.last_copy = self._record_copy_event()
        slot.unit_id, slot.state, slot.tick = unit_id, _PREFETCHED, self._next_tick()

    def acquire(self, unit_id: Hashable) -> dict[str, list[torch.Tensor]]:
        """Return the unit's state on the device, ready for in-place updates.

        Keys: ``exp_avg``, ``exp_avg_sq`` and, with ``fp32_master``, ``master``; lists are in
        the order of the parameters given to :meth:`register`. Prefetches first if needed.
        The current stream is made to wait for the copy (an event wait, never a device-wide
        synchronize). The tensors alias a pooled device buffer: they are valid only until
        :meth:`release`, and must be updated on the current stream (or one ordered before
        the ``release`` call, S3).
        """
        unit = self._unit(unit_id)
        slot = self._slot_of(unit_id)
        if slot is not None and slot.state == _ACQUIRED:
            raise RuntimeError(f"unit {unit_id!r} is already acquired; release it first")
        self.prefetch(unit_id)
        slot = self._slot_of(unit_id)
        assert slot is not None and slot.state == _PREFETCHED
        if self._cuda and slot.copy_done is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.copy_done)  # S2
        slot.state = _ACQUIRED
        out: dict[str, list[torch.Tensor]] = {}
        for v in unit.views:
            out.setdefault(v.key, []).append(_typed_view(slot.buf, v))
        return out

    def release(self, unit_id: Hashable) -> None:
        """Write the unit's device state back to host memory (asynchronously on CUDA).

        Call it on the stream that ran the update, after queueing the update (S3). The
        slot stays a valid cached copy of the unit until a prefetch of another unit reuses
        it; its memory is reused, never freed, so no ``record_stream`` is needed (S5).
        """
        unit = self._unit(unit_id)
        slot = self._slot_of(unit_id)
        if slot is None or slot.state != _ACQUIRED:
            raise RuntimeError(f"unit {unit_id!r} is not acquired")
        if self._cuda and self._copy_stream is not None:
            # S3: the D2H copy starts only after the caller's queued update.
            step_done = torch.cuda.current_stream(self.device).record_event()
            self._copy_stream.wait_event(step_done)
        with self._copy_ctx():
            unit.host.copy_(slot.buf[: unit.nbytes], non_blocking=self._cuda)
            slot.copy_done = unit.last_copy = self._record_copy_event()
        slot.state, slot.tick = _RELEASED, self._next_tick()

    def reset(self, unit_id: Hashable) -> None:
        """Forget the unit's state: its next use starts from zeros and a fresh master copy.

        For GRASS's ``on_reactivation="reset"``: a layer leaving the active set loses its
        moments. The host buffer is kept (allocated once) and re-initialised lazily on the
        unit's next use, which first waits for the unit's last transfer (S4), so ``reset``
        itself never blocks. A cached device copy of the unit is dropped (S6: no copy is
        lost, the state is being discarded anyway). The unit must not be acquired.
        """
        unit = self._unit(unit_id)
        slot = self._slot_of(unit_id)
        if slot is not None:
            if slot.state == _ACQUIRED:
                raise RuntimeError(f"cannot reset unit {unit_id!r} while it is acquired")
            slot.unit_id, slot.state = None, _FREE
        unit.initialized = False

    def synchronize(self) -> None:
        """Block the host until every issued transfer finished (event waits only).

        Afterwards host buffers hold the latest released state (S4). Call before reading
        host state directly or checkpointing; :meth:`state_dict` calls it itself.
        """
        for slot in self._slots:
            if slot.copy_done is not None:
                slot.copy_done.synchronize()
                slot.copy_done = None

    def free_device_buffers(self) -> None:
        """Drop both device slots (e.g. before evaluation); they are re-created on demand.

        Requires that no unit is acquired. Safe without waiting because slot memory is only
        recycled for copy-stream allocations, which are ordered after every pending use (S5).
        """
        if any(s.state == _ACQUIRED for s in self._slots):
            raise RuntimeError("cannot free device buffers while a unit is acquired")
        if self._copy_stream is None and self._cuda:
            # Slots were allocated on the (then) current stream: wait for our own copies.
            self.synchronize()
        self._slots = [_Slot(), _Slot()]

    # ------------------------------------------------------------------ introspection
    @property
    def copy_stream(self) -> torch.cuda.Stream | None:
        """The dedicated transfer stream (CUDA with ``overlap=True``), else ``None``."""
        return self._copy_stream

    def resident_units(self) -> tuple[Hashable, ...]:
        """Units whose state currently sits in a device slot (at most two)."""
        return tuple(s.unit_id for s in self._slots if s.state != _FREE)

    def host_bytes(self) -> int:
        """Bytes of host buffers allocated so far (units not used yet take none)."""
        return sum(u.host.numel() for u in self._units.values() if u.host is not None)

    def device_bytes(self) -> int:
        """Bytes held on ``device`` for staging: the allocated slots, at most 2 x max unit."""
        return sum(s.buf.numel() for s in self._slots if s.buf is not None)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Host state of every unit used so far, as CPU tensors.

        Format: ``{"units": {unit_id: {"exp_avg": [...], "exp_avg_sq": [...],
        ["master": [...]]}}}``. Units never used have no state (like ``torch.optim``) and
        are re-initialised lazily after loading. Calls :meth:`synchronize` first. As with
        ``torch.optim``, the tensors are live views of the host buffers, not copies: save or
        clone them before the next ``release``. They never live on the device, so a
        checkpoint loads anywhere.
        """
        self.synchronize()
        units: dict[Hashable, dict[str, list[torch.Tensor]]] = {}
        for uid, unit in self._units.items():
            if unit.initialized:
                state: dict[str, list[torch.Tensor]] = {}
                for v in unit.views:
                    state.setdefault(v.key, []).append(_typed_view(unit.host, v))
                units[uid] = state
        return {"units": units}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Copy a :meth:`state_dict` into the host buffers (allocated once, reused).

        Every unit in ``state_dict`` must be registered with matching shapes and dtypes;
        registered units absent from it are reset and re-initialised on their next use.
        No unit may be acquired. Device slots are invalidated, since they no longer match
        host memory.
        """
        if any(s.state == _ACQUIRED for s in self._slots):
            raise RuntimeError("cannot load state while a unit is acquired")
        loaded = state_dict["units"]
        for uid, state in loaded.items():
            unit = self._units.get(uid)
            if unit is None:
                raise ValueError(f"state_dict has unit {uid!r} which is not registered")
            keys = {v.key for v in unit.views}
            if set(state) != keys:
                raise ValueError(f"unit {uid!r}: state keys {sorted(state)} != expected {sorted(keys)}")
            for v in unit.views:
                tensors = state[v.key]
                if len(tensors) != len(unit.params):
                    raise ValueError(
                        f"unit {uid!r}: {v.key} has {len(tensors)} tensors, expected {len(unit.params)}"
                    )
                t = tensors[v.index]
                if t.shape != v.shape or t.dtype != v.dtype:
                    raise ValueError(
                        f"unit {uid!r}: {v.key}[{v.index}] is {t.dtype}{tuple(t.shape)}, "
                        f"expected {v.dtype}{tuple(v.shape)}"
                    )
        self.synchronize()  # S4: no copy may still read or write a host buffer.
        for slot in self._slots:
            slot.unit_id, slot.state = None, _FREE
        for uid, unit in self._units.items():
            unit.initialized, unit.last_copy = False, None
            if uid in loaded:
                self._ensure_host(uid, unit, init=False)
                for v in unit.views:
                    _typed_view(unit.host, v).copy_(loaded[uid][v.key][v.index])
                unit.initialized = True

    # ------------------------------------------------------------------ internals
    def _unit(self, unit_id: Hashable) -> _Unit:
        try:
            return self._units[unit_id]
        except KeyError:
            raise KeyError(f"unit {unit_id!r} is not registered") from None

    def _slot_of(self, unit_id: Hashable) -> _Slot | None:
        for slot in self._slots:  # S7: at most one match
            if slot.state != _FREE and slot.unit_id == unit_id:
                return slot
        return None

    def _victim(self) -> _Slot:
        for wanted in (_FREE, _RELEASED, _PREFETCHED):
            candidates = [s for s in self._slots if s.state == wanted]
            if candidates:
                return min(candidates, key=lambda s: s.tick)
        raise RuntimeError("both device slots hold acquired units; release one before prefetching another")

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    def _copy_ctx(self) -> contextlib.AbstractContextManager:
        if self._copy_stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self._copy_stream)

    def _record_copy_event(self) -> Any:
        if not self._cuda:
            return None
        stream = self._copy_stream or torch.cuda.current_stream(self.device)
        return stream.record_event()

    def _ensure_host(self, unit_id: Hashable, unit: _Unit, init: bool = True) -> None:
        """Allocate the unit's host buffer once; fill it with fresh state on first use.

        S4: a newly allocated buffer has never been part of a copy. Before re-initialising
        an existing buffer (after :meth:`reset`) the host waits on ``last_copy``, the
        unit's latest transfer (e.g. the write-back queued by its last ``release``): the
        CPU must not write the buffer while the copy stream still reads or writes it.
        """
        if unit.host is None:
            unit.host = torch.empty(unit.nbytes, dtype=torch.uint8, pin_memory=self._pin)
        if unit.initialized or not init:
            return
        if unit.last_copy is not None:
            unit.last_copy.synchronize()
            unit.last_copy = None
        unit.host.zero_()
        for v in unit.views:
            if v.key == "master":
                # One-off blocking copy; on CUDA it waits for the queued updates of the param.
                _typed_view(unit.host, v).copy_(unit.params[v.index])
        unit.initialized = True

    def _ensure_capacity(self, slot: _Slot, nbytes: int) -> None:
        if slot.buf is not None and slot.buf.numel() >= nbytes:
            return
        size = max(nbytes, max(u.nbytes for u in self._units.values()))
        slot.buf = None  # S5: the old block is only recycled for copy-stream allocations.
        with self._copy_ctx():
            slot.buf = torch.empty(size, dtype=torch.uint8, device=self.device)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._units)

    def __len__(self) -> int:
        return len(self._units)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(device={self.device}, units={len(self._units)}, "
            f"pinned={self._pin}, copy_stream={self._copy_stream is not None}, "
            f"resident={list(self.resident_units())})"
        )
