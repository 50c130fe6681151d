"""Models: the tiny Llama builder used by the demo, tests, benchmarks and examples, the tiny pretrained
Llama shipped with the package, and the loader of a causal LM + tokenizer from a local directory or the
hub (transformers, lazily). Used by ``grass-llm train`` and ``grass-llm eval`` alike."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from grass_llm._text import one_line

__all__ = [
    "TINY_PRETRAINED_ASSET",
    "ModelLoadError",
    "load_model_and_tokenizer",
    "load_tiny_pretrained",
    "looks_like_path",
    "tiny_llama",
]

#: The tiny pretrained Llama shipped with the package (``model=builtin:tiny-pretrained``): its weights
#: (``.safetensors``) and a JSON record of its shape, checksum and how it was made (``.json``), written
#: by ``scripts/pretrain_tiny.py``.
TINY_PRETRAINED_ASSET = Path(__file__).resolve().parent / "assets" / "tiny-pretrained"


class ModelLoadError(ValueError):
    """A model or tokenizer cannot be loaded; the message names it and why."""


def tiny_llama(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 8,
    intermediate_size: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    max_positions: int = 512,
    tie: bool = False,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    **config: Any,
):
    """A randomly initialised ``LlamaForCausalLM`` (``intermediate_size`` default: 2 x hidden).

    ``seed`` seeds the initialisation (the global torch RNG); extra keywords go to ``LlamaConfig``
    (``pad_token_id``, ``attn_implementation``...).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        **config,
    )
    model = LlamaForCausalLM(cfg)
    return model if dtype is None else model.to(dtype)


def looks_like_path(name: str) -> bool:
    """Whether a model name is meant as a local path (not a hub id like ``org/model``)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def load_model_and_tokenizer(name: str, dtype: torch.dtype | None = None, device: Any = None):
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local directory (a model, or a peft adapter
    with ``adapter_config.json``) or a hub id.

    The tokenizer gets a pad token (EOS, else UNK) when it has none. Raises :class:`ModelLoadError`
    naming ``name`` when it cannot be loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name).expanduser()
    if looks_like_path(name) and not local.exists():
        raise ModelLoadError(f"model path {name!r} does not exist")
    has_config = (local / "config.json").is_file() or (local / "adapter_config.json").is_file()
    if local.exists() and not (local.is_dir() and has_config):
        raise ModelLoadError(f"model {name!r} is not a model directory (no config.json in {local})")
    source = str(local) if local.exists() else name
    if local.is_dir() and not (local / "config.json").is_file():
        _check_adapter_base(name, local / "adapter_config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except Exception as e:  # OSError, ValueError, safetensors' SafetensorError (a truncated file)...
        text = one_line(e, limit=None, empty="(no message)")
        raise ModelLoadError(f"cannot load model {name!r}: {type(e).__name__}: {text}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return (model if device is None else model.to(device)), tokenizer


def _check_adapter_base(name: str, config: Path) -> None:
    """An adapter directory must record a base model that exists (a path) or a hub name: checked here,
    so that a missing base is one clear line, not a request to the hub for a model named ``None``."""
    import json

    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"model {name!r}: cannot read {config}: {e}") from None
    if not base:
        raise ModelLoadError(
            f"model {name!r} is an adapter that records no base model ({config.name} has no "
            "base_model_name_or_path); load its base with peft.PeftModel.from_pretrained(base, adapter)"
        )
    if looks_like_path(base) and not Path(base).expanduser().exists():
        raise ModelLoadError(f"model {name!r} is an adapter whose base model {base!r} does not exist")


def load_tiny_pretrained(dtype: torch.dtype | None = None, asset: Path | None = None):
    """The tiny pretrained Llama shipped with the package (``builtin:tiny-pretrained``), for the
    built-in tokenizer (``grass_llm.data.builtin_tokenizer``). Its checksum is checked first.

    Raises :class:`ModelLoadError` when the asset is missing or does not match its recorded checksum.
    """
    import hashlib
    import json

    from safetensors.torch import load

    asset = TINY_PRETRAINED_ASSET if asset is None else Path(asset)
    weights, record_file = asset.with_suffix(".safetensors"), asset.with_suffix(".json")
    try:
        record = json.loads(record_file.read_text())
        blob = weights.read_bytes()
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"builtin:tiny-pretrained: cannot read the packaged model {weights}: {e}"
        ) from None
    if hashlib.sha256(blob).hexdigest() != record["sha256"]:
        raise ModelLoadError(
            f"builtin:tiny-pretrained: {weights} does not match its recorded checksum (damaged install?)"
        )
    model = tiny_llama(**record["model"])
    model.load_state_dict({k: v.float() for k, v in load(blob).items()})
    model.generation_config.pad_token_id = record["model"].get("pad_token_id")
    return model if dtype is None else model.to(dtype)
