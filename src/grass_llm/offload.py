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

Chunks
------
With ``chunk_bytes`` set, a unit's state is cut into *chunks* of at most that many bytes
(a parameter may be split into flat element ranges, "pieces"; AdamW is elementwise, so a
piece updates exactly like the whole tensor). The lease protocol then runs per chunk:
``prefetch(uid, c)`` / ``acquire(uid, c)`` / ``release(uid, c)``, and a slot holds one chunk,
so the device holds at most ``2 * chunk_bytes`` whatever the size of a unit: a decoder layer
of a 7B model with fp32 master weights (8 bytes per parameter) would otherwise need two
1.5 GiB slots. ``chunk_pieces(uid, c)`` says which parameter elements each acquired tensor
covers: a tensor covering a whole parameter has the parameter's shape, a piece is 1-D.
Without ``chunk_bytes`` every unit is one chunk (chunk 0, the default argument), holding
whole parameters. The transfer volume is the same either way; with overlap the copy of the
next chunk runs while one chunk steps.

Devices
-------
``cuda``: pinned host buffers, a copy stream and events. ``cpu``: the same copy-in / copy-out
code with separate "device" buffers and eager copies, so numerics are tested bit for bit
without a GPU. ``meta``: host buffers on the CPU, slots on ``meta``, eager copies; this is how
``grass-llm memory`` runs the offloader on fake tensors, counting only ``meta`` storages as
device memory (the host buffers are where they would be on CUDA: on the CPU).

Memory layout
-------------
Each unit's state is one flat ``uint8`` host buffer (pinned when the device is CUDA), carved
into its chunks, each chunk into aligned typed views: all ``exp_avg`` pieces, then all
``exp_avg_sq``, then the fp32 ``master`` copies, then the ``compensation`` buffers. A chunk
therefore moves with a single ``copy_`` per direction instead of one small copy per tensor.

The device side is a pool of exactly two *slots*: flat ``uint8`` buffers sized to the
largest chunk of the registered units (with ``chunk_bytes``: at most ``chunk_bytes``). Why a pool instead of allocating per unit:
the peak is the same (two of the largest chunk is also the worst case of per-chunk
allocation), but a pool makes the bound explicit (``device_bytes() <= 2 * max chunk``),
never fragments the caching allocator with a stream of differently sized blocks, and makes
the freeing rules trivial (see invariant S5). The price is that a small unit occupies a
slot sized for the largest one; GRASS units are identical decoder layers, so nothing is
lost in the common case. Register only the units that can be trained: a frozen embedding
matrix registered "just in case" would size both slots to its state.

A slot is in one of four states (per chunk; "unit" below means "chunk of a unit")::

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
S7. A chunk lives in at most one slot, so two copies of one host byte range are never in
    flight. Chunks of one unit are disjoint byte ranges of its host buffer and all of its
    transfers run on the one copy stream in issue order, so the unit's ``last_copy`` (the
    event of its latest transfer of any chunk) covers every earlier one (S4).

Not thread-safe: drive one offloader from one Python thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch

__all__ = ["STATE_KEYS", "LayerStateOffloader"]

#: Per-unit state tensors, in layout order. ``master`` exists only with ``fp32_master=True``,
#: ``compensation`` (the rounding error a low-precision weight still owes, in the weight's dtype)
#: only with ``compensation=True``.
STATE_KEYS = ("exp_avg", "exp_avg_sq", "master", "compensation")

# Byte alignment of every view inside a flat buffer: a multiple of every element size and
# of the 16-byte vector loads used by fused/foreach optimizer kernels.
_ALIGN = 64
# A parameter split across chunks is cut at multiples of this many elements (keeps pieces aligned).
_SPLIT_GRAIN = 256

_FREE, _PREFETCHED, _ACQUIRED, _RELEASED = "free", "prefetched", "acquired", "released"


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclasses.dataclass(frozen=True)
class _View:
    key: str
    index: int  # parameter index in the unit
    offset: int  # byte offset in the unit's flat buffer
    dtype: torch.dtype
    shape: torch.Size  # the parameter's shape for a whole parameter, else (stop - start,)
    start: int  # flat element range of the parameter
    stop: int

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


