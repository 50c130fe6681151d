"""The tiny pretrained model shipped with the package (builtin:tiny-pretrained) is what
scripts/pretrain_tiny.py recorded, and the script runs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from grass_llm.models import TINY_PRETRAINED_ASSET, ModelLoadError, load_tiny_pretrained

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_weights_match_the_record():
    weights = TINY_PRETRAINED_ASSET.with_suffix(".safetensors")
    record = json.loads(TINY_PRETRAINED_ASSET.with_suffix(".json").read_text())
    blob = weights.read_bytes()
    assert hashlib.sha256(blob).hexdigest() == record["sha256"] and len(blob) == record["bytes"]
    assert len(blob) < 4 * 2**20  # a few MB at most
    assert record["pretraining"]["command"].startswith("python scripts/pretrain_tiny.py")
    model = load_tiny_pretrained()
    assert sum(p.numel() for p in model.parameters()) == record["params"]
    assert model.config.num_hidden_layers == 8
    from grass_llm.data import builtin_tokenizer

    assert model.config.vocab_size == len(builtin_tokenizer())


def test_damaged_asset_is_refused(tmp_path):
    asset = tmp_path / "tiny-pretrained"
    blob = bytearray(TINY_PRETRAINED_ASSET.with_suffix(".safetensors").read_bytes())
    blob[-10] ^= 1
    asset.with_suffix(".safetensors").write_bytes(bytes(blob))
    asset.with_suffix(".json").write_text(TINY_PRETRAINED_ASSET.with_suffix(".json").read_text())
    with pytest.raises(ModelLoadError, match="does not match its recorded checksum"):
        load_tiny_pretrained(asset=asset)
    with pytest.raises(ModelLoadError, match="builtin:tiny-pretrained: cannot read the packaged model"):
        load_tiny_pretrained(asset=tmp_path / "missing")


def test_pretraining_script_writes_a_consistent_asset(tmp_path):
    out = tmp_path / "tiny"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "pretrain_tiny.py"), "--steps", "3", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["pretraining"]["steps"] == 3 and "--steps 3" in record["pretraining"]["command"]
    assert record["model"] == json.loads(TINY_PRETRAINED_ASSET.with_suffix(".json").read_text())["model"]
    model = load_tiny_pretrained(torch.float32, asset=out)  # the checksum it recorded holds
    assert not torch.equal(model.lm_head.weight, load_tiny_pretrained().lm_head.weight)
