"""Nothing already written is lost (issue #20, first class): what a command replaces is deleted only once
its replacement is complete, and a refused or failed command leaves every file as it found it.

Driven through the CLI (``grass_llm.cli.main`` in this process). A full disk is simulated by a quota on
every file written under the run directory: Python's ``open`` (``torch.save`` through a file object, the
run log, matplotlib) and safetensors' ``save_file`` (Rust, so patched by name) fail once the quota is
used up, with ``OSError(ENOSPC)`` or, as ``torch.save``'s own writer does, ``RuntimeError``. The write
that fills the disk is drawn at random (``GRASS_FAULT_SEED`` replays a draw)."""

from __future__ import annotations

import builtins
import contextlib
import errno
import fnmatch
import io
import os
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from test_faults import FAST, _same_run, train

from grass_llm.recipes.run_checkpoint import list_checkpoints, verify_checkpoint
from grass_llm.runlog import read_log

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> content)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# overwrite=true: set aside, deleted once the new run is complete; never its own input
def test_overwrite_with_the_earlier_runs_final_model_as_input_is_refused_and_changes_nothing(tmp_path, capsys):
    """The issue's command (`out_dir=D overwrite=true model=D/final`) deleted D, input model included."""
    run = tmp_path / "D"
    assert train(capsys, *FAST, "max_steps=3", f"out_dir={run}")[0] == 0
    before = _files(run)
    for given in (f"model={run}/final", f"model={run}/final/"):
        rc, _, err = train(capsys, *FAST, "max_steps=3", f"out_dir={run}", "overwrite=true", given)
        assert rc == 2, err
        assert (
            f"grass-llm train: error: overwrite=true would replace {run}/final, which holds this run's input "
            f"{run}/final; copy it out of {run} first, or choose another out_dir (nothing was changed)"
        ) in err
        assert _files(run) == before
    # with a copy elsewhere it trains on it, and replaces the earlier run
    import shutil

    shutil.copytree(run / "final", tmp_path / "base")
    rc, out, err = train(capsys, *FAST, "max_steps=3", f"out_dir={run}", "overwrite=true", f"model={tmp_path / 'base'}")
    assert rc == 0, err
    assert "deleted what was set aside" in out and not (run / "replaced-run-1").exists()


def test_an_overwrite_that_does_not_complete_keeps_the_earlier_run(tmp_path, capsys):
    """Stopped (stop_at_step) or resumed: the earlier run is in replaced-run-1, byte for byte, until the
    run that replaced it is complete (a run that fails keeps it too: the full-disk test below)."""
    run = tmp_path / "D"
    args = [*FAST, "max_steps=6", "save_every=2", f"out_dir={run}"]
    assert train(capsys, *args)[0] == 0
    earlier = _files(run)
    rc, out, _ = train(capsys, *args, "overwrite=true", "stop_at_step=2")
    assert rc == 0 and "stopped at step 2 of 6" in out
    aside = run / "replaced-run-1"
    assert _files(aside) == earlier  # every file of the earlier run, moved (nothing copied or lost)
    assert [r["step"] for r in read_log(run)] == [1, 2]
    rc, out, _ = train(capsys, *args, "--resume", "stop_at_step=4")
    assert rc == 0 and _files(aside) == earlier
    # the replacing run completes: only now is the earlier run deleted
    rc, out, _ = train(capsys, *args, "--resume")
    assert rc == 0 and "done:" in out
    assert f"overwrite=true: this run is complete; deleted what was set aside in {aside}" in out
    assert not aside.exists() and (run / "final" / "model.safetensors").is_file()


