"""What ``GrassOptimizer`` needs from data parallelism, and the single-process implementation.

The optimizer is built with a backend and talks to it only through :class:`DataParallelBackend`.
Its *units* are its param groups in order (decoder layer ``i`` is unit ``i``, then ``embeddings``,
``norm``, ``head``), each given as the list of its trainable parameters. The calls, in the order
the optimizer makes them:

``attach(units, on_reduced)``
    once, at construction, before the optimizer installs its own gradient hooks (so the backend's
    hooks run first). ``on_reduced(unit_ids)``: call it whenever the gradients of these units have
    become the global batch's (after an all-reduce), so that the optimizer reads their norms before
    anyone (a Trainer, a user) clips them. Backends whose ``gradients_final_in_hooks`` is true never
    call it: the optimizer reads the gradients in its own hooks.
``set_trained(unit_ids)``
    whenever the set of trained units changes; empty while probing.
``no_sync()``
    context around the backward passes of all micro-batches but the last of an optimizer step.
``reduce_gradients(unit_ids)``
    in ``step()``, before any gradient is read: afterwards every rank holds the gradient of the
    global batch for these units (whole, or its shard of it).
``local(tensor)``
    the part of a parameter or gradient this rank holds (sharded backends: the local shard).
``reduce_sumsq_(sumsq)``
    in place: per-layer squared gradient norms as seen by this rank -> the global ones (for eq. 2).
``reduce_probe_unit(unit_id, grads, on_sumsq)`` / ``finish_probe_reductions()``
    probing, backends with ``probe_needs_whole_units``: ``grads`` is this rank's accumulated gradient
    of a whole decoder layer (which the optimizer frees right after); the backend makes it the
    global batch's and calls ``on_sumsq(unit_id, squared norm)``, possibly later, at the latest in
    ``finish_probe_reductions()``.
``broadcast_layers(layers)``
    a draw -> the draw every rank uses.
``owns(unit_id)``
    whether this rank keeps the unit's optimizer state and steps it (ZeRO-1 style sharding).
``broadcast_updates(unit_ids)``
    after the owners stepped: every rank receives the new weights.
``export_state(value, param)`` / ``import_state(value, param)``
    an optimizer state of ``param`` as this rank keeps it -> as it is saved (sharded backends: a
    ``DTensor``), and any saved form -> as this rank keeps it.
``consolidate_state_dict(sd)``
    the optimizer's state dict -> one that is complete and independent of the world size
    (may be a collective: call ``state_dict()`` on every rank).
``close()``
    remove hooks; the optimizer is not stepped any more.

Where a new backend goes: a module of this package implementing these calls (``replicated.py`` for
torch.distributed data parallelism; ``fsdp2.py`` for FSDP2-sharded models), and a branch in
``grass_llm.distributed.resolve.resolve_backend`` (the one module that knows every backend: this one
knows none, so the backends can build on it without an import cycle).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["DataParallelBackend", "LocalBackend", "collective_device"]


class DataParallelBackend:
    """The interface (module docstring). The defaults are the single-process behaviour."""

    rank: int = 0
    world_size: int = 1
    #: the gradients a parameter's post-accumulate-grad hook sees are the global ones (one process)
    gradients_final_in_hooks: bool = True
    #: probing hands whole layers' local gradients to ``reduce_probe_unit`` (else per-parameter norms)
    probe_needs_whole_units: bool = False
    #: a GradScaler's per-rank overflow check agrees on every rank
    supports_grad_scaler: bool = True

    def attach(
        self, units: Sequence[Sequence[nn.Parameter]], on_reduced: Callable[[list[int]], None] | None = None
    ) -> None:
        """Called once by the optimizer with its units' trainable parameters."""

    def set_trained(self, unit_ids: Collection[int]) -> None:
        """The units trained from now on (empty while probing)."""

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Skip gradient synchronisation for the backward passes inside."""
        yield

    def reduce_gradients(self, unit_ids: Sequence[int]) -> None:
        """Make the gradients of these units the global batch's on every rank."""

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part of ``tensor`` this rank holds."""
        return tensor

    def reduce_sumsq_(self, sumsq: torch.Tensor) -> None:
        """Per-layer squared gradient norms seen by this rank -> the global ones, in place."""

    def reduce_probe_unit(
        self, unit_id: int, grads: Sequence[torch.Tensor], on_sumsq: Callable[[int, torch.Tensor], None]
    ) -> None:
        """Probing: the squared norm of the global gradient of a whole unit, given this rank's."""
        on_sumsq(
            unit_id, sum(torch.linalg.vector_norm(g, dtype=torch.float32).double().square() for g in grads)
        )

    def finish_probe_reductions(self) -> None:
        """Deliver every pending ``reduce_probe_unit`` result."""

    def broadcast_layers(self, layers: Sequence[int]) -> list[int]:
        """The layers every rank trains."""
        return list(layers)

    def owns(self, unit_id: int) -> bool:
        """Whether this rank keeps and steps the optimizer state of the unit."""
        return True

    def broadcast_updates(self, unit_ids: Sequence[int]) -> None:
        """After the owners stepped these units: every rank holds their new weights."""

    def export_state(self, value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """An optimizer state of ``param`` as kept -> as saved."""
        return value

    def import_state(self, value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """A saved optimizer state of ``param`` -> as this rank keeps it."""
        return value

    def consolidate_state_dict(self, sd: dict[str, Any]) -> dict[str, Any]:
        """The optimizer's state dict, complete and independent of the world size."""
        return sd

    def close(self) -> None:
        """Remove what ``attach`` installed."""


class LocalBackend(DataParallelBackend):
    """One process: every call is a no-op."""

    def __repr__(self) -> str:
        return "LocalBackend()"


def collective_device(group: Any = None) -> torch.device:
    """Where small host values (a layer draw, a flag vector) go for a collective on ``group``: NCCL
    needs CUDA tensors (on the current device); gloo and the fake backend take CPU tensors."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

