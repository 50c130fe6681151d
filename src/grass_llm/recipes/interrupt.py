"""SIGINT / SIGTERM for ``grass-llm train``: finish the step in flight, checkpoint it, exit 130 / 143.

:class:`StopSignals` replaces the handlers of SIGINT (Ctrl-C) and SIGTERM (schedulers, spot
preemption, ``kill``) while a run is set up and trained:

* outside a deferring section (setup: loading the model and data), a signal raises
  :class:`Interrupted` at once: nothing was trained yet, so nothing is lost;
* inside ``with signals.deferred():`` (the training loop, saving), the first signal is only
  recorded in ``received``; the loop finishes the step in flight, saves a checkpoint and returns;
* a second signal raises :class:`Interrupted` at once (stop now, without that checkpoint). Saves are
  atomic (``grass_llm.recipes.run_checkpoint``), so the checkpoints already there stay intact.

An exception raised from a signal handler lands in whatever code runs at that moment, third-party code
included, and that code may swallow it or turn it into another error: a ``try: import numpy`` that
catches everything leaves numpy half-imported, and the next import fails with ``RecursionError``. So
the stop is remembered outside the exception (``raised``): :meth:`StopSignals.check` raises it again at
a safe point (the end of setup, every step boundary), and the command line reports any error that
follows a raised stop as that stop (``grass_llm.cli.main``), with its exit code and one line.

Handlers can only be installed from the main thread; elsewhere ``install`` does nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["Interrupted", "StopSignals", "signal_name"]

HANDLED = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(BaseException):  # like KeyboardInterrupt: not caught by `except Exception`
    """A signal stopped the run at once; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, again: bool = False) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum
        self.again = again
        self.detail = ""  # filled in by the recipe: where it stopped, what is saved

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """SIGINT / SIGTERM handlers that defer the stop to the end of the training step (module doc)."""

    def __init__(self) -> None:
        self.received: int | None = None  # the first signal recorded while deferring
        self.raised: int | None = None  # a signal whose Interrupted was raised (it may have been swallowed)
        self._defer = 0
        self._old: dict[int, Any] = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in HANDLED:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def ignore(self) -> None:
        """Ignore the handled signals from now on: a process whose command has ended (its exit code and
        message decided) exits with them, instead of a ``KeyboardInterrupt`` traceback."""
        for s in self._old:
            signal.signal(s, signal.SIG_IGN)
        self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self._defer and self.received is None and self.raised is None:
            self.received = signum
            return
        again = self.received is not None or self.raised is not None
        if self.raised is None:
            self.raised = signum
        raise Interrupted(signum, again=again)

    def check(self) -> None:
        """Raise :class:`Interrupted` again if a signal raised it before (code in between may have
        swallowed it); a safe point, in our own code."""
        if self.raised is not None:
            raise Interrupted(self.raised, again=self.received is not None)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Record the first signal instead of stopping (the caller polls ``received``). A stop raised
        before (and swallowed) stops here, before anything deferred starts."""
        self.check()
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1
