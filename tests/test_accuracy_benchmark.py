"""The accuracy study (``benchmarks/accuracy.py``) in its ``--smoke`` mode, run twice as a user runs it:
it writes its tables and plots, the same command gives the same numbers (here also with another
number of worker processes and the pretrained model rebuilt in a fresh cache), and without the
optional ``badam`` package the BAdam row is skipped with a note instead of failing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCH / "accuracy.py"
#: run the script with ``badam`` unimportable (as in CI, where the bench extra is not installed)
HIDE_BADAM = (
    "import os, runpy, sys; sys.modules['badam'] = None; sys.argv = sys.argv[1:]; "
    "sys.path.insert(0, os.path.dirname(sys.argv[0])); runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _badam_installed() -> bool:
    return importlib.util.find_spec("badam") is not None


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict[str, Path]:
    """Two smoke runs of ``--study all``, each pretraining in its own empty cache: ``a`` in one
    process, ``b`` with 2 worker processes and ``badam`` hidden."""
    out = {}
    for name, workers, prefix in (("a", 1, []), ("b", 2, ["-c", HIDE_BADAM])):
        d = tmp_path_factory.mktemp(f"accuracy-{name}")
        cmd = [sys.executable, *prefix, str(SCRIPT), "--smoke", "--study", "all", "--workers", str(workers)]
        cmd += ["--out", str(d), "--cache", str(d / "cache")]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=240,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            cwd=BENCH.parent,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        (d / "stderr.txt").write_text(proc.stderr)
        out[name] = d
    return out


def _numbers(res: dict) -> dict:
    """Every per-run number that must not depend on the machine's speed or the worker count."""
    keep = ("accuracy", "by_kind", "final_train_loss", "val_loss_curve", "fft_layer_mgn", "mgn_history",
            "trained_steps_per_layer", "final_probabilities", "samples")  # fmt: skip
    runs = {}
    for r in res["runs"]:
        if r["method"] == "badam-pkg":
            continue
        key = (r["task"], r["method"], r["config"], r["purpose"], r["lr"], r["seed"])
        runs[key] = {k: r.get(k) for k in keep}
    selection = [r for r in res["selection"] if r["method"] != "badam-pkg"]
    return {"runs": runs, "selection": selection, "weights": res["pretrain"]["weights_sha256"]}


def test_accuracy_smoke_writes_tables_and_plots(smoke: dict[str, Path]) -> None:
    d = smoke["a"]
    md = (d / "accuracy.md").read_text()
    assert "SMOKE RUN" in md and "python benchmarks/accuracy.py --smoke" in md
    for task in ("arith", "common"):
        assert f"## Task {task}" in md
    for label in ("| GRASS |", "| GRASS-uniform |", "| GRASS* |", "| LISA |", "| LoRA |", "| FFT |"):
        assert label in md
    assert "| BAdam-style (cyclic) |" in md
    assert ("| BAdam (badam pkg) |" in md) == _badam_installed()
    assert "**GRASS - GRASS-uniform** (primary)" in md and "97.5%" in md
    assert "Weights sha256 `" in md and "ATEN_CPU_CAPABILITY=avx2" in md and "machine load:" in md
    res = json.loads((d / "accuracy.json").read_text())
    assert res["numerics"]["pinned"] and res["numerics"]["torch_threads"] == 1
    assert all(0 <= r["accuracy"] <= 100 for r in res["runs"])
    for png in ("mgn_layers.png", "mgn_over_training.png", "val_loss.png"):
        assert (d / png).stat().st_size > 1000
    assert "Warning" not in (d / "stderr.txt").read_text(), "no warning (generation, peft, BAdam)"
    sens = (d / "sensitivity.md").read_text()
    assert "Ts x gamma" in sens and "Tp (probing steps)" in sens and "temperature tau" in sens


def test_accuracy_smoke_is_deterministic(smoke: dict[str, Path]) -> None:
    """Same command, fresh cache, 1 vs 2 worker processes: the same weights and the same numbers."""
    for name in ("accuracy", "sensitivity"):
        a = json.loads((smoke["a"] / f"{name}.json").read_text())
        b = json.loads((smoke["b"] / f"{name}.json").read_text())
        assert not a["pretrain"]["cached"] and not b["pretrain"]["cached"], "both runs pretrained anew"
        assert _numbers(a) == _numbers(b)


def test_accuracy_smoke_skips_badam_row_without_the_package(smoke: dict[str, Path]) -> None:
    md = (smoke["b"] / "accuracy.md").read_text()
    assert "Skipped: badam-pkg: package badam not installed" in md
    assert "| BAdam (badam pkg) |" not in md


@pytest.mark.slow
def test_accuracy_split_by_task_merges_to_the_same_numbers(smoke: dict[str, Path], tmp_path: Path) -> None:
    """The main study run as one process per task (side by side, for the wall time) and merged by
    ``accuracy_report.py --merge`` gives the numbers of one run over both tasks."""
    parts = []
    for task in ("arith", "common"):
        d = tmp_path / task
        cmd = [sys.executable, str(SCRIPT), "--smoke", "--tasks", task, "--out", str(d)]
        cmd += ["--cache", str(smoke["a"] / "cache")]  # the model pretrained by run a
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        parts.append(str(d / "accuracy.json"))
    merged = tmp_path / "merged"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "accuracy_report.py"), str(merged), "--merge", *parts],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((smoke["a"] / "accuracy.json").read_text())
    m = json.loads((merged / "accuracy.json").read_text())
    assert _numbers(m) == _numbers(a)
    md = (merged / "accuracy.md").read_text()
    assert "## Task arith" in md and "## Task common" in md and "one per task subset" in md
    assert "--tasks arith" in md and "--tasks common" in md
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "accuracy_report.py"),
            str(tmp_path / "bad"),
            "--merge",
            parts[0],
            parts[0],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "a task is in two parts" in proc.stderr
