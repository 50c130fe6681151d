"""Shared pieces of the benchmarks: hardware description, model shapes, method factory, result files.

Every benchmark builds its methods through ``make_method``, which is ``grass-llm train``'s own
``grass_llm.recipes.methods.build_method``: "grass", "lisa", "lora" or "fft" mean the same thing in
the benchmarks as in training (LoRA: ``grass-llm train``'s default targets, alpha = 2 * rank, no
dropout, adapters in the model dtype).
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


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None


def _own_repository() -> bool:
    """Whether REPO_ROOT is the top of a git repository that tracks this project (this file and the package).
    A copy exported without ``.git`` into another checkout is not: git would answer for the enclosing one."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or top.returncode != 0 or not top.stdout.strip():
        return False
    if Path(top.stdout.strip()).resolve() != REPO_ROOT.resolve():
        return False
    here = Path(__file__).resolve().relative_to(REPO_ROOT.resolve()).as_posix()
    tracked = _git("ls-files", "--error-unmatch", "--", here, "src/grass_llm/__init__.py")
    return tracked is not None and tracked.returncode == 0


def git_commit() -> str:
    """The commit of this project's checkout, or "unknown" (no git, or not a checkout of its own)."""
    if not _own_repository():
        return "unknown"
    out = _git("rev-parse", "--short", "HEAD")
    return (out.stdout.strip() if out is not None and out.returncode == 0 else "") or "unknown"


def git_uncommitted() -> list[str]:
    """Tracked files under src/ and benchmarks/ (results excluded) that differ from HEAD during the run
    (none known outside a checkout of this project)."""
    if not _own_repository():
        return []
    out = _git("status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks")
    if out is None:
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
    from grass_llm.recipes.models import tiny_llama

    return tiny_llama(
        shape.vocab,
        shape.hidden,
        shape.layers,
        shape.intermediate,
        shape.heads,
        shape.kv_heads,
        max_positions,
        seed=seed,
        dtype=dtype,
        use_cache=False,
        attn_implementation="sdpa",
    )


#: Hugging Face configs of the models in the paper's tables (+ LLaMA2-70B for FSDP2), by name; ``tiny`` is
#: the 4-layer stand-in of the ``--smoke`` / ``--dry-run`` modes. (class name in transformers, kwargs)
MODEL_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "TinyLlama-1.1B": (
        "LlamaConfig",
        dict(
            hidden_size=2048,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            intermediate_size=5632,
            vocab_size=32000,
            max_position_embeddings=2048,
        ),
    ),
    "Gemma-2B": (
        "GemmaConfig",
        dict(
            hidden_size=2048,
            num_hidden_layers=18,
            num_attention_heads=8,
            num_key_value_heads=1,
            head_dim=256,
            intermediate_size=16384,
            vocab_size=256000,
            max_position_embeddings=8192,
        ),
    ),
    "LLaMA2-7B": (
        "LlamaConfig",
        dict(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            intermediate_size=11008,
            vocab_size=32000,
            max_position_embeddings=4096,
        ),
    ),
    "LLaMA2-70B": (
        "LlamaConfig",
        dict(
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            vocab_size=32000,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
    ),
    "tiny": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
            max_position_embeddings=256,
        ),
    ),
}


def model_config(name: str, label: str | None = None):
    """The transformers config of ``MODEL_SHAPES[name]``, named ``label`` (default ``name``) in reports."""
    import transformers

    cls, kwargs = MODEL_SHAPES[name]
    cfg = getattr(transformers, cls)(**kwargs)
    cfg._name_or_path = label or name
    return cfg


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ------------------------------------------------------------------------------------------------
# methods
def make_method(
    method: str,
    model,
    lr: float,
    *,
    lora_rank: int = 128,
    max_grad_norm: float | None = None,
    seed: int = 0,
    **grass: Any,
):
    """(model, optimizer) for ``method`` exactly as ``grass-llm train`` builds it; LoRA wraps (and
    returns) a new model object. ``grass`` holds ``grass.*`` settings (``period=``, ``offload=``...),
    which override the method's defaults as they would in a config file.

    ``max_grad_norm`` is applied inside GrassOptimizer for the layer-wise methods; for fft / lora the
    caller clips (``clip`` below), as the recipe does.
    """
    from grass_llm.recipes.methods import build_method
    from grass_llm.recipes.train_config import TrainConfig

    cfg = TrainConfig(
        method=method,
        lr=lr,
        weight_decay=0.0,
        max_grad_norm=max_grad_norm,
        seed=seed,
        lora={"rank": lora_rank, "alpha": 2 * lora_rank},
        grass=grass,
    )
    return build_method(model, cfg)


def clip(model, optimizer, max_grad_norm: float | None) -> None:
    """Gradient clipping for fft / lora (GrassOptimizer clips inside step())."""
    from grass_llm import GrassOptimizer

    if max_grad_norm is None or isinstance(optimizer, GrassOptimizer):
        return
    params = [p for p in model.parameters() if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)


def write_results(out: Path, name: str, data: dict[str, Any], markdown: str) -> None:
    """``out/<name>.json`` and ``out/<name>.md`` (the directory is created)."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
