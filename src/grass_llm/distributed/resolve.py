"""``GrassOptimizer``'s ``distributed`` argument -> a data-parallel backend: the one module that knows
every backend of this package (``base`` knows none, so that the backends build on it without a cycle)."""

from __future__ import annotations

from typing import Any

from torch import nn

from grass_llm.distributed.base import DataParallelBackend, LocalBackend
from grass_llm.distributed.fsdp2 import FSDP2Backend, is_fsdp2_model
from grass_llm.distributed.replicated import ReplicatedBackend

__all__ = ["resolve_backend"]


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def resolve_backend(distributed: Any, model: nn.Module) -> DataParallelBackend:
    """The ``distributed`` argument of ``GrassOptimizer`` -> a backend.

    ``"auto"``: ``FSDP2Backend`` for a model sharded with ``fully_shard``; else the replicated backend
    when ``torch.distributed`` is initialised with more than one rank; else :class:`LocalBackend`.
    ``True``: the same, but a process group must be initialised. ``None``/``False``: :class:`LocalBackend`
    (not for an FSDP2 model). A :class:`DataParallelBackend`: used.
    """
    if _is_ddp(model):
        raise TypeError(
            "GrassOptimizer got a DistributedDataParallel model. Pass the unwrapped model and do not wrap it "
            "in DDP: GRASS all-reduces the gradients of the active layers itself (DDP would reduce every "
            "layer and reads the gradients that the probing phase frees). See docs/distributed.md."
        )
    if isinstance(distributed, DataParallelBackend):
        return distributed
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    fsdp2 = False
    if initialized:
        fsdp2 = is_fsdp2_model(model)
    if distributed is None or distributed is False:
        if fsdp2:
            raise ValueError(
                "the model is sharded with FSDP2 (fully_shard); allowed: distributed='auto' or True"
            )
        return LocalBackend()
    if distributed is True or distributed == "auto":
        if distributed is True and not initialized:
            raise RuntimeError("distributed=True needs torch.distributed.init_process_group() first")
        if fsdp2:
            return FSDP2Backend(model)
        if initialized and (distributed is True or dist.get_world_size() > 1):
            return ReplicatedBackend()
        return LocalBackend()
    raise ValueError(
        f"distributed={distributed!r} is invalid; allowed: 'auto', True, False, None or a DataParallelBackend"
    )