@dataclasses.dataclass
class _Chunk:
    offset: int  # byte offset in the unit's flat buffer
    nbytes: int
    views: list[_View]
    pieces: list[tuple[int, int, int]]  # (parameter index, start, stop), flat element ranges


@dataclasses.dataclass
class _Unit:
    params: list[torch.Tensor]
    chunks: list[_Chunk]
    nbytes: int
    host: torch.Tensor | None = None  # flat uint8 buffer, allocated once on first use
    initialized: bool = False  # host holds valid state (zeros + master copy, or loaded)
    last_copy: Any = None  # torch.cuda.Event of the last copy into or out of ``host`` (S4)


@dataclasses.dataclass
class _Slot:
    buf: torch.Tensor | None = None  # flat uint8 device buffer, reused across chunks
    unit_id: Hashable | None = None
    chunk: int = 0
    state: str = _FREE
    copy_done: Any = None  # torch.cuda.Event of the last copy touching this slot (S2)
    tick: int = 0  # when it last changed hands; lower = older eviction candidate


def _typed_view(flat: torch.Tensor, v: _View, base: int = 0) -> torch.Tensor:
    """The view ``v`` of a flat buffer that starts at byte ``base`` of the unit's layout."""
    off = v.offset - base
    return flat[off : off + v.nbytes].view(v.dtype).view(v.shape)


def _piece(t: torch.Tensor, v: _View) -> torch.Tensor:
    """The part of a parameter-shaped tensor that view ``v`` holds (for reading)."""
    if (v.start, v.stop) == (0, t.numel()):
        return t.reshape(v.shape)
    return t.reshape(-1)[v.start : v.stop]


