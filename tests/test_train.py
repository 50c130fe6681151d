"""``grass-llm train`` end to end through the CLI, on the built-in tiny model and data, on CPU."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from grass_llm.cli import main
from grass_llm.recipes.run_checkpoint import find_latest_checkpoint
from grass_llm.runlog import read_log

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = [
    "model=builtin:tiny",
    "data=builtin:arith",
    "device=cpu",
    "dtype=fp32",
    "max_length=64",
    "batch_size=4",
    "lr=1e-3",
    "warmup=1",
    "tensorboard=false",
    "plots=false",
    "save_every=0",
]
# keys of a log record that depend on the wall clock or the process, not on the computation
_TIMING = ("time", "tokens_per_s", "memory_bytes", "rss_bytes")


def run(tmp_path, *overrides, name="run"):
    out = tmp_path / name
    rc = main(["train", *FAST, f"out_dir={out}", *overrides])
    return rc, out


def _initial_tiny(seed=0):
    from grass_llm.recipes.build import load_model
    from grass_llm.recipes.train_config import TrainConfig

    cfg = TrainConfig(model="builtin:tiny", max_length=64, seed=seed)
    return load_model(cfg, torch.float32, torch.device("cpu"))[0]


def _final_state(out):
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def _layer_changed(init: dict, final: dict, layer: int) -> bool:
    prefix = f"model.layers.{layer}."
    return any(not torch.equal(v, final[k]) for k, v in init.items() if k.startswith(prefix))


def test_grass_trains_only_sampled_layers_per_period(tmp_path, capsys):
    rc, out = run(
        tmp_path,
        "method=grass",
        "max_steps=7",
        "grass.active_layers=2",
        "grass.period=2",
        "grass.probe_steps=1",
        "plots=true",
        "tensorboard=true",
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "checkpoint:" in printed and "log.jsonl" in printed and "plots:" in printed

    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 8))
    assert log[0]["phase"] == "probe" and log[0]["active_layers"] == []
    train = log[1:]
    assert all(r["phase"] == "train" and len(r["active_layers"]) == 2 for r in train)
    periods = [train[i : i + 2] for i in range(0, 6, 2)]
    assert all(p[0]["active_layers"] == p[1]["active_layers"] for p in periods)  # fixed within a period
    assert all(abs(sum(r["probabilities"]) - 1) < 1e-9 and len(r["importance"]) == 8 for r in train)

    # weights: exactly the layers that were active in some period changed; embeddings/head did not
    init = _initial_tiny().state_dict()
    final = _final_state(out)
    trained = {layer for r in train for layer in r["active_layers"]}
    for layer in range(8):
        assert _layer_changed(init, final, layer) == (layer in trained), layer
    assert torch.equal(init["model.embed_tokens.weight"], final["model.embed_tokens.weight"])
    assert torch.equal(init["lm_head.weight"], final["lm_head.weight"])

    assert (out / "final" / "tokenizer_config.json").is_file()
    ckpt = find_latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == "step-000007" and (ckpt / "optimizer.pt").is_file()
    assert list((out / "plots").glob("*.png"))
    assert list((out / "tensorboard").iterdir())


@pytest.mark.parametrize("method", ["grass-static", "lisa", "badam", "fft", "lora", "dora"])
def test_every_method_runs_end_to_end(tmp_path, method):
    extra = {
        "grass-static": ["grass.probe_steps=1", "grass.period=2"],
        "lora": ["lora.rank=4", "lora.alpha=8"],
        "badam": ["grass.active_layers=1"],  # the demo base sets 2
    }
    extra["dora"] = extra["lora"]
    rc, out = run(tmp_path, f"method={method}", "max_steps=2", *extra.get(method, []))
    assert rc == 0
    log = read_log(out)
    assert len(log) == 2 and all(r["loss"] == r["loss"] for r in log)  # 3 records, no NaN
    assert find_latest_checkpoint(out) is not None
    final = _final_state(out)  # full model; merged for lora / dora
    assert not any("lora" in k for k in final)
    init = _initial_tiny().state_dict()
    changed = {k for k, v in init.items() if not torch.equal(v, final[k])}
    if method == "lisa":
        assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed
        trained = {layer for r in log for layer in r["active_layers"]}
        assert len(trained) == 2  # 2 steps, period 10: one draw of 2 layers
        assert all(_layer_changed(init, final, i) == (i in trained) for i in range(8))
    if method == "badam":  # one layer at a time, nothing else
        trained = {layer for r in log for layer in r["active_layers"]}
        assert len(trained) == 1 and all(_layer_changed(init, final, i) == (i in trained) for i in range(8))
        assert "model.embed_tokens.weight" not in changed and "lm_head.weight" not in changed
    if method in ("lora", "dora"):
        cfg = json.loads((out / "final" / "adapter" / "adapter_config.json").read_text())
        assert cfg["r"] == 4 and cfg["use_dora"] == (method == "dora")
        assert "lm_head.weight" not in changed and "model.layers.0.self_attn.q_proj.weight" in changed
        assert "model.layers.0.self_attn.o_proj.weight" not in changed  # not a target module
    if method == "fft":
        assert "model.embed_tokens.weight" in changed and all(
            _layer_changed(init, final, i) for i in range(8)
        )


def test_resume_equals_uninterrupted_bit_for_bit(tmp_path):
    # 64 records / batch 8 / 2 micro-batches = 4 steps an epoch: the resume at step 3 is mid-epoch
    # and mid-period (probe 1, periods 2-4 and 5-7), and the run crosses an epoch boundary after it
    common = [
        "method=grass",
        "max_steps=6",
        "batch_size=8",
        "grad_accum=2",
        "grass.active_layers=2",
        "grass.period=3",
        "grass.probe_steps=1",
        "schedule=cosine",
    ]
    rc, full = run(tmp_path, *common, name="full")
    assert rc == 0
    rc, split = run(tmp_path, *common, "stop_at_step=3", "save_every=100", name="split")
    assert rc == 0
    assert find_latest_checkpoint(split).name == "step-000003" and not (split / "final").exists()
    rc = main(["train", *FAST, f"out_dir={split}", *common, "--resume"])
    assert rc == 0

    def strip(records):
        return [{k: v for k, v in r.items() if k not in _TIMING} for r in records]

    assert strip(read_log(split)) == strip(read_log(full))
    a, b = _final_state(full), _final_state(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_stop_before_training_with_exit_code_2(tmp_path, capsys):
    def err(*overrides):
        rc, out = run(tmp_path, *overrides, name="bad")
        assert rc == 2
        assert not (out / "log.jsonl").exists()
        return capsys.readouterr().err

    e = err("grass.activ_layers=3")
    assert "grass.activ_layers" in e and "grass.active_layers" in e
    assert "method='gras'" in err("method=gras") and "allowed" in err("method=gras")
    assert "batch_size" in err("batch_size=-1")
    assert "does not exist" in err(f"data={tmp_path / 'missing.json'}")
    assert "does not exist" in err(f"model={tmp_path / 'no-model'}")
    assert "active_layers" in err("grass.active_layers=9")  # the tiny model has 8 layers

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "1+1", "output": "2"}, {"instruction": "2+2"}]))
    e = err(f"data={bad}")
    assert "bad.json" in e and "record 2" in e and "output" in e  # names the file, record and field


def test_print_config_and_help(capsys):
    assert main(["train", "--print-config", "method=lisa", "grass.period=5"]) == 0
    out = capsys.readouterr().out
    assert "method: lisa" in out and "period: 5" in out and "builtin:tiny" in out
    with pytest.raises(SystemExit) as exc:
        main(["train", "-h"])
    assert exc.value.code == 0
    assert "grass.active_layers" in capsys.readouterr().out
