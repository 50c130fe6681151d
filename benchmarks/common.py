"""Shared pieces of the benchmarks: hardware description, model shapes, method factories.

Every benchmark builds its methods through ``make_method`` so that "grass", "lisa", "lora" and "fft"
mean the same thing in the throughput and the accuracy benchmark:

- ``fft``: ``torch.optim.AdamW`` over every parameter.
- ``lora``: peft LoRA on ``q_proj, k_proj, v_proj, up_proj, down_proj`` (LLM-Adapters' and
  ``grass-llm train``'s default targets), alpha = 2 * rank, no dropout, adapters in the model dtype
  (bf16 in the GPU setting); ``torch.optim.AdamW`` over the adapters.
- ``lisa``: ``GrassConfig(policy="uniform", probe_steps=0, train_embeddings=True, train_head=True)``.
- ``grass``: ``GrassConfig(policy="grass")``; ``grass-static`` (GRASS*): ``policy="static"``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------------
# provenance
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def hardware(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores_visible": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": git_commit(),
        "git_uncommitted": git_uncommitted(),
        "niceness": _niceness(),
        "load_avg_start": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = "none (CPU run)"
    return info


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_uncommitted() -> list[str]:
    """Tracked files under src/ and benchmarks/ (results excluded) that differ from HEAD during the run."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    paths = [ln[3:] for ln in out.stdout.splitlines() if len(ln) > 3]
    return [p for p in paths if not p.startswith("benchmarks/results/")]


def load_average() -> float | None:
    """1-minute load average of the machine (other jobs included), or None where unavailable."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _niceness() -> int:
    try:
        return os.nice(0)
    except (OSError, AttributeError):
        return 0


def command_line() -> str:
    """The exact command that produced the results (relative script path, original arguments,
    ``nice -n N`` prefix when the process ran at a lowered priority)."""
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(REPO_ROOT)
    nice = _niceness()
    prefix = [f"nice -n {nice}"] if nice > 0 else []
    return " ".join([*prefix, "python", shlex.quote(str(script)), *map(shlex.quote, sys.argv[1:])])


def hardware_lines(hw: dict[str, Any]) -> list[str]:
    git = f"git {hw['git_commit']}"
    if hw.get("git_uncommitted"):
        git += " + uncommitted changes in " + ", ".join(hw["git_uncommitted"])
    lines = [
        f"- CPU: {hw['cpu']} ({hw['cpu_cores_visible']} cores visible, torch threads {hw['torch_threads']})",
        f"- GPU: {hw['gpu']}",
        f"- torch {hw['torch']}, Python {hw['python']}, {git}, run {hw['date_utc']}",
    ]
    if hw.get("load_avg_start") is not None:
        load = f"{hw['load_avg_start']:.2f} at start"
        if hw.get("load_avg_end") is not None:
            load += f", {hw['load_avg_end']:.2f} at end"
        lines.append(
            f"- machine load: 1-minute load average {load} on {hw['cpu_cores_visible']} cores (other jobs "
            f"included); this process at niceness {hw.get('niceness', 0)}"
        )
    return lines


# ------------------------------------------------------------------------------------------------
# models
@dataclass(frozen=True)
class Shape:
    """A Llama-shaped decoder."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def describe(self) -> str:
        return (
            f"{self.name}: Llama, {self.layers} layers, hidden {self.hidden}, MLP {self.intermediate}, "
            f"{self.heads} heads ({self.kv_heads} KV), vocab {self.vocab}"
        )


#: TinyLlama-1.1B's shape (random init; no hub here)
TINYLLAMA = Shape("tinyllama-1.1b-shape", 2048, 5632, 22, 32, 4, 32000)


def llama(shape: Shape, max_positions: int = 2048, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised ``LlamaForCausalLM`` of ``shape`` (untied head, like TinyLlama)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).to(dtype)


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ------------------------------------------------------------------------------------------------
# methods
def wrap_lora(model, rank: int, alpha: float | None = None, dtype: torch.dtype | None = None):
    """peft LoRA on LORA_TARGETS, no dropout, adapters cast to ``dtype`` (default: the model's)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=rank,
        lora_alpha=2 * rank if alpha is None else alpha,
        target_modules=list(LORA_TARGETS),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg, autocast_adapter_dtype=False)
    if dtype is not None:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)
    return model


def make_method(
    method: str,
    model,
    lr: float,
    *,
    active_layers: int = 2,
    period: int = 25,
    lisa_period: int = 10,
    probe_steps: int = 150,
    lora_rank: int = 128,
    max_grad_norm: float | None = None,
    seed: int = 0,
    offload: bool | str = False,
    overlap: bool = True,
    train_embeddings: bool = False,
    train_head: bool = False,
):
    """(model, optimizer) for ``method``; LoRA wraps (and returns) a new model object.

    ``max_grad_norm`` is applied inside GrassOptimizer for the layer-wise methods; for fft / lora the
    caller clips (``clip(model)`` below).
    """
    from grass_llm import GrassConfig, GrassOptimizer

    if method == "fft":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if method == "lora":
        model = wrap_lora(model, lora_rank, dtype=next(model.parameters()).dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if method == "lisa":
        cfg = GrassConfig(
            active_layers=active_layers,
            period=lisa_period,
            probe_steps=0,
            policy="uniform",
            train_embeddings=True,
            train_head=True,
            max_grad_norm=max_grad_norm,
            seed=seed,
            offload=offload,
            overlap=overlap,
        )
    elif method in ("grass", "grass-static"):
        cfg = GrassConfig(
            active_layers=active_layers,
            period=period,
            probe_steps=probe_steps,
            policy="grass" if method == "grass" else "static",
            train_embeddings=train_embeddings,
            train_head=train_head,
            max_grad_norm=max_grad_norm,
            seed=seed,
            offload=offload,
            overlap=overlap,
        )
    else:
        raise ValueError(f"unknown method {method!r}")
    return model, GrassOptimizer(model, cfg, lr=lr, weight_decay=0.0)


def clip(model, optimizer, max_grad_norm: float | None) -> None:
    """Gradient clipping for fft / lora (GrassOptimizer clips inside step())."""
    from grass_llm import GrassOptimizer

    if max_grad_norm is None or isinstance(optimizer, GrassOptimizer):
        return
    params = [p for p in model.parameters() if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
