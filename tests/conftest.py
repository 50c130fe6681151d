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
# LLM-Adapters' data: $GRASS_DATA_DIR when set, else the shared data beside the checkout when it is there
# (development); subprocesses inherit the variable. A fresh clone has neither: see ``eval_data``.
if "GRASS_DATA_DIR" not in os.environ and (REPO_ROOT.parent / "shared" / "data" / "llm-adapters").is_dir():
    os.environ["GRASS_DATA_DIR"] = str(REPO_ROOT.parent / "shared" / "data")
SHARED_DATA = Path(os.environ["GRASS_DATA_DIR"]) if os.environ.get("GRASS_DATA_DIR") else None
#: the first 4 records of each LLM-Adapters evaluation set, shipped with the tests (tests/data/llm-adapters/SOURCE.md)
BUNDLED_DATA = Path(__file__).resolve().parent / "data"


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
    """The full LLM-Adapters data (``$GRASS_DATA_DIR``); the test skips without it."""
    if SHARED_DATA is None or not (SHARED_DATA / "llm-adapters").is_dir():
        where = f"at $GRASS_DATA_DIR={SHARED_DATA}" if SHARED_DATA else "($GRASS_DATA_DIR is not set)"
        pytest.skip(f"needs LLM-Adapters' full data: no llm-adapters/ {where}")
    return SHARED_DATA


@pytest.fixture
def eval_data() -> Path:
    """A data root holding LLM-Adapters' evaluation sets: ``$GRASS_DATA_DIR`` when it holds them, else the first
    4 records of each shipped in ``tests/data`` (enough for ``--limit 4``)."""
    if SHARED_DATA is not None and (SHARED_DATA / "llm-adapters" / "dataset").is_dir():
        return SHARED_DATA
    return BUNDLED_DATA


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
