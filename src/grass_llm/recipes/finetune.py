"""``grass-llm train``: fine-tune a causal LM with GRASS or a baseline (``grass_llm.recipes.methods``).

A recipe in the torchtune sense. :func:`train` reads a ``TrainConfig`` (YAML file + ``key=value``
overrides, see ``grass_llm.recipes.train_config``) and runs :class:`FinetuneRecipe`:

* ``setup()``: checks the input (config, data file, model path; bad input stops with exit code 2
  before any training), builds the model, the method's optimizer (``build_method``), the LR
  schedule (after GRASS probing) and the data, and restores a checkpoint when resuming;
* ``train_step()``: one optimizer step over ``grad_accum`` micro-batches (token-weighted loss over
  the whole step and all ranks);
* ``log()``: one ``log.jsonl`` record per step (and TensorBoard), the progress bar;
* ``save_checkpoint()`` / ``save_final()``: atomic resumable checkpoints
  (``grass_llm.recipes.run_checkpoint``), the final model + tokenizer, the plots.

Resuming (``--resume [PATH]`` or ``resume=auto``) restores the weights, the optimizer (for GRASS: every
layer's AdamW state, the MGN, the sampler and its RNG), the scheduler, the data position and the
global RNG states, so N steps + save + resume + N steps equals 2N uninterrupted steps bit for bit.

Run directory layout (``out_dir``, default ``runs/<method>``)::

    log.jsonl                  one record per optimizer step (grass_llm.recipes.runlog schema)
    tensorboard/               TensorBoard mirror of the log
    checkpoints/step-000120/   latest resumable checkpoint (model.pt, optimizer.pt, state.pt, config.yaml)
    final/                     final model + tokenizer (save_pretrained); LoRA: final/adapter too
    plots/                     PNG plots (grass_llm.plots)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grass_llm.recipes.train_config import TrainConfig, TrainConfigError, load_train_config

__all__ = [
    "DEMO_CONFIG",
    "FinetuneRecipe",
    "TrainInputError",
    "TrainResult",
    "add_cli_arguments",
    "cli_main",
    "train",
]

#: What ``grass-llm train`` runs without ``--config``: the tiny built-in model on the built-in
#: arithmetic sample, on CPU in well under a minute. Same as ``configs/demo.yaml``.
DEMO_CONFIG: dict[str, Any] = {
    "model": "builtin:tiny",
    "data": "builtin:arith",
    "method": "grass",
    "device": "cpu",
    "dtype": "fp32",
    "max_length": 96,
    "batch_size": 8,
    "grad_accum": 1,
    "lr": 3e-3,
    "warmup": 10,
    "schedule": "cosine",
    "max_steps": 200,
    "max_grad_norm": 1.0,
    "save_every": 50,
    "out_dir": "runs/demo",
    "grass": {"active_layers": 2, "period": 10, "probe_steps": 20},
}

_STATE_VERSION = 1
# settings a resumed run must share with its checkpoint (plus the method's own section)
_MUST_MATCH = (
    "model",
    "method",
    "data",
    "max_length",
    "batch_size",
    "grad_accum",
    "packing",
    "group_by_length",
)


class TrainInputError(ValueError):
    """Bad input found before training (data file, model path, incompatible settings): exit code 2."""


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    steps: int
    total_steps: int
    final_loss: float | None
    checkpoint: Path | None
    final_dir: Path | None
    final_kind: str
    log_path: Path
    plots: list[Path] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------
# CLI
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``grass-llm train`` (settings themselves are ``key=value`` overrides)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Fine-tune a causal LM with GRASS or a baseline. Settings come from the defaults, then --config, "
        "then key=value overrides (nested keys with dots: grass.active_layers=4). Without --config the "
        "built-in demo settings (configs/demo.yaml) are the base: `grass-llm train` alone trains a tiny "
        "random Llama on a built-in arithmetic sample on CPU."
    )
    lines = [f"  {k:<30} {h}" for k, h in TrainConfig.help().items()]
    parser.epilog = "settings (key=value):\n" + "\n".join(lines)
    parser.add_argument("--config", metavar="PATH", help="YAML file of settings (see configs/).")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="PATH",
        help="Continue from a checkpoint directory, or (no PATH) from the latest one in out_dir.",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="Print the resolved settings as YAML and exit."
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Setting overrides.")


def cli_main(args: argparse.Namespace) -> int:
    """Run ``grass-llm train``; returns the exit code (2 for bad input, before any training)."""
    try:
        cfg = load_train_config(args.config, args.overrides, base=None if args.config else DEMO_CONFIG)
        if args.resume is not None:
            cfg = dataclasses.replace(cfg, resume=args.resume)
    except TrainConfigError as e:
        print(f"grass-llm train: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    try:
        result = train(cfg)
    except (TrainInputError, TrainConfigError) as e:
        print(f"grass-llm train: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(result)
    return 0


def _quiet(*args: Any, **kwargs: Any) -> None:
    """``print`` for ranks other than 0 under torchrun."""


def _print_summary(r: TrainResult) -> None:
    loss = "n/a" if r.final_loss is None else f"{r.final_loss:.4f}"
    if r.steps < r.total_steps:
        print(f"\nstopped at step {r.steps} of {r.total_steps} ({r.seconds:.1f} s), last loss {loss}")
    else:
        print(f"\ndone: {r.steps} steps in {r.seconds:.1f} s, last loss {loss}")
    if r.checkpoint is not None:
        print(f"  checkpoint: {r.checkpoint}  (continue with --resume)")
    print(f"  model:      {r.final_dir if r.final_dir is not None else '-'}  ({r.final_kind})")
    print(f"  log:        {r.log_path}")
    tb = r.run_dir / "tensorboard"
    if tb.exists():
        print(f"  tensorboard: tensorboard --logdir {tb}")
    if r.plots:
        print(f"  plots:      {r.plots[0].parent}/ ({', '.join(p.name for p in r.plots)})")


def config_yaml(cfg: TrainConfig) -> str:
    """The resolved settings as YAML (what ``--print-config`` prints and checkpoints record)."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ------------------------------------------------------------------------------------------------
