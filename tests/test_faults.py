"""Fault injection: `grass-llm train` driven as a user would, with the faults a user meets.

Signals and kills at random moments (several times), divergence, a reused out_dir, --resume in every
position and with changed settings, damaged and incomplete checkpoints, out_dirs that are files or
read-only, bad paths. Each case checks the exit code, the message the user sees, and that nothing
finished was lost (a run interrupted any number of times and resumed ends bit for bit where an
uninterrupted run ends).

Runs on the tiny random model (builtin:tiny), one thread, a few dozen steps; signals and kills go to
subprocesses (`python -m grass_llm`), the rest runs in-process through ``grass_llm.cli.main``.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from grass_llm.cli import main
from grass_llm.recipes.run_checkpoint import find_latest_checkpoint, list_checkpoints, verify_checkpoint
from grass_llm.runlog import read_log

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_thread")]

FAST = [
    "model=builtin:tiny",
    "device=cpu",
    "dtype=fp32",
    "max_length=64",
    "batch_size=4",
    "lr=1e-3",
    "warmup=1",
    "tensorboard=false",
    "plots=false",
    "eval_heldout=0",
    "grass.probe_steps=2",
    "grass.period=3",
]
# log keys that depend on the wall clock or the process, not on the computation
_TIMING = ("time", "tokens_per_s", "memory_bytes", "rss_bytes")


def train(capsys, *args) -> tuple[int, str, str]:
    """`grass-llm train ARGS` in this process: (exit code, stdout, stderr)."""
    rc = main(["train", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start(cwd: Path, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "grass_llm", "train", *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _strip(records):
    return [{k: v for k, v in r.items() if k not in _TIMING} for r in records]


def _final(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def _same_run(a: Path, b: Path) -> None:
    """Equal logs (every step once, same numbers) and bit-identical final weights."""
    assert _strip(read_log(a)) == _strip(read_log(b))
    wa, wb = _final(a), _final(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _log_steps(run: Path) -> int:
    try:
        return sum(1 for line in (run / "log.jsonl").read_text().splitlines() if line.endswith("}"))
    except FileNotFoundError:
        return 0


# ------------------------------------------------------------------------------------------------
# signals and kills
def test_signals_and_kills_at_random_moments_lose_nothing(tmp_path, capsys):
    """SIGINT, SIGTERM, SIGKILL and a double SIGINT at random moments (one of them during setup), each
    followed by --resume: the run ends exactly where an uninterrupted one does."""
    seed = int(os.environ.get("GRASS_FAULT_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    steps = 30
    args = [*FAST, f"max_steps={steps}", "save_every=4"]
    rc, _, _ = train(capsys, *args, f"out_dir={tmp_path / 'ref'}")
    assert rc == 0

    run = tmp_path / "run"
    plan = [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGKILL, 1), (signal.SIGINT, 2)]
    rng.shuffle(plan)
    setup_hit = rng.randrange(len(plan))  # one signal lands before training starts
    for i, (sig, times) in enumerate(plan):
        before = _log_steps(run)
        proc = start(tmp_path, *args, "out_dir=run", *(["--resume"] if i else []))
        if i == setup_hit:
            time.sleep(rng.uniform(0.0, 2.0))  # importing torch, building the model, loading the checkpoint
        else:
            target = before + rng.randint(1, 6)
            deadline = time.time() + 120
            while _log_steps(run) < target and proc.poll() is None:
                assert time.time() < deadline, f"seed {seed}: step {target} not reached"
                time.sleep(0.01)
        for _ in range(times):
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        where = f"seed {seed}, attempt {i}, {sig.name} x{times}:\n{out}\n{err[-2000:]}"
        if proc.returncode == 0:  # the run finished before the signal arrived
            break
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL, where
        else:
            assert proc.returncode == 128 + sig, where
            if f"stopped by {sig.name} after step" in out:  # stopped in training, after a checkpoint
                step = int(out.split(f"stopped by {sig.name} after step ")[1].split()[0])
                assert f"{sig.name} received: saving a checkpoint of step {step} ..." in out, where
                assert f"checkpoint: run/checkpoints/step-{step:06d}  (continue with --resume)" in out, where
                assert "continue with: grass-llm train " in out and out.rstrip().endswith("--resume"), where
                verify_checkpoint(run / "checkpoints" / f"step-{step:06d}")
            elif i == setup_hit:
                assert (
                    f"grass-llm train: stopped by {sig.name} during setup, before the first step: nothing was "
                    "trained or saved in this invocation"
                ) in err, where
            else:  # the second SIGINT arrived before the checkpoint was complete: stopped without it
                assert times == 2 and f"grass-llm train: stopped by {sig.name} again while " in err, where
                assert "stopped at once without it;" in err and err.rstrip().endswith("--resume"), where
        assert "Traceback" not in err, where
        # every checkpoint left verifies (an interrupted save leaves only a .tmp, which is not used)
        for _, d in list_checkpoints(run):
            verify_checkpoint(d)
    proc = start(tmp_path, *args, "out_dir=run", "--resume")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"seed {seed}: {err[-3000:]}"
    assert "done:" in out
    _same_run(tmp_path / "ref", run)  # nothing finished was lost


def test_sigterm_under_torchrun_saves_one_checkpoint(tmp_path):
    """2 CPU ranks: SIGTERM to both workers (what a scheduler does), one checkpoint from rank 0, exit 143."""
    args = [*FAST, "max_steps=100000", "save_every=0", "out_dir=run"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.Popen(
        [*cmd, "-m", "grass_llm", "train", *args],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 150
    while _log_steps(tmp_path / "run") < 5:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # the launcher and both workers
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert out.count("SIGTERM received: saving a checkpoint of step") == 1  # rank 0 alone prints
    assert "continue with: the same torchrun / accelerate command with --resume" in out
    step = int(out.split("saving a checkpoint of step ")[1].split()[0])
    ckpt = tmp_path / "run" / "checkpoints" / f"step-{step:06d}"
    verify_checkpoint(ckpt)
    assert [d.name for _, d in list_checkpoints(tmp_path / "run")] == [ckpt.name]
    assert _log_steps(tmp_path / "run") == step


@pytest.mark.parametrize("signals", [1, 2])
def test_a_signal_while_the_plots_are_drawn(tmp_path, capsys, monkeypatch, signals):
    """grass-llm train draws the plots after the run: one signal lets them finish, then stops like a
    signal during the run (exit code 130, the resume command); a second one stops at once, saying where."""
    import grass_llm.plots

    drawn = grass_llm.plots.plot_run

    def interrupted_plot_run(run_dir, out_dir=None):
        for _ in range(signals):
            os.kill(os.getpid(), signal.SIGINT)
        return drawn(run_dir, out_dir)

    monkeypatch.setattr(grass_llm.plots, "plot_run", interrupted_plot_run)
    out_dir = tmp_path / "run"
    rc, out, err = train(capsys, *FAST, "max_steps=3", "plots=true", f"out_dir={out_dir}")
    assert rc == 130
    assert (out_dir / "final").is_dir() and find_latest_checkpoint(out_dir).name == "step-000003"
    if signals == 1:
        assert (out_dir / "plots" / "layers_heatmap.png").is_file()
        assert "stopped by SIGINT after step 3 of 3" in out and "continue with: grass-llm train" in out
    else:
        assert "stopped by SIGINT again while drawing the plots: stopped at once without it" in err
        assert "the last checkpoint is " in err


# ------------------------------------------------------------------------------------------------
# divergence
def test_divergence_stops_with_exit_1_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    common = [*FAST, "method=fft", "max_steps=40", "save_every=5", f"out_dir={run}"]
    rc, _, _ = train(capsys, *common, "stop_at_step=10")
    assert rc == 0
    good = find_latest_checkpoint(run)
    assert good.name == "step-000010"
    # lr 1e30 from step 10 on: the weights blow up at step 11, the gradients are NaN from step 12
    rc, out, err = train(capsys, *common, "--resume", "lr=1e30", "max_nonfinite_steps=4")
    assert rc == 1, err
    assert "step 12: gradients not finite (loss nan); step skipped, weights unchanged" in out
    assert (
        "grass-llm train: error: stopped at step 15: 4 steps in a row had non-finite gradients "
        "(steps 12-15, max_nonfinite_steps=4); the run is diverging. Nothing was saved after step 11. "
        f"The last checkpoint is {good}. Continue from it with a lower learning rate: grass-llm train "
    ) in err
    assert err.rstrip().endswith("--resume lr=<lower>") and "lr=1e30" not in err
    assert [d for _, d in list_checkpoints(run)] == [good] and not (run / "final").exists()
    log = read_log(run)
    assert [r["skipped"] for r in log[11:15]] == [True] * 4 and not any(r["skipped"] for r in log[:11])
    # the last finite checkpoint is intact: continue it with a sane LR to the end
    rc, out, _ = train(capsys, *common, "--resume", "lr=1e-3")
    assert rc == 0 and "done: 30 steps" in out and "resumed at step 10" in out
    assert not any(r["skipped"] for r in read_log(run))


def test_grass_divergence_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    """The issue's run, in small: GRASS with lr=1e30 from the start (probing 2 steps, then training)."""
    run = tmp_path / "run"
    args = [*FAST, "lr=1e30", "max_steps=40", "save_every=2", "max_nonfinite_steps=3", f"out_dir={run}"]
    rc, out, err = train(capsys, *args)
    assert rc == 1
    # step 3 trains at warmup's LR 0, step 4 at 1e30: its weights are huge but finite (saved), then NaN
    assert "step 5: gradients not finite (loss nan); step skipped, weights unchanged" in out
    assert "stopped at step 7: 3 steps in a row had non-finite gradients (steps 5-7" in err
    assert f"Nothing was saved after step 4. The last checkpoint is {run}/checkpoints/step-000004." in err
    assert [d.name for _, d in list_checkpoints(run)] == ["step-000004"] and not (run / "final").exists()
    assert [r["skipped"] for r in read_log(run)] == [False] * 4 + [True] * 3
    assert "GrassOptimizer skipped a step" not in err  # said once, by the loop


