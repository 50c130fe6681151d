"""GRASS on FSDP2 (``torch.distributed.fsdp.fully_shard``): for models whose weights do not fit one device.

The user shards the model as FSDP2 expects, every decoder block and then the root::

    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    opt = GrassOptimizer(model, GrassConfig(...))   # distributed="auto" picks FSDP2Backend

and runs the usual loop. Each rank holds a shard (dim 0) of every parameter as a ``DTensor``; FSDP2
all-gathers a block for its forward and backward and reduce-scatters its gradients, then calls the
sharded parameters' post-accumulate-grad hooks with the reduced shard. GRASS keeps working on that:

* **Frozen layers.** ``requires_grad`` still selects the trained layers: FSDP2 reduce-scatters only
  the parameters that received gradients, and switching ``requires_grad`` between steps needs no
  re-wrapping. Backward stops at the lowest active block as without FSDP.
* **MGN (eq. 2, exact).** The hooks read the squared norm of the *local* shard of each gradient;
  ``reduce_sumsq_`` sums them over the mesh (one all-reduce of a few floats per step), which is the
  squared norm of the global batch's gradient. During probing FSDP2 reduce-scatters every layer, the
  hooks read and free the shards at once (earlier micro-batches of a step go to a host buffer, as on
  one process).
* **AdamW on the local shards only.** Each rank keeps the states of its own shard of every unit (so
  the states are sharded like the weights); with offload they live in host memory, a unit's shard
  at a time staged on the device.
* **Same draw everywhere.** Rank 0's draw is broadcast.
* **Gradient accumulation.** ``optimizer.no_sync()`` around every micro-batch but the last: while
  training it defers FSDP2's reduce-scatter (``set_requires_gradient_sync(False)``; only the active
  layers hold unsharded gradients); while probing FSDP2 keeps reduce-scattering (the full unsharded
  gradients of every layer would not fit) and GRASS adds the shards up on the host.
* **Clipping** across shards: ``clip_grad_norm_`` on the DTensor gradients (a collective).
* **Checkpoints.** ``GrassOptimizer.state_dict()`` returns the states as ``DTensor``s sharded like their
  parameters, so ``torch.distributed.checkpoint`` saves each rank's shard and loads them on another
  world size; ``load_state_dict`` accepts DTensors of any sharding, full tensors, or this rank's shards.

A GradScaler is not supported with FSDP2 (its overflow check would be per rank); use bf16.

Invariants (referenced as ``# F1`` ... next to the code that relies on them):

F1. Every trainable parameter is a ``DTensor`` sharded on one 1-D mesh (checked in ``attach``), so
    one process group carries every collective of the backend.
F2. FSDP2 calls a sharded parameter's post-accumulate-grad hook with the reduced shard: the hooks see
    the global batch's gradient (``gradients_final_in_hooks``), and the squared norms of the local
    shards summed over the mesh (``reduce_sumsq_``) are the squared norms of the whole gradients.
F3. While nothing is trained (probing) ``no_sync()`` changes nothing: FSDP2 keeps reduce-scattering
    every micro-batch, since unsharded gradients of every layer would not fit.
F4. The draw of the group's rank 0 is broadcast, so every rank trains the same layers.
F5. An optimizer state is kept as this rank's shard of a tensor shaped like its parameter, and
    saved as a ``DTensor`` sharded like it; a saved state of any sharding (or a full tensor, or this
    rank's shard) loads on any world size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from grass_llm.distributed.base import DataParallelBackend, collective_device

__all__ = [
    "FSDP2Backend",
    "apply_fsdp2",
    "fsdp_root",
    "is_fsdp2_model",
    "like_param",
    "local_tensor",
    "shard_of",
]


def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, _dtensor_cls()) else tensor


def shard_of(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``full``, a tensor the shape of the DTensor ``param``, sharded like it; a copy
    (some torch versions return a view that keeps the whole tensor alive)."""
    from torch.distributed.tensor import distribute_tensor

    full = full.to(param.to_local().device)
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local().clone()


