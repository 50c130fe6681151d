"""The optimizer's hold on its model: ``requires_grad`` flags, hooks, and the guards for wrappers.

* **Flags**: the optimizer sets ``requires_grad`` itself (every block while probing, the active layers and
  the always-trained groups while training), so backward stops at the lowest active layer. Parameters the
  user froze before any GRASS optimizer touched the model stay frozen; those outside the decoder
  (``LayerGroups.other``: a vision tower, an encoder) are frozen for good.
* **One optimizer per model**: a second one built on the same model closes the first.
* **Lifetime**: hooks hold only a weak reference to the optimizer. ``close()`` (also on leaving
  ``with GrassOptimizer(...) as opt:``, and when the optimizer is garbage collected) removes every hook and
  gives the model back the flags it had before any GRASS optimizer touched it.
* **Forward pre-hooks**: HF's ``enable_input_require_grads`` (installed with gradient checkpointing) makes
  the embedding output require grad, which forces backward through every frozen layer; it is removed while
  the embeddings are frozen. A ``DistributedDataParallel`` wrapper calling the model (the HF Trainer under
  torchrun) gets its gradient reduction switched off (GRASS reduces the active layers' gradients itself;
  DDP's buckets cannot follow the sampled layers). Under *reentrant* checkpointing a checkpointed block
  computes gradients only if an input requires grad: the lowest active block gets an input that does.

Invariants:
M1. The backend attaches (and installs its hooks) before the optimizer installs its own, so the backend's
    gradient hooks run first.
M2. A hook never keeps the optimizer alive: it calls through ``weakref`` and does nothing once the
    optimizer is closed or gone.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from grass_llm.activation_checkpointing import checkpoint_blocks_while
from grass_llm.distributed.base import DataParallelBackend

__all__ = ["ModelBinding", "move_parameter_", "weak_call"]

# model -> the GrassOptimizer attached to it (weakly)
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def weak_call(obj: Any, name: str) -> Callable[..., Any]:
    """``getattr(obj, name)(*args)`` through a weak reference (a no-op once ``obj`` is gone, M2)."""
    ref = weakref.ref(obj)

    def call(*args: Any) -> Any:
        target = ref()
        return None if target is None else getattr(target, name)(*args)

    return call


def move_parameter_(p: nn.Parameter, device: torch.device) -> None:
    """Move a parameter the model does not own (the loss-scale probe) to ``device``, keeping the object that
    the param groups hold; its gradient is dropped."""
    p.grad = None
    moved = p.detach().to(device)
    if torch._has_compatible_shallow_copy_type(p, moved):
        p.data = moved
    else:  # e.g. to meta (grass-llm memory, tests)
        torch.utils.swap_tensors(p, nn.Parameter(moved, requires_grad=p.requires_grad))


def _detach(
    handles: list[Any], backend: DataParallelBackend, original: dict[nn.Parameter, bool], blocks: list[nn.Module]
) -> None:
    """Remove an optimizer's hooks, its probing checkpointing and restore the model's flags (``close()``
    and the GC finalizer)."""
    for h in handles:
        h.remove()
    handles.clear()
    backend.close()
    checkpoint_blocks_while(blocks, None)
    blocks.clear()
    for p, flag in original.items():
        p.requires_grad_(flag)


def _calling_ddp(module: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The ``DistributedDataParallel`` whose forward is calling ``module`` (a few frames up), if any."""
    frame = sys._getframe(3)
    for _ in range(12):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        if isinstance(obj, nn.parallel.DistributedDataParallel) and obj.module is module:
            return obj
        frame = frame.f_back
    return None


