"""Where ``grass_llm.models`` lived before it moved below the applications; kept so that old imports work."""

from grass_llm.models import (
    TINY_PRETRAINED_ASSET,
    ModelLoadError,
    load_model_and_tokenizer,
    load_tiny_pretrained,
    looks_like_path,
    tiny_llama,
)

__all__ = [
    "TINY_PRETRAINED_ASSET",
    "ModelLoadError",
    "load_model_and_tokenizer",
    "load_tiny_pretrained",
    "looks_like_path",
    "tiny_llama",
]