def test_a_signal_while_an_overwrite_run_starts_keeps_the_earlier_run(tmp_path):
    """Ctrl-C at a random moment of an overwrite=true run (setup or training): the earlier run is intact
    (in place, or set aside), never gone."""
    import signal
    import subprocess
    import sys
    import time

    from test_faults import _env

    seed = int(os.environ.get("GRASS_FAULT_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    run = tmp_path / "D"
    args = [*FAST, "save_every=5", "out_dir=D"]
    proc = subprocess.run(
        [sys.executable, "-m", "grass_llm", "train", *args, "max_steps=6"], cwd=tmp_path, env=_env(), capture_output=True
    )
    assert proc.returncode == 0
    earlier = _files(run)
    proc = subprocess.Popen(
        [sys.executable, "-m", "grass_llm", "train", *args, "max_steps=150", "overwrite=true"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(rng.uniform(0.5, 8.0))  # (setup takes a few seconds, training about as long)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    where = f"seed {seed}: {out[-2000:]}\n{err[-2000:]}"
    assert proc.returncode in (0, 130), where
    assert "Traceback" not in err, where
    complete = "overwrite=true: this run is complete; deleted what was set aside" in out
    if proc.returncode == 130 and not complete:  # (the signal may land after the run completed)
        aside = run / "replaced-run-1"
        kept = _files(aside) if aside.exists() else {k: v for k, v in _files(run).items() if k in earlier}
        assert kept == earlier, where


# ------------------------------------------------------------------------------------------------
# a full disk at a random point
class DiskFull:
    """The disk under ``root`` fills up at ``fail_at`` = (file, n): the n-th write (1-based) to that file
    (its path relative to ``root``, a glob pattern; None: never, only record the writes) and every later
    write raise
    ``OSError(ENOSPC)`` (``kind="enospc"``) or ``RuntimeError`` (``kind="runtime"``, what ``torch.save``'s
    zip writer raises). Writes are ``write()`` calls on files opened for writing with Python's ``open``
    (``torch.save`` through a file object, the run log, configs, manifests, matplotlib, the tokenizer)
    and whole ``safetensors.torch.save_file`` calls (native code), which raise ``SafetensorError`` as
    they do on a full disk."""

    def __init__(self, root: Path, fail_at: tuple[str, int] | None, kind: str = "enospc") -> None:
        self.root, self.fail_at, self.kind = str(root.resolve()), fail_at, kind
        self.writes: list[str] = []  # the file of each write, relative to root
        self.hit = False
        self._open = builtins.open

    def draw(self, rng: random.Random) -> tuple[str, int]:
        """A write to fail at: a file drawn among those written (each as likely: the log as likely as a
        checkpoint's weights), then one of its writes."""
        name = rng.choice(sorted(set(self.writes)))
        return name, rng.randint(1, self.writes.count(name))

    def _write(self, what: str) -> None:
        name = os.path.relpath(os.path.abspath(what), self.root).replace(str(os.getpid()), "PID")
        self.writes.append(name)
        if self.fail_at is not None and fnmatch.fnmatch(name, self.fail_at[0]):
            matching = sum(fnmatch.fnmatch(n, self.fail_at[0]) for n in self.writes)
            self.hit = self.hit or matching == self.fail_at[1]
        if not self.hit:
            return
        if self.kind == "runtime":
            raise RuntimeError(f"[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file {what}")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)

    def _mine(self, path: str) -> bool:
        return bool(path) and os.path.abspath(path).startswith(self.root)

    def open(self, file, mode="r", *args, **kwargs):
        f = self._open(file, mode, *args, **kwargs)
        path = os.fsdecode(file) if isinstance(file, (str, bytes, os.PathLike)) else ""
        if any(c in mode for c in "wax+") and self._mine(path):
            return _Metered(f, self, path)
        return f

    def save_file(self, real):
        def save_file(tensors, filename, metadata=None):
            from safetensors import SafetensorError

            if self._mine(os.fspath(filename)):
                try:
                    self._write(os.fspath(filename))
                except (OSError, RuntimeError):
                    raise SafetensorError(
                        f"Error while serializing: I/O error: No space left on device (os error 28) at path {filename}"
                    ) from None
            return real(tensors, filename, metadata=metadata)

        return save_file

    @contextlib.contextmanager
    def installed(self, monkeypatch):
        import safetensors.torch
        import transformers.modeling_utils  # (binds save_file at import: patched by that name too)

        real = safetensors.torch.save_file
        with monkeypatch.context() as m:
            m.setattr(builtins, "open", self.open)
            m.setattr(io, "open", self.open)
            m.setattr(safetensors.torch, "save_file", self.save_file(real))
            m.setattr(transformers.modeling_utils, "safe_save_file", self.save_file(real))
            yield self


class _Metered:
    def __init__(self, f, disk: DiskFull, path: str) -> None:
        self._f, self._disk, self._path = f, disk, path

    def write(self, data):
        self._disk._write(self._path)
        return self._f.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.mark.parametrize("kind", ["enospc", "runtime"])
def test_a_full_disk_at_a_random_point_ends_in_one_line_and_loses_nothing(tmp_path, capsys, monkeypatch, kind):
    """Each draw: the disk fills at a random write (a checkpoint's weights, optimizer or manifest, the
    log, the final model...): the run stops with exit code 1 and one line naming the file, every
    checkpoint left verifies, no partial file is left behind; with room again --resume ends bit for bit
    where an uninterrupted run ends."""
    seed = int(os.environ.get("GRASS_FAULT_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    args = [*FAST, "max_steps=8", "save_every=3"]
    with DiskFull(tmp_path / "ref", None).installed(monkeypatch) as counted:
        assert train(capsys, *args, f"out_dir={tmp_path / 'ref'}")[0] == 0
    for attempt in range(3):
        run = tmp_path / f"run{attempt}"
        name, n = fail_at = counted.draw(rng)
        where = f"seed {seed}, attempt {attempt}: the disk fills at write {n} of {name}"
        with DiskFull(run, fail_at, kind).installed(monkeypatch) as disk:
            rc, _, err = train(capsys, *args, f"out_dir={run}")
        lines = [line for line in err.splitlines() if line.startswith("grass-llm train: error:")]
        assert len(lines) == 1 and "Traceback" not in err, f"{where}\n{err}"
        if name.startswith(".grass-llm-write-test"):  # out_dir's check before the run: nothing changed
            assert disk.hit and rc == 2 and "is not writable" in lines[0], f"{where}\n{err}"
            assert not run.exists(), where  # (this command created it: removed again)
            continue
        assert disk.hit and rc == 1, f"{where}\n{err}"
        cause = "No space left on device" if kind == "enospc" else "Error"  # (torch: RuntimeError, safetensors'...)
        assert "cannot write " in lines[0] and str(run) in lines[0] and cause in lines[0], f"{where}\n{err}"
        assert "then continue with --resume" in lines[0], f"{where}\n{err}"
        leftovers = [p for p in run.rglob("*") if ".tmp" in p.name]
        assert leftovers == [], f"{where}: {leftovers}"
        for _, d in list_checkpoints(run):
            verify_checkpoint(d)
        rc, _, err = train(capsys, *args, f"out_dir={run}", "--resume")
        assert rc == 0, f"{where}\n{err}"
        _same_run(tmp_path / "ref", run)


def test_checkpoint_and_final_weights_get_the_same_mode_as_the_other_files(tmp_path, capsys):
    """safetensors writes 0600; the run's other files follow the umask (0644 under 022)."""
    run = tmp_path / "run"
    assert train(capsys, *FAST, "max_steps=2", f"out_dir={run}")[0] == 0
    mask = os.umask(0)
    os.umask(mask)
    modes = {str(p.relative_to(run)): p.stat().st_mode & 0o777 for p in run.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o666 & ~mask}, modes
    assert "checkpoints/step-000002/model.safetensors" in modes and "final/model.safetensors" in modes


def test_a_damaged_log_line_on_resume_is_set_aside_not_a_traceback(tmp_path, capsys):
    """A corrupted log.jsonl line stopped --resume with a traceback after "resumed from ..."."""
    run = tmp_path / "run"
    args = [*FAST, "max_steps=6", "save_every=2", f"out_dir={run}"]
    assert train(capsys, *args, "stop_at_step=4")[0] == 0
    log = run / "log.jsonl"
    lines = log.read_text().splitlines()
    lines[1] = lines[1][:20] + "\x00garbage"
    damaged = "\n".join(lines) + "\n"
    log.write_text(damaged)
    rc, _, err = train(capsys, *args, "--resume")
    assert rc == 0, err
    assert "Traceback" not in err
    assert f"grass-llm: warning: {log}: line 2 is not a valid record" in err
    assert f"the log as it was is kept in {log}.damaged" in err
    assert (run / "log.jsonl.damaged").read_text() == damaged
    assert [r["step"] for r in read_log(run)] == [1, 3, 4, 5, 6]


def test_torch_load_of_saved_state_stays_weights_only(tmp_path, capsys):
    """The new entries of state.pt (the data fingerprint) load with weights_only=True."""
    run = tmp_path / "run"
    assert train(capsys, *FAST, "max_steps=2", f"out_dir={run}")[0] == 0
    state = torch.load(run / "checkpoints" / "step-000002" / "state.pt", weights_only=True)
    assert set(state["data_identity"]) == {"fingerprint", "records", "source"}
