"""Every command in the README runs (or, for the GPU + hub ones, parses and resolves), and the README's
test command is the one CI runs."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grass_llm.recipes.train_config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _cli(
    args: list[str], cwd: Path, timeout: int = 240, data_dir: Path | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if data_dir is not None:
        env["GRASS_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "grass_llm", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _commands(block: str) -> list[list[str]]:
    """The shell lines of a block, comments stripped, split into words ($PWD left literal)."""
    out = []
    for line in block.splitlines():
        line = re.split(r"\s#\s", line)[0].strip()
        if line and not line.startswith("#"):
            out.append(shlex.split(line))
    return out


def test_readme_test_command_is_what_ci_runs():
    ci_line = [
        ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.startswith("python3 -m venv")
    ]
    assert len(ci_line) == 1
    assert ci_line[0] in [b.strip() for b in _blocks("bash")], "README test command != .ci/run"


def test_readme_demo_command_trains_and_prints_where_everything_is(tmp_path):
    demo = _blocks("bash")[0].strip()
    assert demo == 'python3 -m venv .venv && .venv/bin/pip install -e ".[hf]" && .venv/bin/grass-llm train'
    proc = _cli(["train"], cwd=tmp_path)  # the installed entry point runs grass_llm.cli:main, as here
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "demo"
    for label, path in [
        ("checkpoint:", "runs/demo/checkpoints/step-000200"),
        ("log:", "runs/demo/log.jsonl"),
        ("plots:", "runs/demo/plots/"),
    ]:
        assert f"{label}" in proc.stdout and path in proc.stdout
    assert (run / "checkpoints" / "step-000200").is_dir()
    assert (run / "log.jsonl").stat().st_size > 0
    assert {p.name for p in (run / "plots").glob("*.png")} >= {"layers_heatmap.png", "loss.png"}
    # it ends by showing what GRASS taught the pretrained model, and where the layer heatmap is
    found = re.search(
        r"held-out accuracy: ([\d.]+)% -> ([\d.]+)% \(64 arithmetic questions not in the training",
        proc.stdout,
    )
    assert found, proc.stdout
    before, after = map(float, found.groups())
    assert (
        f"held-out accuracy before training: {before}% (64 arithmetic questions not in the training data)"
        in (proc.stdout)
    )
    assert after >= before + 30, (before, after)
    assert (
        "layer heatmap: runs/demo/plots/layers_heatmap.png  (which decoder layers trained at each step)"
        in proc.stdout
    )
    assert "Traceback" not in proc.stderr and "warnings.warn" not in proc.stderr


def test_readme_command_line_block_runs(tmp_path, eval_data):
    """The `## Command line` block, run top to bottom in a scratch directory (shortened runs). The eval reads
    $GRASS_DATA_DIR's data, or the records shipped in tests/data on a fresh clone."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    block = next(b for b in _blocks("bash") if b.lstrip().startswith("grass-llm train [--config"))
    cmds = _commands(block)
    assert [c[:2] for c in cmds] == [
        ["grass-llm", "train"],
        ["grass-llm", "train"],
        ["grass-llm", "train"],
        ["grass-llm", "eval"],
        ["grass-llm", "memory"],
        ["grass-llm", "plot"],
    ]
    # 1: the synopsis; run as `grass-llm train --help`
    proc = _cli(["train", "--help"], tmp_path)
    assert proc.returncode == 0 and "grass_llm" not in proc.stderr
    # 2: the LISA demo, shortened (the README's keys + max_steps/save_every)
    proc = _cli([*cmds[1][1:], "max_steps=12", "save_every=6"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "demo-lisa" / "checkpoints" / "step-000012").is_dir()
    # 3: --resume continues the demo run from its latest checkpoint (stopped at step 8 of 12 here)
    proc = _cli(["train", "max_steps=12", "save_every=4", "stop_at_step=8"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _cli([cmds[2][1], "max_steps=12", "save_every=4", *cmds[2][2:]], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "demo" / "checkpoints" / "step-000012").is_dir()
    # 4: eval of the run's final model on the arithmetic sets (2 items each)
    final = tmp_path / "runs" / "demo" / "final"
    args = [a.replace("RUN/final", str(final)) for a in cmds[3][1:]]
    out = ["--out", str(tmp_path / "eval")]
    proc = _cli([*args, "--limit", "2", "--max-new-tokens", "4", *out], tmp_path, data_dir=eval_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "| MultiArith | AddSub | GSM8K | AQuA | SingleEq | SVAMP | Avg. |" in table
    # 5: memory estimate of the run's model config, no GPU
    args = [a.replace("path/to/config.json", str(final / "config.json")) for a in cmds[4][1:]]
    proc = _cli([*args, "--seq-len", "64", "--json", str(tmp_path / "mem.json")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    estimates = json.loads((tmp_path / "mem.json").read_text())
    # each method's whole run, then the steps it comes from: the training step, and GRASS's probing step
    # (--phase both, the default)
    assert [(e["method"], e["phase"]) for e in estimates] == [
        ("grass", "run"),
        ("grass", "train"),
        ("grass", "probe"),
        ("lora", "run"),
        ("lora", "train"),
        ("fft", "run"),
        ("fft", "train"),
    ] and all(e["peak"] > 0 for e in estimates)
    # 6: plots of the run
    proc = _cli([cmds[5][1], "runs/demo"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "demo" / "plots" / "layers_heatmap.png").stat().st_size > 0


def test_readme_real_setting_commands_resolve(tmp_path):
    """The TinyLlama commands need a GPU and the hub: check that their config and flags resolve."""
    block = next(b for b in _blocks("bash") if "tinyllama-math-grass.yaml" in b)
    train, evaluate = [c for c in _commands(block) if c[0] == "grass-llm"]
    cfg_path = ROOT / train[train.index("--config") + 1]
    cfg = load_train_config(cfg_path, overrides=[a.replace("$PWD", str(tmp_path)) for a in train[4:]])
    assert (
        cfg.method == "grass"
        and cfg.model.startswith("TinyLlama/")
        and cfg.data_dir == str(tmp_path / "LLM-Adapters")
    )
    assert cfg.out_dir + "/final" == evaluate[evaluate.index("--model") + 1]
    for variant in ("grass-static", "lisa", "fft", "lora-r128", "lora-r256", "dora"):
        assert (ROOT / "configs" / f"tinyllama-math-{variant}.yaml").is_file()
    proc = _cli([evaluate[1], "--help"], tmp_path)
    flags = set(re.findall(r"--[a-z-]+", proc.stdout))
    assert {a for a in evaluate if a.startswith("--")} <= flags


def test_readme_python_snippet_runs(tiny_llama, tmp_path, monkeypatch):
    """The `Use it in your own loop` snippet, with a tiny model and a few batches."""
    snippet = next(b for b in _blocks("python") if "GrassOptimizer(model" in b)
    ids = torch.randint(0, 64, (4, 2, 12))
    loader = [{"input_ids": x, "labels": x} for x in ids]
    ns = {"torch": torch, "model": tiny_llama(), "loader": loader}
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), ns)
    assert ns["opt"].global_step == 4 and (tmp_path / "opt.pt").stat().st_size > 0


@pytest.mark.parametrize("script", ["grass_loop.py", "hf_trainer.py"])
def test_examples_run(script, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_readme_fsdp2_commands_run(tmp_path):
    """The README's FSDP2 block: the torchrun line on 2 CPU processes with the demo settings (run.yaml
    stands for the user's config), and the per-rank memory estimate on a tiny config."""
    block = next(b for b in _blocks("bash") if "distributed.strategy=fsdp2" in b)
    train_line, memory_line = [line for line in block.strip().splitlines() if line.strip()]
    words = shlex.split(train_line)
    words[words.index("--nproc_per_node") + 1] = "2"
    i = words.index("--config")
    words[i : i + 2] = ["max_steps=6", "save_every=3", "plots=false", "tensorboard=false", "eval_heldout=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "demo" / "checkpoints" / "step-000006" / "sharded" / ".metadata").is_file()
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=256
    ).save_pretrained(tmp_path / "cfg")
    args = shlex.split(memory_line.replace("path/to/config.json", str(tmp_path / "cfg" / "config.json")))
    proc = _cli([*args[1:], "--seq-len", "32", "--json", str(tmp_path / "mem.json")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "mem.json").read_text())
    assert {r["method"] for r in rows} == {"grass", "fft", "lora"} and all(r["world_size"] == 8 for r in rows)


def test_readme_torchrun_command_runs_on_two_cpu_processes(tmp_path):
    """The README's torchrun line with 2 processes and the demo settings (the TinyLlama config needs a GPU)."""
    line = next(b for b in _blocks("bash") if b.startswith("torchrun")).strip()
    words = shlex.split(line)
    assert words[words.index("--config") + 1] == "configs/tinyllama-math-grass.yaml"
    words[words.index("--nproc_per_node") + 1] = "2"
    i = words.index("--config")
    words[i : i + 2] = ["max_steps=25", "save_every=0", "plots=false", "tensorboard=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes x 4 rows" in proc.stdout and proc.stdout.count("done: 25 steps") == 1


def test_ci_run_sets_grass_data_dir_only_when_the_data_is_there(tmp_path):
    """.ci/run on a fresh clone without ../shared beside it leaves GRASS_DATA_DIR unset (the tests then use
    tests/data); beside ../shared/data it points there; a GRASS_DATA_DIR already set is kept."""
    line = next(
        ln
        for ln in (ROOT / ".ci" / "run").read_text().splitlines()
        if "GRASS_DATA_DIR" in ln and "export" in ln
    )
    clone = tmp_path / "clone"
    clone.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "GRASS_DATA_DIR"}

    def value(extra_env: dict | None = None) -> str:
        script = f'{line}\necho "${{GRASS_DATA_DIR-unset}}"'
        proc = subprocess.run(
            ["bash", "-c", script],
            cwd=clone,
            env={**env, **(extra_env or {})},
            capture_output=True,
            text=True,
            check=True,
        )
        return proc.stdout.strip()

    assert value() == "unset"
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert Path(value()) == (tmp_path / "shared" / "data").resolve()
    assert value({"GRASS_DATA_DIR": "/elsewhere"}) == "/elsewhere"


def test_bundled_eval_data_is_the_first_records_of_each_set():
    """tests/data holds the first 4 records of every evaluation set grass-llm eval knows (HellaSwag's test set is
    not in the snapshot), readable by the evaluator; they equal the full files' when those are here."""
    from conftest import BUNDLED_DATA, SHARED_DATA

    from grass_llm import evaluate as E
    from grass_llm.data import load_records

    assert (BUNDLED_DATA / "llm-adapters" / "SOURCE.md").is_file()
    for name in E.GROUPS["all"]:
        if name == "HellaSwag":
            continue
        records = load_records(E.benchmark_path(name, BUNDLED_DATA), required=("instruction", "answer"))
        assert len(records) == 4, name
        if SHARED_DATA is not None and (SHARED_DATA / "llm-adapters" / "dataset").is_dir():
            full = json.loads(E.benchmark_path(name, SHARED_DATA).read_text())
            assert records == full[:4], name