def test_skipped_steps_are_counted_and_reported(tmp_path, capsys):
    """A run that skipped steps but went on says how many (max_nonfinite_steps=0: never stop)."""
    run = tmp_path / "run"
    common = [*FAST, "method=fft", "max_steps=24", "save_every=0", f"out_dir={run}"]
    rc, _, _ = train(capsys, *common, "stop_at_step=6")
    rc, out, _ = train(capsys, *common, "--resume", "lr=1e30", "max_nonfinite_steps=0", "stop_at_step=20")
    assert rc == 0
    assert "step 17: gradients not finite (loss nan); step skipped, weights unchanged" in out
    assert "step 18: gradients" not in out  # 10 are shown, then:
    assert out.count("more steps with non-finite gradients: skipped and counted, not shown") == 1
    assert (
        "skipped:    13 steps with non-finite gradients (steps 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, ...); "
        "weights unchanged by them"
    ) in out
    ckpt = find_latest_checkpoint(run)
    assert ckpt.name == "step-000020"
    from safetensors.torch import load_file

    assert all(bool(torch.isfinite(t).all()) for t in load_file(str(ckpt / "model.safetensors")).values())


def test_nonfinite_weights_are_never_saved(tmp_path):
    """The last line of defence: weights that are not finite are not written over the last checkpoint."""
    from grass_llm.recipes.finetune import FinetuneRecipe, TrainFailed
    from grass_llm.recipes.launch import Launch
    from grass_llm.recipes.train_config import load_train_config

    run = tmp_path / "run"
    cfg = load_train_config(overrides=[*FAST, "max_steps=4", f"out_dir={run}"])
    recipe = FinetuneRecipe(cfg, Launch(), torch.device("cpu"))
    recipe.setup(None)
    recipe.train_step()
    good = recipe.save_checkpoint()
    with torch.no_grad():
        recipe.model.model.layers[3].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(
        TrainFailed, match=r"the weights after step 1 are not finite \(1 of \d+ tensors, e\.g\. "
    ):
        recipe.save_checkpoint()
    with pytest.raises(TrainFailed, match=r"the final weights are not finite .*The last checkpoint is "):
        recipe.save_final()
    assert [d for _, d in list_checkpoints(run)] == [good] and not (run / "final").exists()
    verify_checkpoint(good)


