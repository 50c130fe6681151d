"""Shared test fixtures: offline hub, fixed seeds, default dtype reset, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# the shared data beside the checkout (CI and development); subprocesses inherit the variable
os.environ.setdefault("GRASS_DATA_DIR", str(REPO_ROOT.parent / "shared" / "data"))
SHARED_DATA = Path(os.environ["GRASS_DATA_DIR"])


@pytest.fixture(autouse=True)
def _reset_torch_state():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture
def one_thread():
    """torch on one thread (the tiny models run far faster on one thread than on two contended ones)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "llm-adapters").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


class RandomTokens(torch.utils.data.Dataset):
    """``n`` fixed random sequences of ``length`` token ids below ``vocab`` (labels = inputs): a dataset for
    the Hugging Face Trainer tests."""

    def __init__(self, n: int = 32, length: int = 12, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def make_tiny_llama(num_layers: int = 4, vocab: int = 64, hidden: int = 16, tie: bool = False, seed: int = 0):
    """A random Llama small enough for many CPU steps a second."""
    from grass_llm.models import tiny_llama

    return tiny_llama(vocab, hidden, num_layers, num_heads=2, max_positions=64, tie=tie, seed=seed)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama
