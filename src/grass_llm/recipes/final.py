"""The final model of a run: ``RUN/final`` (the method's ``save_final`` + the tokenizer), written in a
temporary directory first and renamed into place; under FSDP2 from an unsharded copy gathered on rank 0."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from grass_llm.recipes.build import TrainObjects
from grass_llm.recipes.errors import TrainFailed
from grass_llm.recipes.launch import Launch
from grass_llm.recipes.run_checkpoint import describe_error, file_mode
from grass_llm.recipes.train_config import TrainConfig
from grass_llm.run_layout import ADAPTER_DIR, FINAL_DIR

__all__ = ["unsharded_model", "write_final"]


def unsharded_model(objs: TrainObjects, cfg: TrainConfig, launch: Launch, dtype: torch.dtype) -> nn.Module | None:
    """Rank 0: the FSDP2 model's full weights in an unsharded copy on the CPU (other ranks: None).
    A collective: FSDP2 all-gathers each parameter."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(objs.model, options=options)  # (on rank 0 only)
    if not launch.is_main:
        return None
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(objs.hf_config, dtype=dtype)
    if objs.method.wrap is not None:
        plain = objs.method.wrap(plain, cfg)
    plain.load_state_dict(full, strict=True, assign=True)
    if objs.generation_config is not None:  # (from_config would rebuild it from config.json)
        base = plain.get_base_model() if hasattr(plain, "get_base_model") else plain
        base.generation_config = copy.deepcopy(objs.generation_config)
    return plain


def write_final(objs: TrainObjects, cfg: TrainConfig, model: nn.Module, kept: str) -> tuple[Path, str]:
    """Write ``model`` (the method's ``save_final``) and the tokenizer into ``RUN/final`` through
    ``RUN/final.tmp``; returns (the directory to load, its description). ``kept``: what a failure leaves.

    An earlier ``RUN/final`` is replaced only once the new one is complete (a rename); a write that
    fails (disk full: an ``OSError``, or a writer's own ``RuntimeError`` / ``SafetensorError``) leaves
    no ``final.tmp`` behind and ends the run with ``TrainFailed`` naming the directory."""
    final = cfg.run_dir / FINAL_DIR
    tmp = cfg.run_dir / f"{FINAL_DIR}.tmp"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        with _no_hf_progress_bar():  # transformers' "Writing model shards" bar
            objs.tokenizer.save_pretrained(tmp)
            out, kind = objs.method.save_final(model, tmp, cfg)
            if objs.method.adapters_only:
                objs.tokenizer.save_pretrained(tmp / ADAPTER_DIR)
        mode = file_mode()
        for f in tmp.rglob("*"):  # (safetensors creates its files 0600)
            if f.is_file():
                os.chmod(f, mode)
        _replace(tmp, final)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainFailed(
            f"cannot write the final model in {final}: {describe_error(e)}. {kept} Make room (or fix the "
            "permissions), then continue with --resume"
        ) from None
    return final / out.relative_to(tmp), kind.replace(str(tmp), str(final))


def _replace(tmp: Path, final: Path) -> None:
    """``tmp`` becomes ``final``; an earlier ``final`` is deleted only once the new one is in place."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f"{FINAL_DIR}.replaced.tmp")
    if old.exists():
        shutil.rmtree(old)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _no_hf_progress_bar() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if on:
            hf_logging.enable_progress_bar()