def test_a_checkpoint_that_cannot_be_written_fails_the_run_clearly(tmp_path):
    from grass_llm.recipes.finetune import FinetuneRecipe, TrainFailed
    from grass_llm.recipes.launch import Launch
    from grass_llm.recipes.train_config import load_train_config

    run = tmp_path / "run"
    cfg = load_train_config(overrides=[*FAST, "max_steps=4", f"out_dir={run}"])
    recipe = FinetuneRecipe(cfg, Launch(), torch.device("cpu"))
    recipe.setup(None)
    recipe.train_step()
    run.mkdir()
    (run / "checkpoints").write_text("in the way")  # as a full disk or a lost mount would make it fail
    with pytest.raises(
        TrainFailed, match=r"cannot write the checkpoint .*step-000001: .*No checkpoint was written"
    ):
        recipe.save_checkpoint()


# ------------------------------------------------------------------------------------------------
# out_dir reuse
def test_reusing_an_out_dir_is_refused_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    args = [*FAST, "max_steps=4", f"out_dir={run}"]
    assert train(capsys, *args)[0] == 0
    (run / "notes.txt").write_text("mine")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    rc, out, err = train(capsys, *args)
    assert rc == 2
    assert (
        f"grass-llm train: error: out_dir {str(run)!r} holds an earlier run (log.jsonl, checkpoints, final); "
        "continue it with --resume, start over with overwrite=true (replaces it), or choose another out_dir"
    ) in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing touched
    rc, out, err = train(capsys, *args, "overwrite=true", "max_steps=3")
    assert rc == 0
    aside = run / "replaced-run-1"
    assert (
        f"overwrite=true: set the earlier run's log.jsonl, checkpoints/step-000004, final aside in {aside}; "
        "deleted once this run is complete"
    ) in out
    assert f"overwrite=true: this run is complete; deleted what was set aside in {aside}" in out
    assert not aside.exists() and not (run / ".grass-llm.lock").exists()
    assert [r["step"] for r in read_log(run)] == [1, 2, 3]
    assert (run / "notes.txt").read_text() == "mine"  # not an output of the run: kept


