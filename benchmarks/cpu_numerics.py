"""The CPU numerics pinned before torch loads, so that machines of one kind (x86-64, AVX2 or better)
compute the same bits: ATen's kernels at the AVX2 width (AVX-512 ones sum in another order) and MKL's
AVX2 code path in its strict reproducible mode (independent of memory alignment).

Torch-free on purpose: a script imports it and calls ``pin()`` before ``import torch``. The accuracy
study's pretrained cache is keyed on these values, so every script that reuses that model pins them.
"""

from __future__ import annotations

import os

CPU_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin() -> None:
    """Set ``CPU_NUMERICS`` in the environment; effective only before torch is imported."""
    os.environ.update(CPU_NUMERICS)