def like_param(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard ``local`` as a DTensor sharded like the DTensor ``param``."""
    return _dtensor_cls().from_local(
        local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


def apply_fsdp2(model: nn.Module, layers: Any = None, mesh: Any = None) -> nn.Module:
    """``fully_shard`` every decoder block (``grass_llm.discover_layers``; ``layers`` overrides it) and then
    the root, on ``mesh`` (default: the world, on the current CUDA device or the CPU). Returns ``model``."""
    from torch.distributed.fsdp import fully_shard

    from grass_llm.layers import discover_layers

    kwargs = {"mesh": mesh} if mesh is not None else {}
    for block in discover_layers(model, layers).blocks:
        fully_shard(block, **kwargs)
    # a peft model: its base model is the root (peft's generate() calls the base model directly, which
    # would bypass the root's all-gather of the embeddings were the PeftModel wrapper the root)
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    fully_shard(root, **kwargs)
    return model


def fsdp_root(model: nn.Module) -> nn.Module:
    """The outermost ``fully_shard``-ed module of ``model`` (``model`` itself, or a peft model's base)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            return module
    raise ValueError("the model has no fully_shard-ed module")


def is_fsdp2_model(model: nn.Module) -> bool:
    """Whether ``model`` holds parameters sharded by FSDP2 (``fully_shard``)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules())


class FSDP2Backend(DataParallelBackend):
    """Synchronises a ``GrassOptimizer`` over a model sharded with FSDP2 (module docstring).

    Args:
        model: the model, its decoder blocks and root passed through ``fully_shard``.
    """

    gradients_final_in_hooks = True  # F2: FSDP2 calls the hooks with the reduced shard
    probe_needs_whole_units = False
    supports_grad_scaler = False

    def __init__(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("FSDP2Backend needs torch.distributed.init_process_group() first")
        roots = [m for m in model.modules() if isinstance(m, FSDPModule)]
        if not roots:
            raise ValueError(
                "FSDP2Backend needs a model passed through torch.distributed.fsdp.fully_shard (each decoder "
                "block, then the root)"
            )
        self.model = model
        self._fsdp_modules = roots
        self.mesh: Any = None
        self.group: Any = None
        self._trained: frozenset[int] = frozenset()

    def __repr__(self) -> str:
        return f"FSDP2Backend(rank={self.rank}, world_size={self.world_size})"

    # ------------------------------------------------------------------------------------------
    def attach(
        self, units: Sequence[Sequence[nn.Parameter]], on_reduced: Callable[[list[int]], None] | None = None
    ) -> None:
        """Check that the units' parameters are sharded on one mesh and take it (F1)."""
        DTensor = _dtensor_cls()
        params = [p for ps in units for p in ps]
        plain = [i for i, p in enumerate(params) if not isinstance(p, DTensor)]
        if plain:
            raise ValueError(
                f"{len(plain)} trainable parameters are not sharded by FSDP2; pass every decoder block and then "
                "the root module through fully_shard before building the optimizer"
            )
        self.mesh = params[0].device_mesh
        if any(p.device_mesh != self.mesh for p in params):  # equal meshes (fully_shard makes one per call)
            raise ValueError("the model's parameters are sharded on different device meshes; GRASS needs one")
        if self.mesh.ndim != 1:
            raise ValueError(f"a {self.mesh.ndim}-D device mesh (HSDP) is not supported; use a 1-D mesh")
        self.group = self.mesh.get_group()
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)

    def set_trained(self, unit_ids: Collection[int]) -> None:
        self._trained = frozenset(unit_ids)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        if not self._trained:  # F3: probing, FSDP keeps reduce-scattering
            yield
            return
        for m in self._fsdp_modules:
            m.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for m in self._fsdp_modules:
                m.set_requires_gradient_sync(True, recurse=False)

    # ------------------------------------------------------------------------------------------
    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        return local_tensor(tensor)

    def reduce_sumsq_(self, sumsq: torch.Tensor) -> None:
        """Squared norms of local shards -> of the whole gradients: a sum over the mesh (float64, F2)."""
        buf = sumsq.to(torch.float64)
        dist.all_reduce(buf, group=self.group)
        sumsq.copy_(buf)

    def broadcast_layers(self, layers: Sequence[int]) -> list[int]:
        if dist.get_backend(self.group) == "fake":  # grass-llm memory's fake ranks: nothing to agree on
            return list(layers)
        t = torch.tensor(list(layers), dtype=torch.int64, device=collective_device(self.group))
        dist.broadcast(t, src=dist.get_global_rank(self.group, 0), group=self.group)  # F4
        return [int(i) for i in t.tolist()]

    # ------------------------------------------------------------------------------------------
    # optimizer states: sharded like their parameters (F5)
    def export_state(self, value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a state -> a DTensor sharded like ``param``."""
        if not isinstance(param, _dtensor_cls()) or value.dim() == 0:
            return value
        return like_param(value, param)

    def import_state(self, value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """A saved state (DTensor of any sharding, full tensor, or this rank's shard) -> this rank's shard."""
        DTensor = _dtensor_cls()
        if not isinstance(param, DTensor) or value.dim() == 0:
            return value
        if isinstance(value, DTensor):
            return value.redistribute(param.device_mesh, param.placements).to_local()
        local_shape = param.to_local().shape
        if value.shape == param.shape:
            return shard_of(value, param)
        if value.shape == local_shape:
            return value
        raise ValueError(
            f"an optimizer state of shape {tuple(value.shape)} fits neither the parameter {tuple(param.shape)} "
            f"nor this rank's shard {tuple(local_shape)}"
        )