# ------------------------------------------------------------------------------------------------
# --resume
def test_resume_in_any_position(tmp_path, capsys):
    run = tmp_path / "run"
    base = [*FAST, "max_steps=12", "save_every=2"]
    assert train(capsys, *base, f"out_dir={run}", "stop_at_step=3")[0] == 0
    # the command: --resume first, then key=value (they used to be taken as the checkpoint path)
    rc, out, err = train(capsys, "--resume", f"out_dir={run}", "stop_at_step=5", *base)
    assert rc == 0, err
    assert f"resumed from {run}/checkpoints/step-000003 at step 3" in out
    assert "stopped at step 5 of 12 (stop_at_step): 2 steps in" in out
    rc, out, _ = train(capsys, *base, f"out_dir={run}", "stop_at_step=7", "--resume")  # last
    assert rc == 0 and "at step 5" in out
    rc, out, _ = train(capsys, *base[:3], "--resume", *base[3:], f"out_dir={run}", "stop_at_step=9")  # middle
    assert rc == 0 and "at step 7" in out
    # a given checkpoint: --resume=PATH (or --resume PATH); the settings come from the checkpoint
    ckpt = run / "checkpoints" / "step-000009"
    rc, out, _ = train(capsys, f"--resume={ckpt}", "stop_at_step=10")
    assert rc == 0 and f"resumed from {ckpt} at step 9" in out and "(steps 10-10 of 12" in out
    rc, out, _ = train(capsys, "--resume", str(run / "checkpoints" / "step-000010"))
    assert rc == 0 and "done: 2 steps in" in out and "(steps 11-12 of 12; resumed at step 10)" in out
    assert [r["step"] for r in read_log(run)] == list(range(1, 13))
    # --help says so
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "--resume[=PATH]" in help_text and "may stand anywhere" in help_text.replace("\n", " ").replace(
        "  ", " "
    )


