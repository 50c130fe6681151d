"""``grass-llm train``: fine-tune a causal LM with GRASS or a baseline (grass-static, LISA, FFT, LoRA, DoRA).

A recipe in the torchtune sense: one function, ``train(config)``, that reads a ``TrainConfig``
(YAML file + ``key=value`` overrides, see ``grass_llm.train_config``) and runs the whole job:

1. checks the input (config, data file, model path) and stops with exit code 2 before any training;
2. builds the model (``builtin:tiny``: a tiny random Llama with the built-in tokenizer), wraps it
   with peft for LoRA / DoRA, turns on gradient checkpointing if asked;
3. builds the optimizer: ``GrassOptimizer`` for grass / grass-static / lisa, ``torch.optim.AdamW``
   over the trainable parameters for fft / lora / dora; and an LR schedule with warmup that starts
   after GRASS probing;
4. trains with gradient accumulation (token-weighted loss over the micro-batches of a step), a tqdm
   bar, one ``log.jsonl`` record per step (and TensorBoard), atomic resumable checkpoints;
5. saves the final model + tokenizer, draws the plots, prints where everything is.

Resuming (``--resume [PATH]`` or ``resume=auto``) restores the weights, the optimizer (for GRASS: every
layer's AdamW state, the MGN, the sampler and its RNG), the scheduler, the data position and the
global RNG states, so N steps + save + resume + N steps equals 2N uninterrupted steps bit for bit.

Run directory layout (``out_dir``, default ``runs/<method>``)::

    log.jsonl                  one record per optimizer step (grass_llm.runlog schema)
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

from grass_llm.train_config import TrainConfig, TrainConfigError, load_train_config

__all__ = [
    "DEMO_CONFIG",
    "TrainInputError",
    "TrainResult",
    "add_cli_arguments",
    "cli_main",
    "find_latest_checkpoint",
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

CHECKPOINT_DIR = "checkpoints"
_STEP_PREFIX = "step-"
_TMP_SUFFIX = ".tmp"
_COMPLETE = "COMPLETE"
_STATE_VERSION = 1


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
    from grass_llm.train_config import TrainConfig as _TC

    lines = [f"  {k:<28} {h}" for k, h in _TC.help().items()]
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
        print(_config_yaml(cfg), end="")
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


def _config_yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ------------------------------------------------------------------------------------------------
# setup
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


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _check_inputs(cfg: TrainConfig) -> Path | None:
    """File-system checks that need no model or tokenizer; returns the resolved data file."""
    from grass_llm.data import DataError, resolve_data_path

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
    elif _looks_like_path(cfg.model) and not Path(cfg.model).expanduser().exists():
        raise TrainInputError(f"model path {cfg.model!r} does not exist")
    return data_file


def _build_tiny_model(tokenizer, max_length: int, seed: int):
    """builtin:tiny: a random 8-layer Llama (hidden 64) sized to the built-in tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max(512, max_length),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _load_model_and_tokenizer(cfg: TrainConfig, dtype, device):
    import torch

    if cfg.model == "builtin:tiny":
        from grass_llm.data import builtin_tokenizer

        tokenizer = builtin_tokenizer()
        model = _build_tiny_model(tokenizer, cfg.max_length, cfg.seed).to(dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(cfg.seed)
        local = Path(cfg.model).expanduser()
        source = str(local) if local.exists() or _looks_like_path(cfg.model) else cfg.model
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except (OSError, ValueError) as e:
            raise TrainInputError(f"cannot load model {cfg.model!r}: {e}") from None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = (
                tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
            )
    model.config.use_cache = False
    return model.to(device), tokenizer


def _wrap_lora(cfg: TrainConfig, model, dtype):
    """LoRA / DoRA adapters through peft; adapter dtype per ``lora.dtype``."""
    import torch
    from peft import LoraConfig, get_peft_model

    lo = cfg.lora
    peft_cfg = LoraConfig(
        r=lo.rank,
        lora_alpha=lo.alpha,
        target_modules=list(lo.target_modules),
        lora_dropout=lo.dropout,
        use_dora=cfg.method == "dora",
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        # autocast_adapter_dtype=False keeps the adapters in the model dtype; we cast explicitly below
        model = get_peft_model(model, peft_cfg, autocast_adapter_dtype=False)
    except ValueError as e:
        raise TrainInputError(f"lora.target_modules={lo.target_modules!r}: {e}") from None
    adapter_dtype = {"model": dtype, "fp32": torch.float32, "bf16": torch.bfloat16}[lo.dtype]
    for p in model.parameters():
        if p.requires_grad and p.dtype != adapter_dtype:
            p.data = p.data.to(adapter_dtype)
    return model


def _build_optimizer(cfg: TrainConfig, model, launch):
    import torch

    if cfg.layer_wise:
        from grass_llm.config import ConfigError
        from grass_llm.optim import GrassOptimizer

        sync = None  # GrassOptimizer's own data-parallel sync (no DDP): active layers only
        if launch.distributed:
            from grass_llm.distributed import ReplicatedBackend

            shard = cfg.grass.shard_optimizer_states and cfg.method != "lisa"
            sync = ReplicatedBackend(shard_optimizer_states=shard)
        try:
            return GrassOptimizer(
                model,
                cfg.grass_config(),
                lr=cfg.learning_rate,
                weight_decay=cfg.weight_decay,
                distributed=sync,
            )
        except ConfigError as e:
            section = "lisa" if cfg.method == "lisa" else "grass"
            raise TrainInputError(f"{section}.{e}") from None
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed)


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


# ------------------------------------------------------------------------------------------------
# checkpoints
def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``run_dir/checkpoints``, or None."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for d in root.iterdir():
        if not d.name.startswith(_STEP_PREFIX) or d.name.endswith(_TMP_SUFFIX):
            continue
        if not (d / _COMPLETE).is_file():
            continue
        try:
            step = int(d.name[len(_STEP_PREFIX) :])
        except ValueError:
            continue
        if best is None or step > best[0]:
            best = (step, d)
    return None if best is None else best[1]


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _save_torch(obj: Any, path: Path) -> None:
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _model_state(cfg: TrainConfig, model) -> dict[str, Any]:
    """Everything that training changes: the whole model, or the adapters for LoRA / DoRA."""
    if cfg.method in ("lora", "dora"):
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}


