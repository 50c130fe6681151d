"""Smoke tests of the benchmark scripts: each runs in its tiny ``--smoke`` mode and writes its table.

They check the scripts run end to end and produce well-formed Markdown + JSON, not the numbers.
The accuracy study has its own file, ``test_accuracy_benchmark.py`` (smoke + determinism).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=BENCH.parent,
    )


@pytest.mark.skipif(not (BENCH / "throughput.py").exists(), reason="no benchmarks/")
def test_throughput_smoke(tmp_path: Path) -> None:
    proc = _run("throughput.py", "--threads", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "throughput.md").read_text()
    assert "SMOKE RUN" in md and "python benchmarks/throughput.py --smoke" in md
    for row in ("| fft |", "| lora-r128 |", "| lisa-g2 |", "| grass-g2 |", "grass-g2-offload"):
        assert row in md
    assert "Table 8" in md and "This run is on the CPU" in md and "machine load:" in md
    res = json.loads((tmp_path / "throughput.json").read_text())
    assert res["smoke"] and res["methods"]["fft"]["tokens_per_s"] > 0
    assert {"grass", "no-mgn", "probe"} <= set(res["overhead"])
    # GRASS's run average in the paper's shape: Tp probing steps and T - Tp training steps
    ra, T, Tp = res["run_average"], res["total_steps"], res["probe_steps"]
    tokens = res["batch_size"] * res["seq_len"]
    assert ra["tokens_per_s"] == pytest.approx(T * tokens / (Tp * ra["t_probe_s"] + (T - Tp) * ra["t_train_s"]))
    assert ra["vs_lora"] == pytest.approx(ra["tokens_per_s"] / res["methods"]["lora-r128"]["tokens_per_s"])
    assert "| **grass-g2, run average** |" in md


@pytest.mark.skipif(not (BENCH / "memory_fsdp2.py").exists(), reason="no benchmarks/")
def test_memory_fsdp2_smoke(tmp_path: Path) -> None:
    """Every row (GRASS train / probe with frozen and full checkpointing, FFT, LoRA) on 8 fake FSDP2 ranks."""
    proc = _run("memory_fsdp2.py", "--out", str(tmp_path), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "memory_fsdp2_smoke.json").read_text())
    rows = res["rows"]
    assert len(rows) == 6 and all(r["peak"] > 0 and r["world_size"] == 8 for r in rows)
    assert "FSDP2 x8 (per rank)" in (tmp_path / "memory_fsdp2_smoke.md").read_text()


@pytest.mark.skipif(not (BENCH / "bf16_updates.py").exists(), reason="no benchmarks/")
def test_bf16_updates_smoke(tmp_path: Path) -> None:
    """The bf16 update benchmark runs on the accuracy study's pretrained model (pretrained into an empty
    cache here) and writes one row per variant and learning rate."""
    proc = _run("bf16_updates.py", "--out", str(tmp_path), "--cache", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "bf16_updates.md").read_text()
    assert "SMOKE RUN" in md and "weights sha256" in md
    for row in (
        "| fp32 |",
        "| bf16 nearest |",
        "| bf16 kahan |",
        "| bf16 stochastic |",
        "| bf16 fp32-master |",
    ):
        assert md.count(row) == 2, row  # one per learning rate
    res = json.loads((tmp_path / "bf16_updates.json").read_text())
    fp32 = [r for r in res["runs"] if r["name"] == "fp32"]
    assert len(res["runs"]) == 10 and all(r["update_error"] == 0.0 for r in fp32)
    assert all(0.0 <= r["changed_after_all"] <= 1.0 for r in res["runs"])
    assert list((tmp_path / "cache").rglob("pretrained-*.pt")), "the pretrained model is cached"


# ------------------------------------------------------------------------------------------------
# the commands the docs list use real flags and settings keys
DOCS = [BENCH.parent / "docs" / "reproduce.md", BENCH / "README.md"]


def _doc_commands(path: Path) -> list[str]:
    """Every ``grass-llm train|eval|memory`` / ``python benchmarks/...`` command in inline code or a code block."""
    import re

    text = path.read_text()
    chunks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    chunks += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    cmds = []
    for chunk in chunks:
        for line in chunk.splitlines():
            line = line.split(" #")[0].strip()
            for part in line.split("&&"):
                part = re.sub(r"^(nice -n \d+ )?(\.venv/bin/)?", "", part.strip())
                if part.startswith(
                    ("grass-llm train", "grass-llm eval", "grass-llm memory", "python benchmarks/")
                ):
                    cmds.append(part)
    return cmds


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_doc_commands_are_valid(doc: Path) -> None:
    import shlex

    if not doc.exists():
        pytest.skip(f"no {doc}")
    from grass_llm.cli import build_parser
    from grass_llm.recipes.train_config import load_train_config

    cmds = _doc_commands(doc)
    assert cmds, f"no commands found in {doc}"
    eval_outs: list[str] = []
    for cmd in cmds:
        argv = shlex.split(cmd.replace("$LLMA", "/tmp/LLM-Adapters"))
        if argv[:2] == ["grass-llm", "eval"] and "--model" not in argv:
            continue  # a mention of a flag in the prose, not a command
        if argv[0] == "grass-llm":
            args = build_parser(argv[1]).parse_args(argv[1:])  # unknown flags exit with status 2
            if argv[1] == "memory":
                assert args.model, cmd
            elif argv[1] == "train":
                load_train_config(args.config and str(BENCH.parent / args.config), args.overrides)
            else:
                assert args.out, f"{cmd}: without --out every run's final/ would write eval/final"
                eval_outs.append(args.out)
        else:
            script = (BENCH.parent / argv[1]).read_text()
            for flag in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
                assert f'"{flag}"' in script, f"{cmd}: {argv[1]} has no {flag}"
    assert len(eval_outs) == len(set(eval_outs)), "two eval commands write the same directory"


# ------------------------------------------------------------------------------------------------
# memory_diagnose.py / gpu_diagnose.sh: the GPU diagnosis of the estimate (issue 17.2)
def _diagnose():
    import importlib

    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("memory_diagnose")
    finally:
        sys.path.remove(str(BENCH))


def test_gpu_diagnose_dry_run(tmp_path: Path) -> None:
    """The driver's dry run: a stage runs memory_diagnose.py --dry-run in its own process and writes its JSON
    (a Gemma-family row here: tied embeddings, one KV head)."""
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "STAGES": "gemma-lisa",
        "PYTHONPATH": os.pathsep.join([str(BENCH.parent / "src"), str(BENCH)]),
    }
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_diagnose.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diagnose.log", "gemma-lisa.json"]
    log = (tmp_path / "diagnose.log").read_text()
    assert "== gemma-lisa rc=0" in log and "status 0" in log
    for name, method in (("gemma-lisa", "lisa"),):
        res = json.loads((tmp_path / f"{name}.json").read_text())
        assert res["setting"]["method"] == method and res["setting"]["dry_run"]
        run, est = res["device_run"], res["estimate"]
        assert run["measured"] > 0 and est["peak"] > 0
        # the real CPU step and the fake estimate count the same storages (within 2%)
        assert abs(est["peak"] - run["measured"]) <= 0.02 * run["measured"], res["summary"]
        assert sum(i["bytes"] for i in est["live_at_peak_top"]) <= est["peak"]
        assert any(g["group"] == "weights" for g in est["live_at_peak_groups"])
        assert all(row["group"] for row in res["diff_live_at_peak"])
        assert res["sdpa_calls"] and res["sdpa_calls"][0]["backend"]
    gemma = json.loads((tmp_path / "gemma-lisa.json").read_text())
    assert "tied" in gemma["setting"]["config"] or gemma["sdpa_calls"][0]["enable_gqa"]


def test_diagnose_replays_the_allocator_history() -> None:
    """The peak of the recorded step, the blocks live then, and their labels, from a synthetic allocator trace."""
    d = _diagnose()
    snapshot = {
        "segments": [
            {
                "device": 0,
                "blocks": [
                    {"address": 1000, "size": 1024, "requested_size": 1000, "state": "active_allocated"},
                    {"address": 9000, "size": 512, "state": "inactive"},
                ],
            },
            {"device": 1, "blocks": [{"address": 7, "size": 512, "state": "active_allocated"}]},
        ]
    }
    before = d.live_blocks(snapshot, 0)
    assert before == {1000: {"size": 1024, "block_size": 1024, "frames": []}}
    py = [
        {"filename": "/x/torch/nn/modules/module.py", "line": 1, "name": "_call_impl"},
        {"filename": "/x/transformers/models/llama/modeling_llama.py", "line": 42, "name": "forward"},
    ]
    trace = [
        {"action": "alloc", "addr": 64, "size": 100},  # before the marker: ignored
        {"action": "free_requested", "addr": 64, "size": 100},
        {"action": "alloc", "addr": 5000, "size": d.MARKER_BYTES},
        {"action": "free_requested", "addr": 5000, "size": d.MARKER_BYTES},
        {"action": "alloc", "addr": 2000, "size": 4096, "frames": py},  # an op output
        {"action": "alloc", "addr": 3000, "size": 100, "frames": py},  # not an op output (a workspace)
        {"action": "free_requested", "addr": 2000, "size": 4096},
        {"action": "alloc", "addr": 4000, "size": 8192},  # an op output: the peak
        {"action": "free_requested", "addr": 4000, "size": 8192},
        {"action": "free_requested", "addr": 3000, "size": 100},
    ]
    m = d.find_marker(trace, 5000)
    assert m == 2 and d.find_marker(trace, 6000) == -1
    initial, peak, live, allocs = d.replay(before, trace, m + 2)
    assert initial == 1024 and peak == 1024 + 512 + 8192
    assert sorted(live) == [1000, 3000, 4000]
    labels = d.label_allocs(
        allocs,
        [
            (2000, 4096, "forward fwd model.layers.3.mlp aten.mm.default"),
            (4000, 8192, "backward bwd model.layers.0.mlp MmBackward0 aten.mm.default"),
        ],
    )
    assert sorted(labels.values()) == [
        "backward bwd model.layers.0.mlp MmBackward0 aten.mm.default",
        "forward fwd model.layers.3.mlp aten.mm.default",
    ]
    top, items = d.describe_peak(live, labels, {1000: "weights model.embed_tokens.weight"}, top=2)
    assert [i["bytes"] for i in top] == [8192, 1024]
    groups = {i["group"]: i for i in items}
    assert set(groups) == {
        "backward bwd model.layers.N.mlp MmBackward0 aten.mm.default",
        "weights",
        "[step, not an op output] llama/modeling_llama.py:42 forward",
    }
    diff = d.diff_groups(items, [{"group": "weights", "bytes": 1024}], top=5)
    assert {r["group"] for r in diff} == set(groups) - {"weights"}


def test_diagnose_small_model_is_the_cuda_tests_model() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_tm", BENCH.parent / "tests" / "test_memory.py")
    tm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tm)
    assert _diagnose().SMALL == tm.SMALL


def test_diagnose_without_cuda_exits_2(capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the no-CUDA error")
    d = _diagnose()
    assert d.main(["--model", "tiny"]) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert d.main(["--dry-run", "--method", "qlora"]) == 2
    assert "qlora" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# provenance: the commit is the project's own
def _load_common(path: Path):
    import importlib.util

    name = f"_common_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # (its dataclasses look their module up)
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[name]
    return mod


def _git(cwd: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_hardware_names_the_projects_own_commit_or_unknown(tmp_path: Path) -> None:
    """hardware()'s git commit is this project's: a copy exported without .git into another checkout reports
    "unknown" (not the enclosing checkout's commit), as does a copy inside a repository of another project."""
    import shutil

    if shutil.which("git") is None:
        pytest.skip("needs git")
    outer = tmp_path / "outer"
    outer.mkdir()
    _git(outer, "init", "-q")
    (outer / "other.txt").write_text("another project\n")
    _git(outer, "add", "other.txt")
    _git(outer, "commit", "-q", "-m", "other")
    export = outer / "export"
    (export / "benchmarks").mkdir(parents=True)
    shutil.copy(BENCH / "common.py", export / "benchmarks" / "common.py")
    (export / "src" / "grass_llm").mkdir(parents=True)
    (export / "src" / "grass_llm" / "__init__.py").write_text("")
    exported = _load_common(export / "benchmarks" / "common.py")
    assert exported.git_commit() == "unknown" and exported.git_uncommitted() == []
    # a repository of its own that is not this project (it tracks neither file) is not either
    _git(export, "init", "-q")
    (export / "x.txt").write_text("x\n")
    _git(export, "add", "x.txt")
    _git(export, "commit", "-q", "-m", "x")
    assert _load_common(export / "benchmarks" / "common.py").git_commit() == "unknown"
    # once it tracks the project's files it is the project's checkout
    _git(export, "add", "benchmarks/common.py", "src/grass_llm/__init__.py")
    _git(export, "commit", "-q", "-m", "project")
    assert _load_common(export / "benchmarks" / "common.py").git_commit() == _git(
        export, "rev-parse", "--short", "HEAD"
    )
    # this checkout: its own commit
    here = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=BENCH.parent, capture_output=True, text=True
    )
    if here.returncode == 0:
        assert _load_common(BENCH / "common.py").git_commit() == here.stdout.strip()


