"""One run per ``out_dir``: the lock ``grass-llm train`` holds on its run directory while it runs.

The lock is ``out_dir/.grass-llm.lock`` (``grass_llm.run_layout.LOCK_FILENAME``) with an exclusive
``flock`` on it, and the holder (process id, host, start time, command line) written inside. A second
``grass-llm train`` on the same ``out_dir`` (a new run, or a second ``--resume``) finds it held and stops
with exit code 2, naming the holder.

Invariants:

* the kernel releases an ``flock`` when its process ends, however it ends (exit, crash, ``kill -9``),
  so a lock file left behind by a killed process is stale by construction: the next run takes it over;
* the holder unlinks the file while it still holds the lock, then closes it. A process that opened the
  file just before (and waits for nothing: the lock is non-blocking) checks, once it holds the lock,
  that the file it locked is still the one at the path (same inode) and tries again otherwise, so two
  processes never both believe they hold it;
* the holder writes itself into the file only after it holds the lock, so a process that finds the lock
  held may read the file before it is written: it reads again for a moment before naming no holder;
* on a file system without ``flock`` (some network mounts) the run goes on unlocked, with a warning.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from grass_llm.run_layout import LOCK_FILENAME

__all__ = ["RunDirBusy", "RunDirLock"]


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock; ``holder`` describes it."""

    def __init__(self, run_dir: Path, holder: str) -> None:
        super().__init__(f"out_dir {str(run_dir)!r} is in use by {holder}")
        self.run_dir, self.holder = run_dir, holder


def _describe(info: dict[str, Any]) -> str:
    """The holder of a lock, for a message: ``grass-llm train (pid 12, host h, since ...: cmd)``."""
    if not info.get("pid"):
        return "another grass-llm process (it is starting)"
    where = f"pid {info['pid']} on {info.get('host', '?')}"
    since = f", running since {info['started']}" if info.get("started") else ""
    command = f": {info['command']}" if info.get("command") else ""
    return f"another grass-llm train ({where}{since}{command})"


class RunDirLock:
    """The lock of one run directory (module docstring). ``acquire`` raises :class:`RunDirBusy`."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILENAME
        self._fd: int | None = None
        self.took_over: dict[str, Any] | None = None  # the holder of a stale lock this one replaced

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunDirLock:
        try:
            import fcntl
        except ImportError:  # (not POSIX)
            warnings.warn(f"no lock on {self.run_dir}: file locks need a POSIX system", UserWarning, stacklevel=2)
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = self._read_holder(fd)
                os.close(fd)
                raise RunDirBusy(self.run_dir, _describe(info)) from None
            except OSError as e:  # (ENOLCK, EOPNOTSUPP: a file system without flock)
                os.close(fd)
                warnings.warn(f"no lock on {self.run_dir}: {e.strerror or e}", UserWarning, stacklevel=2)
                return self
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder unlinked it meanwhile: lock the new file
        stale = self._read(fd)
        self.took_over = stale if stale.get("pid") else None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["grass-llm", *sys.argv[1:]]) if sys.argv else "",
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    @classmethod
    def _read_holder(cls, fd: int, wait_s: float = 2.0) -> dict[str, Any]:
        """The holder of a lock held by another process. The holder writes itself in just after it took
        the lock, so a lock found empty is read again for up to ``wait_s`` before it is called starting."""
        deadline = time.monotonic() + wait_s
        while not (info := cls._read(fd)).get("pid") and time.monotonic() < deadline:
            time.sleep(0.02)
        return info

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            data = os.pread(fd, 1 << 16, 0)
            info = json.loads(data.decode()) if data.strip() else {}
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def release(self) -> None:
        """Unlink the lock file while holding it, then close it (safe to call twice)."""
        if self._fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                os.unlink(self.path)
        except OSError:
            pass  # (the directory is gone or read-only: the lock dies with the file descriptor)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
