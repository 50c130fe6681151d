"""benchmarks/gpu_check.py without a GPU: argument checks and a dry run of every step on the CPU."""

from __future__ import annotations

import json
import os
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


def test_dry_run_runs_every_check_on_the_cpu_one_process_per_row(gpu_check, tmp_path, monkeypatch):
    """Every memory row, and two throughput rows (the others differ only in their settings), each measured in a
    fresh process of its own (issue 17.3: rows in one process counted each other's memory)."""
    two = [
        r for r in gpu_check.THROUGHPUT if r[0] in ("GRASS γ=2, offload + overlap", "GRASS γ=2, no offload")
    ]
    monkeypatch.setattr(gpu_check, "THROUGHPUT", two)
    rc = gpu_check.main(["--dry-run", "--skip-tests", "--out", str(tmp_path), "--steps", "1"])
    assert rc == 0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN on the CPU" in md and "device: **CPU (dry run)**" in md and "all checks passed" in md
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["label"] for r in res["memory"]] == [label for label, _, _ in gpu_check.MEMORY_CHECKS]
    assert all(r["passed"] and abs(r["relative_error"]) <= 0.05 for r in res["memory"])
    rows = {r["label"]: r for r in res["throughput"]}
    assert len(rows) == 2 and all(r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["GRASS γ=2, offload + overlap"]["offload"] and not rows["GRASS γ=2, no offload"]["offload"]
    pids = [r["pid"] for r in res["memory"] + res["throughput"]]
    assert len(set(pids)) == len(pids) and os.getpid() not in pids


def test_a_failing_row_process_is_a_failed_row(gpu_check):
    spec = {"kind": "memory", "model": "tiny", "label": "x", "method": "no-such-method", "kw": {}}
    row = gpu_check.in_fresh_process(dict(spec, dry_run=True, seq_len=16))
    assert row["passed"] is False and "row process failed" in row["error"] and row["label"] == "x"


def test_bad_arguments_exit_2(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--models", "gpt5"]) == 2
    assert "gpt5" in capsys.readouterr().err
    assert gpu_check.main(["--dry-run"]) == 2  # would overwrite the committed GPU report
    assert "--out" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gpu_check.main(["--out", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_help_lists_the_checks(gpu_check, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--help"])
    assert exc.value.code == 0
    assert "max_memory_allocated" in capsys.readouterr().out
    assert sys.modules["gpu_check"] is gpu_check