def test_resume_applies_safe_changes_and_refuses_the_rest(tmp_path, capsys):
    run = tmp_path / "run"
    base = [*FAST, "max_steps=10", "save_every=2", f"out_dir={run}"]
    assert train(capsys, *base, "stop_at_step=4")[0] == 0
    # refused: a setting that defines the run, named with both values; nothing is written
    rc, _, err = train(capsys, *base, "--resume", "batch_size=8", "grass.period=5")
    assert rc == 2
    assert (
        f"grass-llm train: error: cannot resume from {run}/checkpoints/step-000004 with other settings than "
        "the checkpoint's: batch_size: 4 -> 8; grass.period: 3 -> 5. Only these may change on resume: lr, "
        "max_steps, epochs, save_every"
    ) in err
    rc, _, err = train(capsys, *base, "--resume", "max_steps=3")
    assert rc == 2 and "max_steps=3 is below the step of the checkpoint" in err and "allowed: >= 4" in err
    assert [d.name for _, d in list_checkpoints(run)] == ["step-000004"]
    # applied: lr, max_steps and save_every; said, used, and recorded in the next checkpoint
    rc, out, _ = train(capsys, *base, "--resume", "lr=5e-4", "max_steps=12", "save_every=3", "stop_at_step=6")
    assert rc == 0
    assert (
        "resume: changed settings, applied from step 4 on: lr 0.001 -> 0.0005, max_steps 10 -> 12, "
        "save_every 2 -> 3"
    ) in out
    log = read_log(run)
    assert log[4]["lr"] < 5e-4 and log[3]["lr"] > 5e-4  # the schedule's peak is the new lr
    ckpt = find_latest_checkpoint(run)
    assert ckpt.name == "step-000006"  # save_every=3
    config = (ckpt / "config.yaml").read_text()
    assert config.startswith(
        "# resumed at step 4 with changes: lr 0.001 -> 0.0005, max_steps 10 -> 12, save_every 2 -> 3\n"
    )
    assert "lr: 0.0005" in config and "max_steps: 12" in config
    # the next resume takes them from the checkpoint: no change to report, and the run ends at 12
    rc, out, _ = train(capsys, "--resume", f"out_dir={run}")
    assert rc == 0 and "changed settings" not in out and "done: 6 steps in" in out and "of 12" in out


def test_resume_with_nothing_to_resume_starts_at_step_0(tmp_path, capsys):
    rc, out, _ = train(capsys, *FAST, "max_steps=3", f"out_dir={tmp_path / 'new'}", "--resume")
    assert rc == 0
    assert f"resume: no checkpoint in {tmp_path / 'new' / 'checkpoints'}; starting at step 0" in out
    # killed before its first checkpoint: only a log; --resume starts over and rewrites it
    old = tmp_path / "old"
    assert train(capsys, *FAST, "max_steps=6", "save_every=0", f"out_dir={old}", "stop_at_step=2")[0] == 0
    shutil.rmtree(old / "checkpoints")
    assert (
        train(capsys, *FAST, "max_steps=6", "save_every=0", f"out_dir={old}")[0] == 2
    )  # (refused, see above)
    rc, out, _ = train(capsys, *FAST, "max_steps=6", "save_every=0", f"out_dir={old}", "--resume")
    assert rc == 0 and "starting at step 0" in out and [r["step"] for r in read_log(old)] == list(range(1, 7))
    # a final model without any checkpoint is not a run to continue, nor one to write over
    shutil.rmtree(tmp_path / "new" / "checkpoints")
    rc, _, err = train(capsys, *FAST, "max_steps=3", f"out_dir={tmp_path / 'new'}", "--resume")
    assert rc == 2
    assert f"cannot resume: {tmp_path / 'new'} holds a final model but no checkpoint; start over with" in err


# ------------------------------------------------------------------------------------------------
# damaged and incomplete checkpoints
def _two_checkpoints(tmp_path, capsys, steps=12) -> tuple[Path, list[str]]:
    """A run stopped at step 8 whose checkpoints dir holds step 4 (a kept copy) and step 8."""
    run = tmp_path / "run"
    args = [*FAST, f"max_steps={steps}", "save_every=4", f"out_dir={run}"]
    assert train(capsys, *args, "stop_at_step=4")[0] == 0
    keep = tmp_path / "step-000004"
    shutil.copytree(run / "checkpoints" / "step-000004", keep)
    assert train(capsys, *args, "--resume", "stop_at_step=8")[0] == 0
    shutil.copytree(keep, run / "checkpoints" / "step-000004")  # as if rotation had not happened yet
    return run, args


