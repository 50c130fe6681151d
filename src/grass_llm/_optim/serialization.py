"""``GrassOptimizer.state_dict`` / ``load_state_dict``.

Format: PyTorch's optimizer format (param groups, and per parameter ``step``, ``exp_avg``, ``exp_avg_sq``
and ``master`` or ``compensation`` when its precision has one, always as tensors, wherever the offloader
keeps them) plus a ``grass`` entry: the config, the sampler and its RNG, the MGN, the schedule.

Loading validates the whole state dict first (its entries, every state tensor's shape against its
parameter, the saved ``GrassConfig`` against this one) and changes nothing when it refuses: no half-loaded
optimizer. Config fields that change what is trained (:data:`TRAJECTORY_FIELDS`) must match unless
``strict=False`` (then a warning names them); where states live and how updates are rounded may change
(states are converted).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from grass_llm._tensor import flat_params, param_index
from grass_llm.config import GrassConfig

# ``opt`` below is a grass_llm.optim.GrassOptimizer (not imported: the optimizer sits a layer above its parts)
GrassOptimizer = Any

__all__ = ["TRAJECTORY_FIELDS", "load_state_dict", "state_dict"]

VERSION = 2
#: GrassConfig fields a resumed run must share with the saved one (they decide what is trained and how)
TRAJECTORY_FIELDS = (
    "active_layers", "period", "probe_steps", "temperature", "ema", "policy", "train_embeddings",
    "train_head", "train_norm", "on_reactivation", "max_grad_norm", "layers",
)  # fmt: skip
_STATE_KEYS = {"step", "exp_avg", "exp_avg_sq", "master", "compensation"}


def state_dict(opt: GrassOptimizer) -> dict[str, Any]:
    sd = torch.optim.Optimizer.state_dict(opt)
    # torch.optim packs the live per-parameter dicts: copy them before adding to them
    sd["state"] = {i: dict(st) for i, st in sd["state"].items()}
    index = param_index(opt.param_groups)
    for p, moments in opt.store.param_states(offloaded_only=True).items():
        sd["state"][index[id(p)]].update(moments)  # offloaded moments: host copies where torch.optim keeps them
    params = flat_params(opt.param_groups)
    for i, st in sd["state"].items():  # FSDP2: states as DTensors sharded like their parameters
        sd["state"][i] = {k: v if k == "step" else opt.backend.export_state(v, params[i]) for k, v in st.items()}
    grass = opt.selection.state_dict()
    sd["grass"] = {
        "version": VERSION,
        "config": opt.config.to_dict(),
        "num_layers": opt.num_layers,
        "global_step": opt.global_step,
        "skipped_steps": opt.skipped_steps,
        **grass,
    }
    return opt.backend.consolidate_state_dict(sd)  # collective when sharding; rank 0's is complete


def _check(opt: GrassOptimizer, sd: dict[str, Any], strict: bool) -> tuple[dict, list[dict], dict]:
    """Validate everything; return (grass entry, param groups, per-index state tensors). Raises ValueError."""
    if not isinstance(sd, dict):
        raise ValueError(f"state_dict must be a dict, got {type(sd).__name__}")
    grass = sd.get("grass")
    if grass is None:
        raise ValueError("state_dict has no 'grass' entry: it was not saved by GrassOptimizer.state_dict()")
    if grass.get("partial_shard"):
        raise ValueError(
            f"state_dict is rank {grass['partial_shard']['rank']}'s part of a sharded optimizer; save and "
            "load the state_dict() of rank 0, which holds every rank's states"
        )
    for key in ("num_layers", "global_step"):
        if key not in grass:
            raise ValueError(f"state_dict's 'grass' entry has no {key!r}: it is incomplete")
    if grass["num_layers"] != opt.num_layers:
        raise ValueError(
            f"state_dict is for a model with {grass['num_layers']} decoder layers, this one has {opt.num_layers}"
        )
    opt.selection.validate_state(grass)
    _check_config(opt.config, grass.get("config"), strict)
    for key in ("state", "param_groups"):
        if key not in sd:
            raise ValueError(f"state_dict has no {key!r} entry: it is incomplete (saved moments would be lost)")
    groups = list(sd["param_groups"])
    if len(groups) == len(opt.param_groups) - 1:  # saved before the loss-scale probe existed
        n = sum(len(g["params"]) for g in groups)
        groups.append({k: v for k, v in {**opt.param_groups[-1], "params": [n]}.items() if k != "initial_lr" or k in groups[0]})
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in opt.param_groups]:
        raise ValueError(
            "state_dict's param groups do not match this optimizer's (another model or another layer split): "
            f"{[len(g['params']) for g in groups]} parameters per group, expected "
            f"{[len(g['params']) for g in opt.param_groups]}"
        )
    params = flat_params(opt.param_groups)
    tensors: dict[int, dict[str, torch.Tensor]] = {}
    for idx, st in sd["state"].items():
        if not isinstance(idx, int) or not 0 <= idx < len(params):
            raise ValueError(f"state_dict's state has an entry for parameter {idx!r}; allowed: 0..{len(params) - 1}")
        unknown = set(st) - _STATE_KEYS
        if unknown or "step" not in st:
            raise ValueError(f"state_dict's state of parameter {idx} has keys {sorted(st)}; expected step, "
                             "exp_avg, exp_avg_sq and master or compensation")  # fmt: skip
        for k, v in st.items():
            if k != "step" and tuple(v.shape) != tuple(params[idx].shape):
                raise ValueError(
                    f"state_dict's {k} of parameter {idx} has shape {tuple(v.shape)}, the parameter "
                    f"{tuple(params[idx].shape)}"
                )
        tensors[idx] = {k: v for k, v in st.items() if k != "step"}
    return grass, groups, tensors


def _check_config(config: GrassConfig, saved: dict[str, Any] | None, strict: bool) -> None:
    if saved is None:
        return
    changed = [f for f in TRAJECTORY_FIELDS if f in saved and saved[f] != getattr(config, f)]
    if not changed:
        return
    what = ", ".join(f"{f}: saved {saved[f]!r}, now {getattr(config, f)!r}" for f in changed)
    if strict:
        raise ValueError(
            f"state_dict was saved under another GrassConfig ({what}); build the optimizer with the saved "
            "config (GrassConfig.from_dict(state_dict['grass']['config'])) or pass strict=False to continue "
            "with this one"
        )
    warnings.warn(f"GrassOptimizer.load_state_dict: continuing with a changed GrassConfig ({what})", stacklevel=3)


def load_state_dict(opt: GrassOptimizer, sd: dict[str, Any], strict: bool = True) -> None:
    """Restore :func:`state_dict`, whatever device its tensors were moved to (accelerate moves an optimizer's
    whole state to the accelerator): every piece goes where this optimizer keeps it."""
    grass, groups, tensors = _check(opt, sd, strict)
    # torch.optim would cast the moments to the weights' dtype and device; keep them aside and place them
    # ourselves (fp32 moments stay fp32, offloaded ones go to host buffers, step to the CPU)
    steps = {idx: {"step": torch.as_tensor(st["step"]).to("cpu", torch.float32)} for idx, st in sd["state"].items()}
    rest = {k: v for k, v in sd.items() if k != "grass"}
    torch.optim.Optimizer.load_state_dict(opt, {**rest, "param_groups": groups, "state": steps})
    params = flat_params(opt.param_groups)
    opt.store.place_param_states(
        {params[i]: {k: opt.backend.import_state(v, params[i]) for k, v in ms.items()} for i, ms in tensors.items()}
    )
    for j, group in enumerate(opt.param_groups[:-1]):  # ZeRO-1 on this world size; any world size loads
        if not opt.backend.owns(j):
            for p in group["params"]:
                opt.state.pop(p, None)
    opt.selection.load_state_dict(grass)
    opt.global_step = int(grass["global_step"])
    opt.skipped_steps = int(grass.get("skipped_steps", 0))
    opt._end_step_reset()
    opt._apply_active(opt.selection.active, reset_leaving=False)
