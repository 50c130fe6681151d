"""Live bytes of tensor storages under a ``TorchDispatchMode``: the device-memory counter of the estimator.

:class:`LiveBytesTracker` counts every storage an op allocates while the mode is active (and the ones
given to :meth:`~LiveBytesTracker.track`), frees them through weak references, and records the peak
with its breakdown by category. It works with real and fake tensors alike; each storage is rounded up
to the CUDA caching allocator's 512-byte granularity, so the peak compares with
``torch.cuda.max_memory_allocated``.

Two things a CUDA run holds that are no op's output are modelled, so that the peak equals
``torch.cuda.max_memory_allocated`` of the same steps (checked on an H200, ``tests/test_memory.py``):

* **cuBLAS workspaces.** PyTorch gives every (cuBLAS handle, stream) pair that runs a matmul a workspace
  from the caching allocator at its first matmul and keeps it (``aten/src/ATen/cuda/CublasHandlePool.cpp``).
  Handles are per thread: the thread that runs the forward pass, and autograd's device thread that runs
  backward, so a training step holds two. With ``cublas_workspace`` set, the first matmul of forward and
  the first of backward each add one block of that size (category ``workspaces``), kept from then on; an
  ``addmm`` with a 1-D bias (``F.linear`` with a bias) runs on cuBLASLt, whose own workspace
  (``cublaslt_workspace``) is added the same way. :mod:`grass_llm.memory.workspaces` sizes them as
  PyTorch does.
* **In-place gradient accumulation.** When two gradients of one tensor meet in autograd's input buffer
  (a tied weight used by the embedding and the head, a residual stream), plain autograd adds one into
  the other in place; under any Python dispatch mode (this one, ``FakeTensorMode``) it allocates the sum
  anew. Inside :meth:`~LiveBytesTracker.backward_of` such a sum borrows the bytes of its operands: it
  counts nothing when made, and takes over the bytes of the first operand freed after it, as the buffer
  that plain autograd added into.

With ``origins=True`` each storage also keeps a label of what made it (the op, the section of the
step, the module or autograd node), and :meth:`~LiveBytesTracker.peak_storages` lists the storages
live at the peak: the diagnostic view that ``benchmarks/memory_diagnose.py`` compares with the CUDA
caching allocator's own record of a real step. The labels are :mod:`grass_llm.memory.origins`'s.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from grass_llm.memory.origins import Origins
from grass_llm.memory.workspaces import BLAS_OPS

__all__ = ["ALLOCATOR_ROUND", "CATEGORIES", "LiveBytesTracker"]

#: Memory categories of the breakdown, in report order (``workspaces``: cuBLAS / cuBLASLt workspaces).
CATEGORIES = ("weights", "gradients", "optimizer_states", "activations", "workspaces")
ALLOCATOR_ROUND = 512  # bytes: the CUDA caching allocator rounds every block up to a multiple of this


class _Entry:
    __slots__ = ("__weakref__", "borrower", "category", "lenders", "nbytes", "origin", "ptr")

    def __init__(self, nbytes: int, category: str, origin: str | None = None, ptr: int = 0):
        self.nbytes = nbytes
        self.category = category
        self.origin = origin
        self.ptr = ptr
        #: an in-place accumulation not settled yet: the sum's entry (on its operands) / its operands' keys
        self.borrower: _Entry | None = None
        self.lenders: tuple[int, ...] = ()


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

    ``origins=True`` (diagnostics; slower) labels every storage with what made it:
    ``"<section> <phase> <module> <node> <op>"`` (:mod:`grass_llm.memory.origins`; ``section`` is set by
    :meth:`section`, modules are named under :meth:`label_modules`). Tensors given to
    :meth:`track` with ``names`` carry their names (``weight model.layers.0.mlp.up_proj.weight``).

    ``cublas_workspace`` / ``cublaslt_workspace``: the bytes of one cuBLAS / cuBLASLt workspace, added at the
    first matmul of the forward and of the backward thread (see the module docstring); 0 (the default, a
    CPU) adds none. Wrap ``backward()`` in :meth:`backward_of` to count gradient sums as plain autograd does.
    """

    def __init__(
        self,
        round_to: int = ALLOCATOR_ROUND,
        device: torch.device | str | None = None,
        origins: bool = False,
        cublas_workspace: int = 0,
        cublaslt_workspace: int = 0,
    ):
        super().__init__()
        if round_to < 1:
            raise ValueError(f"round_to={round_to!r} is invalid; allowed: an integer >= 1")
        for name, value in (("cublas_workspace", cublas_workspace), ("cublaslt_workspace", cublaslt_workspace)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= 0 (bytes)")
        self.round_to = int(round_to)
        self.device = None if device is None else torch.device(device)
        self.origins = bool(origins)
        #: bytes of one cuBLAS / cuBLASLt workspace (0: none, as on a CPU)
        self.cublas_workspace = cublas_workspace
        self.cublaslt_workspace = cublaslt_workspace
        #: the workspaces made so far: ("cuBLAS" | "cuBLASLt", "forward" | "backward")
        self.workspaces: list[tuple[str, str]] = []
        self._applied: Any = None  # the autograd node whose outputs are being summed into input buffers
        #: origins=True: every storage counted, in order (``ptr``, ``nbytes``, ``origin``, final ``category``)
        self.allocations: list[_Entry] = []
        self._origins = Origins()  # what made each storage (origins=True)
        self.category = "activations"
        self.current = 0
        self.peak = 0
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: dict[int, weakref.ref] = {}
        self._live: dict[int, _Entry] = {}
        self._peak_pending = False
        self._peak_entries: list[tuple[_Entry, int]] = []  # (entry, its bytes at the peak)

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

    def track(
        self,
        tensors: Iterable[torch.Tensor] | torch.Tensor,
        category: str,
        names: Iterable[str] | None = None,
    ) -> None:
        """Count tensors created outside the mode (weights, buffers) under ``category``; ``names``
        (one per tensor) label them when ``origins`` is on."""
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        labels = iter(names) if names is not None else None
        for t in tensors:
            name = next(labels, None) if labels is not None else None
            origin = f"{category} {name}" if name is not None else None
            self._add(t, category, retag=True, origin=origin)

    def retag(self, tensors: Iterable[torch.Tensor] | torch.Tensor, category: str) -> None:
        """Move the storage of each tensor to ``category`` (tracking it if it is not yet)."""
        self.track(tensors, category)

    def section(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Label the storages made inside the block with ``name`` (``origins`` only)."""
        return self._origins.section(name)

    def label_modules(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
        """While active, ops are labelled with the innermost module of ``model`` running, and each
        autograd node made in a module's forward carries that module's name into backward."""
        return self._origins.label_modules(model)

    @contextlib.contextmanager
    def backward_of(self, *roots: torch.Tensor) -> Iterator[None]:
        """Wrap ``loss.backward()`` (``roots``: the tensors backward starts from): a sum that autograd's
        engine makes of two gradients of one tensor is counted as plain autograd makes it, in place (see the
        module docstring). A post hook on every node of the graph marks the moment its outputs go to the
        next nodes' input buffers, where those sums are made."""
        nodes, todo, seen = [], [t.grad_fn for t in roots if t.grad_fn is not None], set()
        while todo:
            node = todo.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            nodes.append(node)
            todo.extend(n for n, _ in node.next_functions if n is not None)
        handles = []
        for node in nodes:
            if "AccumulateGrad" in node.name():  # (a leaf's gradient: no input buffer after it)
                continue
            handles.append(node.register_hook(partial(self._node_applied, node)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._applied = None

    def _node_applied(self, node: Any, grad_inputs: Any, grad_outputs: Any) -> None:
        self._applied = node

    def peak_storages(self) -> list[dict[str, Any]]:
        """The storages live at the peak, largest first: ``bytes``, ``category`` and ``origin`` (``None``
        unless ``origins`` was on when the storage was made or tracked)."""
        self._snapshot_if_pending()
        out = [{"bytes": n, "category": e.category, "origin": e.origin} for e, n in self._peak_entries]
        return sorted(out, key=lambda d: -d["bytes"])

    def peak_breakdown(self) -> dict[str, int]:
        """Bytes per category of the storages live at the peak."""
        self._snapshot_if_pending()
        out = dict.fromkeys(CATEGORIES, 0)
        for e, nbytes in self._peak_entries:
            out[e.category] += nbytes
        return out

    def resized(self, t: torch.Tensor) -> None:
        """Re-read the size of ``t``'s storage after it was resized in place (FSDP2 frees and
        re-allocates its unsharded parameters with ``untyped_storage().resize_``, which no op shows)."""
        self._add(t, self.category, retag=False, resized=True)

    def __enter__(self):
        out = super().__enter__()
        self._patches = contextlib.ExitStack()
        self._patches.enter_context(self._fsdp_storage_resizes())
        return out

    def __exit__(self, *exc):
        self._patches.close()
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def _fsdp_storage_resizes(self):
        """Route FSDP2's storage frees / re-allocations (``alloc_storage`` / ``free_storage``) to
        :meth:`resized` while the mode is active."""
        try:
            from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group
        except ImportError:  # (torch built without distributed)
            yield
            return
        saved = [
            (m, name, getattr(m, name))
            for m in (_fsdp_param, _fsdp_param_group)
            for name in ("alloc_storage", "free_storage")
            if hasattr(m, name)
        ]

        def wrap(fn):
            def resize(tensor: torch.Tensor) -> None:
                fn(tensor)
                self.resized(tensor)

            return resize

        for m, name, fn in saved:
            setattr(m, name, wrap(fn))
        try:
            yield
        finally:
            for m, name, fn in saved:
                setattr(m, name, fn)

    def current_breakdown(self) -> dict[str, int]:
        """Bytes per category of the storages live now."""
        out = dict.fromkeys(CATEGORIES, 0)
        for e in self._live.values():
            out[e.category] += e.nbytes
        return out

    # -- dispatch -------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kwargs = kwargs or {}
        origin = None
        backward = torch._C._current_graph_task_id() != -1
        lenders = self._accumulation(func, args, kwargs, out) if backward and self._applied is not None else None
        if lenders is not None:
            self._borrow(out, lenders, self._origin(func) if self.origins else None)
        else:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    if self.origins and origin is None:
                        origin = self._origin(func)
                    self._add(t, self.category, retag=False, origin=origin)
        if func.overloadpacket in BLAS_OPS and (self.cublas_workspace or self.cublaslt_workspace):
            thread = "backward" if backward else "forward"
            self._workspace("cuBLAS", thread, self.cublas_workspace)
            bias = args[0] if args else None
            if func is torch.ops.aten.addmm.default and isinstance(bias, torch.Tensor) and bias.dim() == 1:
                self._workspace("cuBLASLt", thread, self.cublaslt_workspace)
        return out

    def _workspace(self, library: str, thread: str, nbytes: int) -> None:
        """The first matmul of ``thread`` on ``library``: PyTorch allocates its workspace, which stays."""
        if nbytes <= 0 or (library, thread) in self.workspaces:
            return
        self.workspaces.append((library, thread))
        entry = _Entry(-(-nbytes // self.round_to) * self.round_to, "workspaces", f"{library} workspace ({thread})")
        if self.origins:
            self.allocations.append(entry)
        self._live[id(entry)] = entry  # (never freed: no storage, no weak reference)
        self._count(entry.nbytes)

    def _accumulation(self, func, args, kwargs, out) -> tuple[_Entry, _Entry] | None:
        """The operands' entries when this op is the engine summing two gradients into an input buffer (an
        ``add`` of two same-sized tensors while the node that made one of them hands its outputs on)."""
        if func is not torch.ops.aten.add.Tensor or kwargs.get("alpha", 1) != 1 or len(args) != 2:
            return None
        if torch._C._current_autograd_node() is not self._applied:
            return None
        a, b = args
        if not all(isinstance(t, torch.Tensor) for t in (a, b, out)):
            return None
        storages = [self._storage(t) for t in (a, b, out)]
        if any(st is None for st in storages) or self._entries.get(storages[2]) is not None:
            return None
        entries = [self._entries.get(st) for st in storages[:2]]
        if entries[0] is None or entries[1] is None or entries[0] is entries[1]:
            return None
        size = self._rounded(storages[2])
        if any(e.nbytes != size or e.borrower is not None for e in entries):
            return None
        return entries[0], entries[1]

    def _borrow(self, out: torch.Tensor, lenders: tuple[_Entry, _Entry], origin: str | None) -> None:
        """Track ``out`` with no bytes of its own: it takes over those of the first lender freed."""
        entry = self._add(out, self.category, retag=False, origin=origin, borrowed=True)
        if entry is None:
            return
        entry.lenders = tuple(id(e) for e in lenders)
        for e in lenders:
            e.borrower = entry

    def _storage(self, t: torch.Tensor):
        t = self._local(t)
        if self.device is not None and t.device.type != self.device.type:
            return None
        try:
            return t.untyped_storage()
        except (NotImplementedError, RuntimeError):
            return None

    def _origin(self, func) -> str:
        return self._origins.label(func)

    # -- bookkeeping ----------------------------------------------------------------------------
    @staticmethod
    def _local(t: torch.Tensor) -> torch.Tensor:
        # a DTensor (FSDP2) is a wrapper: this rank holds its local tensor's storage only (the mode sees
        # the DTensor-level op first, whose output would otherwise count at the global size)
        local = getattr(t, "_local_tensor", None)
        return local if isinstance(local, torch.Tensor) else t

    def _add(
        self,
        t: torch.Tensor,
        category: str,
        retag: bool,
        resized: bool = False,
        origin: str | None = None,
        borrowed: bool = False,
    ) -> _Entry | None:
        """Track ``t``'s storage (``borrowed``: with no bytes of its own yet); its entry, or None when it is
        not counted (another device, no single storage)."""
        st = self._storage(t)  # (None: another device; sparse / nested tensors, no single storage)
        if st is None:
            return None
        entry = self._entries.get(st)
        if entry is not None:
            if retag:
                entry.category = category
                if origin is not None:
                    entry.origin = origin
            if resized:
                nbytes = self._rounded(st)
                self._count(nbytes - entry.nbytes)
                entry.nbytes = nbytes
            return entry
        nbytes = 0 if borrowed else self._rounded(st)
        entry = _Entry(nbytes, category, origin)
        if self.origins:
            if st.device.type != "meta":  # (fake / meta storages have no address)
                with contextlib.suppress(RuntimeError, NotImplementedError):
                    entry.ptr = int(st.data_ptr())
            self.allocations.append(entry)
        self._entries[st] = entry
        key = id(entry)
        self._refs[key] = weakref.ref(st, partial(self._on_free, key))
        self._live[key] = entry
        self._count(nbytes)
        return entry

    def _rounded(self, storage: torch.UntypedStorage) -> int:
        return -(-storage.nbytes() // self.round_to) * self.round_to

    def _count(self, delta: int) -> None:
        """Live bytes change by ``delta``; the live set is snapshotted before the first drop after a peak."""
        if delta < 0:
            self._snapshot_if_pending()
        self.current += delta
        if self.current > self.peak:
            self.peak = self.current
            self._peak_pending = True

    def _on_free(self, key: int, _ref: weakref.ref) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        borrower = entry.borrower
        if borrower is not None and id(borrower) in self._live:
            # the first operand of an in-place accumulation to go: the sum lives in its bytes from now on
            borrower.nbytes, entry.nbytes = entry.nbytes, 0
            self._settle(borrower)
        elif entry.lenders:
            self._settle(entry)  # the sum went before its operands: they free their own bytes
        self._count(-entry.nbytes)  # (snapshots the live set, this entry included, after a peak)
        del self._live[key]
        self._refs.pop(key, None)

    def _settle(self, borrower: _Entry) -> None:
        for key in borrower.lenders:
            lender = self._live.get(key)
            if lender is not None and lender.borrower is borrower:
                lender.borrower = None
        borrower.lenders = ()

    def _snapshot_if_pending(self) -> None:
        # The live set is copied only at a local maximum (just before the first free after a new
        # peak), not at every allocation that raises the peak.
        if self._peak_pending and self.current == self.peak:
            self._peak_entries = [(e, e.nbytes) for e in self._live.values()]
        self._peak_pending = False

