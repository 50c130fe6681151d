"""Every failure is one line with its documented exit code (issue #20, third class): 1 the run failed,
2 bad input (nothing changed), 128 + N a signal; no traceback unless GRASS_LLM_DEBUG is set. Driven
through the CLI (``grass_llm.cli.main``, or ``python -m grass_llm`` where a signal or a fresh
interpreter matters)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from conftest import BUNDLED_DATA
from test_faults import FAST, _env, train
from test_faults_lost import DiskFull, _files

from grass_llm.cli import main

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]

EVAL = ["--benchmarks", "gsm8k", "--limit", "2", "--max-new-tokens", "2", "--device", "cpu", "--dtype", "fp32"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str, prefix: str) -> str:
    """The single ``prefix: error: ...`` line of ``err``; no traceback."""
    lines = [line for line in err.splitlines() if line.startswith(f"{prefix}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished builtin:tiny run (final model + tokenizer, checkpoints, log)."""
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", *FAST, "max_steps=2", f"out_dir={run}"]) == 0
    return run


# ------------------------------------------------------------------------------------------------
# bad input is exit code 2, and says what the path is
def test_a_truncated_model_is_bad_input_for_train_and_eval(tmp_path, capsys, finished_run):
    model = tmp_path / "model"
    shutil.copytree(finished_run / "final", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    rc, _, err = train(capsys, *FAST, f"model={model}", f"out_dir={tmp_path / 'new'}")
    assert rc == 2
    line = one_error_line(err, "grass-llm train")
    assert f"cannot load model {str(model)!r}: " in line
    assert not (tmp_path / "new").exists()  # a refused run leaves no empty out_dir behind
    # eval --overwrite: refused before anything of the earlier results is touched
    out = tmp_path / "results"
    assert run_cli(capsys, "eval", "--model", str(finished_run / "final"), "--out", str(out), "--data-dir", str(BUNDLED_DATA), *EVAL)[0] == 0
    before = _files(out)
    rc, _, err = run_cli(capsys, "eval", "--model", str(model), "--out", str(out), "--overwrite", "--data-dir", str(BUNDLED_DATA), *EVAL)
    assert rc == 2 and f"cannot load model {str(model)!r}" in one_error_line(err, "grass-llm eval")
    assert _files(out) == before


@pytest.mark.parametrize("what", ["run directory", "checkpoints", "final", "file", "empty directory"])
def test_resume_from_a_path_that_is_no_checkpoint_says_what_it_is(capsys, finished_run, what):
    (finished_run.parent / "empty").mkdir(exist_ok=True)
    path = {
        "run directory": finished_run,
        "checkpoints": finished_run / "checkpoints",
        "final": finished_run / "final",
        "file": finished_run / "log.jsonl",
        "empty directory": finished_run.parent / "empty",
    }[what]
    before = _files(finished_run)
    rc, _, err = train(capsys, f"--resume={path}")
    assert rc == 2
    line = one_error_line(err, "grass-llm train")
    assert f"cannot resume from {str(path)!r}: it " in line and "incomplete" not in line
    newest = finished_run / "checkpoints" / "step-000002"
    expected = {
        "run directory": f"it is a run directory, not a checkpoint; its newest intact checkpoint is {newest}. "
        f"continue that run with --resume out_dir={finished_run}, or give one of its checkpoints as --resume=PATH",
        "checkpoints": f"it is the checkpoints directory of the run {finished_run}; its newest intact checkpoint is "
        f"{newest}. continue that run with --resume out_dir={finished_run}",
        "final": f"it is a final model, not a checkpoint (train from it with model=PATH); its newest intact "
        f"checkpoint is {newest}",
        "file": "it is a file; a checkpoint is a directory checkpoints/step-N of a run directory",
        "empty directory": "it holds no checkpoint files; a checkpoint is a directory checkpoints/step-N of a run",
    }[what]
    assert expected in line
    assert _files(finished_run) == before


def test_a_dangling_symlink_as_out_dir(tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    rc, _, err = train(capsys, *FAST, f"out_dir={link}")
    assert rc == 2
    assert (
        f"out_dir {str(link)!r} is a symbolic link to {str(tmp_path / 'gone')!r}, which does not exist; allowed: "
        "a directory (created if missing), or a link to one"
    ) in one_error_line(err, "grass-llm train")
    rc, _, err = train(capsys, *FAST, f"out_dir={link / 'run'}")
    assert rc == 2 and f"{str(link)!r} (in out_dir {str(link / 'run')!r}) is a symbolic link" in err
    assert not (tmp_path / "gone").exists() and link.is_symlink()


def test_a_run_refused_after_its_out_dir_was_made_leaves_none_behind(tmp_path, capsys):
    new = tmp_path / "a" / "b" / "run"
    rc, _, err = train(capsys, "max_length=600", "max_steps=2", f"out_dir={new}")  # refused when building
    assert rc == 2 and "max_length=600 is longer than" in err
    assert list(tmp_path.iterdir()) == []


def test_summary_paths_are_shell_words(tmp_path, capsys):
    run = tmp_path / "my run"
    rc, out, _ = train(capsys, *FAST, "max_steps=2", f"out_dir={run}", "tensorboard=true")
    assert rc == 0
    assert f"  checkpoint: '{run}/checkpoints/step-000002'  (continue with --resume)" in out
    assert f"  log:        '{run}/log.jsonl'" in out
    assert f"  tensorboard: tensorboard --logdir '{run}/tensorboard'" in out


# ------------------------------------------------------------------------------------------------
# failures are one line, exit code 1
def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    import grass_llm.recipes.finetune as finetune

    def broken(*args, **kwargs):
        raise KeyError("something no one expected")

    monkeypatch.setattr(finetune, "train_step", broken)
    monkeypatch.delenv("GRASS_LLM_DEBUG", raising=False)
    rc, _, err = train(capsys, *FAST, "max_steps=2", f"out_dir={tmp_path / 'a'}")
    assert rc == 1
    assert one_error_line(err, "grass-llm train") == (
        "grass-llm train: error: KeyError: 'something no one expected' (an unexpected failure; set "
        "GRASS_LLM_DEBUG=1 to see the traceback)"
    )
    monkeypatch.setenv("GRASS_LLM_DEBUG", "1")
    with pytest.raises(KeyError, match="something no one expected"):
        main(["train", *FAST, "max_steps=2", f"out_dir={tmp_path / 'b'}"])


def test_an_out_dir_deleted_during_a_run(tmp_path, capsys, monkeypatch):
    """The run log is gone (and TensorBoard's writer fails in its thread): exit code 1, one line."""
    import grass_llm.recipes.finetune as finetune

    real = finetune.train_step
    run = tmp_path / "run"

    def step_then_delete(*args, **kwargs):
        out = real(*args, **kwargs)
        if (run / "log.jsonl").is_file() and len((run / "log.jsonl").read_text().splitlines()) == 3:
            shutil.rmtree(run)
        return out

    monkeypatch.setattr(finetune, "train_step", step_then_delete)
    rc, _, err = train(capsys, *FAST, "max_steps=8", "save_every=2", "tensorboard=true", f"out_dir={run}")
    assert rc == 1
    line = one_error_line(err, "grass-llm train")
    assert f"the run log {run}/log.jsonl was deleted while the run wrote it (out_dir removed?)" in line
    assert f"The last checkpoint, {run}/checkpoints/step-000002, is gone" in line


def test_plot_errors_are_one_line_and_earlier_plots_stay(tmp_path, capsys, monkeypatch, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert run_cli(capsys, "plot", str(run))[0] == 0
    before = _files(run / "plots")
    (tmp_path / "file").write_text("x")
    rc, _, err = run_cli(capsys, "plot", str(run), "--out", str(tmp_path / "file"))
    assert rc == 2
    assert f"--out {str(tmp_path / 'file')!r} is a file; allowed: a directory" in one_error_line(err, "grass-llm plot")
    for kind in ("enospc", "runtime"):
        with DiskFull(run, ("plots/.layers_heatmap.png.*.tmp", 1), kind).installed(monkeypatch):
            rc, _, err = run_cli(capsys, "plot", str(run))
        assert rc == 1, err
        line = one_error_line(err, "grass-llm plot")
        assert f"cannot write the plots in {run}/plots: " in line and "plots already there are unchanged" in line
        assert _files(run / "plots") == before


def test_eval_keeps_earlier_results_when_it_fails_or_is_stopped(tmp_path, capsys, monkeypatch, finished_run):
    import grass_llm.evaluate.run as eval_run

    out = tmp_path / "results"
    args = ["eval", "--model", str(finished_run / "final"), "--out", str(out), "--data-dir", str(BUNDLED_DATA)]
    assert run_cli(capsys, *args, *EVAL)[0] == 0
    before = _files(out)
    # a full disk while the new results are written
    with DiskFull(out, ("*/results.md", 1)).installed(monkeypatch) as disk:
        rc, _, err = run_cli(capsys, *args, "--overwrite", *EVAL)
    assert disk.writes and rc == 1
    assert "the results that were there are unchanged" in one_error_line(err, "grass-llm eval")
    assert _files(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)
    # Ctrl-C while generating
    real = eval_run.generate_responses

    def interrupted(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(eval_run, "generate_responses", interrupted)
    rc, _, err = run_cli(capsys, *args, "--overwrite", "--benchmarks", "gsm8k,multiarith", *EVAL[2:])
    assert rc == 130 and "grass-llm eval: stopped by SIGINT" in err and "Traceback" not in err
    assert _files(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)
    monkeypatch.setattr(eval_run, "generate_responses", real)
    # --overwrite that completes replaces them, and drops earlier files the new results do not have
    rc, _, _ = run_cli(capsys, *args, "--overwrite", "--benchmarks", "multiarith", *EVAL[2:])
    assert rc == 0 and sorted(p.name for p in out.iterdir()) == ["MultiArith.jsonl", "results.json", "results.md"]


def test_an_adapter_of_a_builtin_base_evaluates_offline(tmp_path, capsys):
    """It used to record no base, and eval asked the hub for a model named None."""
    run = tmp_path / "run"
    rc, _, err = train(
        capsys, *FAST, "method=lora", "lora.rank=4", "model=builtin:tiny-pretrained", "max_steps=2", f"out_dir={run}"
    )
    assert rc == 0, err
    adapter = run / "final" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(adapter / "base")
    results = {}
    for name, model in (("merged", run / "final"), ("adapter", adapter)):
        rc, _, err = run_cli(capsys, "eval", "--model", str(model), "--out", str(tmp_path / name), "--data-dir", str(BUNDLED_DATA), *EVAL)
        assert rc == 0, err
        results[name] = [json.loads(line)["response"] for line in (tmp_path / name / "GSM8K.jsonl").read_text().splitlines()]
    assert results["adapter"] == results["merged"]  # the base + adapter is the merged model
    # an adapter that records no base: one line, no request to the hub
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    rc, _, err = run_cli(capsys, "eval", "--model", str(adapter), "--out", str(tmp_path / "x"), "--data-dir", str(BUNDLED_DATA), *EVAL)
    assert rc == 2 and "is an adapter that records no base model" in one_error_line(err, "grass-llm eval")


# ------------------------------------------------------------------------------------------------
# a signal during setup: its exit code and one line, whatever the code it lands in does with it
@pytest.mark.parametrize("then", ["continues", "fails"])
def test_a_signal_swallowed_during_setup_still_stops_the_run(tmp_path, capsys, monkeypatch, then):
    """Third-party code that catches everything (or turns the stop into another error, as a half-imported
    numpy does) used to train on, or end in a traceback with exit code 1."""
    import grass_llm.recipes.build as build

    real = build.load_model

    def load_model_swallowing_a_signal(*args, **kwargs):
        with contextlib.suppress(BaseException):  # (what a library's `except BaseException: pass` does)
            os.kill(os.getpid(), signal.SIGINT)
        if then == "fails":
            raise ModuleNotFoundError("Could not import module 'LlamaConfig'")
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "load_model", load_model_swallowing_a_signal)
    run = tmp_path / "run"
    rc, _, err = train(capsys, *FAST, "max_steps=2", f"out_dir={run}")
    assert rc == 130, err
    assert err.strip().splitlines()[-1] == (
        "grass-llm train: stopped by SIGINT during setup, before the first step: nothing was trained or saved "
        "in this invocation"
    )
    assert "Traceback" not in err and "error:" not in err
    assert not run.exists()


_DRIVER = """
import fnmatch, os, signal, sys
pattern, nth = sys.argv[1], int(sys.argv[2]); seen = [0]
def hook(event, args):
    if event == "import" and fnmatch.fnmatch(str(args[0]), pattern):
        seen[0] += 1
        if seen[0] == nth:
            print("SIGNAL at the import of", args[0], file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGINT)
from grass_llm.cli import main
sys.addaudithook(hook)
sys.exit(main(["train", *sys.argv[3:]]))
"""


def test_a_signal_at_random_imports_during_setup(tmp_path):
    """SIGINT delivered at a random import of the setup, in a fresh interpreter each time: one of numpy's
    (which swallows it: the run trained on, or ended in a RecursionError traceback with exit code 1, the
    known flake), of transformers', of anything. Exit code 130 and one line, never a traceback."""
    seed = int(os.environ.get("GRASS_FAULT_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    draws = [("numpy.*", rng.randint(1, 25)), ("transformers.*", rng.randint(1, 200)), ("*", rng.randint(5, 1200))]
    for pattern, nth in draws:
        proc = subprocess.run(
            [sys.executable, "-c", _DRIVER, pattern, str(nth), *FAST, "max_steps=1", f"out_dir={tmp_path / 'run'}"],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=240,
        )
        where = f"seed {seed}, import {nth} of {pattern}:\n{proc.stderr[-3000:]}"
        if "SIGNAL" not in proc.stderr:  # (fewer such imports: the run finished)
            assert proc.returncode == 0, where
            shutil.rmtree(tmp_path / "run")
            continue
        assert proc.returncode == 130, where
        assert "Traceback" not in proc.stderr and "error:" not in proc.stderr, where
        assert proc.stderr.strip().splitlines()[-1].startswith("grass-llm train: stopped by SIGINT during setup"), where
        assert not (tmp_path / "run").exists(), where
