"""The host side of :class:`grass_llm.offload.LayerStateOffloader`: every unit's state in one flat host
buffer (pinned for CUDA), the copy stream and events, and every copy between host and device (counted).

The offloader's synchronisation invariants (S1-S7, R1-R4) are stated in ``offloader.py``; the ones this
module relies on are cited where it does.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch

from grass_llm.offload.layout import ALIGN, Chunk, UnitLayout

__all__ = ["HostStates"]


@dataclasses.dataclass
class _Unit:
    layout: UnitLayout
    host: torch.Tensor | None = None  # flat uint8 buffer, allocated once on first use
    initialized: bool = False  # host holds valid state (zeros + master copy, or loaded)
    last_copy: Any = None  # torch.cuda.Event of the last copy into or out of ``host`` (S4)


class HostStates:
    """Registered units, their host buffers, and the copy engine (see LayerStateOffloader for the Args)."""

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
            isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < ALIGN * 8
        ):
            raise ValueError(f"chunk_bytes={chunk_bytes!r} is invalid; allowed: None or an integer >= {ALIGN * 8}")
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
        #: bytes copied host -> device and device -> host so far (state traffic, in both residencies)
        self.bytes_to_device = 0
        self.bytes_to_host = 0

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
        """Declare a unit and the layout of its state (:class:`UnitLayout`). Allocates nothing yet; the
        host buffer is allocated on first use and reused for the offloader's lifetime, the ``master``
        copies taken from the parameters' values at the unit's first use."""
        if unit_id in self._units:
            raise ValueError(f"unit {unit_id!r} is already registered")
        layout = UnitLayout.build(
            unit_id,
            params,
            self.chunk_bytes,
            fp32_states=fp32_states,
            fp32_master=fp32_master,
            compensation=compensation,
        )
        self._units[unit_id] = _Unit(layout)

    def units(self) -> tuple[Hashable, ...]:
        """Registered unit ids, in registration order."""
        return tuple(self._units)

    def unit_nbytes(self, unit_id: Hashable) -> int:
        """Bytes one copy of the unit's state takes (its host buffer)."""
        return self._unit(unit_id).layout.nbytes

    def unit_keys(self, unit_id: Hashable) -> set[str]:
        """The state tensors the unit holds (``exp_avg``, ``exp_avg_sq``, and ``master`` / ``compensation``)."""
        return self._unit(unit_id).layout.keys

    def num_chunks(self, unit_id: Hashable) -> int:
        """How many chunks the unit's state is staged in (1 without ``chunk_bytes``)."""
        return len(self._unit(unit_id).layout.chunks)

    def chunk_nbytes(self, unit_id: Hashable, chunk: int = 0) -> int:
        """Bytes of one chunk of the unit's state (what a device slot must hold for it)."""
        return self._chunk(unit_id, chunk).nbytes

    def chunk_pieces(self, unit_id: Hashable, chunk: int = 0) -> list[tuple[int, int, int]]:
        """``(parameter index, start, stop)`` of every tensor of the chunk, in the order of the lists
        :meth:`acquire` returns (``(i, 0, numel)`` for a whole parameter)."""
        return list(self._chunk(unit_id, chunk).pieces)

    def host_bytes(self) -> int:
        """Bytes of host buffers allocated so far (units not used yet take none)."""
        return sum(u.host.numel() for u in self._units.values() if u.host is not None)

    def _unit(self, unit_id: Hashable) -> _Unit:
        try:
            return self._units[unit_id]
        except KeyError:
            raise KeyError(f"unit {unit_id!r} is not registered") from None

    def _chunk(self, unit_id: Hashable, chunk: int) -> Chunk:
        chunks = self._unit(unit_id).layout.chunks
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not 0 <= chunk < len(chunks):
            raise IndexError(f"unit {unit_id!r} has chunks 0..{len(chunks) - 1}, not {chunk!r}")
        return chunks[chunk]

    def _copy_ctx(self) -> contextlib.AbstractContextManager:
        if self._copy_stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self._copy_stream)

    def _to_device(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self._copy(dst, src)
        self.bytes_to_device += src.numel()

    def _to_host(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self._copy(dst, src)
        self.bytes_to_host += src.numel()

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if src.device.type != "meta":  # a meta buffer (grass-llm memory) holds no values to copy out
            dst.copy_(src, non_blocking=self._cuda)

    def _record_copy_event(self) -> Any:
        if not self._cuda:
            return None
        return (self._copy_stream or torch.cuda.current_stream(self.device)).record_event()

    def _record_compute_event(self) -> Any:
        return torch.cuda.current_stream(self.device).record_event() if self._cuda else None

    def _copy_waits_for(self, event: Any) -> None:
        if event is not None and self._copy_stream is not None:
            self._copy_stream.wait_event(event)

    def _wait(self, copy_done: Any) -> None:
        if self._cuda and copy_done is not None:
            torch.cuda.current_stream(self.device).wait_event(copy_done)

    def _ensure_host(self, unit: _Unit, init: bool = True) -> None:
        """Allocate the unit's host buffer once; fill it with fresh state on first use. S4: a new buffer
        has never been part of a copy; an existing one (after :meth:`reset`) is re-initialised only after
        waiting on ``last_copy``, the unit's latest transfer."""
        if unit.host is None:
            pin = self._pin and self.host_device.type == "cpu"
            unit.host = torch.empty(unit.layout.nbytes, dtype=torch.uint8, device=self.host_device, pin_memory=pin)
        if unit.initialized or not init:
            return
        if unit.last_copy is not None:
            unit.last_copy.synchronize()
            unit.last_copy = None
        unit.layout.init(unit.host)  # one-off blocking copy of the masters: waits for the param's updates
        unit.initialized = True

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._units)

    def __len__(self) -> int:
        return len(self._units)