class LayerStateOffloader:
    """Keep per-unit AdamW state in host memory; stage one or two chunks of it on the device.

    Args:
        device: where the optimizer step runs. ``cuda`` (any index) uses pinned host
            buffers, a dedicated copy stream and events; ``cpu`` keeps the same copy-in /
            copy-out code path with separate "device" buffers and eager copies, so the
            bookkeeping and numerics can be tested bit for bit without a GPU; ``meta``
            (fake-tensor memory estimates) keeps host buffers on the CPU and slots on meta.
        pin_memory: ``"auto"`` or ``True``: pin host buffers when ``device`` is CUDA (pinning
            needs CUDA and only helps transfers to it). ``False``: pageable host buffers;
            transfers then stage through the driver and overlap poorly.
        overlap: CUDA only. ``True`` runs transfers on a dedicated copy stream so they
            overlap compute; ``False`` runs them on the caller's current stream (simpler
            to profile and debug, no overlap). Ignored elsewhere.
        chunk_bytes: stage units in chunks of at most this many bytes (see "Chunks" in the
            module docstring); ``None``: each unit is one chunk.
        host_device: where the host buffers live: ``cpu``, or ``meta`` when ``grass-llm memory``
            estimates a run whose device it models with fake CPU tensors (FSDP2 needs them), so that
            the host buffers are not counted as device memory.

    The API is a lease protocol: ``register`` every unit once, then per step and chunk
    ``prefetch`` (optional, for overlap) -> ``acquire`` -> update the returned tensors in
    place on the current stream -> ``release``. At most two chunks are on the device; at
    most two can be acquired at the same time.
    """

    def __init__(
        self,
        device: torch.device | str,
        pin_memory: bool | str = "auto",
        overlap: bool = True,
        chunk_bytes: int | None = None,
        host_device: torch.device | str = "cpu",
    ) -> None:
        device = torch.device(device)
        self.host_device = torch.device(host_device)
        if self.host_device.type not in ("cpu", "meta"):
            raise ValueError(f"host_device={host_device!r} is invalid; allowed: cpu, meta")
        if pin_memory not in ("auto", True, False):
            raise ValueError(f"pin_memory must be 'auto', True or False, got {pin_memory!r}")
        if chunk_bytes is not None and (
            isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < _ALIGN * 8
        ):
            raise ValueError(
                f"chunk_bytes={chunk_bytes!r} is invalid; allowed: None or an integer >= {_ALIGN * 8}"
            )
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {device} requested but CUDA is not available")
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
        elif device.type not in ("cpu", "meta"):
            raise ValueError(f"unsupported device {device}: expected 'cpu', 'cuda' or 'meta'")
        self.device = device
        self.chunk_bytes = chunk_bytes
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
        compensation: bool = False,
    ) -> None:
        """Declare a unit and the layout of its state. Allocates nothing yet.

        ``exp_avg``/``exp_avg_sq`` get each parameter's shape and dtype (``float32`` with
        ``fp32_states``); ``master`` (``fp32_master`` only) is a float32 copy of the
        parameter, taken from its value at the unit's first use; ``compensation``
        (``compensation`` only) has the parameter's dtype and starts at zero. The host
        buffer is allocated on first use and reused for the offloader's lifetime.
        """
        if unit_id in self._units:
            raise ValueError(f"unit {unit_id!r} is already registered")
        params = [p.detach() for p in params]
        if not params:
            raise ValueError(f"unit {unit_id!r} has no parameters")
        for i, p in enumerate(params):
            if not p.is_floating_point():
                raise TypeError(f"unit {unit_id!r}: parameter {i} has non-float dtype {p.dtype}")
        layout: list[tuple[str, Any]] = [
            ("exp_avg", lambda p: torch.float32 if fp32_states else p.dtype),
            ("exp_avg_sq", lambda p: torch.float32 if fp32_states else p.dtype),
        ]
        if fp32_master:
            layout.append(("master", lambda p: torch.float32))
        if compensation:
            layout.append(("compensation", lambda p: p.dtype))
        chunks: list[_Chunk] = []
        offset = 0
        for pieces in self._split(params, layout):
            views: list[_View] = []
            start = offset
            for key, dtype_of in layout:
                for i, a, b in pieces:
                    p = params[i]
                    shape = p.shape if (a, b) == (0, p.numel()) else torch.Size([b - a])
                    view = _View(key, i, offset, dtype_of(p), shape, a, b)
                    views.append(view)
                    offset += _align(view.nbytes)
            chunks.append(_Chunk(start, offset - start, views, pieces))
        self._units[unit_id] = _Unit(params=params, chunks=chunks, nbytes=offset)

    def _split(self, params: list[torch.Tensor], layout) -> list[list[tuple[int, int, int]]]:
        """Pieces of each chunk: whole parameters, or flat element ranges of a split one."""
        if self.chunk_bytes is None:
            return [[(i, 0, p.numel()) for i, p in enumerate(params)]]
        budget = self.chunk_bytes
        chunks: list[list[tuple[int, int, int]]] = []
        current: list[tuple[int, int, int]] = []
        used = 0
        for i, p in enumerate(params):
            sizes = [dtype_of(p).itemsize for _, dtype_of in layout]
            per_elem = sum(sizes)

            def cost(n: int) -> int:
                return sum(_align(n * s) for s in sizes)  # noqa: B023

            n = p.numel()
            splittable = n > 0 and p.is_contiguous()
            if not splittable or used + cost(n) <= budget:
                if current and used + cost(n) > budget:
                    chunks.append(current)
                    current, used = [], 0
                current.append((i, 0, n))
                used += cost(n)
                continue
            a = 0
            while a < n:
                room = (budget - used - _ALIGN * len(sizes)) // per_elem
                room = room // _SPLIT_GRAIN * _SPLIT_GRAIN if room >= _SPLIT_GRAIN else room
                if room <= 0 and current:
                    chunks.append(current)
                    current, used = [], 0
                    continue
                b = min(n, a + max(room, 1))
                current.append((i, a, b))
                used += cost(b - a)
                a = b
        if current:
            chunks.append(current)
        return chunks

    def units(self) -> tuple[Hashable, ...]:
        """Registered unit ids, in registration order."""
        return tuple(self._units)

    def unit_nbytes(self, unit_id: Hashable) -> int:
        """Bytes one copy of the unit's state takes (its host buffer)."""
        return self._unit(unit_id).nbytes

    def num_chunks(self, unit_id: Hashable) -> int:
        """How many chunks the unit's state is staged in (1 without ``chunk_bytes``)."""
        return len(self._unit(unit_id).chunks)

    def chunk_nbytes(self, unit_id: Hashable, chunk: int = 0) -> int:
        """Bytes of one chunk of the unit's state (what a device slot must hold for it)."""
        return self._chunk(self._unit(unit_id), unit_id, chunk).nbytes

    def chunk_pieces(self, unit_id: Hashable, chunk: int = 0) -> list[tuple[int, int, int]]:
        """``(parameter index, start, stop)`` of every tensor of the chunk, in the order of the
        lists :meth:`acquire` returns: flat element ranges of the parameters given to
        :meth:`register` (``(i, 0, numel)`` for a whole parameter)."""
        return list(self._chunk(self._unit(unit_id), unit_id, chunk).pieces)

    # ------------------------------------------------------------------ lease protocol
    def prefetch(self, unit_id: Hashable, chunk: int = 0) -> None:
        """Start copying chunk ``chunk`` of ``unit_id``'s state to the device, asynchronously on CUDA.

        No-op if the chunk is already on the device (prefetched, acquired, or released and
        not yet evicted). Otherwise it takes a free slot, else the least recently released
        one, else the older prefetched-but-unacquired one (that prefetch is wasted but no
        state is lost, S6). Raises if both slots are acquired.
        """
        unit = self._unit(unit_id)
        ch = self._chunk(unit, unit_id, chunk)
        slot = self._slot_of(unit_id, chunk)
        if slot is not None:
            if slot.state == _RELEASED:
                # Cache hit: the slot is a valid copy. acquire() still waits on copy_done,
                # i.e. the pending write-back that reads this slot (S2).
                slot.state = _PREFETCHED
            return
        slot = self._victim()
        self._ensure_host(unit_id, unit)
        self._ensure_capacity(slot, ch.nbytes)
        with self._copy_ctx():
            # S1: ordered after any earlier D2H out of this slot or into this host range.
            slot.buf[: ch.nbytes].copy_(unit.host[ch.offset : ch.offset + ch.nbytes], non_blocking=self._cuda)
            slot.copy_done = unit.last_copy = self._record_copy_event()
        slot.unit_id, slot.chunk, slot.state, slot.tick = unit_id, chunk, _PREFETCHED, self._next_tick()

    def acquire(self, unit_id: Hashable, chunk: int = 0) -> dict[str, list[torch.Tensor]]:
        """Return chunk ``chunk`` of the unit's state on the device, ready for in-place updates.

        Keys: ``exp_avg``, ``exp_avg_sq`` and, when registered, ``master`` and
        ``compensation``; lists are in the order of :meth:`chunk_pieces` (without chunks: the
        order of the parameters given to :meth:`register`). Prefetches first if needed. The
        current stream is made to wait for the copy (an event wait, never a device-wide
        synchronize). The tensors alias a pooled device buffer: they are valid only until
        :meth:`release`, and must be updated on the current stream (or one ordered before
        the ``release`` call, S3).
        """
        unit = self._unit(unit_id)
        ch = self._chunk(unit, unit_id, chunk)
        slot = self._slot_of(unit_id, chunk)
        if slot is not None and slot.state == _ACQUIRED:
            raise RuntimeError(f"unit {unit_id!r} chunk {chunk} is already acquired; release it first")
        self.prefetch(unit_id, chunk)
        slot = self._slot_of(unit_id, chunk)
        assert slot is not None and slot.state == _PREFETCHED
        if self._cuda and slot.copy_done is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.copy_done)  # S2
        slot.state = _ACQUIRED
        out: dict[str, list[torch.Tensor]] = {}
        for v in ch.views:
            out.setdefault(v.key, []).append(_typed_view(slot.buf, v, ch.offset))
        return out

    def release(self, unit_id: Hashable, chunk: int = 0) -> None:
        """Write the chunk's device state back to host memory (asynchronously on CUDA).

        Call it on the stream that ran the update, after queueing the update (S3). The
        slot stays a valid cached copy of the chunk until a prefetch of another chunk reuses
        it; its memory is reused, never freed, so no ``record_stream`` is needed (S5).
        """
        unit = self._unit(unit_id)
        ch = self._chunk(unit, unit_id, chunk)
        slot = self._slot_of(unit_id, chunk)
        if slot is None or slot.state != _ACQUIRED:
            raise RuntimeError(f"unit {unit_id!r} chunk {chunk} is not acquired")
        if self._cuda and self._copy_stream is not None:
            # S3: the D2H copy starts only after the caller's queued update.
            step_done = torch.cuda.current_stream(self.device).record_event()
            self._copy_stream.wait_event(step_done)
        with self._copy_ctx():
            unit.host[ch.offset : ch.offset + ch.nbytes].copy_(slot.buf[: ch.nbytes], non_blocking=self._cuda)
            slot.copy_done = unit.last_copy = self._record_copy_event()
        slot.state, slot.tick = _RELEASED, self._next_tick()

    def reset(self, unit_id: Hashable) -> None:
        """Forget the unit's state: its next use starts from zeros and a fresh master copy.

        For GRASS's ``on_reactivation="reset"``: a layer leaving the active set loses its
        moments. The host buffer is kept (allocated once) and re-initialised lazily on the
        unit's next use, which first waits for the unit's last transfer (S4), so ``reset``
        itself never blocks. Cached device copies of the unit's chunks are dropped (S6: no
        copy is lost, the state is being discarded anyway). No chunk may be acquired.
        """
        unit = self._unit(unit_id)
        slots = [s for s in self._slots if s.state != _FREE and s.unit_id == unit_id]
        if any(s.state == _ACQUIRED for s in slots):
            raise RuntimeError(f"cannot reset unit {unit_id!r} while it is acquired")
        for slot in slots:
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

        Requires that no chunk is acquired. Safe without waiting because slot memory is only
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
        """Units that have a chunk in a device slot (at most two entries, one per slot)."""
        return tuple(s.unit_id for s in self._slots if s.state != _FREE)

    def host_bytes(self) -> int:
        """Bytes of host buffers allocated so far (units not used yet take none)."""
        return sum(u.host.numel() for u in self._units.values() if u.host is not None)

    def device_bytes(self) -> int:
        """Bytes held on ``device`` for staging: the allocated slots, at most 2 x the largest chunk."""
        return sum(s.buf.numel() for s in self._slots if s.buf is not None)

    def device_buffers(self) -> list[torch.Tensor]:
        """The device slot buffers allocated so far (for memory accounting; do not write them)."""
        return [s.buf for s in self._slots if s.buf is not None]

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Host state of every unit used so far, as CPU tensors in the parameters' shapes.

        Format: ``{"units": {unit_id: {"exp_avg": [...], "exp_avg_sq": [...],
        ["master": [...]], ["compensation": [...]]}}}``, one tensor per parameter. Units
        never used have no state (like ``torch.optim``) and are re-initialised lazily after
        loading. Calls :meth:`synchronize` first. As with ``torch.optim``, a parameter held in
        one piece is a live view of the host buffer, not a copy (save or clone it before the
        next ``release``); a parameter split across chunks comes back as a copy. They never
        live on the device, so a checkpoint loads anywhere.
        """
        self.synchronize()
        units: dict[Hashable, dict[str, list[torch.Tensor]]] = {}
        for uid, unit in self._units.items():
            if unit.initialized:
                units[uid] = self._gather(unit)
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
            keys = {v.key for v in unit.chunks[0].views}
            if set(state) != keys:
                raise ValueError(f"unit {uid!r}: state keys {sorted(state)} != expected {sorted(keys)}")
            for key in keys:
                tensors = state[key]
                if len(tensors) != len(unit.params):
                    raise ValueError(
                        f"unit {uid!r}: {key} has {len(tensors)} tensors, expected {len(unit.params)}"
                    )
            for v in self._whole_views(unit):
                t = state[v.key][v.index]
                p = unit.params[v.index]
                if t.shape != p.shape or t.dtype != v.dtype:
                    raise ValueError(
                        f"unit {uid!r}: {v.key}[{v.index}] is {t.dtype}{tuple(t.shape)}, "
                        f"expected {v.dtype}{tuple(p.shape)}"
                    )
        self.synchronize()  # S4: no copy may still read or write a host buffer.
        for slot in self._slots:
            slot.unit_id, slot.state = None, _FREE
        for uid, unit in self._units.items():
            unit.initialized, unit.last_copy = False, None
            if uid in loaded:
                self._ensure_host(uid, unit, init=False)
                for ch in unit.chunks:
                    for v in ch.views:
                        _typed_view(unit.host, v).copy_(_piece(loaded[uid][v.key][v.index], v))
                unit.initialized = True

    # ------------------------------------------------------------------ internals
    def _unit(self, unit_id: Hashable) -> _Unit:
        try:
            return self._units[unit_id]
        except KeyError:
            raise KeyError(f"unit {unit_id!r} is not registered") from None

    @staticmethod
    def _chunk(unit: _Unit, unit_id: Hashable, chunk: int) -> _Chunk:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not 0 <= chunk < len(unit.chunks):
            raise IndexError(f"unit {unit_id!r} has chunks 0..{len(unit.chunks) - 1}, not {chunk!r}")
        return unit.chunks[chunk]

    def _whole_views(self, unit: _Unit) -> list[_View]:
        """One view per (key, parameter): the first piece of each (for its key and dtype)."""
        seen, out = set(), []
        for ch in unit.chunks:
            for v in ch.views:
                if (v.key, v.index) not in seen:
                    seen.add((v.key, v.index))
                    out.append(v)
        return out

    def _gather(self, unit: _Unit) -> dict[str, list[torch.Tensor]]:
        """Per key, one tensor per parameter in its shape: a view of the host buffer when the
        parameter is one piece, else the concatenation of its pieces."""
        parts: dict[tuple[str, int], list[torch.Tensor]] = {}
        for ch in unit.chunks:
            for v in ch.views:
                parts.setdefault((v.key, v.index), []).append(_typed_view(unit.host, v))
        out: dict[str, list[torch.Tensor]] = {}
        for (key, i), ts in parts.items():
            p = unit.params[i]
            t = ts[0] if len(ts) == 1 else torch.cat(ts).view(p.shape)
            out.setdefault(key, [None] * len(unit.params))[i] = t  # type: ignore[list-item]
        return out

    def _slot_of(self, unit_id: Hashable, chunk: int) -> _Slot | None:
        for slot in self._slots:  # S7: at most one match
            if slot.state != _FREE and slot.unit_id == unit_id and slot.chunk == chunk:
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
            pin = self._pin and self.host_device.type == "cpu"
            unit.host = torch.empty(unit.nbytes, dtype=torch.uint8, device=self.host_device, pin_memory=pin)
        if unit.initialized or not init:
            return
        if unit.last_copy is not None:
            unit.last_copy.synchronize()
            unit.last_copy = None
        unit.host.zero_()
        for ch in unit.chunks:
            for v in ch.views:
                if v.key == "master":
                    # One-off blocking copy; on CUDA it waits for the queued updates of the param.
                    _typed_view(unit.host, v).copy_(_piece(unit.params[v.index], v))
        unit.initialized = True

    def _ensure_capacity(self, slot: _Slot, nbytes: int) -> None:
        if slot.buf is not None and slot.buf.numel() >= nbytes:
            return
        size = max(nbytes, max(c.nbytes for u in self._units.values() for c in u.chunks))
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
            f"chunk_bytes={self.chunk_bytes}, pinned={self._pin}, "
            f"copy_stream={self._copy_stream is not None}, resident={list(self.resident_units())})"
        )
