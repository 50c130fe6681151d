"""What a run needs on the device beyond the estimated peak (:class:`Margin`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Margin"]

_GiB = 2**30


@dataclass(frozen=True)
class Margin:
    """What a run needs on the device beyond the estimated peak (which, like ``torch.cuda.max_memory_allocated``,
    counts the caching allocator's live blocks only).

    ``context_bytes``: memory the process holds outside the caching allocator: the CUDA context and the
    loaded kernels (about 0.5 GiB for a torch process on a Hopper GPU with CUDA 12-13, lazy module loading),
    with room to spare for libraries' own buffers (cuDNN, NCCL). The cuBLAS workspaces that PyTorch takes
    through the caching allocator are in the estimate itself (its ``workspaces``).
    ``fragmentation``: the share of the peak the caching allocator holds in cached-but-free blocks that a
    request of another size cannot use (a few percent in steady training loops; PyTorch's
    ``expandable_segments`` lowers it). ``benchmarks/fit_check.py`` measures both on a GPU.
    """

    context_bytes: int = 3 * _GiB // 4
    fragmentation: float = 0.05

    def needed(self, peak: int) -> int:
        """Device memory a run with this estimated peak needs."""
        return math.ceil(peak * (1 + self.fragmentation)) + self.context_bytes

    def of(self, peak: int) -> int:
        """The margin added to ``peak``."""
        return self.needed(peak) - peak

    def describe(self) -> str:
        return (
            f"{self.context_bytes / _GiB:.2f} GiB + {self.fragmentation:.0%} of the peak (the CUDA context and "
            "kernels outside max_memory_allocated; allocator fragmentation)"
        )
