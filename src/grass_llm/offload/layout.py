"""Where each piece of a unit's optimizer state sits in its flat host buffer.

A *unit* (a decoder layer, the embeddings, ...) is a list of parameters. Its state is one flat
``uint8`` buffer carved into *chunks* (at most ``chunk_bytes`` each when set, else one chunk holding
the whole unit), each chunk into aligned typed views: all ``exp_avg`` pieces, then all ``exp_avg_sq``,
then the fp32 ``master`` copies, then the ``compensation`` buffers. A chunk therefore moves with a
single ``copy_`` per direction. A parameter larger than what is left of a chunk is cut into flat
element ranges ("pieces"); AdamW is elementwise, so a piece updates exactly like the whole tensor.

Torch-only, no device logic: :mod:`grass_llm.offload.offloader` moves the bytes this module lays out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any

import torch

__all__ = ["ALIGN", "STATE_KEYS", "Chunk", "UnitLayout", "View", "piece_of", "typed_view"]

#: Per-unit state tensors, in layout order. ``master`` exists only with ``fp32_master=True``,
#: ``compensation`` (the rounding error a low-precision weight still owes, in the weight's dtype)
#: only with ``compensation=True``.
STATE_KEYS = ("exp_avg", "exp_avg_sq", "master", "compensation")

#: Byte alignment of every view inside a flat buffer: a multiple of every element size and of the
#: 16-byte vector loads used by fused/foreach optimizer kernels.
ALIGN = 64
# A parameter split across chunks is cut at multiples of this many elements (keeps pieces aligned).
_SPLIT_GRAIN = 256


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclasses.dataclass(frozen=True)
class View:
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
class Chunk:
    offset: int  # byte offset in the unit's flat buffer
    nbytes: int
    views: list[View]
    pieces: list[tuple[int, int, int]]  # (parameter index, start, stop), flat element ranges


def typed_view(flat: torch.Tensor, v: View, base: int = 0) -> torch.Tensor:
    """The view ``v`` of a flat buffer that starts at byte ``base`` of the unit's layout."""
    off = v.offset - base
    return flat[off : off + v.nbytes].view(v.dtype).view(v.shape)


def piece_of(t: torch.Tensor, v: View) -> torch.Tensor:
    """The part of a parameter-shaped tensor that view ``v`` holds (for reading)."""
    if (v.start, v.stop) == (0, t.numel()):
        return t.reshape(v.shape)
    return t.reshape(-1)[v.start : v.stop]


@dataclasses.dataclass
class UnitLayout:
    """The state layout of one unit: its parameters (detached), chunks and total bytes."""

    params: list[torch.Tensor]
    chunks: list[Chunk]
    nbytes: int

    @classmethod
    def build(
        cls,
        unit_id: Hashable,
        params: Sequence[torch.Tensor],
        chunk_bytes: int | None,
        *,
        fp32_states: bool = False,
        fp32_master: bool = False,
        compensation: bool = False,
    ) -> UnitLayout:
        """``exp_avg``/``exp_avg_sq`` get each parameter's shape and dtype (``float32`` with
        ``fp32_states``); ``master`` (``fp32_master`` only) is float32; ``compensation``
        (``compensation`` only) has the parameter's dtype."""
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
        chunks: list[Chunk] = []
        offset = 0
        for pieces in _split(params, layout, chunk_bytes):
            views: list[View] = []
            start = offset
            for key, dtype_of in layout:
                for i, a, b in pieces:
                    p = params[i]
                    shape = p.shape if (a, b) == (0, p.numel()) else torch.Size([b - a])
                    view = View(key, i, offset, dtype_of(p), shape, a, b)
                    views.append(view)
                    offset += _align(view.nbytes)
            chunks.append(Chunk(start, offset - start, views, pieces))
        return cls(params=params, chunks=chunks, nbytes=offset)

    @property
    def keys(self) -> set[str]:
        return {v.key for v in self.chunks[0].views}

    def whole_views(self) -> list[View]:
        """One view per (key, parameter): the first piece of each (for its key and dtype)."""
        seen, out = set(), []
        for ch in self.chunks:
            for v in ch.views:
                if (v.key, v.index) not in seen:
                    seen.add((v.key, v.index))
                    out.append(v)
        return out

    def gather(self, flat: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Per key, one tensor per parameter in its shape, from a flat buffer holding the whole unit: a
        view of the buffer when the parameter is one piece, else the concatenation of its pieces."""
        parts: dict[tuple[str, int], list[torch.Tensor]] = {}
        for ch in self.chunks:
            for v in ch.views:
                parts.setdefault((v.key, v.index), []).append(typed_view(flat, v))
        out: dict[str, list[torch.Tensor]] = {}
        for (key, i), ts in parts.items():
            p = self.params[i]
            t = ts[0] if len(ts) == 1 else torch.cat(ts).view(p.shape)
            out.setdefault(key, [None] * len(self.params))[i] = t  # type: ignore[list-item]
        return out

    def scatter(self, flat: torch.Tensor, state: dict[str, list[torch.Tensor]]) -> None:
        """Copy per-parameter tensors (any device) into a flat buffer holding the whole unit."""
        for ch in self.chunks:
            for v in ch.views:
                typed_view(flat, v).copy_(piece_of(state[v.key][v.index], v))

    def init(self, flat: torch.Tensor) -> None:
        """Fresh state: zeros, and the master copies taken from the parameters' current values."""
        flat.zero_()
        for ch in self.chunks:
            for v in ch.views:
                if v.key == "master":
                    typed_view(flat, v).copy_(piece_of(self.params[v.index], v))

    def validate(self, unit_id: Hashable, state: dict[str, list[torch.Tensor]]) -> None:
        """Raise ``ValueError`` unless ``state`` has this layout's keys, count, shapes and dtypes."""
        keys = self.keys
        if set(state) != keys:
            raise ValueError(f"unit {unit_id!r}: state keys {sorted(state)} != expected {sorted(keys)}")
        for key in keys:
            if len(state[key]) != len(self.params):
                raise ValueError(
                    f"unit {unit_id!r}: {key} has {len(state[key])} tensors, expected {len(self.params)}"
                )
        for v in self.whole_views():
            t, p = state[v.key][v.index], self.params[v.index]
            if t.shape != p.shape or t.dtype != v.dtype:
                raise ValueError(
                    f"unit {unit_id!r}: {v.key}[{v.index}] is {t.dtype}{tuple(t.shape)}, "
                    f"expected {v.dtype}{tuple(p.shape)}"
                )


def _split(params: list[torch.Tensor], layout, chunk_bytes: int | None) -> list[list[tuple[int, int, int]]]:
    """Pieces of each chunk: whole parameters, or flat element ranges of a split one."""
    if chunk_bytes is None:
        return [[(i, 0, p.numel()) for i, p in enumerate(params)]]
    budget = chunk_bytes
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
            room = (budget - used - ALIGN * len(sizes)) // per_elem
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
