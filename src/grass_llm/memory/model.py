"""The model an estimate or a measurement builds: its transformers config (:func:`load_config`, never
downloaded) and a randomly initialised causal LM of it (:func:`build_model`, as a CUDA run's)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from grass_llm._text import one_line
from grass_llm.memory.inputs import MemoryEstimateError
from grass_llm.models import looks_like_path

__all__ = ["BUILTIN_MODELS", "build_model", "builtin_config", "config_name", "load_config"]


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
    if isinstance(model, str) and model.startswith("builtin:"):
        return builtin_config(model)
    path = Path(model).expanduser()
    if path.is_file():
        return _from_json_file(path, str(model))
    if path.is_dir() and not (path / "config.json").is_file():
        raise MemoryEstimateError(f"model={str(model)!r} is a directory without a config.json")
    if not path.exists() and (looks_like_path(str(model)) or str(model).endswith(".json")):
        raise MemoryEstimateError(f"model={str(model)!r}: no such file or directory")
    try:
        return AutoConfig.from_pretrained(str(model), local_files_only=True)
    except Exception as err:  # (OSError, ValueError, a config class's own validation errors)
        if path.is_dir():
            raise MemoryEstimateError(f"model={str(model)!r}: {one_line(err, limit=300)}") from err
        raise MemoryEstimateError(
            f"model={str(model)!r} not found: it is neither a config.json file, a directory with one, nor a hub "
            "name in the local cache (no download is attempted)"
        ) from err


BUILTIN_MODELS = ("builtin:tiny", "builtin:tiny-pretrained")


def builtin_config(name: str, settings: Any = None):
    """The config of a model ``grass-llm train`` builds in (``model=builtin:...``), built by the recipe's own
    ``load_model`` for ``settings`` (a ``TrainConfig``; default: train's defaults with this model)."""
    from grass_llm.recipes.build import load_model
    from grass_llm.recipes.train_config import TrainConfig

    if name not in BUILTIN_MODELS:
        raise MemoryEstimateError(f"model={name!r} is invalid; allowed built-in models: {', '.join(BUILTIN_MODELS)}")
    model, _ = load_model(settings if settings is not None else TrainConfig(model=name), torch.float32, torch.device("cpu"))
    config = model.config
    config._name_or_path = name
    return config


def _from_json_file(path: Path, name: str):
    """The config of a ``config.json`` file; :class:`MemoryEstimateError` in one line for any bad content."""
    from transformers import CONFIG_MAPPING, AutoConfig

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:  # (a binary file: UnicodeDecodeError)
        raise MemoryEstimateError(f"model={name!r}: cannot read a JSON config: {one_line(err, limit=300)}") from err
    if not isinstance(data, dict):
        raise MemoryEstimateError(f"model={name!r}: the config is a JSON {type(data).__name__}; allowed: an object")
    model_type = data.pop("model_type", None)
    if not model_type:
        raise MemoryEstimateError(f"model={name!r}: the config has no 'model_type' field")
    if model_type not in CONFIG_MAPPING:
        raise MemoryEstimateError(
            f"model={name!r}: model_type={model_type!r} is not a model type this transformers knows"
        )
    try:
        return AutoConfig.for_model(model_type, **data)
    except Exception as err:  # (ValueError, TypeError, a config class's strict validation errors)
        raise MemoryEstimateError(f"model={name!r}: invalid config: {one_line(err, limit=300)}") from err


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