# input checks (no model or tokenizer needed)
def _resolve_device(cfg: TrainConfig):
    import torch

    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainInputError(f"device={cfg.device!r} but no CUDA device is available; allowed: cpu, auto")
    return torch.device(cfg.device)


def _resolve_dtype(cfg: TrainConfig, device):
    import torch

    if cfg.dtype == "fp32":
        return torch.float32
    if cfg.dtype == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _check_inputs(cfg: TrainConfig) -> Path | None:
    """File-system checks that need no model or tokenizer; returns the resolved data file."""
    from grass_llm.data import DataError, resolve_data_path
    from grass_llm.recipes.models import looks_like_path

    data_file: Path | None = None
    if cfg.data.startswith("builtin:"):
        if cfg.data != "builtin:arith":
            raise TrainInputError(
                f"data={cfg.data!r} is unknown; allowed: builtin:arith or a JSON/JSONL file"
            )
    else:
        try:
            data_file = resolve_data_path(cfg.data, cfg.data_dir)
        except DataError as e:
            raise TrainInputError(f"data: {e}") from None
        if not data_file.is_file():
            raise TrainInputError(f"data: {data_file} is not a file")
    if cfg.model.startswith("builtin:"):
        if cfg.model != "builtin:tiny":
            raise TrainInputError(
                f"model={cfg.model!r} is unknown; allowed: builtin:tiny, a hub name or a path"
            )
    elif looks_like_path(cfg.model) and not Path(cfg.model).expanduser().exists():
        raise TrainInputError(f"model path {cfg.model!r} does not exist")
    return data_file


