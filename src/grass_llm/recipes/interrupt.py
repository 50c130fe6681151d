"""SIGINT / SIGTERM for ``grass-llm train``: finish the step in flight, checkpoint it, exit 130 / 143.

:class:`StopSignals` replaces the handlers of SIGINT (Ctrl-C) and SIGTERM (schedulers, spot
preemption, ``kill``) while a run is set up and trained:

* outside a deferring section (setup: loading the model and data), a signal raises
  :class:`Interrupted` at once: nothing was trained yet, so nothing is lost;
* inside ``with signals.deferred():`` (the training loop, saving), the first signal is only
  recorded in ``received``; the loop finishes the step in flight, saves a checkpoint and returns;
* a second signal raises :class:`Interrupted` at once (stop now, without that checkpoint). Saves are
  atomic (``grass_llm.recipes.run_checkpoint``), so the checkpoints already there stay intact.

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
        self.received: int | None = None
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

    def _handle(self, signum: int, frame: Any) -> None:
        if self._defer and self.received is None:
            self.received = signum
            return
        raise Interrupted(signum, again=self.received is not None)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Record the first signal instead of stopping (the caller polls ``received``)."""
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1