def _load_model_state(cfg: TrainConfig, model, state: dict[str, Any]) -> None:
    import torch

    if cfg.method in ("lora", "dora"):
        params = dict(model.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise TrainInputError(f"checkpoint adapters do not match the model: {missing[:3]} ...")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)
        return
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise TrainInputError(f"checkpoint does not match the model; missing {result.missing_keys[:3]} ...")


def _rng_state(device) -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _scheduler_state(scheduler) -> dict[str, Any]:
    return scheduler.state_dict()  # grass_llm.schedule keeps it weights_only-loadable


def _load_scheduler_state(scheduler, state: dict[str, Any]) -> None:
    scheduler.load_state_dict(state)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


def _save_checkpoint(run_dir: Path, step: int, payload: dict[str, Any], cfg: TrainConfig) -> Path:
    """Write ``checkpoints/step-N`` atomically: a temp dir, fsync'd, then ``os.replace``.

    Invariant: a directory named ``step-N`` (without ``.tmp``) holding ``COMPLETE`` is complete. The
    previous checkpoint is deleted only after the new one has been renamed into place, so a crash at
    any moment leaves at least one complete checkpoint.
    """
    root = run_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_STEP_PREFIX}{step:06d}"
    tmp = root / (final.name + _TMP_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _save_torch(payload["model"], tmp / "model.pt")
    _save_torch(payload["optimizer"], tmp / "optimizer.pt")
    _save_torch(payload["state"], tmp / "state.pt")
    with open(tmp / "config.yaml", "w") as f:
        f.write(_config_yaml(cfg))
        f.flush()
        os.fsync(f.fileno())
    with open(tmp / _COMPLETE, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # same step saved twice (end of run right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in root.iterdir():
        if old != final and old.name.startswith(_STEP_PREFIX):
            shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    if not (path / _COMPLETE).is_file():
        raise TrainInputError(f"{path} is not a complete grass-llm checkpoint (no {_COMPLETE} marker)")
    out = {}
    for name in ("model", "optimizer", "state"):
        try:
            out[name] = torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True)
        except Exception as e:
            raise TrainInputError(f"cannot read checkpoint file {path / (name + '.pt')}: {e}") from None
    return out


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


def _check_resume_compatible(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    now = cfg.to_dict()
    diff = [k for k in _MUST_MATCH if saved.get(k) != now.get(k)]
    for section in ("grass", "lisa", "lora"):
        if cfg.method in _SECTION_METHODS[section] and saved.get(section) != now.get(section):
            diff.append(section)
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
        raise TrainInputError(f"cannot resume from {path}: settings differ from the checkpoint's ({detail})")


_SECTION_METHODS = {"grass": ("grass", "grass-static"), "lisa": ("lisa",), "lora": ("lora", "dora")}


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
    from grass_llm.launch import from_env

    launch, device = from_env(device)  # torchrun / accelerate: one process per device
    try:
        return _run(cfg, launch, device, data_file, t_start)
    finally:
        launch.close()


def _run(cfg: TrainConfig, launch, device, data_file: Path | None, t_start: float) -> TrainResult:
    import torch

    say = print if launch.is_main else _quiet
    if cfg.batch_size % launch.world_size:
        raise TrainInputError(
            f"batch_size={cfg.batch_size} is the micro-batch over all {launch.world_size} processes and must be "
            f"divisible by their number; allowed: a multiple of {launch.world_size}"
        )
    dtype = _resolve_dtype(cfg, device)
    run_dir = cfg.run_dir

    # resume target (checked before building anything)
    resume_path: Path | None = None
    if cfg.resume is not None:
        if cfg.resume == "auto":
            resume_path = find_latest_checkpoint(run_dir)
            if resume_path is None:
                say(f"resume=auto: no checkpoint in {run_dir / CHECKPOINT_DIR}; starting from scratch")
        else:
            resume_path = Path(cfg.resume).expanduser()
            if not resume_path.is_dir():
                raise TrainInputError(f"resume checkpoint {cfg.resume!r} does not exist")
    ckpt = _load_checkpoint(resume_path) if resume_path is not None else None
    if ckpt is not None:
        _check_resume_compatible(ckpt["state"]["config"], cfg, resume_path)

    _seed_everything(cfg.seed)
    model, tokenizer = _load_model_and_tokenizer(cfg, dtype, device)
    loader = _build_data(cfg, tokenizer, data_file)

    from grass_llm.layers import LayerDiscoveryError, discover_layers

    try:
        num_layers = discover_layers(model).num_layers
    except LayerDiscoveryError as e:
        raise TrainInputError(f"model {cfg.model!r}: {e}") from None
    if cfg.method in ("lora", "dora"):
        model = _wrap_lora(cfg, model, dtype)
    if cfg.gradient_checkpointing:
        from grass_llm.activation_checkpointing import enable_gradient_checkpointing

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        try:
            enable_gradient_checkpointing(base)
        except TypeError as e:
            raise TrainInputError(f"gradient_checkpointing=true: {e}") from None
    optimizer = _build_optimizer(cfg, model, launch)
    fwd = model  # what the loop calls: the model, or its DDP wrapper (fft / lora / dora on several ranks)
    if launch.distributed and not cfg.layer_wise:
        from torch.nn.parallel import DistributedDataParallel

        fwd = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # all micro-batches but the last run without gradient all-reduce (GrassOptimizer: and without the
    # step_in_backward update)
    no_sync = optimizer.no_sync if cfg.layer_wise else getattr(fwd, "no_sync", contextlib.nullcontext)

    micro_per_epoch = len(loader)
    steps_per_epoch = max(micro_per_epoch // cfg.grad_accum, 1)
    total_steps = (
        cfg.max_steps if cfg.max_steps is not None else max(math.ceil(cfg.epochs * steps_per_epoch), 1)
    )
    probe = cfg.probe_steps
    if probe >= total_steps:
        warnings.warn(
            f"grass.probe_steps={probe} >= the run's {total_steps} optimizer steps: no weight will change; "
            "lower grass.probe_steps or raise max_steps / epochs",
            UserWarning,
            stacklevel=2,
        )
    from grass_llm.schedule import build_lr_scheduler, resolve_warmup

    schedule = "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule
    scheduler = build_lr_scheduler(
        optimizer,
        schedule,
        num_warmup_steps=resolve_warmup(cfg.warmup, max(total_steps - probe, 1)),
        num_training_steps=total_steps,
        delay_steps=probe,
    )
    batches = _Batches(loader)

    # -- restore ----------------------------------------------------------------------------------
    step, tokens_seen = 0, 0
    if ckpt is not None:
        _load_model_state(cfg, model, ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        _load_scheduler_state(scheduler, ckpt["state"]["scheduler"])
        batches.load_state_dict(ckpt["state"]["data"])
        step = int(ckpt["state"]["step"])
        tokens_seen = int(ckpt["state"]["tokens_seen"])
        _set_rng_state(ckpt["state"]["rng"], device)
        say(f"resumed from {resume_path} at step {step}")
    else:
        stale = run_dir / CHECKPOINT_DIR
        if launch.is_main and stale.is_dir() and any(stale.iterdir()):
            say(
                f"starting from scratch in {run_dir}: replacing its old checkpoints (use --resume to continue)"
            )
            shutil.rmtree(stale)
        launch.barrier()  # invariant: no rank looks for checkpoints while rank 0 removes them
    del ckpt

    from grass_llm.runlog import RunLogger

    logger = RunLogger(run_dir, tensorboard=cfg.tensorboard, resume_from=step) if launch.is_main else None
    layer_wise = cfg.layer_wise
    all_layers = list(range(num_layers))
    trainable = [p for p in model.parameters() if p.requires_grad] if not layer_wise else []
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(
        f"grass-llm train: {cfg.method} on {cfg.model} ({num_layers} layers, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {dtype}, {device}); "
        f"data {cfg.data}: {micro_per_epoch} batches of {cfg.batch_size}/epoch; {total_steps} steps"
        + (f" ({probe} probing)" if probe else "")
        + ("" if layer_wise else f"; {n_trainable / 1e6:.2f}M trainable")
        + (
            f"; {launch.world_size} processes x {cfg.batch_size // launch.world_size} rows"
            if launch.distributed
            else ""
        )
    )

    from tqdm.auto import tqdm

    model.train()
    last_loss: float | None = None
    last_ckpt: Path | None = find_latest_checkpoint(run_dir) if step else None
    end = total_steps if cfg.stop_at_step is None else min(cfg.stop_at_step, total_steps)
    pbar = tqdm(
        total=total_steps,
        initial=step,
        desc=cfg.method,
        dynamic_ncols=True,
        file=sys.stderr,
        disable=not launch.is_main,
    )
    try:
        while step < end:
            t0 = time.perf_counter()
            micro = [launch.shard(batches.next()) for _ in range(cfg.grad_accum)]
            # token-weighted loss over the whole step: every micro-batch's summed loss / all label tokens.
            # With N ranks the gradient all-reduce takes the mean, so each rank divides by (tokens of all
            # ranks) / N: the mean of the ranks' gradients is then the gradient of the global token mean.
            n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
            if launch.distributed:
                (n_all,) = launch.sum([n_items], device)
                n_items_t = torch.tensor(max(n_all, 1.0) / launch.world_size, device=device)
            else:
                n_items_t = torch.tensor(max(n_items, 1), device=device)
            phase = "probe" if layer_wise and optimizer.probing else "train"
            active = optimizer.active_layers if layer_wise else all_layers
            lr = optimizer.param_groups[0]["lr"]
            loss_sum = torch.zeros((), device=device, dtype=torch.float32)
            tokens = 0
            for i, b in enumerate(micro):
                b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
                tokens += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                with no_sync() if i + 1 < len(micro) else contextlib.nullcontext():
                    out = fwd(**b, num_items_in_batch=n_items_t)
                    out.loss.backward()
                loss_sum += out.loss.detach().float()
            if not layer_wise and cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens

            loss_all, tokens_all = launch.sum([float(loss_sum), tokens], device)
            loss = loss_all / launch.world_size  # the global token mean
            tokens = int(tokens_all)
            last_loss = loss
            dt = time.perf_counter() - t0
            cuda_mem, rss = _memory(device)
            record: dict[str, Any] = {
                "step": step,
                "phase": phase,
                "loss": loss,
                "lr": lr,
                "active_layers": [] if phase == "probe" else active,
                "tokens": tokens,
                "tokens_per_s": tokens / dt if dt > 0 else 0.0,
                "memory_bytes": cuda_mem,
                "rss_bytes": rss,
                "tokens_seen": tokens_seen,
            }
            if layer_wise:
                record["importance"] = optimizer.importance
                record["probabilities"] = optimizer.probabilities
            if logger is not None:
                logger.log(record)
            pbar.update(1)
            pbar.set_postfix(
                loss=f"{loss:.3f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                layers="probe" if phase == "probe" else (",".join(map(str, active)) if layer_wise else "all"),
                mem=_fmt_bytes(cuda_mem if cuda_mem is not None else rss),
                refresh=False,
            )
            if cfg.save_every and step % cfg.save_every == 0 and step < end:
                last_ckpt = _checkpoint(
                    run_dir, step, tokens_seen, cfg, model, optimizer, scheduler, batches, device, launch
                )
    finally:
        pbar.close()
        if logger is not None:
            logger.close()

    if last_ckpt is None or last_ckpt.name != f"{_STEP_PREFIX}{step:06d}":
        last_ckpt = _checkpoint(
            run_dir, step, tokens_seen, cfg, model, optimizer, scheduler, batches, device, launch
        )
    final_dir, final_kind, plots = None, f"not written: stopped at step {step} of {total_steps}", []
    if launch.is_main:  # every rank holds the same weights; rank 0 writes them
        if step == total_steps:  # (stop_at_step: the run goes on after --resume)
            final_dir, final_kind = _save_final(cfg, model, tokenizer, run_dir)
        plots = _plots(run_dir) if cfg.plots else []
    launch.barrier()
    return TrainResult(
        run_dir=run_dir,
        steps=step,
        total_steps=total_steps,
        final_loss=last_loss,
        checkpoint=last_ckpt,
        final_dir=final_dir,
        final_kind=final_kind,
        log_path=run_dir / "log.jsonl",
        plots=plots,
        seconds=time.perf_counter() - t_start,
    )


def _checkpoint(
    run_dir, step, tokens_seen, cfg, model, optimizer, scheduler, batches, device, launch
) -> Path:
    """Save a checkpoint from rank 0 (every rank builds the payload: with ZeRO-1 sharding the optimizer's
    ``state_dict()`` is a collective). Returns its path on every rank once it is complete."""
    state = {
        "version": _STATE_VERSION,
        "step": step,
        "tokens_seen": tokens_seen,
        "scheduler": _scheduler_state(scheduler),
        "data": batches.state_dict(),
        "rng": _rng_state(device),
        "config": cfg.to_dict(),
    }
    payload = {"model": _model_state(cfg, model), "optimizer": optimizer.state_dict(), "state": state}
    path = run_dir / CHECKPOINT_DIR / f"{_STEP_PREFIX}{step:06d}"
    if launch.is_main:
        path = _save_checkpoint(run_dir, step, payload, cfg)
    launch.barrier()  # invariant: no rank goes on (or exits) before the checkpoint is complete
    return path


def _save_final(cfg: TrainConfig, model, tokenizer, run_dir: Path) -> tuple[Path, str]:
    """Save the final model with ``save_pretrained`` (+ tokenizer). LoRA: the adapter in
    ``final/adapter`` and, with ``lora.merge``, the merged model in ``final/``."""
    final = run_dir / "final"
    if final.exists():
        shutil.rmtree(final)
    final.mkdir(parents=True)
    tokenizer.save_pretrained(final)
    if cfg.method in ("lora", "dora"):
        model.save_pretrained(final / "adapter")
        tokenizer.save_pretrained(final / "adapter")
        if cfg.lora.merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(final)
            return final, f"merged {cfg.method} model + tokenizer; adapter alone in {final / 'adapter'}"
        return final / "adapter", f"{cfg.method} adapter + tokenizer (load on top of {cfg.model})"
    model.save_pretrained(final)
    return final, "full model + tokenizer"


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
