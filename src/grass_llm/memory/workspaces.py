"""The cuBLAS / cuBLASLt workspaces a CUDA run holds beyond its ops' outputs, sized as PyTorch sizes them.

PyTorch gives every (cuBLAS handle, stream) pair that runs a matmul a workspace from the caching allocator at
its first matmul and keeps it (``aten/src/ATen/cuda/CublasHandlePool.cpp``). Handles are per thread: the
thread that runs the forward pass, and autograd's device thread that runs backward, so a training step holds
two. An ``addmm`` with a 1-D bias (``F.linear`` with a bias) runs on cuBLASLt, whose own workspace is added the
same way. :class:`~grass_llm.memory.tracker.LiveBytesTracker` adds them at the first matmul of each thread
(torch and the standard library only, layer L0).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

__all__ = [
    "BLAS_OPS",
    "CUBLASLT_WORKSPACE_DEFAULT",
    "CUBLAS_WORKSPACE_DEFAULT",
    "GPUS",
    "cublas_workspace_bytes",
    "cublaslt_workspace_bytes",
]

#: PyTorch's cuBLAS workspace per (handle, stream) when ``CUBLAS_WORKSPACE_CONFIG`` is not set
#: (``CublasHandlePool.cpp``, ``parseChosenWorkspaceSize``): 32 MiB on Hopper (compute capability 9.0,
#: H100 / H200), else ``:4096:2:16:8`` (2 x 4 MiB + 8 x 16 KiB).
CUBLAS_WORKSPACE_DEFAULT = {"hopper": 32 * 2**20, "other": 2 * 4096 * 1024 + 8 * 16 * 1024}
#: The GPUs the estimate can stand for: ``hopper`` (sm90) and ``other`` (every other NVIDIA GPU).
GPUS = tuple(CUBLAS_WORKSPACE_DEFAULT)
#: cuBLASLt's workspace per (handle, stream) without ``CUBLASLT_WORKSPACE_SIZE``: 1024 KiB.
CUBLASLT_WORKSPACE_DEFAULT = 1024 * 1024

#: ops that run on cuBLAS on a CUDA device (addmm with a 1-D bias: cuBLASLt)
BLAS_OPS = frozenset(
    getattr(torch.ops.aten, name)
    for name in ("mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "addr")
)


def cublas_workspace_bytes(gpu: str = "hopper", env: Mapping[str, str] | None = None) -> int:
    """Bytes of one cuBLAS workspace, as PyTorch chooses them: ``CUBLAS_WORKSPACE_CONFIG`` when set (the sum
    of SIZE KiB x COUNT over its ``:SIZE:COUNT`` pairs; PyTorch falls back to the default when none parses),
    else the default of ``gpu`` (:data:`CUBLAS_WORKSPACE_DEFAULT`). ``env``: default ``os.environ``."""
    if gpu not in CUBLAS_WORKSPACE_DEFAULT:
        raise ValueError(f"gpu={gpu!r} is invalid; allowed: {', '.join(GPUS)}")
    value = (os.environ if env is None else env).get("CUBLAS_WORKSPACE_CONFIG")
    pairs = re.findall(r":([0-9]+):([0-9]+)", value or "")
    if not pairs:
        return CUBLAS_WORKSPACE_DEFAULT[gpu]
    return sum(int(size) * 1024 * int(count) for size, count in pairs)


def cublaslt_workspace_bytes(gpu: str = "hopper", env: Mapping[str, str] | None = None) -> int:
    """Bytes of one cuBLASLt workspace, as PyTorch chooses them: ``CUBLASLT_WORKSPACE_SIZE`` KiB (default
    1024), at most the cuBLAS workspace; 0 with ``TORCH_CUBLASLT_UNIFIED_WORKSPACE=1`` (cuBLASLt then uses
    the cuBLAS workspace of its handle and stream)."""
    env = os.environ if env is None else env
    if env.get("TORCH_CUBLASLT_UNIFIED_WORKSPACE", "").strip().lower() in ("1", "true", "on", "yes"):
        return 0
    try:
        size = int(env.get("CUBLASLT_WORKSPACE_SIZE", "")) * 1024
    except ValueError:
        size = CUBLASLT_WORKSPACE_DEFAULT
    return min(size, cublas_workspace_bytes(gpu, env))
