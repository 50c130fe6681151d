"""The layout of a run directory (``out_dir`` of ``grass-llm train``): the names its writer (the recipe)
and its readers (``grass-llm plot``, ``grass-llm eval``, ``--resume``) share, each defined once.

    log.jsonl       one record per optimizer step (grass_llm.runlog)
    tensorboard/    TensorBoard mirror of the log
    checkpoints/    resumable checkpoints, step-NNNNNN/ (grass_llm.recipes.run_checkpoint)
    final/          the final model + tokenizer (LoRA / DoRA: the adapter alone in final/adapter/)
    plots/          PNG plots (grass_llm.plots)
    eval/           where ``grass-llm eval --model RUN/final`` writes by default
    replaced-run-N/ an earlier run that ``overwrite=true`` set aside; deleted once the new run is complete
    .grass-llm.lock held by the ``grass-llm train`` running in it (grass_llm.recipes.run_lock)
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "ADAPTER_DIR",
    "CHECKPOINT_DIR",
    "EVAL_DIR",
    "FINAL_DIR",
    "LOCK_FILENAME",
    "LOG_FILENAME",
    "PLOTS_DIR",
    "REPLACED_PREFIX",
    "RUN_OUTPUTS",
    "TENSORBOARD_DIR",
    "is_run_dir",
    "run_outputs",
]

LOG_FILENAME = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
FINAL_DIR = "final"
ADAPTER_DIR = "adapter"  # in FINAL_DIR: an adapter method's adapter alone (+ tokenizer)
PLOTS_DIR = "plots"
EVAL_DIR = "eval"
#: Everything a run writes into its directory (what ``overwrite=true`` replaces; nothing else is touched).
RUN_OUTPUTS = (LOG_FILENAME, TENSORBOARD_DIR, CHECKPOINT_DIR, FINAL_DIR, PLOTS_DIR, EVAL_DIR)
#: ``replaced-run-N``: where ``overwrite=true`` sets an earlier run aside until the new one is complete
REPLACED_PREFIX = "replaced-run-"
#: the lock of the run in progress (never an output: not copied, not replaced)
LOCK_FILENAME = ".grass-llm.lock"


def run_outputs(path: str | os.PathLike[str]) -> list[str]:
    """The names in ``path`` that a run wrote (``RUN_OUTPUTS`` and set-aside earlier runs), in that order."""
    path = Path(path)
    found = [n for n in RUN_OUTPUTS if (path / n).exists() or (path / n).is_symlink()]
    if path.is_dir():
        found += sorted(p.name for p in path.iterdir() if p.name.startswith(REPLACED_PREFIX))
    return found


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is the directory of a ``grass-llm train`` run (it has a log or checkpoints)."""
    path = Path(path)
    return (path / LOG_FILENAME).is_file() or (path / CHECKPOINT_DIR).is_dir()
