"""Smoke tests of the benchmark scripts: each runs in its tiny ``--smoke`` mode and writes its table.

They check the scripts run end to end and produce well-formed Markdown + JSON, not the numbers.
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
    assert "Table 8" in md and "No GPU was available" in md and "machine load:" in md
    res = json.loads((tmp_path / "throughput.json").read_text())
    assert res["smoke"] and res["methods"]["fft"]["tokens_per_s"] > 0
    assert {"grass", "no-mgn", "probe"} <= set(res["overhead"])


@pytest.mark.skipif(not (BENCH / "accuracy.py").exists(), reason="no benchmarks/")
def test_accuracy_smoke(tmp_path: Path) -> None:
    proc = _run("accuracy.py", "--out", str(tmp_path), "--cache", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "accuracy.md").read_text()
    assert "SMOKE RUN" in md
    for method in ("fft", "lora", "lisa", "grass", "grass-static"):
        assert f"| {method} |" in md
    res = json.loads((tmp_path / "accuracy.json").read_text())
    assert len(res["runs"]) == 5 and all(0 <= r["accuracy"] <= 100 for r in res["runs"])
    assert list((tmp_path / "cache").rglob("pretrained-*.pt")), "the pretrained model is cached"
