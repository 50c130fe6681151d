"""Results that were silently wrong (issue #20, second class), driven as a user drives them: two real
processes on one out_dir, --resume on changed data or a changed GrassConfig, skipped steps and the LR
schedule (issue #17.4) in grass-llm train and under the Hugging Face Trainer."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from test_faults import FAST, _log_steps, start, train

from grass_llm.data import builtin_sample
from grass_llm.recipes.run_checkpoint import verify_checkpoint
from grass_llm.runlog import read_log

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]


# ------------------------------------------------------------------------------------------------
# one run per out_dir: two real processes
def _both(tmp_path: Path, *args: str) -> list[tuple[int, str, str, int]]:
    """Start two `grass-llm train ARGS` together; (exit code, stdout, stderr, pid) of each."""
    procs = [start(tmp_path, *args) for _ in range(2)]
    out = []
    for p in procs:
        o, e = p.communicate(timeout=240)
        out.append((p.returncode, o, e, p.pid))
    return out


def test_two_processes_on_one_out_dir_one_runs_the_other_stops_naming_it(tmp_path):
    """Started together (new runs, then two --resume): one trains, the other stops with exit code 2
    before writing anything, naming the process that holds the out_dir; every step is logged once."""
    args = [*FAST, "max_steps=12", "save_every=4", "out_dir=run"]
    for extra in ([], ["--resume", "max_steps=24"]):
        results = sorted(_both(tmp_path, *args, *extra), key=lambda r: r[0])
        (rc_ok, out_ok, _, pid_ok), (rc_busy, _, err_busy, _) = results
        assert (rc_ok, rc_busy) == (0, 2), err_busy
        assert "done:" in out_ok
        assert (
            f"grass-llm train: error: out_dir 'run' is in use by another grass-llm train (pid {pid_ok} on "
        ) in err_busy and "; wait for it to end, or choose another out_dir (nothing was changed)" in err_busy
        assert "Traceback" not in err_busy
        steps = [r["step"] for r in read_log(tmp_path / "run")]
        assert steps == list(range(1, steps[-1] + 1)) and steps[-1] in (12, 24)
    assert not (tmp_path / "run" / ".grass-llm.lock").exists()  # released on exit


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    run = tmp_path / "run"
    proc = start(tmp_path, *FAST, "max_steps=100000", "save_every=3", "out_dir=run")
    deadline = time.time() + 120
    while _log_steps(run) < 4:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = proc.pid
    assert (run / ".grass-llm.lock").is_file()  # left behind, but no process holds it
    proc = start(tmp_path, *FAST, "max_steps=8", "out_dir=run", "--resume")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert f"out_dir: took over the lock left by pid {killed}, which is no longer running" in out
    assert not (run / ".grass-llm.lock").exists()


def test_a_lock_found_before_its_holder_wrote_itself_in_still_names_the_holder(tmp_path):
    """The holder writes its pid just after it takes the lock (CI met the gap on a loaded machine: the
    second process said "it is starting"); one that never writes is called starting, after a moment."""
    import fcntl
    import threading

    from grass_llm.recipes.run_lock import RunDirBusy, RunDirLock

    fd = os.open(tmp_path / ".grass-llm.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a second open file description: a second holder
    try:
        with pytest.raises(RunDirBusy) as never:
            RunDirLock(tmp_path).acquire()
        assert never.value.holder == "another grass-llm process (it is starting)"
        info = json.dumps({"pid": 4321, "host": "h", "started": "then", "command": "grass-llm train x"})
        writer = threading.Timer(0.3, lambda: os.pwrite(fd, info.encode(), 0))
        writer.start()
        with pytest.raises(RunDirBusy) as late:
            RunDirLock(tmp_path).acquire()
        writer.join()
        assert late.value.holder == "another grass-llm train (pid 4321 on h, running since then: grass-llm train x)"
    finally:
        os.close(fd)


def test_the_plots_are_drawn_while_the_run_holds_its_out_dir(tmp_path, capsys, monkeypatch):
    """grass-llm train draws its plots from out_dir/log.jsonl into out_dir/plots: another run (overwrite=true)
    that took the directory in between would have its log plotted and its run set aside. Found by review:
    the lock was released before the plots were drawn."""
    import grass_llm.plots as plots
    from grass_llm.recipes.run_lock import RunDirBusy, RunDirLock

    seen = []
    real = plots.plot_run

    def plot_run(run_dir, *a, **kw):
        try:
            RunDirLock(run_dir).acquire().release()
            seen.append("free")
        except RunDirBusy:
            seen.append("held")
        return real(run_dir, *a, **kw)

    monkeypatch.setattr(plots, "plot_run", plot_run)
    rc, out, err = train(capsys, *FAST, "max_steps=2", "plots=true", f"out_dir={tmp_path / 'run'}")
    assert rc == 0, err
    assert seen == ["held"] and (tmp_path / "run" / "plots").is_dir() and "plots:" in out
    assert not (tmp_path / "run" / ".grass-llm.lock").exists()


# ------------------------------------------------------------------------------------------------
# the training data's fingerprint
def _write_json(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))
    return path


def test_resume_on_changed_data_is_refused_unless_asked(tmp_path, capsys):
    records = builtin_sample()
    first = _write_json(tmp_path / "a" / "math.json", records)
    run = tmp_path / "run"
    args = [*FAST, "max_steps=8", "save_every=2", f"out_dir={run}", "data=math.json"]
    assert train(capsys, *args, f"data_dir={first.parent}", "stop_at_step=2")[0] == 0
    ckpt = run / "checkpoints" / "step-000002"
    before = sorted(p.name for p in run.rglob("*"))
    # the same number of records, one answer changed; and the same name through a new data_dir
    changed = [dict(r) for r in records]
    changed[5]["output"] = changed[5]["output"].replace("The answer", "So the answer")
    _write_json(tmp_path / "b" / "math.json", changed)
    for how in ([f"data_dir={first.parent}"], [f"data_dir={tmp_path / 'b'}"]):
        if how == [f"data_dir={first.parent}"]:
            _write_json(first, changed)
        rc, _, err = train(capsys, *args, *how, "--resume")
        assert rc == 2, err
        assert f"grass-llm train: error: cannot resume from {ckpt}: the training data changed since it was saved (" in err
        assert "64 records, fingerprint " in err and "add allow_data_change=true to continue on this data" in err
        assert sorted(p.name for p in run.rglob("*")) == before  # nothing changed
    # the same content in another layout (one line, keys reordered) elsewhere: the same data
    _write_json(first, records)
    other = tmp_path / "c" / "math.json"
    other.parent.mkdir()
    other.write_text(json.dumps([dict(reversed(list(r.items()))) for r in records]))
    rc, out, err = train(capsys, *args, f"data_dir={other.parent}", "--resume", "stop_at_step=4")
    assert rc == 0, err
    # asked for explicitly: continues on the new data, and says so in the checkpoint
    rc, out, err = train(capsys, *args, f"data_dir={tmp_path / 'b'}", "--resume", "allow_data_change=true")
    assert rc == 0, err
    assert "resume: the training data changed since" in out and "(allow_data_change=true)" in out
    history = (run / "checkpoints" / "step-000008" / "config.yaml").read_text()
    assert "# resumed at step 4 with changes: data_dir " in history and ", data '" in history


# ------------------------------------------------------------------------------------------------
# a GrassConfig that differs from the one the optimizer state was saved under
def _rewrite(ckpt: Path, name: str, obj) -> None:
    """Replace ``ckpt/name`` and its manifest entry (as a user editing a checkpoint would have to)."""
    torch.save(obj, ckpt / name)
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    data = (ckpt / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (ckpt / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    verify_checkpoint(ckpt)


def test_resume_under_another_grass_config_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    args = [*FAST, "max_steps=6", "save_every=2", f"out_dir={run}"]
    assert train(capsys, *args, "stop_at_step=4")[0] == 0
    ckpt = run / "checkpoints" / "step-000004"
    for change in ("grass.temperature=3", "grass.active_layers=3", "grass.ema=0.9", "method=grass-static"):
        rc, _, err = train(capsys, *args, "--resume", change)
        assert rc == 2 and f"{change.split('=')[0]}:" in err and "cannot resume from" in err, err
    # the optimizer's own state saved under another GrassConfig (the settings say otherwise): refused
    # by GrassOptimizer.load_state_dict, one line, exit code 2
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    sd["grass"]["config"]["temperature"] = 7.0
    _rewrite(ckpt, "optimizer.pt", sd)
    rc, _, err = train(capsys, *args, "--resume")
    assert rc == 2, err
    assert f"grass-llm train: error: cannot resume from {ckpt}: it does not fit this run: state_dict was saved " in err
    assert "temperature: saved 7.0, now 1.0" in err and "Traceback" not in err
    # a state dict without its `state` entry (every moment lost) likewise
    sd["grass"]["config"]["temperature"] = 1.0
    del sd["state"]
    _rewrite(ckpt, "optimizer.pt", sd)
    rc, _, err = train(capsys, *args, "--resume")
    assert rc == 2 and "has no 'state' entry" in err, err


# ------------------------------------------------------------------------------------------------
# skipped steps and the LR schedule (issue #17.4)
def test_skipped_steps_do_not_move_the_lr_schedule_in_grass_llm_train(tmp_path, capsys, monkeypatch):
    """Non-finite losses at steps 1 (probing), 4 (first training step) and 6: probing repeats its
    skipped step, the warm-up starts at the first training step that completes, a skipped training step
    leaves the LR where it was; resumed in the middle, the same LRs."""
    import grass_llm.recipes.step as step_module

    real = step_module.causal_lm_loss
    calls = {"n": 0}
    nan_at = {1, 4, 6}

    def loss_with_nan(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] in nan_at else loss

    monkeypatch.setattr(step_module, "causal_lm_loss", loss_with_nan)
    args = [*FAST, "max_steps=10", "warmup=2", "lr=1e-3", "schedule=linear", "save_every=0"]
    rc, out, _ = train(capsys, *args, f"out_dir={tmp_path / 'a'}")
    assert rc == 0 and "skipped:    3 steps" in out
    log = read_log(tmp_path / "a")
    assert [r["skipped"] for r in log] == [i + 1 in nan_at for i in range(10)]
    assert [r["phase"] for r in log[:4]] == ["probe", "probe", "probe", "train"]  # step 1 repeated
    lrs = [r["lr"] for r in log]
    # completed training steps 1, 2, 3...: warm-up 0, 0.5 lr, then linear decay over the 8 steps
    # after probing; the skipped steps 4 and 6 repeat the LR of the step they replace
    expected = [1e-3 * f for f in (0.0, 0.0, 0.5, 0.5, 1.0, 5 / 6, 4 / 6)]
    assert lrs[3:] == pytest.approx(expected), lrs
    assert all(lr == lrs[0] for lr in lrs[:3])  # the schedule holds during probing


def test_skipped_steps_do_not_move_the_lr_schedule_under_the_trainer(tmp_path):
    """The Trainer calls scheduler.step() after every optimizer step, skipped or not."""
    transformers = pytest.importorskip("transformers")
    from conftest import RandomTokens, make_tiny_llama

    from grass_llm import GrassConfig
    from grass_llm.integrations.hf import create_grass_optimizer_and_scheduler

    model = make_tiny_llama(num_layers=4)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        max_steps=9,
        warmup_steps=2,
        lr_scheduler_type="linear",
        disable_tqdm=True,
        seed=0,
    )
    opt, sched = create_grass_optimizer_and_scheduler(
        model, args, grass_config=GrassConfig(active_layers=1, period=2, probe_steps=2)
    )
    nan_at = {1, 4}  # the Trainer's steps (1-based): one in probing, the first training step
    applied: list[float] = []

    def loss_with_nan(outputs, labels, num_items_in_batch=None):
        step = len(applied) + 1
        applied.append(opt.param_groups[0]["lr"])
        logits = outputs.logits[:, :-1].reshape(-1, outputs.logits.shape[-1]).float()
        loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1))
        return loss * float("nan") if step in nan_at else loss

    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=RandomTokens(),
        optimizers=(opt, sched),
        compute_loss_func=loss_with_nan,
    )
    trainer.train()
    assert opt.skipped_steps == 2
    # steps 1-3 probe (step 1 skipped and repeated), step 4 (first training step) skipped: the warm-up
    # starts at step 5 with 0, then 0.5 lr, then the linear decay over the 7 steps after probing
    assert applied[:3] == [applied[0]] * 3
    assert applied[3:] == pytest.approx([1e-2 * f for f in (0.0, 0.0, 0.5, 1.0, 4 / 5, 3 / 5)]), applied
    # the scheduler's state still loads with weights_only=True (the Trainer's resume), and resumes exactly
    import io

    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["last_epoch"] == 9 - 2
