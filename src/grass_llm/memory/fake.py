"""What makes a run on fake tensors follow the path of a real CUDA one: the patches active during a fake run
(:func:`fake_mode_patches`, with the SDPA kernel a CUDA device would take) and a fake process group for an
FSDP2 estimate (:func:`fake_process_group`)."""

from __future__ import annotations

import contextlib

import torch

from grass_llm.memory.inputs import MemoryEstimateError

__all__ = ["fake_mode_patches", "fake_process_group"]


def _cuda_sdpa(original, device_type: str = "meta"):
    """``F.scaled_dot_product_attention`` for ``meta`` tensors as a CUDA device runs it: the flash kernel for
    bf16/fp16 (head dim <= 256, multiple of 8, no mask), else the memory-efficient one (no mask, no grouped
    heads), else the math path. On ``meta`` SDPA would take the math path, which saves the (B, H, T, T)
    attention weights that a CUDA run never allocates. Both kernels have meta implementations and derivatives."""

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type == device_type and attn_mask is None and query.dim() == 4:
            head_dim = query.shape[-1]
            grouped = key.shape[-3] != query.shape[-3]
            if query.dtype in (torch.bfloat16, torch.float16) and head_dim <= 256 and head_dim % 8 == 0:
                return torch.ops.aten._scaled_dot_product_flash_attention(
                    query, key, value, dropout_p, is_causal, False, scale=scale
                )[0]
            if not grouped:
                grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
                return torch.ops.aten._scaled_dot_product_efficient_attention(
                    query, key, value, None, grad, dropout_p, is_causal, scale=scale
                )[0]
        kwargs = {"enable_gqa": enable_gqa} if enable_gqa else {}
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)

    return sdpa


@contextlib.contextmanager
def fake_mode_patches(mode, device_type: str = "meta"):
    """Patches, active only during a fake run, that make it follow the path of a real CUDA one.

    1. ``nn.Module.to`` on fake parameters: ``Module._apply`` swaps them with
       ``torch.utils.swap_tensors``, which refuses a tensor that has weak references, and the fake
       mode's meta converter keeps weak memos of the tensors it has seen (torch 2.13). The memos
       only speed up converting real tensors (none are converted here), so they are dropped
       before each swap.
    2. transformers' packed-sequence detection reads tensor values and, seeing fake tensors,
       assumes packing: it then materialises a (B, T, T) mask and SDPA takes its masked path. The
       synthetic batch is one unpadded sequence per row, for which a real run finds no packing
       (``None``) and calls SDPA with ``is_causal=True``; the patch returns that ``None``.
    3. SDPA takes the kernel a CUDA device would take (:func:`_cuda_sdpa`), on ``device_type``: the
       device that stands for CUDA (``meta``, or the fake CPU of an FSDP2 estimate).
    4. torch.optim's fused AdamW, which ``grass-llm train`` builds on CUDA, accepts that device.
    """
    if mode is None:
        yield
        return
    import torch.nn.functional as F
    import torch.optim.optimizer as torch_optimizer
    import torch.utils

    original_swap = torch.utils.swap_tensors
    original_fused = torch_optimizer._get_fused_kernels_supported_devices

    def swap(t1, t2):
        converter = mode.fake_tensor_converter.meta_converter
        converter.tensor_memo.clear()
        converter.describer.lookup_tensor.clear()
        return original_swap(t1, t2)

    masking_utils = None
    with contextlib.suppress(ImportError):
        from transformers import masking_utils
    original_find = getattr(masking_utils, "find_packed_sequence_indices", None)
    original_sdpa = F.scaled_dot_product_attention

    torch.utils.swap_tensors = swap
    F.scaled_dot_product_attention = _cuda_sdpa(original_sdpa, device_type)
    torch_optimizer._get_fused_kernels_supported_devices = lambda: [*original_fused(), "meta"]
    if original_find is not None:
        masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        torch.utils.swap_tensors = original_swap
        F.scaled_dot_product_attention = original_sdpa
        torch_optimizer._get_fused_kernels_supported_devices = original_fused
        if original_find is not None:
            masking_utils.find_packed_sequence_indices = original_find


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """``world_size > 1``: a fake process group of that many ranks (collectives are no-ops, as in
    torchtitan's estimator) and its 1-D CPU mesh, yielded; else ``None``."""
    if world_size == 1:
        yield None
        return
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise MemoryEstimateError("world_size > 1 needs no process group initialised (it makes a fake one)")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()
