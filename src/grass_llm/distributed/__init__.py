"""Data parallelism for ``GrassOptimizer``: the backend interface and its implementations.

* :mod:`~grass_llm.distributed.base`: :class:`DataParallelBackend` (what the optimizer needs) and
  :class:`LocalBackend` (one process);
* :mod:`~grass_llm.distributed.resolve`: :func:`resolve_backend`, the optimizer's ``distributed``
  argument -> a backend;
* :mod:`~grass_llm.distributed.replicated`: :class:`ReplicatedBackend`, the whole model on every
  rank, only the active layers' gradients all-reduced (torch.distributed, no DDP);
* :mod:`~grass_llm.distributed.fsdp2`: :class:`FSDP2Backend`, a model sharded with FSDP2's
  ``fully_shard``: each rank holds and steps a shard of every layer.
"""

from grass_llm.distributed.base import DataParallelBackend, LocalBackend
from grass_llm.distributed.fsdp2 import FSDP2Backend
from grass_llm.distributed.replicated import ReplicatedBackend
from grass_llm.distributed.resolve import resolve_backend

__all__ = ["DataParallelBackend", "FSDP2Backend", "LocalBackend", "ReplicatedBackend", "resolve_backend"]
