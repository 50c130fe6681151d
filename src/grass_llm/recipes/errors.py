"""How ``grass-llm train`` ends: its exit codes and the two errors of a run that does not finish."""

from __future__ import annotations

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "TrainFailed", "TrainInputError"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class TrainInputError(ValueError):
    """Bad input found before training (data file, model path, out_dir, incompatible settings): exit code 2."""


class TrainFailed(RuntimeError):
    """The run stopped without finishing (divergence, non-finite weights, a write that failed): exit code 1.
    The message says why and what was kept."""
