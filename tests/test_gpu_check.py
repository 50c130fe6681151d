"""benchmarks/gpu_check.py and benchmarks/gpu_all.sh without a GPU: argument checks, the row scheduler, the time
budget, and dry runs of every kind of row on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_check

    return gpu_check


def test_dry_run_runs_every_kind_of_row_on_the_cpu_one_process_per_row(gpu_check, tmp_path, monkeypatch):
    """A whole-run memory row and the throughput rows (a GRASS run average with its states offloaded per
    period, as on a GPU, its worst case, LoRA), each measured in a fresh process of its own (issue 17.3: rows in
    one process counted each other's memory); every row names its method, settings, device, date and commit."""
    monkeypatch.setattr(gpu_check, "MEMORY_CHECKS", [("GRASS γ=2", "grass", {})])
    period = {"overrides": {"grass.offload": "period", "grass.period": 4}}
    monkeypatch.setattr(
        gpu_check,
        "THROUGHPUT",
        [
            ("LoRA r=128", "lora", {"rank": 128}, "steps"),
            ("GRASS γ=2, run average", "grass", period, "run"),
            ("GRASS γ=2, worst case (layers 0..γ-1)", "grass", period, "worst"),
        ],
    )
    argv = ["--dry-run", "--out", str(tmp_path), "--steps", "1", "--periods", "2", "--commit", "abc1234"]
    assert gpu_check.main(argv) == 0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN on the CPU" in md and "device: **CPU (dry run)**" in md and "all checks passed" in md
    assert "git abc1234" in md and "| GRASS γ=2, run average | **" in md
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not res["in_progress"] and res["passed"] and res["commit"] == "abc1234"
    (mem,) = res["memory"]
    assert mem["passed"] and abs(mem["relative_error"]) <= gpu_check.TOLERANCE
    assert mem["whole_run_from"] in ("train", "probe") and set(mem["estimate_steps"]) == {"train", "probe"}
    rows = {r["label"]: r for r in res["throughput"]}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] == 0  # (no CUDA: no max_memory_allocated)
        assert r["device"] == "CPU (dry run)" and r["commit"] == "abc1234" and r["date_utc"]
        assert r["settings"]["method"] == r["method"]
    run = rows["GRASS γ=2, run average"]
    assert run["settings"]["offload"] == "period" and run["settings"]["period"] == 4
    assert len(run["draws"]) == 3  # the first draw and one at the end of each of the 2 timed periods
    assert run["bytes_to_device"] > 0 and run["bytes_to_host"] > 0  # the resamples moved states
    tokens = run["batch"] * run["seq_len"]
    expected = 3750 * tokens / (150 * run["t_probe_s"] + 3600 * run["t_train_s"])
    assert run["tokens_per_s"] == pytest.approx(expected) == run["run_average_tokens_per_s"]
    if run.get("first_use_units"):  # layers drawn for the first time in the timed periods: paid once a run
        assert run["amortized_tokens_per_s"] >= 0.99 * run["tokens_per_s"]
    worst = rows["GRASS γ=2, worst case (layers 0..γ-1)"]
    assert worst["active_layers"] == [0, 1] and worst["tokens_per_s"] == worst["train_tokens_per_s"]
    pids = [r["pid"] for r in [mem, *rows.values()]]
    assert len(set(pids)) == len(pids) and os.getpid() not in pids


def test_a_spent_budget_leaves_a_complete_report_of_what_ran(gpu_check, tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "1", "--methods", "fft"]) == 1
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = res["memory"] + res["throughput"]
    assert len(rows) == 2 and all(r.get("not_run") and "time budget" in r["error"] for r in rows)
    assert "NOT RUN (time budget)" in (tmp_path / "gpu_check.md").read_text()