def test_corrupted_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, capsys):
    rc, _, _ = train(capsys, *FAST, "max_steps=12", "save_every=4", f"out_dir={tmp_path / 'ref'}")
    run, args = _two_checkpoints(tmp_path, capsys)
    newest = run / "checkpoints" / "step-000008"
    blob = bytearray((newest / "model.safetensors").read_bytes())
    blob[-100] ^= 0xFF  # one flipped byte inside a weight
    (newest / "model.safetensors").write_bytes(bytes(blob))
    rc, out, err = train(capsys, *args, "--resume")
    assert rc == 0, err
    assert (
        f"resume: checkpoint {newest} is damaged: model.safetensors does not match its checksum; set aside "
        f"as {newest}.corrupt (not deleted)"
    ) in out
    assert f"resume: resuming from the newest intact checkpoint, {run}/checkpoints/step-000004" in out
    assert (newest.parent / "step-000008.corrupt" / "model.safetensors").read_bytes() == bytes(blob)
    _same_run(tmp_path / "ref", run)  # nothing lost: steps 5-8 ran again, identically


def test_explicitly_given_damaged_checkpoint_is_refused(tmp_path, capsys):
    run, _ = _two_checkpoints(tmp_path, capsys)
    newest = run / "checkpoints" / "step-000008"
    (newest / "optimizer.pt").write_bytes(b"garbage")
    rc, _, err = train(capsys, f"--resume={newest}")
    assert rc == 2
    assert (
        f"grass-llm train: error: cannot resume: {newest} is damaged: optimizer.pt has 7 bytes, the manifest "
        f"says"
    ) in err
    assert f"; the newest intact checkpoint beside it is {run}/checkpoints/step-000004" in err
    assert newest.is_dir()  # not moved, not deleted


def test_incomplete_checkpoint_is_never_used_nor_deleted(tmp_path, capsys):
    run, args = _two_checkpoints(tmp_path, capsys)
    newest = run / "checkpoints" / "step-000008"
    (newest / "COMPLETE").unlink()
    rc, out, _ = train(capsys, *args, "--resume", "stop_at_step=10")
    assert rc == 0
    assert (
        f"resume: checkpoint {newest} is incomplete (no COMPLETE marker); set aside as {newest}.incomplete "
        "(not deleted)"
    ) in out
    assert "at step 4" in out
    # rotation deleted the superseded checkpoints (4, and the new 8) but not the incomplete one
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-000008.incomplete", "step-000010"]


def test_only_checkpoint_incomplete_refuses_and_deletes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    args = [*FAST, "max_steps=12", "save_every=4", f"out_dir={run}"]
    assert train(capsys, *args, "stop_at_step=4")[0] == 0
    ckpt = run / "checkpoints" / "step-000004"
    (ckpt / "COMPLETE").unlink()
    files = sorted(p.name for p in ckpt.iterdir())
    rc, _, err = train(capsys, *args, "--resume")
    assert rc == 2
    assert f"cannot resume: no intact checkpoint in {run}/checkpoints (see above; nothing was deleted)" in err
    assert sorted(p.name for p in (run / "checkpoints" / "step-000004.incomplete").iterdir()) == files
    assert read_log(run)  # the log is kept too


def test_resuming_an_older_checkpoint_into_newer_ones_needs_overwrite(tmp_path, capsys):
    run, _ = _two_checkpoints(tmp_path, capsys)
    older = run / "checkpoints" / "step-000004"
    rc, _, err = train(capsys, f"--resume={older}")
    assert rc == 2
    assert f"it holds newer checkpoints ({run}/checkpoints/step-000008)" in err and "overwrite=true" in err
    rc, out, _ = train(capsys, f"--resume={older}", "overwrite=true", "stop_at_step=6")
    aside = run / "replaced-run-1"
    assert rc == 0
    assert f"overwrite=true: set the newer checkpoints checkpoints/step-000008 aside in {aside}; deleted" in out
    verify_checkpoint(aside / "checkpoints" / "step-000008")  # kept until the run is complete
    rc, out, _ = train(capsys, "--resume", f"out_dir={run}")
    assert rc == 0 and "done:" in out and not aside.exists()


