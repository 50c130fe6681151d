"""Run log (``grass_llm.runlog``) and plots (``grass_llm.plots``, ``grass-llm plot``)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from grass_llm import cli
from grass_llm.plots import (
    activity_matrix,
    infer_num_layers,
    per_layer_matrix,
    plot_run,
    prepare_records,
)
from grass_llm.runlog import LOG_FILENAME, RunLogError, RunLogger, read_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_PNGS = ("layers_heatmap.png", "importance.png", "probabilities.png", "loss.png")


def active_at(step: int, num_layers: int, probe_steps: int, period: int) -> list[int]:
    """Two active layers, switched every ``period`` training steps, in a known pattern."""
    k = (step - probe_steps - 1) // period
    return sorted({(3 * k) % num_layers, (3 * k + 5) % num_layers})


def write_synthetic_run(
    run_dir: Path,
    num_layers: int = 8,
    probe_steps: int = 10,
    train_steps: int = 60,
    period: int = 25,
    **logger_kwargs,
) -> list[dict]:
    """A run log like the training loop writes; returns the records as written."""
    gen = torch.Generator().manual_seed(0)
    mgn = torch.linspace(0.2, 2.0, num_layers, dtype=torch.float64)
    written = []
    with RunLogger(run_dir, **logger_kwargs) as log:
        for step in range(1, probe_steps + train_steps + 1):
            probing = step <= probe_steps
            mgn = mgn * (0.99 + 0.02 * torch.rand(num_layers, generator=gen, dtype=torch.float64))
            probs = mgn / mgn.sum()
            written.append(
                log.log(
                    step=step,
                    phase="probe" if probing else "train",
                    loss=torch.tensor(3.0 * math.exp(-step / 40) + 0.1 * torch.rand(1, generator=gen).item()),
                    lr=1e-4,
                    active_layers=[] if probing else active_at(step, num_layers, probe_steps, period),
                    importance=mgn,  # tensors are turned into JSON lists
                    probabilities=probs,
                    tokens=512,
                    tokens_per_s=2048.0,
                    memory_bytes=None,
                    custom_key={"kept": True},
                )
            )
    return written


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 10_000, (path, len(data))  # a real figure, not an empty canvas


# ----------------------------------------------------------------------------------------------
# runlog
def test_logger_writes_schema_and_reads_back(tmp_path):
    written = write_synthetic_run(tmp_path)
    records = read_log(tmp_path)
    assert records == written
    assert len(records) == 70
    first, last = records[0], records[-1]
    assert first["step"] == 1 and first["phase"] == "probe" and first["active_layers"] == []
    assert last["step"] == 70 and last["phase"] == "train" and last["active_layers"] == [3, 6]
    assert isinstance(last["loss"], float) and isinstance(last["importance"], list)
    assert len(last["importance"]) == len(last["probabilities"]) == 8
    assert math.isclose(sum(last["probabilities"]), 1.0)
    assert last["memory_bytes"] is None and last["tokens"] == 512
    assert last["custom_key"] == {"kept": True}  # extra keys survive
    assert isinstance(last["time"], float)  # filled in by the logger
    # one compact line per record, newline-terminated
    lines = (tmp_path / LOG_FILENAME).read_text().splitlines()
    assert len(lines) == 70 and json.loads(lines[5]) == records[5]


def test_logger_flushes_every_record(tmp_path):
    with RunLogger(tmp_path) as log:
        log.log(step=1, phase="train", loss=1.0)
        assert [r["step"] for r in read_log(tmp_path)] == [1]  # visible while the logger is open
        log.log({"step": 2, "phase": "train"}, loss=float("nan"))
        second = read_log(tmp_path)[1]
        assert math.isnan(second["loss"])


@pytest.mark.parametrize(
    "record, match",
    [
        ({"phase": "train"}, "'step'"),
        ({"step": -1, "phase": "train"}, "'step'"),
        ({"step": True, "phase": "train"}, "'step'"),
        ({"step": 1, "phase": "warmup"}, "'phase'"),
    ],
)
def test_logger_rejects_bad_records(tmp_path, record, match):
    with RunLogger(tmp_path) as log, pytest.raises(RunLogError, match=match):
        log.log(record)
    assert read_log(tmp_path) == []


def test_logger_closed(tmp_path):
    log = RunLogger(tmp_path)
    log.close()
    log.close()
    assert log.closed
    with pytest.raises(RuntimeError, match="closed"):
        log.log(step=1, phase="train")


def test_resume_truncates_and_appends(tmp_path):
    write_synthetic_run(tmp_path, probe_steps=3, train_steps=7)  # steps 1..10
    # resumed from the checkpoint after step 6: steps 7..10 are logged again, no duplicates
    with RunLogger(tmp_path, resume_from=6) as log:
        assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4, 5, 6]
        for step in range(7, 12):
            log.log(step=step, phase="train", loss=0.5, rerun=True)
    records = read_log(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 12))
    assert [bool(r.get("rerun")) for r in records] == [False] * 6 + [True] * 5


def test_truncate_after_on_open_logger(tmp_path):
    with RunLogger(tmp_path) as log:
        for step in range(1, 9):
            log.log(step=step, phase="train")
        assert log.truncate_after(5) == 3
        log.log(step=6, phase="train", again=True)
    records = read_log(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["again"] is True
    with RunLogger(tmp_path) as log:  # reopening without resume_from appends
        log.log(step=7, phase="train")
    assert [r["step"] for r in read_log(tmp_path)] == list(range(1, 8))


def test_torn_final_line_is_skipped_and_repaired(tmp_path):
    path = tmp_path / LOG_FILENAME
    path.write_text('{"step":1,"phase":"train"}\n{"step":2,"phase":"train"}\n{"step":3,"pha')
    with pytest.warns(RuntimeWarning, match="incomplete final line"):
        assert [r["step"] for r in read_log(tmp_path)] == [1, 2]
    with pytest.warns(RuntimeWarning, match="incomplete final line"), RunLogger(tmp_path) as log:
        log.log(step=3, phase="train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]
    # a complete final record that only lacks its newline is kept, not dropped
    path.write_text('{"step":1,"phase":"train"}')
    with RunLogger(tmp_path) as log:
        log.log(step=2, phase="train")
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2]


def test_read_log_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run log at"):
        read_log(tmp_path)
    path = tmp_path / LOG_FILENAME
    path.write_text('{"step":1,"phase":"train"}\nnot json\n{"step":3,"phase":"train"}\n')
    with pytest.raises(RunLogError, match="bad line 2"):
        read_log(tmp_path)
    path.write_text('{"step":1,"phase":"train"}\n\n[1, 2]\n')
    with pytest.raises(RunLogError, match="bad line 3: expected a JSON object"):
        read_log(tmp_path)
    path.write_text('{"step":1,"phase":"train"}\n{"step":"2","phase":"train"}\n')
    with pytest.raises(RunLogError, match="bad line 2: 'step'"):
        read_log(tmp_path)
    path.write_bytes(b'{"step":1,"phase":"train"}\n\xff\xfe binary\n')
    with pytest.raises(RunLogError, match="bad line 2: not UTF-8 text"):
        read_log(tmp_path)
    damaged = '{"step":1,"phase":"train"}\nnot json\n{"step":3,"phase":"train"}\n'
    path.write_text(damaged)
    # a resume drops the damaged line with a warning, and keeps the file as it was beside it
    with pytest.warns(RuntimeWarning, match=r"line 2 is not a valid record: .*kept in .*log\.jsonl\.damaged"):
        RunLogger(tmp_path, resume_from=1).close()
    assert (tmp_path / f"{LOG_FILENAME}.damaged").read_text() == damaged
    assert [r["step"] for r in read_log(tmp_path)] == [1]


def test_tensorboard_mirror(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_synthetic_run(tmp_path, num_layers=4, probe_steps=2, train_steps=6, tensorboard=True)
    with RunLogger(tmp_path, tensorboard=True, resume_from=5) as log:
        log.log(step=6, phase="train", loss=123.0)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "tokens_per_s", "importance/layer_00", "probabilities/layer_03"} <= tags
    assert "step" not in tags and "time" not in tags and "memory_bytes" not in tags  # null is skipped
    loss = {e.step: e.value for e in acc.Scalars("loss")}
    assert sorted(loss) == [1, 2, 3, 4, 5, 6]  # steps 7, 8 purged on resume
    assert loss[6] == 123.0


# ----------------------------------------------------------------------------------------------
# pure data functions
def test_activity_matrix_cells(tmp_path):
    records = prepare_records(write_synthetic_run(tmp_path))
    assert infer_num_layers(records) == 8
    act = activity_matrix(records, 8)
    assert act.shape == (8, 70)
    expected = np.zeros((8, 70))
    # training steps 11..35 -> layers {0, 5}, 36..60 -> {3, 0}, 61..70 -> {6, 3}; column = step - 1
    expected[[0, 5], 10:35] = 1
    expected[[0, 3], 35:60] = 1
    expected[[3, 6], 60:70] = 1
    np.testing.assert_array_equal(act, expected)
    assert not act[:, :10].any()  # probing steps update nothing
    # a probing record listing every layer still sets no cell
    assert not activity_matrix([{"step": 1, "phase": "probe", "active_layers": list(range(8))}], 8).any()
    with pytest.raises(ValueError, match="active layer 8 out of range"):
        activity_matrix([{"step": 1, "phase": "train", "active_layers": [8]}], 8)


def test_prepare_records_and_per_layer_matrix():
    records = [
        {"step": 2, "phase": "train", "importance": [1.0, 2.0]},
        {"step": 1, "phase": "probe"},
        {"step": 2, "phase": "train", "importance": [3.0, None], "active_layers": [2]},
    ]
    prepared = prepare_records(records)
    assert [r["step"] for r in prepared] == [1, 2]
    assert prepared[1]["importance"] == [3.0, None]  # the last record of a step wins
    assert infer_num_layers(prepared) == 3  # active layer 2 -> at least 3 layers
    m = per_layer_matrix(prepared, "importance", 3)
    assert m.shape == (3, 2) and m[0, 1] == 3.0
    assert np.isnan(m[:, 0]).all() and np.isnan(m[1, 1]) and np.isnan(m[2, 1])
    with pytest.raises(RunLogError, match="no records"):
        prepare_records([])
    with pytest.raises(RunLogError, match="number of decoder layers"):
        infer_num_layers([{"step": 1, "phase": "train", "loss": 1.0}])


# ----------------------------------------------------------------------------------------------
# plots
def test_plot_run_writes_all_pngs(tmp_path):
    run_dir = tmp_path / "run"
    write_synthetic_run(run_dir)
    paths = plot_run(run_dir)
    assert [p.name for p in paths] == list(ALL_PNGS)
    assert all(p.parent == run_dir / "plots" for p in paths)
    for p in paths:
        assert_png(p)


def test_plot_run_many_layers_heatmap_mode(tmp_path):
    write_synthetic_run(tmp_path, num_layers=24, probe_steps=5, train_steps=30, period=10)
    out = tmp_path / "figs"
    paths = plot_run(tmp_path, out_dir=out)
    assert [p.name for p in paths] == list(ALL_PNGS)
    for p in paths:
        assert p.parent == out
        assert_png(p)


def test_plot_run_probe_only(tmp_path):
    write_synthetic_run(tmp_path, probe_steps=6, train_steps=0)
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == list(ALL_PNGS)
    for p in paths:
        assert_png(p)


def test_plot_run_missing_optional_keys(tmp_path):
    with RunLogger(tmp_path) as log:
        log.log(step=1, phase="train", active_layers=[0, 2])
        log.log(step=2, phase="train", active_layers=[1])
        log.log(step=3, phase="train")  # no active_layers at all
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["layers_heatmap.png"]  # no importance, probabilities, loss
    assert_png(paths[0])


def test_plot_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run log"):
        plot_run(tmp_path)
    (tmp_path / LOG_FILENAME).write_text("")
    with pytest.raises(RunLogError, match="empty"):
        plot_run(tmp_path)


# ----------------------------------------------------------------------------------------------
# CLI
@pytest.fixture
def plot_only_cli(monkeypatch):
    """``cli.build_parser`` imports every subcommand's module; keep only ``plot`` so this test does
    not depend on the train/eval modules, which are developed separately."""
    monkeypatch.setattr(cli, "SUBCOMMANDS", {"plot": cli.SUBCOMMANDS["plot"]})
    return cli.main


def test_cli_plot(tmp_path, capsys, plot_only_cli):
    write_synthetic_run(tmp_path, probe_steps=4, train_steps=20)
    assert plot_only_cli(["plot", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert [Path(p).name for p in printed] == list(ALL_PNGS)
    for p in printed:
        assert_png(Path(p))
    out = tmp_path / "elsewhere"
    assert plot_only_cli(["plot", str(tmp_path), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(ALL_PNGS)


def test_cli_plot_errors(tmp_path, capsys, plot_only_cli):
    missing = tmp_path / "no-such-run"
    assert plot_only_cli(["plot", str(missing)]) == 2
    assert f"run directory not found: {missing}" in capsys.readouterr().err
    assert plot_only_cli(["plot", str(tmp_path)]) == 2  # directory without a log
    assert "no run log at" in capsys.readouterr().err
    (tmp_path / LOG_FILENAME).write_text('{"step":1,"phase":"train"}\n{oops\n{"step":3,"phase":"train"}\n')
    assert plot_only_cli(["plot", str(tmp_path)]) == 2  # a malformed log is bad input
    assert "error: " in (err := capsys.readouterr().err) and "bad line 2" in err
    # skipped plots are reported, not silently dropped
    (tmp_path / LOG_FILENAME).write_text('{"step":1,"phase":"train","active_layers":[0]}\n')
    assert plot_only_cli(["plot", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().endswith("layers_heatmap.png")
    assert "skipped loss.png" in captured.err


def test_cli_plot_help(plot_only_cli, capsys):
    with pytest.raises(SystemExit) as exc:
        plot_only_cli(["plot", "-h"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    assert "run_dir" in help_text and "--out DIR" in help_text
