"""What made a storage: the labels :class:`~grass_llm.memory.tracker.LiveBytesTracker` gives its storages
with ``origins=True`` (the diagnostic view of ``benchmarks/memory_diagnose.py``; torch only, layer L0).

A label reads ``"<section> <phase> <module> <node> <op>"``: ``section`` is set by :meth:`Origins.section`
(the estimator marks forward, backward, clip, optimizer, zero_grad), ``phase`` is ``fwd``, ``bwd`` or
``recompute`` (a checkpointed forward run again in backward), ``module`` the innermost module running
(forward) or the one whose forward made the autograd node (backward; needs :meth:`Origins.label_modules`),
``node`` the autograd node running, ``op`` the aten op. Ops outside any module carry the innermost calling
line outside torch and the tracker instead of a module.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from functools import partial

import torch
from torch.utils._pytree import tree_leaves

__all__ = ["Origins"]

_NODE_KEY = "grass_module"  # autograd node metadata: the module whose forward made the node
#: the frames a caller's line is never taken from: this module's and the tracker's
_OWN_FILES = frozenset(
    os.path.normcase(os.path.join(os.path.dirname(os.path.abspath(__file__)), name))
    for name in ("origins.py", "tracker.py")
)


class Origins:
    """The section of the step and the module running, for labelling the storages made now."""

    def __init__(self) -> None:
        self._section = ""
        self._module_stack: list[str] = []

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Label the storages made inside the block with ``name``."""
        previous, self._section = self._section, name
        try:
            yield
        finally:
            self._section = previous

    @contextlib.contextmanager
    def label_modules(self, model: torch.nn.Module) -> Iterator[None]:
        """While active, ops are labelled with the innermost module of ``model`` running, and each
        autograd node made in a module's forward carries that module's name into backward."""
        handles = []
        for name, module in model.named_modules():
            label = name or type(module).__name__
            handles.append(module.register_forward_pre_hook(partial(self._enter_module, label)))
            handles.append(module.register_forward_hook(partial(self._leave_module, label), always_call=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._module_stack.clear()

    def _enter_module(self, label: str, module, args) -> None:
        self._module_stack.append(label)

    def _leave_module(self, label: str, module, args, output) -> None:
        if self._module_stack and self._module_stack[-1] == label:
            self._module_stack.pop()
        # the nodes this forward made (inner modules labelled theirs first): walk back to labelled ones
        todo = [t.grad_fn for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while todo:
            node = todo.pop()
            try:
                meta = node.metadata
            except (AttributeError, RuntimeError):
                continue
            if _NODE_KEY in meta:
                continue
            meta[_NODE_KEY] = label
            todo.extend(n for n, _ in node.next_functions if n is not None)

    def label(self, func) -> str:
        """The label of a storage the op ``func`` makes now."""
        backward = torch._C._current_graph_task_id() != -1
        node = torch._C._current_autograd_node() if backward else None
        phase = ("recompute" if self._module_stack else "bwd") if backward else "fwd"
        module = self._module_stack[-1] if self._module_stack else ""
        node_name = ""
        if node is not None:
            node_name = node.name()
            if not module:
                with contextlib.suppress(AttributeError, RuntimeError):
                    module = node.metadata.get(_NODE_KEY, "")
        if not module:
            module = _caller()
        parts = [self._section or "-", phase, module or "-"]
        if node_name:
            parts.append(node_name)
        parts.append(str(func))
        return " ".join(parts)


def _caller() -> str:
    """``file.py:line`` of the innermost Python frame outside torch, this module and the tracker (or "")."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.normcase(frame.f_code.co_filename)
        if path not in _OWN_FILES and f"{os.sep}torch{os.sep}" not in path and "<" not in path:
            return f"{os.path.basename(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return ""
