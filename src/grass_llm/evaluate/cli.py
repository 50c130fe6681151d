"""``grass-llm eval``: its arguments, where results go (``default_out_dir``), and the command itself."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from grass_llm._tensor import resolve_dtype
from grass_llm.data import PROMPT_STYLES, DataError
from grass_llm.evaluate.benchmarks import (
    BENCHMARKS,
    EvalInputError,
    resolve_benchmarks,
)
from grass_llm.evaluate.results import format_results_markdown
from grass_llm.evaluate.run import benchmark_files, evaluate_model
from grass_llm.models import ModelLoadError, load_model_and_tokenizer, looks_like_path
from grass_llm.run_layout import ADAPTER_DIR, EVAL_DIR, FINAL_DIR, is_run_dir

__all__ = ["add_cli_arguments", "cli_main", "default_out_dir"]


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``grass-llm eval``."""
    parser.add_argument(
        "--model",
        required=True,
        help="local model directory (works offline) or hub name, loaded with AutoModelForCausalLM/AutoTokenizer",
    )
    parser.add_argument(
        "--benchmarks",
        default="all",
        help=(
            "comma list of benchmarks and/or groups (arithmetic, commonsense, all); benchmarks: "
            f"{', '.join(BENCHMARKS)}. Missing test files are skipped only inside a group. Default: all"
        ),
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="data root holding llm-adapters/ or LLM-Adapters' dataset/ (default: $GRASS_DATA_DIR)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help=(
            "output directory (default: RUN/eval for a run's final model RUN/final, RUN/eval-adapter for "
            "RUN/final/adapter, <model dir>/eval for another local model, eval/<org>--<name> for a hub model)"
        ),
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=(
            "replace the results already in the output directory, once the new ones are complete (without it "
            "they are kept and eval stops)"
        ),
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="generation budget (default: 256 arithmetic, 32 commonsense, as LLM-Adapters)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="evaluate only the first N items of each benchmark"
    )
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default=None,
        help="model weight dtype (default: bf16 on a CUDA GPU that supports it, else fp32)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument(
        "--model-name", default=None, help="Model cell of the table row (default: model dir name)"
    )
    parser.add_argument("--method-name", default="-", help="Method cell of the table row, e.g. GRASS")
    parser.add_argument(
        "--prompt-style",
        choices=PROMPT_STYLES,
        default="finetune",
        help="finetune: the training prompt (default); evaluate: LLM-Adapters' evaluation-script whitespace",
    )


def _check_cli_args(args: argparse.Namespace) -> None:
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--max-new-tokens", args.max_new_tokens),
        ("--limit", args.limit),
    ):
        if value is not None and value < 1:
            raise EvalInputError(f"{flag} must be >= 1, got {value}")
    local = Path(args.model).expanduser()
    if local.exists():
        has_config = (local / "config.json").is_file() or (local / "adapter_config.json").is_file()
        if not local.is_dir() or not has_config:
            raise EvalInputError(f"--model {args.model!r}: not a model directory (no config.json in {local})")
    elif looks_like_path(args.model):
        raise EvalInputError(f"--model {args.model!r}: model directory does not exist")
    if args.device is not None:
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            raise EvalInputError(
                f"--device {args.device!r} is not a device; allowed: cpu, cuda, cuda:N"
            ) from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise EvalInputError(f"--device {args.device!r}: CUDA is not available on this machine")


def default_out_dir(model: str) -> Path:
    """Where ``grass-llm eval --model MODEL`` writes without ``--out``: a place that belongs to the model.

    ``RUN/final`` of a ``grass-llm train`` run -> ``RUN/eval``; ``RUN/final/adapter`` ->
    ``RUN/eval-adapter``; another local model directory -> ``<dir>/eval``; a hub name ``org/name`` ->
    ``eval/org--name``.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        if local.name == FINAL_DIR and is_run_dir(local.parent):
            return local.parent / EVAL_DIR
        if local.name == ADAPTER_DIR and local.parent.name == FINAL_DIR and is_run_dir(local.parent.parent):
            return local.parent.parent / f"{EVAL_DIR}-{ADAPTER_DIR}"
        return local / EVAL_DIR
    return Path(EVAL_DIR) / model.strip("/").replace("/", "--")


_RESULT_FILES = ("results.json", "results.md")


def _existing_results(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    names = {*_RESULT_FILES, *(f"{b}.jsonl" for b in BENCHMARKS)}
    return sorted(p for p in out.iterdir() if p.name in names)


def _check_out_dir(out: Path, overwrite: bool) -> list[Path]:
    """Refuse to write over earlier results without ``--overwrite``; returns them (replaced, or deleted
    when the new results have no file of their name, only once the new results are complete)."""
    if out.is_symlink() and not out.exists():
        raise EvalInputError(f"--out {str(out)!r} is a symbolic link to {os.readlink(out)!r}, which does not exist")
    if out.exists() and not out.is_dir():
        raise EvalInputError(f"--out {str(out)!r} is a file; allowed: a directory")
    found = _existing_results(out)
    if found and not overwrite:
        raise EvalInputError(
            f"{out} already holds results ({', '.join(p.name for p in found)}); pass --overwrite to replace "
            "them, or --out DIR to write elsewhere"
        )
    return found


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        return load_model_and_tokenizer(args.model, resolve_dtype(args.dtype, device), device)
    except ModelLoadError as e:
        raise EvalInputError(f"--model {args.model!r}: {e}") from None


def cli_main(args: argparse.Namespace) -> int:
    """Run ``grass-llm eval``; bad input prints ``grass-llm eval: error: ...`` and returns 2."""
    out = Path(".")
    try:
        _check_cli_args(args)
        benches, used_group = resolve_benchmarks(args.benchmarks)
        benchmark_files(benches, args.data_dir, used_group, say=lambda _: None)  # fail before loading the model
        out = Path(args.out).expanduser() if args.out else default_out_dir(args.model)
        earlier = _check_out_dir(out, args.overwrite)
        model, tokenizer = _load(args)
        signals = getattr(args, "_signals", None)
        if signals is not None:
            signals.check()  # (a Ctrl-C while loading, swallowed by the loader: stop before evaluating)
        model_name = args.model_name or Path(args.model.rstrip("/")).name or args.model
        results = evaluate_model(
            model,
            tokenizer,
            args.benchmarks,
            args.data_dir,
            out,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            limit=args.limit,
            model_name=model_name,
            method_name=args.method_name,
            prompt_style=args.prompt_style,
        )
    except (EvalInputError, DataError) as e:
        _stopped_first(args)
        print(f"grass-llm eval: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        _stopped_first(args)
        print(
            f"grass-llm eval: error: cannot write the results in {out}: {e.strerror or e}; the results that "
            "were there are unchanged",
            file=sys.stderr,
        )
        return 1
    written = {f"{name}.jsonl" for name in results["benchmarks"]} | {"results.json", "results.md"}
    for p in earlier:  # (--overwrite: earlier results the new ones have no file for)
        if p.name not in written:
            p.unlink(missing_ok=True)
    print(format_results_markdown(results))
    return 0


def _stopped_first(args: argparse.Namespace) -> None:
    """A failure after a Ctrl-C was raised (and swallowed by a library) is reported as that stop."""
    signals = getattr(args, "_signals", None)
    if signals is not None:
        signals.check()