# ------------------------------------------------------------------------------------------------
# bad paths: clear errors, exit code 2, no traceback
def test_out_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = train(capsys, *FAST, f"out_dir={f}")
    assert rc == 2
    assert (
        f"grass-llm train: error: out_dir {str(f)!r} is a file; allowed: a directory (created if missing)"
        in err
    )
    rc, _, err = train(capsys, *FAST, f"out_dir={f}/run")
    assert rc == 2 and f"out_dir {str(f / 'run')!r} is not writable: Not a directory" in err


def _without_root_override() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE from the bounding set (prctl PR_CAPBSET_DROP), so
    that root obeys file modes like any user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(24, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE) failed")


def test_read_only_out_dir(tmp_path):
    """As a user who cannot write there (run as root, the CLI loses CAP_DAC_OVERRIDE: root writes anywhere)."""
    base = Path(tempfile.mkdtemp(prefix="grass-ro-"))
    try:
        base.chmod(0o755)
        ro = base / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        kwargs = {"preexec_fn": _without_root_override} if os.geteuid() == 0 else {}
        proc = start(base, *FAST, f"out_dir={ro}", **kwargs)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert f"grass-llm train: error: out_dir {str(ro)!r} is not writable: Permission denied" in err
        assert "Traceback" not in err and list(ro.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_max_length_beyond_the_builtin_models_positions(tmp_path, capsys):
    rc, _, err = train(capsys, "max_length=600", f"out_dir={tmp_path}", "max_steps=2")
    assert rc == 2
    assert "max_length=600 is longer than builtin:tiny-pretrained's 512 positions; allowed: <= 512" in err


def test_config_path_that_is_a_directory(tmp_path, capsys):
    rc, _, err = train(capsys, "--config", str(tmp_path))
    assert rc == 2 and f"config file {str(tmp_path)!r} is a directory; allowed: a YAML file" in err
    binary = tmp_path / "x.yaml"
    binary.write_bytes(bytes(range(256)))
    rc, _, err = train(capsys, "--config", str(binary))
    assert rc == 2 and "is not a text file; allowed: a YAML file" in err


def test_memory_on_a_binary_file(tmp_path, capsys):
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    rc = main(["memory", "--model", str(binary)])
    err = capsys.readouterr().err
    assert rc == 2 and f"grass-llm memory: error: model={str(binary)!r}: cannot read a JSON config" in err


# ------------------------------------------------------------------------------------------------
# what the user reads
def test_version_and_help():
    proc = subprocess.run([sys.executable, "-m", "grass_llm", "--version"], capture_output=True, text=True)
    assert (
        proc.returncode == 0 and proc.stdout.startswith("grass-llm ") and proc.stdout.strip() != "grass-llm"
    )
    proc = subprocess.run([sys.executable, "-m", "grass_llm", "train", "-h"], capture_output=True, text=True)
    assert "Mirror the log to TensorBoard (out_dir/tensorboard)" in proc.stdout
    assert "130 / 143 stopped by SIGINT / SIGTERM" in proc.stdout


def test_warnings_are_one_line_and_third_party_noise_is_hidden(tmp_path, capsys):
    # a warning of ours: one line, no source line
    rc, _, err = train(capsys, *FAST, "max_steps=2", f"out_dir={tmp_path / 'a'}")
    assert rc == 0
    assert (
        "grass-llm: warning: grass.probe_steps=2 >= the run's 2 optimizer steps: no weight will change; "
        "lower grass.probe_steps or raise max_steps / epochs\n"
    ) in err
    assert "warnings.warn(" not in err and "self._setup_schedule()" not in err
    # LoRA + activation checkpointing: transformers' FutureWarning and its shard-writing bar stay out
    rc, out, err = train(
        capsys,
        *FAST,
        "method=lora",
        "lora.rank=4",
        "activation_checkpointing=full",
        "max_steps=2",
        f"out_dir={tmp_path / 'b'}",
    )
    assert rc == 0 and (tmp_path / "b" / "final" / "model.safetensors").is_file()
    assert "FutureWarning" not in err and "deprecated" not in err and "Writing model shards" not in out + err