class ModelBinding:
    """Attach ``owner`` (a GrassOptimizer) to ``model``: close a previous one, record the flags, freeze the
    parameters outside the decoder (``frozen_for_good``)."""

    def __init__(
        self, owner: Any, model: nn.Module, backend: DataParallelBackend, frozen_for_good: Iterable[nn.Parameter]
    ) -> None:
        record = _ATTACHED.get(model)
        previous = record["owner"]() if record is not None else None
        if previous is not None:
            warnings.warn(
                "this model already has a GrassOptimizer; closing it (its hooks are removed). Call close() "
                "on an optimizer you stop using, or use `with GrassOptimizer(...) as opt:`",
                RuntimeWarning,
                stacklevel=4,
            )
            previous.close()
        self.model = model
        self.backend = backend
        #: the flags the model had before any GRASS optimizer touched it
        self.original = {p: p.requires_grad for p in model.parameters()}
        self.user_frozen = {id(p) for p, flag in self.original.items() if not flag}
        self.handles: list[Any] = []
        self._checkpointed: list[nn.Module] = []  # blocks recomputed while probing
        self._ddp: weakref.ref | None = None
        _ATTACHED[model] = {"owner": weakref.ref(owner)}
        for p in frozen_for_good:
            p.requires_grad_(False)
        self._finalizer = weakref.finalize(owner, _detach, self.handles, backend, self.original, self._checkpointed)

    def install_hooks(
        self, owner: Any, trainable: Iterable[nn.Parameter], blocks: Iterable[nn.Module]
    ) -> None:
        """Gradient-ready hooks on every trainable parameter (``owner._on_grad``), a forward pre-hook on the
        model (``owner._before_forward``) and on every block (``owner._before_block``), all weak (M1, M2)."""
        self.handles += [p.register_post_accumulate_grad_hook(weak_call(owner, "_on_grad")) for p in trainable]
        self.handles.append(self.model.register_forward_pre_hook(weak_call(owner, "_before_forward")))
        self.handles += [b.register_forward_pre_hook(weak_call(owner, "_before_block")) for b in blocks]

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self, owner: Any) -> None:
        """Remove every hook and restore the flags; safe to call twice."""
        if self._finalizer.alive:
            self._finalizer()
            record = _ATTACHED.get(self.model)
            if record is not None and record["owner"]() is owner:
                del _ATTACHED[self.model]

    def abandon(self) -> None:
        """A failed construction: leave the model as it was."""
        self._finalizer()
        _ATTACHED.pop(self.model, None)

    def set_requires_grad(self, groups: list[dict[str, Any]], on: Callable[[dict[str, Any]], bool]) -> None:
        """``requires_grad`` on the parameters of the groups ``on(group)`` selects (never on user-frozen
        ones); a parameter switched off loses its gradient."""
        for group in groups:
            flag = on(group)
            for p in group["params"]:
                p.requires_grad_(flag and id(p) not in self.user_frozen)
                if not p.requires_grad:
                    p.grad = None

    def recompute_blocks(self, owner: Any, blocks: list[nn.Module], on: bool) -> None:
        """``on``: recompute every block's activations in backward while ``owner`` is probing (the
        optimizer's probing steps run backward through every block, GrassConfig.probe_checkpointing);
        off: run them as usual."""
        ref = weakref.ref(owner)

        def probing() -> bool:
            opt = ref()
            return opt is not None and not opt.closed and opt.probing

        checkpoint_blocks_while(blocks, probing if on else None)
        self._checkpointed[:] = blocks if on else []

    # ------------------------------------------------------------------ forward pre-hooks
    def before_forward(self, module: nn.Module, embeddings_train: bool) -> None:
        """The model's forward pre-hook (module docstring)."""
        if not embeddings_train and getattr(module, "_require_grads_hooks", None):
            module.disable_input_require_grads()
        if not torch.is_grad_enabled():
            return
        ddp = self._ddp() if self._ddp is not None else None
        if ddp is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            ddp = _calling_ddp(module)
            if ddp is not None:
                if self.backend.world_size == 1:
                    raise RuntimeError(
                        "the model is wrapped in DistributedDataParallel but GrassOptimizer was built with "
                        "distributed=False (or before torch.distributed was initialised): GRASS's probing "
                        "frees the gradients DDP would reduce. Build it with distributed='auto' after "
                        "init_process_group (the HF Trainer does both in the right order)"
                    )
                self._ddp = weakref.ref(ddp)
        if ddp is not None:
            ddp.require_backward_grad_sync = False

    @staticmethod
    def before_block(block: nn.Module, args: tuple, lowest: nn.Module) -> tuple | None:
        """A block's forward pre-hook under reentrant checkpointing: the lowest active block (``lowest``)
        gets hidden states that require grad (nothing below needs a gradient)."""
        if not block.training or not torch.is_grad_enabled() or block is not lowest or not args:
            return None
        if not getattr(block, "gradient_checkpointing", False):
            return None
        keywords = getattr(getattr(block, "_gradient_checkpointing_func", None), "keywords", None) or {}
        if keywords.get("use_reentrant", True) is False:
            return None
        x = args[0]
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
            return (x.detach().requires_grad_(True), *args[1:])
        return None
