"""The layout of a run directory (``out_dir`` of ``grass-llm train``): the names its writer (the recipe)
and its readers (``grass-llm plot``, ``grass-llm eval``, ``--resume``) share, each defined once.

    log.jsonl       one record per optimizer step (grass_llm.runlog)
    tensorboard/    TensorBoard mirror of the log
    checkpoints/    resumable checkpoints, step-NNNNNN/ (grass_llm.recipes.run_checkpoint)
    final/          the final model + tokenizer (LoRA / DoRA: the adapter alone in final/adapter/)
    plots/          PNG plots (grass_llm.plots)
    eval/           where ``grass-llm eval --model RUN/final`` writes by default
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "ADAPTER_DIR",
    "CHECKPOINT_DIR",
    "EVAL_DIR",
    "FINAL_DIR",
    "LOG_FILENAME",
    "PLOTS_DIR",
    "RUN_OUTPUTS",
    "TENSORBOARD_DIR",
    "is_run_dir",
]

LOG_FILENAME = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
FINAL_DIR = "final"
ADAPTER_DIR = "adapter"  # in FINAL_DIR: an adapter method's adapter alone (+ tokenizer)
PLOTS_DIR = "plots"
EVAL_DIR = "eval"
#: Everything a run writes into its directory (what ``overwrite=true`` deletes; nothing else is touched).
RUN_OUTPUTS = (LOG_FILENAME, TENSORBOARD_DIR, CHECKPOINT_DIR, FINAL_DIR, PLOTS_DIR, EVAL_DIR)


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is the directory of a ``grass-llm train`` run (it has a log or checkpoints)."""
    path = Path(path)
    return (path / LOG_FILENAME).is_file() or (path / CHECKPOINT_DIR).is_dir()
