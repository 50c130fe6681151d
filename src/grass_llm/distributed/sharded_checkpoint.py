"""Sharded checkpoints of a model and its ``GrassOptimizer`` with ``torch.distributed.checkpoint`` (DCP).

Every rank writes its shards of the weights (``model.state_dict()``: DTensors under FSDP2, plain
tensors otherwise) and of every optimizer state (``GrassOptimizer.state_dict()`` exports them as
DTensors sharded like their parameters), keyed by parameter name; rank 0 also writes the rest of the
optimizer's state (param groups, and the ``grass`` entry: sampler, RNG, MGN, schedule) to
``grass_optimizer.pt``. Loading reads on any world size, FSDP2 or not, one process included: DCP
reshards, and the optimizer's states are loaded into templates built from the checkpoint's metadata
(a fresh optimizer has no state yet to load into).

Layout: ``PATH/.metadata`` + ``PATH/__<rank>_*.distcp`` (DCP) + ``PATH/grass_optimizer.pt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from grass_llm._tensor import flat_params, param_index

__all__ = ["OPTIMIZER_FILE", "load_sharded_checkpoint", "save_sharded_checkpoint", "shard_like_params"]

OPTIMIZER_FILE = "grass_optimizer.pt"


def _names(model: nn.Module, optimizer: Any) -> tuple[list[nn.Parameter], dict[int, str]]:
    return flat_params(optimizer.param_groups), {id(p): n for n, p in model.named_parameters()}


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_sharded_checkpoint(path: str | Path, model: nn.Module, optimizer: Any) -> None:
    """Write ``model`` and ``optimizer`` to ``path`` (a directory). A collective: call it on every rank."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    sd = optimizer.state_dict()  # on every rank (a collective for some backends)
    params, names = _names(model, optimizer)
    states = {}
    for i, st in sd["state"].items():
        name = names.get(id(params[i]))
        if name is not None:  # (the loss-scale probe is not a model parameter and has no state)
            states.update({f"{name}/{key}": value for key, value in st.items()})
    dcp.save({"model": model.state_dict(), "optim": states}, checkpoint_id=str(path))
    if _is_main():
        rest = {"param_groups": sd["param_groups"], "grass": sd.get("grass")}
        torch.save(rest, path / OPTIMIZER_FILE)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def load_sharded_checkpoint(path: str | Path, model: nn.Module, optimizer: Any) -> None:
    """Load what :func:`save_sharded_checkpoint` wrote into ``model`` and ``optimizer``, on any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    if not (path / ".metadata").is_file() or not (path / OPTIMIZER_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is not a sharded grass-llm checkpoint (no .metadata / {OPTIMIZER_FILE})"
        )
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    params, names = _names(model, optimizer)
    by_name = {n: p for p in params if (n := names.get(id(p))) is not None}
    backend = getattr(optimizer, "backend", None)
    states: dict[str, torch.Tensor] = {}
    for key, md in metadata.items():
        if not key.startswith("optim.") or not isinstance(md, TensorStorageMetadata):
            continue
        name, state_key = key[len("optim.") :].rsplit("/", 1)
        param = by_name.get(name)
        if param is None:
            raise ValueError(f"{path}: optimizer state for {name!r}, which this model does not have")
        if len(md.size) == 0:  # the step counter
            states[key[len("optim.") :]] = torch.zeros((), dtype=md.properties.dtype)
            continue
        if backend is not None:  # GrassOptimizer: this rank's shard, exported as the optimizer does
            local = backend.local(param)
            template = torch.zeros(local.shape, dtype=md.properties.dtype, device=local.device)
            template = backend.export_state(template, param)
        else:  # torch.optim (fft / lora): a state like its parameter (a DTensor under FSDP2)
            template = torch.zeros_like(param, dtype=md.properties.dtype)
        states[key[len("optim.") :]] = template
    model_sd = model.state_dict()
    dcp.load({"model": model_sd, "optim": states}, checkpoint_id=str(path))
    model.load_state_dict(model_sd)
    rest = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    index = param_index(optimizer.param_groups)
    packed: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in states.items():
        name, state_key = key.rsplit("/", 1)
        packed.setdefault(index[id(by_name[name])], {})[state_key] = value
    sd = {"state": packed, "param_groups": rest["param_groups"]}
    if rest.get("grass") is not None:
        sd["grass"] = rest["grass"]
    optimizer.load_state_dict(sd)


def shard_like_params(optimizer_state: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """A ``torch.optim`` state dict of full tensors (saved by an unsharded run) with every state the
    shape of its parameter distributed like that parameter (a DTensor under FSDP2), so that the
    optimizer of a sharded model can load it. Other states (the step count) are left as they are."""
    from torch.distributed.tensor import DTensor

    from grass_llm.distributed.fsdp2 import like_param, shard_of

    params = flat_params(optimizer.param_groups)
    state = {}
    for i, st in optimizer_state["state"].items():
        p = params[int(i)]
        if isinstance(p, DTensor):
            st = {
                k: like_param(shard_of(v, p), p)
                if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.shape == p.shape
                else v
                for k, v in st.items()
            }
        state[i] = st
    return {**optimizer_state, "state": state}
