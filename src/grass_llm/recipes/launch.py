"""Process-group setup for ``grass-llm train`` under ``torchrun`` / ``accelerate launch``.

Both launchers start one process per GPU and set ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``. :func:`from_env` initialises the default process group from
them (NCCL on CUDA, gloo on CPU) when ``WORLD_SIZE > 1`` and returns a :class:`Launch` with the
few collectives the training loop needs; on a single process it returns a ``Launch`` whose
collectives are no-ops, so the loop has one code path.

Batch semantics (see docs/distributed.md): ``batch_size`` is the GLOBAL micro-batch. Every rank
draws the same micro-batch from the same seeded batcher and keeps its own contiguous slice of
``batch_size / world_size`` rows, so the data order, the checkpointed data position and the
effective batch (``batch_size * grad_accum``) do not depend on the number of processes, and a run
resumes on any world size that divides ``batch_size``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["COLLECTIVE_TIMEOUT_MIN", "Launch", "from_env", "resolve_strategy"]

COLLECTIVE_TIMEOUT_MIN = 60  # minutes a rank waits in a collective before the process group gives up


@dataclass
class Launch:
    """Rank facts and the loop's collectives (no-ops on one process)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this object initialised the process group and destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's contiguous slice of the rows of a global micro-batch."""
        if not self.distributed:
            return batch
        n = next(iter(batch.values())).shape[0]
        per = n // self.world_size
        lo = self.rank * per
        return {k: v[lo : lo + per] for k, v in batch.items()}

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Sums of host numbers over ranks, all in one tiny all-reduce."""
        if not self.distributed:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def gather_object(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (a list in rank order); None on the other ranks."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def from_env(device: torch.device, env: Any = None) -> tuple[Launch, torch.device]:
    """Initialise the process group from the launcher's environment; returns (launch, device).

    On CUDA each process uses ``cuda:LOCAL_RANK``. Without ``WORLD_SIZE > 1`` nothing is
    initialised. An already initialised group (e.g. by accelerate) is used, not re-created.
    """
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Launch(), device
    rank, local = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        # a long timeout: rank 0 alone gathers and writes the final model (~130 GiB for a 70B model)
        # while the others wait in a collective, longer than NCCL's default 10 minutes
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=COLLECTIVE_TIMEOUT_MIN),
        )
        owns = True
    return Launch(rank=rank, local_rank=local, world_size=world, owns_group=owns), device


def resolve_strategy(strategy: str, launch: Launch, env: Any = None) -> str:
    """``distributed.strategy`` -> ``"single"`` (one process), ``"replicated"`` or ``"fsdp2"``.

    ``auto`` follows ``accelerate launch``: its FSDP2 configs export ``ACCELERATE_USE_FSDP=true`` and
    ``FSDP_VERSION=2`` to every process; anything else (``torchrun``, a DDP config) is replicated.
    """
    if not launch.distributed:
        return "single"
    if strategy != "auto":
        return strategy
    env = os.environ if env is None else env
    if str(env.get("ACCELERATE_USE_FSDP", "")).lower() not in ("1", "true", "yes"):
        return "replicated"
    if str(env.get("FSDP_VERSION", "1")) != "2":
        raise ValueError(
            "accelerate launch with an FSDP1 config (FSDP_VERSION is not 2): grass-llm shards with FSDP2; "
            "set fsdp_version: 2 in the accelerate config, or run with distributed.strategy=replicated"
        )
    return "fsdp2"
