"""Models for the recipes: the tiny Llama builder used by the demo, tests, benchmarks and examples, and
the loader of a causal LM + tokenizer from a local directory or the hub (transformers, lazily)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["ModelLoadError", "load_model_and_tokenizer", "looks_like_path", "tiny_llama"]


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
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model {name!r}: {e}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return (model if device is None else model.to(device)), tokenizer