def _check_resume_compatible(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    from grass_llm.recipes.methods import get_method

    now = cfg.to_dict()
    diff = [k for k in _MUST_MATCH if saved.get(k) != now.get(k)]
    method = get_method(cfg.method)
    section = "grass" if method.layer_wise else "lora" if method.adapters_only else None
    if section is not None and saved.get(section) != now.get(section):
        diff.append(section)
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
        raise TrainInputError(f"cannot resume from {path}: settings differ from the checkpoint's ({detail})")


# ------------------------------------------------------------------------------------------------
# data
class _Batches:
    """Endless micro-batches, epoch after epoch, resumable through ``state_dict`` (a data.Batcher)."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self._it = None

    def next(self):
        if self._it is None:
            self._it = self.loader.forever()
        return next(self._it)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.loader.load_state_dict(state)
        except ValueError as e:
            raise TrainInputError(f"cannot resume the data position: {e}") from None
        self._it = None


def _build_data(cfg: TrainConfig, tokenizer, data_file: Path | None):
    """Records -> tokenised examples -> a resumable ``data.Batcher``. DataError -> TrainInputError."""
    from grass_llm import data as D

    try:
        records = D.builtin_sample() if data_file is None else D.load_records(data_file)
        loader = D.build_loader(
            records,
            tokenizer,
            max_length=cfg.max_length,
            batch_size=cfg.batch_size,
            train_on_response_only=cfg.train_on_response_only,
            packing=cfg.packing,
            group_by_length=cfg.group_by_length,
            seed=cfg.seed,
        )
    except D.DataError as e:
        raise TrainInputError(str(e)) from None
    if len(loader) == 0:
        raise TrainInputError(f"data {cfg.data!r} gives no batch (batch_size={cfg.batch_size})")
    return loader


def _load_model_and_tokenizer(cfg: TrainConfig, dtype, device):
    import torch

    from grass_llm.recipes.models import ModelLoadError, load_model_and_tokenizer, tiny_llama

    if cfg.model == "builtin:tiny":
        from grass_llm.data import builtin_tokenizer

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


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed)


# ------------------------------------------------------------------------------------------------
# metrics
def _memory(device) -> tuple[int | None, int | None]:
    """(peak CUDA bytes allocated since the last reset or None, process RSS bytes or None)."""
    import torch

    cuda = None
    if device.type == "cuda":
        cuda = int(torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
    rss = None
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        with contextlib.suppress(ImportError):
            import resource

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
                1 if sys.platform == "darwin" else 1024
            )
    return cuda, rss


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


# ------------------------------------------------------------------------------------------------
# the recipe
def train(cfg: TrainConfig) -> TrainResult:
    """Run the training job described by ``cfg``. Bad input raises ``TrainInputError`` before training."""
    t_start = time.perf_counter()
    data_file = _check_inputs(cfg)
    device = _resolve_device(cfg)
    from grass_llm.recipes.launch import from_env

    launch, device = from_env(device)  # torchrun / accelerate: one process per device
    try:
        recipe = FinetuneRecipe(cfg, launch, device)
        recipe.setup(data_file)
        return recipe.run(t_start)
    finally:
        launch.close()


@dataclass
class _StepOutput:
    phase: str
    loss: float
    lr: float
    active: list[int]
    tokens: int
    seconds: float


class FinetuneRecipe:
    """One training run: ``setup`` then ``run`` (``train_step`` + ``log`` per step, ``save_*``)."""

    def __init__(self, cfg: TrainConfig, launch, device) -> None:
        self.cfg = cfg
        self.launch = launch
        self.device = device
        self.say = print if launch.is_main else _quiet
        self.run_dir = cfg.run_dir
        self.step = 0
        self.tokens_seen = 0
        self.last_ckpt: Path | None = None

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, data_file: Path | None) -> None:
        cfg, launch = self.cfg, self.launch
        if cfg.batch_size % launch.world_size:
            raise TrainInputError(
                f"batch_size={cfg.batch_size} is the micro-batch over all {launch.world_size} processes and "
                f"must be divisible by their number; allowed: a multiple of {launch.world_size}"
            )
        self.dtype = _resolve_dtype(cfg, self.device)
        resume_path = self._resume_path()
        from grass_llm.recipes.run_checkpoint import CheckpointError, load_checkpoint

        try:
            ckpt = load_checkpoint(resume_path) if resume_path is not None else None
        except CheckpointError as e:
            raise TrainInputError(str(e)) from None
        if ckpt is not None:
            _check_resume_compatible(ckpt["state"]["config"], cfg, resume_path)

        _seed_everything(cfg.seed)
        model, self.tokenizer = _load_model_and_tokenizer(cfg, self.dtype, self.device)
        self.loader = _build_data(cfg, self.tokenizer, data_file)
        self._setup_model_and_optimizer(model)
        self._setup_schedule()
        self.batches = _Batches(self.loader)
        if ckpt is not None:
            self._restore(ckpt, resume_path)
        else:
            self._clear_stale_checkpoints()

    def _resume_path(self) -> Path | None:
        cfg = self.cfg
        if cfg.resume is None:
            return None
        from grass_llm.recipes.run_checkpoint import CHECKPOINT_DIR, find_latest_checkpoint

        if cfg.resume == "auto":
            path = find_latest_checkpoint(self.run_dir)
            if path is None:
                self.say(
                    f"resume=auto: no checkpoint in {self.run_dir / CHECKPOINT_DIR}; starting from scratch"
                )
            return path
        path = Path(cfg.resume).expanduser()
        if not path.is_dir():
            raise TrainInputError(f"resume checkpoint {cfg.resume!r} does not exist")
        return path

    def _setup_model_and_optimizer(self, model) -> None:
        cfg, launch = self.cfg, self.launch
        from grass_llm.layers import LayerDiscoveryError, discover_layers
        from grass_llm.loss import chunked_loss_for
        from grass_llm.recipes.methods import MethodError, build_method, get_method

        self.method = get_method(cfg.method)
        try:
            self.num_layers = discover_layers(model, cfg.grass.layers).num_layers
        except LayerDiscoveryError as e:
            raise TrainInputError(f"model {cfg.model!r}: {e}") from None
        backend = None  # GrassOptimizer's own data-parallel sync (no DDP): active layers only
        if launch.distributed and self.method.layer_wise:
            from grass_llm.distributed import ReplicatedBackend

            backend = ReplicatedBackend(shard_optimizer_states=cfg.distributed.shard_optimizer_states)
        self._enable_activation_checkpointing(model)
        try:
            self.model, self.optimizer = build_method(model, cfg, backend)
        except MethodError as e:
            raise TrainInputError(str(e)) from None
        self.loss_fn = chunked_loss_for(self.model) if cfg.chunked_loss else None
        # what the loop calls: the model, or its DDP wrapper (fft / lora / dora on several ranks)
        self.fwd = self.model
        if launch.distributed and not self.method.layer_wise:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.fwd = DistributedDataParallel(self.model, device_ids=ids)
        # all micro-batches but the last run without gradient all-reduce
        self.no_sync = (
            self.optimizer.no_sync
            if self.method.layer_wise
            else getattr(self.fwd, "no_sync", contextlib.nullcontext)
        )

    def _enable_activation_checkpointing(self, model) -> None:
        from grass_llm.activation_checkpointing import apply_activation_checkpointing

        mode = self.cfg.activation_checkpointing
        try:
            apply_activation_checkpointing(model, mode, self.cfg.grass.layers)
        except TypeError as e:
            raise TrainInputError(f"activation_checkpointing={mode}: {e}") from None

    def _setup_schedule(self) -> None:
        cfg = self.cfg
        steps_per_epoch = max(len(self.loader) // cfg.grad_accum, 1)
        self.total_steps = (
            cfg.max_steps if cfg.max_steps is not None else max(math.ceil(cfg.epochs * steps_per_epoch), 1)
        )
        probe = cfg.probe_steps
        if probe >= self.total_steps:
            warnings.warn(
                f"grass.probe_steps={probe} >= the run's {self.total_steps} optimizer steps: no weight will "
                "change; lower grass.probe_steps or raise max_steps / epochs",
                UserWarning,
                stacklevel=2,
            )
        from grass_llm.schedule import build_lr_scheduler, resolve_warmup

        self.scheduler = build_lr_scheduler(
            self.optimizer,
            "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule,
            num_warmup_steps=resolve_warmup(cfg.warmup, max(self.total_steps - probe, 1)),
            num_training_steps=self.total_steps,
            delay_steps=probe,
        )

    def _restore(self, ckpt: dict[str, Any], path: Path) -> None:
        from grass_llm.recipes.run_checkpoint import set_rng_state

        state = ckpt["state"]
        self._load_model_state(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.batches.load_state_dict(state["data"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        set_rng_state(state["rng"], self.device)
        self.last_ckpt = path
        self.say(f"resumed from {path} at step {self.step}")

    def _clear_stale_checkpoints(self) -> None:
        from grass_llm.recipes.run_checkpoint import CHECKPOINT_DIR

        stale = self.run_dir / CHECKPOINT_DIR
        if self.launch.is_main and stale.is_dir() and any(stale.iterdir()):
            self.say(
                f"starting from scratch in {self.run_dir}: replacing its old checkpoints (use --resume to continue)"
            )
            shutil.rmtree(stale)
        self.launch.barrier()  # invariant: no rank looks for checkpoints while rank 0 removes them

    # -- model state (the whole model, or the adapters) -----------------------------------------
    def _model_state(self) -> dict[str, Any]:
        if self.method.adapters_only:
            return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return {n: t.detach().cpu().clone() for n, t in self.model.state_dict().items()}

    def _load_model_state(self, state: dict[str, Any]) -> None:
        import torch

        if self.method.adapters_only:
            params = dict(self.model.named_parameters())
            missing = [n for n in state if n not in params]
            if missing:
                raise TrainInputError(f"checkpoint adapters do not match the model: {missing[:3]} ...")
            with torch.no_grad():
                for n, t in state.items():
                    params[n].copy_(t)
            return
        result = self.model.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise TrainInputError(
                f"checkpoint does not match the model; missing {result.missing_keys[:3]} ..."
            )

    # -- one optimizer step ---------------------------------------------------------------------
    def train_step(self) -> _StepOutput:
        """Forward + backward over ``grad_accum`` micro-batches, then step the optimizer and schedule.

        The loss is token-weighted over the whole step: every micro-batch's summed loss / all label
        tokens. With N ranks the gradient all-reduce takes the mean, so each rank divides by (tokens of
        all ranks) / N: the mean of the ranks' gradients is then the gradient of the global token mean.
        """
        import torch

        from grass_llm.loss import causal_lm_loss

        cfg, launch, device, opt = self.cfg, self.launch, self.device, self.optimizer
        t0 = time.perf_counter()
        micro = [launch.shard(self.batches.next()) for _ in range(cfg.grad_accum)]
        n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        if launch.distributed:
            (n_all,) = launch.sum([n_items], device)
            n_items_t = torch.tensor(max(n_all, 1.0) / launch.world_size, device=device)
        else:
            n_items_t = torch.tensor(max(n_items, 1), device=device)
        layer_wise = self.method.layer_wise
        phase = "probe" if layer_wise and opt.probing else "train"
        active = opt.active_layers if layer_wise else list(range(self.num_layers))
        lr = opt.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=device, dtype=torch.float32)
        tokens = 0
        for i, b in enumerate(micro):
            b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
            tokens += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
            with self.no_sync() if i + 1 < len(micro) else contextlib.nullcontext():
                loss = causal_lm_loss(self.fwd, b, self.loss_fn, n_items_t, cfg.compact_activations)
                loss.backward()
            loss_sum += loss.detach().float()
        if not layer_wise and cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], cfg.max_grad_norm
            )
        opt.step()
        self.scheduler.step()
        opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += tokens
        loss_all, tokens_all = launch.sum([float(loss_sum), tokens], device)
        # loss: the global token mean
        return _StepOutput(
            phase, loss_all / launch.world_size, lr, active, int(tokens_all), time.perf_counter() - t0
        )

    # -- logging --------------------------------------------------------------------------------
    def log(self, out: _StepOutput) -> None:
        cuda_mem, rss = _memory(self.device)
        record: dict[str, Any] = {
            "step": self.step,
            "phase": out.phase,
            "loss": out.loss,
            "lr": out.lr,
            "active_layers": [] if out.phase == "probe" else out.active,
            "tokens": out.tokens,
            "tokens_per_s": out.tokens / out.seconds if out.seconds > 0 else 0.0,
            "memory_bytes": cuda_mem,
            "rss_bytes": rss,
            "tokens_seen": self.tokens_seen,
        }
        if self.method.layer_wise:
            record["importance"] = self.optimizer.importance
            record["probabilities"] = self.optimizer.probabilities
        if self.logger is not None:
            self.logger.log(record)
        layers = "probe" if out.phase == "probe" else ",".join(map(str, out.active))
        self.pbar.update(1)
        self.pbar.set_postfix(
            loss=f"{out.loss:.3f}",
            tok_s=f"{record['tokens_per_s']:.0f}",
            layers=layers if self.method.layer_wise else "all",
            mem=_fmt_bytes(cuda_mem if cuda_mem is not None else rss),
            refresh=False,
        )

    def _announce(self) -> None:
        cfg, launch, model = self.cfg, self.launch, self.model
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        micro = len(self.loader)
        self.say(
            f"grass-llm train: {cfg.method} on {cfg.model} ({self.num_layers} layers, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {self.dtype}, {self.device}); "
            f"data {cfg.data}: {micro} batches of {cfg.batch_size}/epoch; {self.total_steps} steps"
            + (f" ({cfg.probe_steps} probing)" if cfg.probe_steps else "")
            + ("" if self.method.layer_wise else f"; {n_trainable / 1e6:.2f}M trainable")
            + (
                f"; {launch.world_size} processes x {cfg.batch_size // launch.world_size} rows"
                if launch.distributed
                else ""
            )
        )

    # -- saving ---------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Save a checkpoint from rank 0 (every rank builds the payload: with ZeRO-1 sharding the
        optimizer's ``state_dict()`` is a collective). Returns its path on every rank once complete."""
        from grass_llm.recipes.run_checkpoint import checkpoint_path, rng_state, save_checkpoint

        state = {
            "version": _STATE_VERSION,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "scheduler": self.scheduler.state_dict(),
            "data": self.batches.state_dict(),
            "rng": rng_state(self.device),
            "config": self.cfg.to_dict(),
        }
        payload = {"model": self._model_state(), "optimizer": self.optimizer.state_dict(), "state": state}
        path = checkpoint_path(self.run_dir, self.step)
        if self.launch.is_main:
            path = save_checkpoint(self.run_dir, self.step, payload, config_yaml(self.cfg))
        self.launch.barrier()  # invariant: no rank goes on (or exits) before the checkpoint is complete
        self.last_ckpt = path
        return path

    def save_final(self) -> tuple[Path, str]:
        """The final model (the method's ``save_final``) + tokenizer in ``RUN/final``."""
        final = self.run_dir / "final"
        if final.exists():
            shutil.rmtree(final)
        final.mkdir(parents=True)
        self.tokenizer.save_pretrained(final)
        out, kind = self.method.save_final(self.model, final, self.cfg)
        if self.method.adapters_only:
            self.tokenizer.save_pretrained(final / "adapter")
        return out, kind

    # -- the loop -------------------------------------------------------------------------------
    def run(self, t_start: float) -> TrainResult:
        cfg, launch = self.cfg, self.launch
        from tqdm.auto import tqdm

        from grass_llm.recipes.runlog import RunLogger

        self.logger = (
            RunLogger(self.run_dir, tensorboard=cfg.tensorboard, resume_from=self.step)
            if launch.is_main
            else None
        )
        self._announce()
        self.model.train()
        last_loss: float | None = None
        end = self.total_steps if cfg.stop_at_step is None else min(cfg.stop_at_step, self.total_steps)
        self.pbar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=cfg.method,
            dynamic_ncols=True,
            file=sys.stderr,
            disable=not launch.is_main,
        )
        try:
            while self.step < end:
                out = self.train_step()
                last_loss = out.loss
                self.log(out)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < end:
                    self.save_checkpoint()
        finally:
            self.pbar.close()
            if self.logger is not None:
                self.logger.close()
        if self.last_ckpt is None or self.last_ckpt.name != f"step-{self.step:06d}":
            self.save_checkpoint()
        final_dir, final_kind, plots = (
            None,
            f"not written: stopped at step {self.step} of {self.total_steps}",
            [],
        )
        if launch.is_main:  # every rank holds the same weights; rank 0 writes them
            if self.step == self.total_steps:  # (stop_at_step: the run goes on after --resume)
                final_dir, final_kind = self.save_final()
            plots = _plots(self.run_dir) if cfg.plots else []
        launch.barrier()
        return TrainResult(
            run_dir=self.run_dir,
            steps=self.step,
            total_steps=self.total_steps,
            final_loss=last_loss,
            checkpoint=self.last_ckpt,
            final_dir=final_dir,
            final_kind=final_kind,
            log_path=self.run_dir / "log.jsonl",
            plots=plots,
            seconds=time.perf_counter() - t_start,
        )


def _plots(run_dir: Path) -> list[Path]:
    try:
        from grass_llm.plots import plot_run
    except ImportError as e:
        warnings.warn(f"plots skipped: {e}", UserWarning, stacklevel=2)
        return []
    try:
        return [Path(p) for p in plot_run(run_dir)]
    except Exception as e:  # plotting must never fail a finished run
        warnings.warn(f"plots skipped: {type(e).__name__}: {e}", UserWarning, stacklevel=2)
        return []
