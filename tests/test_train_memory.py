"""``grass-llm train``'s memory settings: chunked loss, compact activations, frozen checkpointing, LISA's
offload flags. The numbers stay those of the plain run."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_train import FAST, _final_state, run

from grass_llm.runlog import read_log


def test_memory_settings_change_no_number(tmp_path):
    common = ["method=grass", "max_steps=4", "grass.active_layers=2", "grass.period=2", "grass.probe_steps=1"]
    rc, plain = run(tmp_path, *common, "chunked_loss=false", "compact_activations=false", name="plain")
    assert rc == 0
    # chunked_loss and compact_activations are on by default
    rc, lean = run(tmp_path, *common, "activation_checkpointing=frozen", name="lean")
    assert rc == 0
    a, b = read_log(plain), read_log(lean)
    assert [r["active_layers"] for r in a] == [r["active_layers"] for r in b]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    fa, fb = _final_state(plain), _final_state(lean)
    for k in fa:
        torch.testing.assert_close(fb[k], fa[k], rtol=1e-4, atol=1e-6)


def test_lisa_keeps_its_offload_and_precision_flags():
    """The LISA branch of the old config dropped grass.offload / overlap / fp32 flags."""
    from grass_llm.models import tiny_llama
    from grass_llm.recipes.methods import build_method
    from grass_llm.recipes.train_config import TrainConfig

    grass = {
        "offload": True,
        "overlap": False,
        "fp32_optimizer_states": True,
        "update_rounding": "stochastic",
    }
    cfg = TrainConfig(method="lisa", grass={**grass, "fp32_master_weights": False})
    assert cfg.grass.offload is True and cfg.grass.overlap is False and cfg.grass.fp32_optimizer_states
    _, opt = build_method(tiny_llama(64, num_layers=4, seed=0, dtype=torch.bfloat16), cfg)
    assert opt.offloader is not None and opt.precision == "stochastic"
    assert {"embeddings", "head"} <= set(opt.offloader.units())  # LISA trains them: they are staged
    cfg = TrainConfig(method="lisa", grass={"offload": False})
    _, opt = build_method(tiny_llama(64, num_layers=4, seed=0, dtype=torch.bfloat16), cfg)
    assert opt.offloader is None and opt.precision == "kahan"


def test_checkpointing_key_errors(tmp_path, capsys):
    from grass_llm.cli import main

    assert main(["train", *FAST, f"out_dir={tmp_path}", "activation_checkpointing=some"]) == 2
    err = capsys.readouterr().err
    assert "activation_checkpointing" in err and "frozen" in err
    assert main(["train", *FAST, f"out_dir={tmp_path}", "gradient_checkpointing=true"]) == 2
    assert "activation_checkpointing=full" in capsys.readouterr().err
