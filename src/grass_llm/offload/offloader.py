"""Layer-wise optimizer-state offloading (GRASS paper, section 3.3), with two residencies.

GRASS steps only a few decoder layers ("units") per iteration, but every unit that may be sampled
later needs its AdamW state kept somewhere. :class:`LayerStateOffloader` keeps the state of *all*
units in host memory (one flat buffer per unit, laid out by :mod:`grass_llm.offload.layout`) and
puts on the device only what is being stepped, in one of two ways:

* **Streaming** (per step, the paper's scheme, the least device memory): a pool of two chunk slots.
  Each update leases its unit chunk by chunk: ``prefetch`` -> ``acquire`` -> update -> ``release``
  (the write-back), the next chunk's copy-in overlapping this one's update::

      off.prefetch(active[0])
      for i, uid in enumerate(active):
          for c in range(off.num_chunks(uid)):
              state = off.acquire(uid, c)          # compute stream waits for the H2D copy
              ...prefetch the next chunk...
              adamw_step(params, state)            # in place, on the current stream
              off.release(uid, c)                  # D2H write-back, async

* **Kept on the device** (per period): ``keep_on_device(units)`` gives each unit of the active set a
  device copy of its whole state for as long as it stays in the set. ``acquire`` / ``release`` of a
  kept unit then move nothing; a unit leaving the set is written back and its device copy dropped,
  an arriving one copied in, both asynchronously on the copy stream, overlapping the compute that
  follows. GRASS keeps its active set for a whole sampling period, so a period costs no state traffic
  between its resamples.

The module is torch-only and knows nothing about models or optimizers; it moves tensors, and counts
the bytes it moves each way (:attr:`bytes_to_device`, :attr:`bytes_to_host`).

Devices
-------
``cuda``: pinned host buffers, a copy stream and events. ``cpu``: the same copy-in / copy-out
code with separate "device" buffers and eager copies, so numerics and traffic are tested bit for
bit without a GPU. ``meta``: host buffers on the CPU, device buffers on ``meta``, eager copies;
this is how ``grass-llm memory`` runs the offloader on fake tensors.

Streaming slots
---------------
Exactly two device slots, flat ``uint8`` buffers sized to the largest chunk (``device_bytes() <= 2 x
max chunk`` plus the kept units). A slot is FREE, PREFETCHED, ACQUIRED or RELEASED (per chunk). A
RELEASED slot still holds a valid copy of its chunk (it was just written back), so acquiring the same
chunk again before the slot is reused costs no transfer.

Synchronisation invariants (CUDA; the CPU path runs every copy eagerly and needs none)
-------------------------------------------------------------------------------------
S1. One copy stream carries every transfer, in both directions, in issue order. So a H2D copy into
    a buffer runs after any earlier D2H copy out of it, and a H2D copy out of a host buffer runs after
    any earlier D2H write-back into it, with no event between them.
S2. ``acquire`` makes the caller's (compute) stream wait on the buffer's ``copy_done`` event, the
    last event recorded on the copy stream after a copy touching it. The compute stream therefore
    never reads state before its H2D copy landed, and never overwrites a slot (cache hit) while its
    previous D2H write-back is still reading it.
S3. ``release`` records an event on the caller's stream; the copy stream waits on it before the
    next copy out of (or drop of) that buffer: a write-back reads the state only after every kernel
    the caller queued on it before ``release``. ``release`` must therefore be called on the stream
    that ran the update (or one ordered after it).
S4. Host buffers are touched by the CPU (``state_dict``, ``load_state_dict``, lazy initialisation)
    only after waiting on the events of the copies that use them (``synchronize()`` or the unit's
    ``last_copy``; event waits, never ``torch.cuda.synchronize()``), or on a buffer never copied yet.
S5. Device buffers are allocated while the copy stream is current, so the caching allocator files
    them under the copy stream and recycles a freed block only for a later allocation on the copy
    stream. Every compute-stream use is bracketed by S2 and S3, which the copy stream is ordered
    after, so a buffer can be dropped (grown, departed, or freed by ``free_device_buffers``) with no
    ``record_stream`` and no host wait, once the copy stream waits on its last release (S3). The
    views handed out by ``acquire`` alias a device buffer and are valid only until ``release``.
    With ``overlap=False`` transfers and buffers live on the caller's stream; S1-S5 hold as long as
    the caller keeps to one stream, and ``free_device_buffers`` also waits.
S6. A PREFETCHED slot that was never acquired equals its host buffer, so evicting it needs no
    write-back; the new H2D copy is ordered after the old one by S1.
S7. A chunk lives in at most one device buffer (a slot, or its unit's kept copy), so two copies of
    one host byte range are never in flight. All of a unit's transfers run on the one copy stream in
    issue order, so its ``last_copy`` (the event of its latest transfer) covers every earlier one (S4).

Kept units (residency per period)
---------------------------------
R1. While a unit is kept, its device copy is the state and its host buffer is stale: ``state_dict``
    writes kept copies back first (S3 then D2H, then S4), ``load_state_dict`` copies the loaded host
    state into them again.
R2. ``keep_on_device`` drops the streaming slots' copies of an arriving unit's chunks (their state
    equals the host buffer: released slots were written back, prefetched ones never changed, S6; an
    acquired one is refused), then copies the whole unit in (S1, S5), so R1 holds from then on.
R3. A departing unit's write-back is queued after its last release (S3) and before any later copy on
    the copy stream (S1): a unit that leaves and comes back in one call, or any arrival reusing its
    freed block (S5), sees the written-back state. ``discard`` departs without a write-back (the state
    is being reset), still after the last release.
R4. ``free_device_buffers`` writes kept units back and drops their copies; they stay kept and the
    next ``acquire`` copies them in again (e.g. around an evaluation that needs the memory).

Not thread-safe: drive one offloader from one Python thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable
from typing import Any

import torch

from grass_llm.offload.host import HostStates
from grass_llm.offload.layout import STATE_KEYS, Chunk, typed_view

__all__ = ["STATE_KEYS", "LayerStateOffloader"]

_FREE, _PREFETCHED, _ACQUIRED, _RELEASED = "free", "prefetched", "acquired", "released"


@dataclasses.dataclass
class _Slot:
    buf: torch.Tensor | None = None  # flat uint8 device buffer, reused across chunks
    unit_id: Hashable | None = None
    chunk: int = 0
    state: str = _FREE
    copy_done: Any = None  # torch.cuda.Event of the last copy touching this slot (S2)
    tick: int = 0  # when it last changed hands; lower = older eviction candidate


@dataclasses.dataclass
class _Kept:
    buf: torch.Tensor | None = None  # the whole unit's state on the device; None: to copy in (R4)
    copy_done: Any = None  # event of its H2D copy (S2)
    used: Any = None  # event recorded by the last release (S3)
    acquired: set[int] = dataclasses.field(default_factory=set)


class LayerStateOffloader(HostStates):
    """Keep per-unit AdamW state in host memory; put chunks of it, or whole kept units, on the device.

    Args:
        device: where the optimizer step runs: ``cuda`` (any index), ``cpu`` (separate "device" buffers
            and eager copies, for tests) or ``meta`` (fake-tensor memory estimates).
        pin_memory: ``"auto"`` or ``True``: pin host buffers when ``device`` is CUDA. ``False``: pageable.
        overlap: CUDA only. ``True`` runs transfers on a dedicated copy stream so they overlap compute;
            ``False`` runs them on the caller's current stream.
        chunk_bytes: stage units in chunks of at most this many bytes; ``None``: each unit is one chunk.
        host_device: where the host buffers live: ``cpu``, or ``meta`` when ``grass-llm memory``
            estimates a run whose device it models with fake CPU tensors.
    """

    def __init__(
        self,
        device: torch.device | str,
        pin_memory: bool | str = "auto",
        overlap: bool = True,
        chunk_bytes: int | None = None,
        host_device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(device, pin_memory, overlap, chunk_bytes, host_device)
        self._slots = [_Slot(), _Slot()]
        self._kept: dict[Hashable, _Kept] = {}
        self._tick = 0

    # ------------------------------------------------------------------ lease protocol
    def prefetch(self, unit_id: Hashable, chunk: int = 0) -> None:
        """Start copying chunk ``chunk`` of ``unit_id``'s state to the device, asynchronously on CUDA.

        No-op if the chunk is already on the device (kept, prefetched, acquired, or released and not
        yet evicted). Otherwise it takes a free slot, else the least recently released one, else the
        older prefetched-but-unacquired one (that prefetch is wasted but no state is lost, S6).
        """
        unit, ch = self._unit(unit_id), self._chunk(unit_id, chunk)
        if unit_id in self._kept:
            return
        slot = self._slot_of(unit_id, chunk)
        if slot is not None:
            if slot.state == _RELEASED:
                slot.state = _PREFETCHED  # cache hit; acquire() still waits on the write-back (S2)
            return
        slot = self._victim()
        self._ensure_host(unit)
        self._ensure_capacity(slot, ch.nbytes)
        with self._copy_ctx():  # S1: after any earlier D2H out of this slot or into this host range
            self._to_device(slot.buf[: ch.nbytes], unit.host[ch.offset : ch.offset + ch.nbytes])
            slot.copy_done = unit.last_copy = self._record_copy_event()
        slot.unit_id, slot.chunk, slot.state, slot.tick = unit_id, chunk, _PREFETCHED, self._next_tick()

    def acquire(self, unit_id: Hashable, chunk: int = 0) -> dict[str, list[torch.Tensor]]:
        """Chunk ``chunk`` of the unit's state on the device, ready for in-place updates.

        Keys: ``exp_avg``, ``exp_avg_sq`` and, when registered, ``master`` and ``compensation``; lists
        in the order of :meth:`chunk_pieces`. The current stream waits for the copy (S2). The tensors
        alias a device buffer: valid only until :meth:`release`, updated on the current stream (S3).
        """
        ch = self._chunk(unit_id, chunk)
        kept = self._kept.get(unit_id)
        if kept is not None:
            if chunk in kept.acquired:
                raise RuntimeError(f"unit {unit_id!r} chunk {chunk} is already acquired; release it first")
            if kept.buf is None:
                self._copy_in(unit_id, kept)  # R4
            self._wait(kept.copy_done)  # S2
            kept.acquired.add(chunk)
            return self._views(kept.buf, ch, base=0)
        slot = self._slot_of(unit_id, chunk)
        if slot is not None and slot.state == _ACQUIRED:
            raise RuntimeError(f"unit {unit_id!r} chunk {chunk} is already acquired; release it first")
        self.prefetch(unit_id, chunk)
        slot = self._slot_of(unit_id, chunk)
        assert slot is not None and slot.state == _PREFETCHED
        self._wait(slot.copy_done)  # S2
        slot.state = _ACQUIRED
        return self._views(slot.buf, ch, base=ch.offset)

    def release(self, unit_id: Hashable, chunk: int = 0) -> None:
        """Done updating the chunk (on the stream that ran the update, S3). A streamed chunk is written
        back to host memory (asynchronously on CUDA); a kept unit's stays on the device (R1)."""
        unit, ch = self._unit(unit_id), self._chunk(unit_id, chunk)
        kept = self._kept.get(unit_id)
        if kept is not None:
            if chunk not in kept.acquired:
                raise RuntimeError(f"unit {unit_id!r} chunk {chunk} is not acquired")
            kept.acquired.discard(chunk)
            kept.used = self._record_compute_event()  # S3, for the departure's write-back
            return
        slot = self._slot_of(unit_id, chunk)
        if slot is None or slot.state != _ACQUIRED:
            raise RuntimeError(f"unit {unit_id!r} chunk {chunk} is not acquired")
        self._copy_waits_for(self._record_compute_event())  # S3
        with self._copy_ctx():
            self._to_host(unit.host[ch.offset : ch.offset + ch.nbytes], slot.buf[: ch.nbytes])
            slot.copy_done = unit.last_copy = self._record_copy_event()
        slot.state, slot.tick = _RELEASED, self._next_tick()

    # ------------------------------------------------------------------ residency per period
    def keep_on_device(self, unit_ids: Iterable[Hashable], discard: Iterable[Hashable] = ()) -> None:
        """Keep exactly ``unit_ids`` on the device from now on (R1-R3): units leaving the set are written
        back (those in ``discard`` are dropped without a write-back) and arriving ones copied in, all
        asynchronously on the copy stream. Units staying move nothing."""
        wanted = list(dict.fromkeys(unit_ids))
        for uid in wanted:
            self._unit(uid)
        discard = set(discard)
        if any(self._kept[u].acquired for u in self._kept if u not in wanted):
            raise RuntimeError("cannot stop keeping a unit while one of its chunks is acquired")
        for uid in [u for u in self._kept if u not in wanted]:
            self._depart(uid, self._kept.pop(uid), write_back=uid not in discard)
        for uid in wanted:
            if uid in self._kept:
                continue
            for slot in self._slots:  # R2
                if slot.state != _FREE and slot.unit_id == uid:
                    if slot.state == _ACQUIRED:
                        raise RuntimeError(f"cannot keep unit {uid!r} while a chunk of it is acquired")
                    slot.unit_id, slot.state = None, _FREE
            kept = self._kept[uid] = _Kept()
            self._copy_in(uid, kept)

    def kept_units(self) -> tuple[Hashable, ...]:
        """Units kept on the device (:meth:`keep_on_device`)."""
        return tuple(self._kept)

    def _copy_in(self, unit_id: Hashable, kept: _Kept) -> None:
        unit = self._unit(unit_id)
        self._ensure_host(unit)
        with self._copy_ctx():  # S5: allocated under the copy stream; S1: after earlier write-backs
            kept.buf = torch.empty(unit.layout.nbytes, dtype=torch.uint8, device=self.device)
            self._to_device(kept.buf, unit.host)
            kept.copy_done = unit.last_copy = self._record_copy_event()

    def _depart(self, unit_id: Hashable, kept: _Kept, write_back: bool) -> None:
        unit = self._unit(unit_id)
        if kept.buf is None:
            return
        self._copy_waits_for(kept.used)  # S3 / R3
        if write_back:
            with self._copy_ctx():
                self._to_host(unit.host, kept.buf)
                unit.last_copy = self._record_copy_event()
        kept.buf = None  # S5: the block is recycled only for later copy-stream allocations

    # ------------------------------------------------------------------ state
    def reset(self, unit_id: Hashable) -> None:
        """Forget the unit's state: its next use starts from zeros and a fresh master copy.

        For GRASS's ``on_reactivation="reset"``. The host buffer is kept and re-initialised lazily on the
        unit's next use, after waiting for its last transfer (S4), so ``reset`` never blocks. Cached
        device copies are dropped (S6). No chunk may be acquired, and the unit may not be kept
        (``keep_on_device(..., discard=...)`` drops a kept unit without a write-back).
        """
        unit = self._unit(unit_id)
        if unit_id in self._kept:
            raise RuntimeError(f"cannot reset unit {unit_id!r} while it is kept on the device")
        slots = [s for s in self._slots if s.state != _FREE and s.unit_id == unit_id]
        if any(s.state == _ACQUIRED for s in slots):
            raise RuntimeError(f"cannot reset unit {unit_id!r} while it is acquired")
        for slot in slots:
            slot.unit_id, slot.state = None, _FREE
        unit.initialized = False

    def synchronize(self) -> None:
        """Block the host until every issued transfer finished (event waits only, S4)."""
        for event in [s.copy_done for s in self._slots] + [u.last_copy for u in self._units.values()]:
            if event is not None:
                event.synchronize()

    def free_device_buffers(self) -> None:
        """Drop both slots and the kept units' device copies (written back first; they stay kept and are
        copied in again on their next ``acquire``, R4). Nothing may be acquired."""
        if any(s.state == _ACQUIRED for s in self._slots) or any(k.acquired for k in self._kept.values()):
            raise RuntimeError("cannot free device buffers while a unit is acquired")
        for uid, kept in self._kept.items():
            self._depart(uid, kept, write_back=True)
        if self._copy_stream is None and self._cuda:
            self.synchronize()  # buffers were allocated on the (then) current stream: wait for our copies
        self._slots = [_Slot(), _Slot()]

    # ------------------------------------------------------------------ introspection
    @property
    def copy_stream(self) -> torch.cuda.Stream | None:
        """The dedicated transfer stream (CUDA with ``overlap=True``), else ``None``."""
        return self._copy_stream

    def resident_units(self) -> tuple[Hashable, ...]:
        """Units with state on the device: those with a chunk in a slot, then the kept ones."""
        slotted = tuple(s.unit_id for s in self._slots if s.state != _FREE)
        return slotted + tuple(u for u, k in self._kept.items() if k.buf is not None and u not in slotted)

    def device_bytes(self) -> int:
        """Bytes held on ``device``: the allocated slots (at most 2 x the largest chunk) and kept units."""
        return sum(b.numel() for b in self.device_buffers())

    def device_buffers(self) -> list[torch.Tensor]:
        """The device buffers allocated now (for memory accounting; do not write them)."""
        kept = [k.buf for k in self._kept.values() if k.buf is not None]
        return [s.buf for s in self._slots if s.buf is not None] + kept

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Host state of every unit used so far, as CPU tensors in the parameters' shapes.

        Format: ``{"units": {unit_id: {"exp_avg": [...], "exp_avg_sq": [...], ["master": [...]],
        ["compensation": [...]]}}}``, one tensor per parameter. Units never used have no state (like
        ``torch.optim``). Kept units are written back first (R1). As with ``torch.optim``, a parameter
        held in one piece is a live view of the host buffer, not a copy; a split one comes back as a copy.
        """
        for uid, kept in self._kept.items():
            if kept.buf is not None:
                self._copy_waits_for(kept.used)  # S3
                with self._copy_ctx():
                    unit = self._units[uid]
                    self._to_host(unit.host, kept.buf)
                    unit.last_copy = self._record_copy_event()
        self.synchronize()
        return {"units": {uid: u.layout.gather(u.host) for uid, u in self._units.items() if u.initialized}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Copy a :meth:`state_dict` into the host buffers (allocated once, reused), and into the kept
        units' device copies (R1). Every unit in it must be registered with matching shapes and dtypes;
        registered units absent from it start afresh on their next use. Nothing may be acquired."""
        if any(s.state == _ACQUIRED for s in self._slots) or any(k.acquired for k in self._kept.values()):
            raise RuntimeError("cannot load state while a unit is acquired")
        loaded = state_dict["units"]
        for uid, state in loaded.items():
            unit = self._units.get(uid)
            if unit is None:
                raise ValueError(f"state_dict has unit {uid!r} which is not registered")
            unit.layout.validate(uid, state)
        for kept in self._kept.values():
            self._copy_waits_for(kept.used)  # the old device copies are dropped (S3, S5)
            kept.buf = None
        self.synchronize()  # S4: no copy may still read or write a host buffer
        for slot in self._slots:
            slot.unit_id, slot.state = None, _FREE
        for uid, unit in self._units.items():
            unit.initialized, unit.last_copy = False, None
            if uid in loaded:
                self._ensure_host(unit, init=False)
                unit.layout.scatter(unit.host, loaded[uid])
                unit.initialized = True
        for uid, kept in self._kept.items():
            self._copy_in(uid, kept)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _views(buf: torch.Tensor, ch: Chunk, base: int) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {}
        for v in ch.views:
            out.setdefault(v.key, []).append(typed_view(buf, v, base))
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

    def _ensure_capacity(self, slot: _Slot, nbytes: int) -> None:
        if slot.buf is not None and slot.buf.numel() >= nbytes:
            return
        size = max(nbytes, max(c.nbytes for u in self._units.values() for c in u.layout.chunks))
        slot.buf = None  # S5: the old block is only recycled for copy-stream allocations.
        with self._copy_ctx():
            slot.buf = torch.empty(size, dtype=torch.uint8, device=self.device)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(device={self.device}, units={len(self._units)}, "
            f"chunk_bytes={self.chunk_bytes}, pinned={self._pin}, copy_stream={self._copy_stream is not None}, "
            f"resident={list(self.resident_units())}, kept={list(self._kept)})"
        )