def test_diagnose_record_step_with_a_stand_in_allocator(monkeypatch) -> None:
    """record_step's plumbing (history calls, snapshot, replay, labels) on the CPU, with torch.cuda's memory
    functions standing in for a GPU's: a trace in which the step's one large block is an op output."""
    import torch

    from grass_llm.memory import LiveBytesTracker, training_step

    d = _diagnose()
    cfg = d.config_for("tiny", dry_run=True)
    step = training_step(cfg, "fft", device="cpu", seq_len=16)
    step.run(1, 16)
    calls = []
    tracker = LiveBytesTracker(device="cpu", origins=True)
    tracker.track(list(step.model.parameters()), "weights")

    def trace():  # the marker, then one allocation per storage the tracker saw in the step (addresses, sizes)
        events = [
            {"action": "alloc", "addr": 5000, "size": d.MARKER_BYTES},
            {"action": "free_requested", "addr": 5000, "size": d.MARKER_BYTES},
        ]
        for e in tracker.allocations[len(params) :]:
            if e.ptr:  # (an empty tensor allocates nothing)
                events.append({"action": "alloc", "addr": e.ptr, "size": e.nbytes, "frames": []})
        events.append({"action": "alloc", "addr": 1, "size": 32 * 2**20, "frames": []})  # a workspace
        return events

    params = list(step.model.parameters())

    def history(enabled="all", context="all", stacks="all", max_entries=1, device=None, clear_history=False):
        calls.append({"enabled": enabled, "stacks": stacks, "clear_history": clear_history})

    fake = {
        "_record_memory_history": history,
        "_snapshot": lambda *a, **k: {"segments": [], "device_traces": [trace()]},
    }
    for name, fn in fake.items():
        monkeypatch.setattr(torch.cuda.memory, name, fn)
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 123)
    monkeypatch.setattr(d, "allocate_marker", lambda dev: 5000)
    args = d.parse(["--dry-run", "--top", "5"])
    args.seq_len = 16
    out = d.record_step(step, args, torch.device("cpu"), 0, tracker, {})
    assert calls and calls[0].get("clear_history") is True
    assert out["recorded_step_peak"] == 123 and out["tracker_peak"] > 0 and "error" not in out
    assert out["allocs_labelled"] == out["allocs_in_step"] - 1  # every op output labelled, not the workspace
    groups = {g["group"] for g in out["live_at_peak_groups"]}
    assert "[step, not an op output] (no Python frames)" in groups
    assert any(g.startswith("forward ") or g.startswith("backward ") for g in groups)
    plain = d.record_step(step, args, torch.device("cpu"), 0, None, {})
    assert plain["allocs_labelled"] == 0 and "tracker_peak" not in plain


def test_gpu_rows_runs_a_row_on_the_cpu() -> None:
    """benchmarks/gpu_rows.py (how benchmarks/results/gpu-h200-2026-12-04/rows.log was measured): one row of
    the same code on the CPU with a tiny model."""
    env = {**os.environ, "QR_DEVICE": "cpu", "QR_MODEL": "tiny", "QR_SEQ": "16", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(BENCH.parent / "src"), str(BENCH)])}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_rows.py"), "row", json.dumps(["grass", {}, [0, 1], 2])],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.split("ROW ", 1)[1])
    assert row["method"] == "grass" and row["tok_s"] > 0 and row["residency"] == "off"
