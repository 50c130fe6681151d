"""What a run trains, built from its settings: the model and tokenizer, the data, the method's model
and optimizer (sharded with FSDP2 or wrapped in DDP as the launch asks), the loss and the LR schedule,
gathered in a :class:`TrainObjects`. Bad input raises ``TrainInputError``."""

from __future__ import annotations

import contextlib
import functools
import math
import random
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grass_llm.activation_checkpointing import apply_activation_checkpointing
from grass_llm.data import (
    Batcher,
    DataError,
    build_loader,
    builtin_sample,
    builtin_tokenizer,
    load_records,
    records_fingerprint,
)
from grass_llm.layers import LayerDiscoveryError, discover_layers
from grass_llm.loss import ChunkedCausalLMLoss, chunked_loss_for
from grass_llm.models import ModelLoadError, load_model_and_tokenizer, load_tiny_pretrained, tiny_llama
from grass_llm.recipes.errors import TrainInputError
from grass_llm.recipes.launch import Launch
from grass_llm.recipes.methods import Method, MethodError, build_method, get_method
from grass_llm.recipes.train_config import TrainConfig
from grass_llm.schedule import build_lr_scheduler, warmup_after_delay

__all__ = ["Batches", "DataIdentity", "TrainObjects", "build", "build_data", "load_model", "seed_everything"]


@dataclass
class TrainObjects:
    """Everything the loop, the checkpoints and the final model need of a run's build."""

    method: Method
    model: nn.Module  # as build_method returned it (peft-wrapped, FSDP2-sharded)
    fwd: nn.Module  # what the loop calls: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: ChunkedCausalLMLoss | None  # None: the model's own loss
    no_sync: Callable[[], AbstractContextManager[Any]]  # around all micro-batches of a step but the last
    trainable: list[nn.Parameter]
    tokenizer: Any
    loader: Batcher
    num_layers: int
    total_steps: int
    hf_config: Any  # of the unwrapped model: under FSDP2 the final model is rebuilt from them
    generation_config: Any
    data: DataIdentity  # what the run trains on (checked on resume)


@dataclass(frozen=True)
class DataIdentity:
    """The training data's content: its fingerprint (``data.records_fingerprint``) and record count."""

    fingerprint: str
    records: int
    source: str  # the data setting (for messages)

    def to_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "records": self.records, "source": self.source}


def build(
    cfg: TrainConfig, launch: Launch, device: torch.device, dtype: torch.dtype, fsdp: bool, data_file: Path | None
) -> TrainObjects:
    """Seed, load, build the method and the schedule, in the order that makes a run reproducible."""
    seed_everything(cfg.seed)
    # FSDP2: the model is read into host memory and fully_shard moves each rank's shards to the device
    model, tokenizer = load_model(cfg, dtype, torch.device("cpu") if fsdp else device)
    loader, data = build_data(cfg, tokenizer, data_file)
    method = get_method(cfg.method)
    try:
        num_layers = discover_layers(model, cfg.grass.layers).num_layers
    except LayerDiscoveryError as e:
        raise TrainInputError(f"model {cfg.model!r}: {e}") from None
    hf_config, generation_config = model.config, getattr(model, "generation_config", None)
    model, optimizer = _build_method(cfg, launch, method, model, fsdp)
    loss_fn = chunked_loss_for(model) if cfg.chunked_loss else None
    fwd, no_sync = _data_parallel(launch, device, method, model, optimizer, fsdp)
    scheduler, total_steps = _build_schedule(cfg, optimizer, loader)
    return TrainObjects(
        method=method,
        model=model,
        fwd=fwd,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=loss_fn,
        no_sync=no_sync,
        trainable=[p for p in model.parameters() if p.requires_grad],
        tokenizer=tokenizer,
        loader=loader,
        num_layers=num_layers,
        total_steps=total_steps,
        hf_config=hf_config,
        generation_config=generation_config,
        data=data,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed)


