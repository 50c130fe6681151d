"""Live bytes of tensor storages under a ``TorchDispatchMode``: the device-memory counter of the estimator.

:class:`LiveBytesTracker` counts every storage an op allocates while the mode is active (and the ones
given to :meth:`~LiveBytesTracker.track`), frees them through weak references, and records the peak
with its breakdown by category. It works with real and fake tensors alike; each storage is rounded up
to the CUDA caching allocator's 512-byte granularity, so the peak compares with
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable
from functools import partial

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["ALLOCATOR_ROUND", "CATEGORIES", "LiveBytesTracker"]

#: Memory categories of the breakdown, in report order.
CATEGORIES = ("weights", "gradients", "optimizer_states", "activations")
ALLOCATOR_ROUND = 512  # bytes: the CUDA caching allocator rounds every block up to a multiple of this


class _Entry:
    __slots__ = ("__weakref__", "category", "nbytes")

    def __init__(self, nbytes: int, category: str):
        self.nbytes = nbytes
        self.category = category


class LiveBytesTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages and records the peak and its breakdown.

    Every output of every op dispatched while the mode is active is tracked through its untyped
    storage (views share their base's storage and are counted once); a weakref callback subtracts
    the bytes when the storage dies. Tensors created before the mode was entered (the weights) are
    added with :meth:`track`. The category of a storage can be changed later with :meth:`retag`
    (a gradient is produced as an ordinary backward output and retagged when it is accumulated);
    the breakdown of the peak uses the final category of each storage that was live at the peak.

    With ``device`` set, only storages on that device are counted (the estimator passes the model's
    device, so host buffers, such as the offloader's, are left out as they are by the CUDA allocator).
    Works with real tensors and with fake tensors alike.
    """

    def __init__(self, round_to: int = ALLOCATOR_ROUND, device: torch.device | str | None = None):
        super().__init__()
        if round_to < 1:
            raise ValueError(f"round_to={round_to!r} is invalid; allowed: an integer >= 1")
        self.round_to = int(round_to)
        self.device = None if device is None else torch.device(device)
        self.category = "activations"
        self.current = 0
        self.peak = 0
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: dict[int, weakref.ref] = {}
        self._live: dict[int, _Entry] = {}
        self._peak_pending = False
        self._peak_entries: list[_Entry] = []

    # -- public ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def tagging(self, category: str):
        """Tag the storages allocated inside the block with ``category``."""
        if category not in CATEGORIES:
            raise ValueError(f"category={category!r} is invalid; allowed: {', '.join(CATEGORIES)}")
        previous, self.category = self.category, category
        try:
            yield
        finally:
            self.category = previous

    def track(self, tensors: Iterable[torch.Tensor] | torch.Tensor, category: str) -> None:
        """Count tensors created outside the mode (weights, buffers) under ``category``."""
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        for t in tensors:
            self._add(t, category, retag=True)

    def retag(self, tensors: Iterable[torch.Tensor] | torch.Tensor, category: str) -> None:
        """Move the storage of each tensor to ``category`` (tracking it if it is not yet)."""
        self.track(tensors, category)

    def peak_breakdown(self) -> dict[str, int]:
        """Bytes per category of the storages live at the peak."""
        self._snapshot_if_pending()
        out = dict.fromkeys(CATEGORIES, 0)
        for e in self._peak_entries:
            out[e.category] += e.nbytes
        return out

    def current_breakdown(self) -> dict[str, int]:
        """Bytes per category of the storages live now."""
        out = dict.fromkeys(CATEGORIES, 0)
        for e in self._live.values():
            out[e.category] += e.nbytes
        return out

    # -- dispatch -------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t, self.category, retag=False)
        return out

    # -- bookkeeping ----------------------------------------------------------------------------
    def _add(self, t: torch.Tensor, category: str, retag: bool) -> None:
        # a DTensor (FSDP2) is a wrapper: this rank holds its local tensor's storage only (the mode sees
        # the DTensor-level op first, whose output would otherwise count at the global size)
        local = getattr(t, "_local_tensor", None)
        if isinstance(local, torch.Tensor):
            t = local
        if self.device is not None and t.device.type != self.device.type:
            return
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse / nested tensors: no single storage
            return
        entry = self._entries.get(st)
        if entry is not None:
            if retag:
                entry.category = category
            return
        nbytes = st.nbytes()
        nbytes = -(-nbytes // self.round_to) * self.round_to
        entry = _Entry(nbytes, category)
        self._entries[st] = entry
        key = id(entry)
        self._refs[key] = weakref.ref(st, partial(self._on_free, key))
        self._live[key] = entry
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
            self._peak_pending = True

    def _on_free(self, key: int, _ref: weakref.ref) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        self._snapshot_if_pending()
        del self._live[key]
        self._refs.pop(key, None)
        self.current -= entry.nbytes

    def _snapshot_if_pending(self) -> None:
        # The live set is copied only at a local maximum (just before the first free after a new
        # peak), not at every allocation that raises the peak.
        if self._peak_pending and self.current == self.peak:
            self._peak_entries = list(self._live.values())
        self._peak_pending = False
