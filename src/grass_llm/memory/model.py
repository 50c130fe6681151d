"""The model an estimate or a measurement builds: its transformers config (:func:`load_config`, never
downloaded) and a randomly initialised causal LM of it (:func:`build_model`, as a CUDA run's)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from grass_llm.memory.inputs import MemoryEstimateError

__all__ = ["build_model", "config_name", "load_config"]


def load_config(model: Any):
    """Resolve ``model`` to a transformers ``PretrainedConfig``.

    ``model`` may be a ``PretrainedConfig``, a path to a ``config.json`` file or to a directory
    holding one, or a hub name that is already in the local cache (no download is attempted).
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if not isinstance(model, (str, Path)):
        raise MemoryEstimateError(
            f"model={model!r} is invalid; allowed: a PretrainedConfig, a config.json path or directory, "
            "or a hub name in the local cache"
        )
    path = Path(model).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (
            OSError,
            UnicodeDecodeError,
            json.JSONDecodeError,
        ) as err:  # (a binary file: UnicodeDecodeError)
            raise MemoryEstimateError(f"model={str(model)!r}: cannot read a JSON config: {err}") from err
        model_type = data.pop("model_type", None)
        if not model_type:
            raise MemoryEstimateError(f"model={str(model)!r}: the config has no 'model_type' field")
        try:
            return AutoConfig.for_model(model_type, **data)
        except ValueError as err:
            raise MemoryEstimateError(f"model={str(model)!r}: {err}") from err
    if path.is_dir() and not (path / "config.json").is_file():
        raise MemoryEstimateError(f"model={str(model)!r} is a directory without a config.json")
    try:
        return AutoConfig.from_pretrained(str(model), local_files_only=True)
    except (OSError, ValueError) as err:
        raise MemoryEstimateError(
            f"model={str(model)!r} not found: it is neither a config.json file, a directory with one, nor a hub "
            f"name in the local cache (no download is attempted): {err}"
        ) from err


def config_name(config) -> str:
    """The name of a config: where it was loaded from, else its model type."""
    name = getattr(config, "_name_or_path", "") or ""
    return name or getattr(config, "model_type", "model")


def build_model(config, dtype: torch.dtype, device: torch.device | str):
    """A causal LM of ``config`` on ``device`` with weights in ``dtype``, with SDPA attention and no KV cache."""
    from transformers import AutoModelForCausalLM

    config = config.__class__.from_dict(config.to_dict())  # never mutate the caller's config
    config.use_cache = False
    if getattr(config, "_attn_implementation", None) in (None, "eager"):
        with contextlib.suppress(Exception):
            config._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model