def load_model(cfg: TrainConfig, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of ``cfg.model`` (a built-in model, a hub name or a path) on ``device``."""
    if cfg.model == "builtin:tiny-pretrained":
        tokenizer = builtin_tokenizer()
        try:
            model = load_tiny_pretrained(dtype)
        except ModelLoadError as e:
            raise TrainInputError(str(e)) from None
        positions = model.config.max_position_embeddings
        if cfg.max_length > positions:
            raise TrainInputError(
                f"max_length={cfg.max_length} is longer than builtin:tiny-pretrained's "
                f"{positions} positions; allowed: <= {positions}"
            )
    elif cfg.model == "builtin:tiny":
        tokenizer = builtin_tokenizer()
        model = tiny_llama(
            len(tokenizer),
            max_positions=max(512, cfg.max_length),
            seed=cfg.seed,
            dtype=dtype,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    else:
        torch.manual_seed(cfg.seed)
        try:
            model, tokenizer = load_model_and_tokenizer(cfg.model, dtype)
        except ModelLoadError as e:
            raise TrainInputError(str(e)) from None
    model.config.use_cache = False
    return model.to(device), tokenizer


def build_data(cfg: TrainConfig, tokenizer: Any, data_file: Path | None) -> tuple[Batcher, DataIdentity]:
    """Records -> tokenised examples -> a resumable ``data.Batcher``, and the records' identity.
    DataError -> TrainInputError."""
    try:
        records = builtin_sample() if data_file is None else load_records(data_file)
        loader = build_loader(
            records,
            tokenizer,
            max_length=cfg.max_length,
            batch_size=cfg.batch_size,
            train_on_response_only=cfg.train_on_response_only,
            packing=cfg.packing,
            group_by_length=cfg.group_by_length,
            seed=cfg.seed,
        )
    except DataError as e:
        raise TrainInputError(str(e)) from None
    if len(loader) == 0:
        raise TrainInputError(f"data {cfg.data!r} gives no batch (batch_size={cfg.batch_size})")
    source = cfg.data if data_file is None else str(data_file)
    return loader, DataIdentity(records_fingerprint(records), len(records), source)


class Batches:
    """Endless micro-batches, epoch after epoch, resumable through ``state_dict`` (a data.Batcher)."""

    def __init__(self, loader: Batcher) -> None:
        self.loader = loader
        self._it: Iterator[dict[str, torch.Tensor]] | None = None

    def next(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._it = self.loader.forever()
        return next(self._it)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any], data_changed: bool = False) -> str | None:
        """Continue at ``state``'s position. On data that changed (``allow_data_change=true``) a position
        that does not fit the new data continues at the start of the same epoch; returns what was done
        then (None: the exact position)."""
        self._it = None
        try:
            self.loader.load_state_dict(state)
            return None
        except ValueError as e:
            if not data_changed:
                raise TrainInputError(f"cannot resume the data position: {e}") from None
        epoch = int(state.get("epoch", 0))
        self.loader.load_state_dict({"epoch": epoch, "index": 0})
        return f"the saved data position does not fit the changed data: continuing at the start of epoch {epoch}"


def _build_method(
    cfg: TrainConfig, launch: Launch, method: Method, model: nn.Module, fsdp: bool
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The method's (model, optimizer), on the data-parallel backend the launch asks for."""
    backend, shard = None, None  # one process: GrassOptimizer's LocalBackend
    if fsdp:  # every rank holds a shard of each block; GRASS picks its FSDP2Backend
        from grass_llm.distributed.fsdp2 import apply_fsdp2

        backend = "auto"
        shard = functools.partial(apply_fsdp2, layers=cfg.grass.layers)
    elif launch.distributed and method.layer_wise:
        from grass_llm.distributed import ReplicatedBackend

        # GrassOptimizer's own data-parallel sync (no DDP): active layers only
        backend = ReplicatedBackend(shard_optimizer_states=cfg.distributed.shard_optimizer_states)
    mode = cfg.activation_checkpointing
    try:
        apply_activation_checkpointing(model, mode, cfg.grass.layers)
    except TypeError as e:
        raise TrainInputError(f"activation_checkpointing={mode}: {e}") from None
    try:
        return build_method(model, cfg, backend, shard=shard)
    except MethodError as e:
        raise TrainInputError(str(e)) from None


def _data_parallel(
    launch: Launch,
    device: torch.device,
    method: Method,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    fsdp: bool,
) -> tuple[nn.Module, Callable[[], AbstractContextManager[Any]]]:
    """What the loop calls (the model, or its DDP wrapper: fft / lora / dora replicated on several
    ranks), and the context that keeps all micro-batches but the last from all-reducing / reduce-scattering."""
    fwd = model
    if launch.distributed and not fsdp and not method.layer_wise:
        from torch.nn.parallel import DistributedDataParallel

        fwd = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if method.layer_wise:
        return fwd, optimizer.no_sync
    if fsdp:
        return fwd, functools.partial(_fsdp_no_sync, model)
    return fwd, getattr(fwd, "no_sync", contextlib.nullcontext)


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    """FSDP2's gradient accumulation without communication (fft / lora / dora): the unsharded
    gradients stay on each rank until the last micro-batch reduce-scatters them."""
    from grass_llm.distributed.fsdp2 import fsdp_root

    root = fsdp_root(model)
    root.set_requires_gradient_sync(False, recurse=True)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True, recurse=True)


def _build_schedule(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, loader: Batcher
) -> tuple[torch.optim.lr_scheduler.LambdaLR, int]:
    """The LR schedule over the run's optimizer steps (warmup and decay after GRASS probing), and their number."""
    steps_per_epoch = max(len(loader) // cfg.grad_accum, 1)
    total = cfg.max_steps if cfg.max_steps is not None else max(math.ceil(cfg.epochs * steps_per_epoch), 1)
    probe = cfg.probe_steps
    if probe >= total:
        warnings.warn(
            f"grass.probe_steps={probe} >= the run's {total} optimizer steps: no weight will "
            "change; lower grass.probe_steps or raise max_steps / epochs",
            UserWarning,
            stacklevel=2,
        )
    scheduler = build_lr_scheduler(
        optimizer,
        "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule,
        num_warmup_steps=warmup_after_delay(cfg.warmup, total, probe),
        num_training_steps=total,
        delay_steps=probe,
    )
    return scheduler, total
