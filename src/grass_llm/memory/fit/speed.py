"""The speed model: the seconds of one optimizer step of a configuration (:class:`SpeedModel`), from what
the step does (:class:`Work`) and the model's parameter counts (:class:`ModelShape`, :func:`model_shape`).
Its constants are fitted to GPU measurements (:mod:`grass_llm.memory.fit.measurements`, ``docs/fit.md``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["SPEED_MODEL", "ModelShape", "SpeedModel", "Work", "model_shape", "update_bytes"]


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of a causal LM that the speed model needs (from its config, built on ``meta``)."""

    num_layers: int
    block_params: int  # of all decoder blocks together
    embedding_params: int
    head_params: int  # 0 when the head is tied to the embeddings
    head_matmul_params: int  # vocab x hidden: the logits' matmul, tied or not
    norm_params: int
    total_params: int
    attention_width: int  # query heads x head dim (the attention score and value matmuls)
    adapter_params: int = 0  # LoRA / DoRA adapters on the target modules at the rank
    tied_head: bool = False  # the head is the embeddings' tensor (``LayerGroups.tied_head``)

    @property
    def mean_block(self) -> float:
        return self.block_params / max(self.num_layers, 1)


def model_shape(
    config: Any, lora_targets: Sequence[str] = (), rank: int = 0, layers: Any = None
) -> ModelShape:
    """The :class:`ModelShape` of a transformers config (the model is built on ``meta``: no memory).
    ``lora_targets`` / ``rank``: count the adapters LoRA would add (``r x (in + out)`` per target linear)."""
    from transformers import AutoModelForCausalLM

    from grass_llm.layers import discover_layers

    config = config.__class__.from_dict(config.to_dict())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    groups = discover_layers(model, layers)
    head_module = model.get_output_embeddings()
    head_matmul = head_module.weight.numel() if head_module is not None else 0
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
    targets = set(lora_targets)
    adapters = 0
    if targets and rank:
        for block in groups.blocks:
            for name, module in block.named_modules():
                if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                    adapters += rank * (module.in_features + module.out_features)
    return ModelShape(
        num_layers=groups.num_layers,
        block_params=sum(groups.numel(i) for i in range(groups.num_layers)),
        embedding_params=sum(p.numel() for p in groups.embeddings),
        head_params=sum(p.numel() for p in groups.head),
        head_matmul_params=head_matmul,
        norm_params=sum(p.numel() for p in groups.norm),
        total_params=sum(p.numel() for p in model.parameters()),
        attention_width=heads * int(head_dim),
        adapter_params=adapters,
        tied_head=groups.tied_head,
    )


@dataclass(frozen=True)
class Work:
    """What one optimizer step does, in the speed model's terms."""

    tokens_per_micro: int  # m x T
    seq_len: int
    grad_accum: int
    blocks_backward: float  # decoder blocks backward passes through (input gradients)
    blocks_weight_grad: float  # decoder blocks whose weight gradients are computed
    blocks_recomputed: float  # decoder blocks run forward again in backward (checkpointing)
    head_weight_grad: bool = False
    update_bytes: float = 0.0  # bytes the AdamW update reads and writes
    streamed_bytes: float = 0.0  # offload=step: state bytes to the device and back, every step
    resample_bytes: float = 0.0  # offload=period: state bytes moved per step, amortised over the period


@dataclass(frozen=True)
class SpeedModel:
    """Seconds of one optimizer step (see the module docstring). Constants: ``micro_batch_s``,
    ``matmul_flops`` and ``stream_bytes_per_s`` are the weighted least-squares fit of :data:`MEASUREMENTS`
    (:func:`calibrate`); ``copy_bytes_per_s`` is the measured rate of pinned host <-> device copies both ways
    at once, ``update_bytes_per_s`` the H200's HBM3e bandwidth (4.8 TB/s, its specification)."""

    micro_batch_s: float = 0.0624
    matmul_flops: float = 475e12
    stream_bytes_per_s: float = 75.5e9
    copy_bytes_per_s: float = 101e9
    update_bytes_per_s: float = 4.8e12

    @staticmethod
    def flops(shape: ModelShape, work: Work) -> float:
        """Matmul FLOPs of one micro-batch: forward, backward, recomputation, adapters."""
        n, t = work.tokens_per_micro, work.seq_len
        attention = 2.0 * n * t * shape.attention_width  # causal QK^T and PV of one block, forward
        block = 2.0 * shape.mean_block * n + attention
        head = 2.0 * shape.head_matmul_params * n
        forward = shape.num_layers * block + head
        backward = head + work.blocks_backward * (2.0 * shape.mean_block * n + 2.5 * attention)
        backward += work.blocks_weight_grad * 2.0 * shape.mean_block * n + (
            head if work.head_weight_grad else 0
        )
        adapters = 6.0 * shape.adapter_params * n
        return forward + backward + work.blocks_recomputed * block + adapters

    def breakdown(self, shape: ModelShape, work: Work) -> dict[str, float]:
        """Seconds of one optimizer step by cause (they sum to :meth:`seconds`)."""
        recompute = work.blocks_recomputed * (
            2.0 * shape.mean_block * work.tokens_per_micro
            + 2.0 * work.tokens_per_micro * work.seq_len * shape.attention_width
        )
        compute = self.flops(shape, work) - recompute
        a = work.grad_accum
        return {
            "micro_batches": a * self.micro_batch_s,
            "compute": a * compute / self.matmul_flops,
            "recompute": a * recompute / self.matmul_flops,
            "update": work.update_bytes / self.update_bytes_per_s,
            "streaming": work.streamed_bytes / self.stream_bytes_per_s,
            "resample": work.resample_bytes / self.copy_bytes_per_s,
        }

    def seconds(self, shape: ModelShape, work: Work) -> float:
        return sum(self.breakdown(shape, work).values())


SPEED_MODEL = SpeedModel()


def update_bytes(weight_bytes: int, state_bytes: int) -> int:
    """Bytes an AdamW update moves per trained parameter: the weight and its gradient read, the weight
    written, every state tensor read and written."""
    return 3 * weight_bytes + 2 * state_bytes
