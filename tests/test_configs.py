"""Every shipped config in configs/ loads, validates and runs (shortened, on the tiny model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from grass_llm.recipes.methods import METHODS
from grass_llm.recipes.train_config import TrainConfig, load_train_config

pytestmark = pytest.mark.usefixtures("one_thread")


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
PAPER = [p for p in CONFIGS if p.name != "demo.yaml"]


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert "demo.yaml" in names
    assert {load_train_config(p).method for p in PAPER} == set(METHODS) - {"badam"}  # no paper row


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_validates(path):
    cfg = load_train_config(path)
    assert isinstance(cfg, TrainConfig)
    raw = yaml.safe_load(path.read_text())
    assert cfg.method == raw["method"]
    if path in PAPER:  # Table 9, TinyLlama arithmetic column
        assert cfg.batch_size * cfg.grad_accum == 8 and cfg.model.startswith("TinyLlama/")
        assert cfg.lr == {"grass": 3e-5, "grass-static": 3e-5, "lisa": 5e-5, "fft": 1e-5}.get(
            cfg.method, 1e-4
        )
        if cfg.method in ("grass", "grass-static"):
            assert (cfg.grass.active_layers, cfg.grass.period, cfg.grass.probe_steps) == (2, 25, 150)
        if cfg.method == "lisa":
            g = cfg.grass
            assert (g.active_layers, g.period, g.probe_steps, g.policy) == (2, 10, 0, "uniform")
            assert g.train_embeddings and g.train_head
        if cfg.method in ("lora", "dora"):
            assert cfg.lora.alpha == 2 * cfg.lora.rank and cfg.lora.rank in (128, 256)


def test_demo_yaml_is_the_embedded_default():
    from grass_llm.recipes.finetune import DEMO_CONFIG

    demo = load_train_config(Path(CONFIGS[0].parent / "demo.yaml"))
    assert demo == load_train_config(base=DEMO_CONFIG)


def test_demo_runs_and_prints_where_things_are(tmp_path, capsys):
    from grass_llm.cli import main

    out = tmp_path / "demo"
    # the demo itself, shortened: 6 steps (2 probing, periods of 2)
    rc = main(
        ["train", f"out_dir={out}", "max_steps=6", "grass.probe_steps=2", "grass.period=2", "plots=false"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"checkpoint: {out}/checkpoints/step-000006" in printed
    assert f"model:      {out}/final" in printed and f"log:        {out}/log.jsonl" in printed


def _run_shortened(path: Path, tmp_path: Path, data: list[str]):
    from grass_llm.recipes.finetune import train

    small = ["lora.rank=4", "lora.alpha=8"] if load_train_config(path).method in ("lora", "dora") else []
    cfg = load_train_config(
        path,
        [
            "model=builtin:tiny",
            *data,
            "dtype=fp32",
            "device=cpu",
            "max_steps=2",
            "grass.probe_steps=1",
            "tensorboard=false",
            "plots=false",
            f"out_dir={tmp_path}",
            *small,
        ],
    )
    result = train(cfg)
    assert result.steps == 2 and result.final_dir is not None and (result.final_dir / "config.json").is_file()


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_config_runs_shortened(path, tmp_path):
    """The paper configs with the model swapped for builtin:tiny and the data for builtin:arith, 2 steps."""
    _run_shortened(path, tmp_path, ["data=builtin:arith", "max_length=64"])


def test_paper_config_runs_on_llm_adapters_data(tmp_path, shared_data):
    """The GRASS config on a real LLM-Adapters file (math_data.json, 3,260 records; math_10k is not here)."""
    data = shared_data / "llm-adapters" / "ft-training_set" / "math_data.json"
    _run_shortened(
        CONFIGS[0].parent / "tinyllama-math-grass.yaml", tmp_path, [f"data={data}", "data_dir=null"]
    )


def test_train_config_is_what_methods_read():
    """``methods`` reads the settings through a protocol (so that ``train_config -> methods`` is the only
    dependency between them); ``TrainConfig`` must keep satisfying it."""
    from grass_llm.recipes.methods import LoraSettings, MethodSettings
    from grass_llm.recipes.train_config import TrainConfig

    cfg = TrainConfig(method="lora")
    assert isinstance(cfg, MethodSettings) and isinstance(cfg.lora, LoraSettings)
    assert cfg.learning_rate == 1e-4


@pytest.mark.parametrize(
    "override, message",
    [
        ("batch_sise=4", "unknown config key 'batch_sise'; did you mean batch_size?"),
        ("gradient_checkpointing=true", "did you mean activation_checkpointing=full?"),
        ("grass.bogus=1", "unknown config key 'grass.bogus'"),
        ("grass=3", "grass is a section; set its keys, e.g. grass.<name>=..."),
        ("lora.rank=x", "lora.rank='x' is invalid; allowed: an integer"),
        ("lr=fast", "lr='fast' is invalid; allowed: a number"),
        # found by trying the CLI as a stranger: no hint, or the section named instead of the key
        ("learning_rate=1e-4", "unknown config key 'learning_rate'; did you mean lr?"),
        ("LR=1e-4", "unknown config key 'LR'; did you mean lr?"),
        ("gradient_accumulation_steps=2", "did you mean grad_accum?"),
        ("gras.period=3", "unknown config key 'gras.period'; did you mean grass.period"),
    ],
)
def test_a_bad_setting_is_named_with_what_is_allowed(override, message):
    from grass_llm.recipes.train_config import TrainConfigError

    with pytest.raises(TrainConfigError, match=re.escape(message)):
        load_train_config(overrides=[override])


@pytest.mark.parametrize("method", ["fft", "lora"])
def test_frozen_checkpointing_is_refused_for_a_method_without_frozen_blocks(method):
    """grass-llm memory --budget refused it while grass-llm train ran it as no checkpointing at all."""
    from grass_llm.recipes.train_config import TrainConfigError

    with pytest.raises(TrainConfigError, match=f"activation_checkpointing=frozen is invalid for method={method}"):
        load_train_config(overrides=[f"method={method}", "activation_checkpointing=frozen"])


@pytest.mark.parametrize(("text", "says"), [("lr: [1\n", "expected ','"), ("a:\n\tb: 1\n", "'\\t'")])
def test_invalid_yaml_is_one_line_saying_where(tmp_path, text, says):
    from grass_llm.recipes.train_config import TrainConfigError

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TrainConfigError) as e:
        load_train_config(path)
    assert "\n" not in str(e.value) and "is not valid YAML at line 2, column 1: " in str(e.value)
    assert says in str(e.value)


def test_a_method_preset_is_completed_not_replaced_by_the_grass_keys_given():
    cfg = load_train_config(overrides=["method=lisa", "grass.active_layers=3"])
    assert (cfg.grass.period, cfg.grass.active_layers, cfg.grass.policy) == (10, 3, "uniform")