class _FakeRow:
    """Stands for a row process: finishes at the second poll; 'x' runs out of memory beside another row."""

    running: list = []  # noqa: RUF012
    peak = 0.0

    def __init__(self, spec, gib, timeout):
        self.spec, self.gib, self.polls = spec, gib, 0
        _FakeRow.running.append(self)
        _FakeRow.peak = max(_FakeRow.peak, sum(r.gib for r in _FakeRow.running))

    def poll(self):
        self.polls += 1
        if self.polls < 2:
            return None
        crowded = len(_FakeRow.running) > 1
        _FakeRow.running.remove(self)
        row = {"kind": "memory", "model": self.spec["model"], "label": self.spec["label"], "passed": True}
        if self.spec["label"] == "x" and crowded:
            return dict(row, passed=False, error="out of memory", oom=True)
        return dict(row, estimate=1, measured=1, relative_error=0.0, alone=bool(self.spec.get("alone")))


def test_memory_rows_share_the_gpu_within_its_capacity_and_an_oom_runs_again_alone(gpu_check, monkeypatch):
    _FakeRow.running, _FakeRow.peak = [], 0.0
    monkeypatch.setattr(gpu_check, "_Running", _FakeRow)
    monkeypatch.setattr(gpu_check.time, "sleep", lambda s: None)
    monkeypatch.setattr(gpu_check, "_expected_gib", lambda spec: spec["gib"])
    specs = [
        {"kind": "memory", "model": "m", "label": label, "method": "fft", "dry_run": False, "gib": gib}
        for label, gib in [("a", 50), ("b", 20), ("x", 18), ("c", 18), ("d", 4)]
    ]
    rows = gpu_check.check_memory(specs, gpu_check.Budget(None), capacity_gib=100, parallel=6, log=lambda m: None)
    assert [r["label"] for r in rows] == ["a", "b", "x", "c", "d"]  # in the order asked for
    assert all(r["passed"] for r in rows) and rows[2]["alone"]
    assert _FakeRow.peak <= 100


def test_a_failing_row_process_is_a_failed_row(gpu_check):
    spec = {"kind": "memory", "model": "tiny", "label": "x", "method": "no-such-method", "kw": {}}
    row = gpu_check.in_fresh_process(dict(spec, dry_run=True, seq_len=16))
    assert row["passed"] is False and "row process failed" in row["error"] and row["label"] == "x"


def test_bad_arguments_exit_2(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--models", "gpt5"]) == 2
    assert "gpt5" in capsys.readouterr().err
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--methods", "sgd"]) == 2
    assert "sgd" in capsys.readouterr().err
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--probe-steps", "3"]) == 2
    assert "--probe-steps" in capsys.readouterr().err
    assert gpu_check.main(["--dry-run"]) == 2  # would overwrite the committed GPU report
    assert "--out" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gpu_check.main(["--out", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_help_lists_the_checks(gpu_check, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "max_memory_allocated" in out and "--budget-s" in out and "run average" in out
    assert sys.modules["gpu_check"] is gpu_check


@pytest.mark.slow  # (gpu_all.sh runs gpu_check, whose dry run the test above runs)
def test_gpu_all_dry_run(tmp_path):
    """The one GPU command's dry run: the CUDA tests (skipped without CUDA), gpu_check, then fit_check's plan
    run, into $OUT (4 files and fit/, the short table last)."""
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "COMMIT": "abc1234",
        "GPU_CHECK_ARGS": "--methods fft --steps 1",
        "PYTHONPATH": os.pathsep.join([str(BENCH.parent / "src"), str(BENCH)]),
    }
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_all.sh"), "--dry-run"], capture_output=True, text=True, timeout=400, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cuda-tests.log",
        "fit",
        "gpu_all.log",
        "gpu_check.json",
        "gpu_check.md",
    ]
    assert sorted(p.name for p in (tmp_path / "fit").iterdir()) == ["fit_check.json", "fit_check.md"]
    log = (tmp_path / "gpu_all.log").read_text()
    assert "== cuda tests rc=0" in log and "== gpu_check rc=0" in log and "commit abc1234" in log
    assert "== fit_check rc=0" in log and "fit_check rc=0" in log.splitlines()[-1]
    assert proc.stdout.strip().splitlines()[-1].startswith("  tput tiny")
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["commit"] == "abc1234" and [r["method"] for r in res["memory"] + res["throughput"]] == ["fft", "fft"]
