"""``grass-llm memory``: the estimator's table (:func:`estimate_main`), or with ``--budget`` the planner's
fastest settings that fit (:func:`plan_main`). ``add_cli_arguments`` / ``cli_main`` are what
``grass_llm.cli`` calls."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from grass_llm._tensor import DTYPES
from grass_llm.memory.budget import BudgetError, format_size, parse_budget
from grass_llm.memory.cuda import cuda_gpu, measure_cuda_step
from grass_llm.memory.estimate import estimate_memory
from grass_llm.memory.fit.plans import RESIDENCIES, FitError, FitPlan
from grass_llm.memory.fit.report import format_plan, plan_header
from grass_llm.memory.fit.search import plan
from grass_llm.memory.inputs import OPTIMIZER_IMPLS, PHASES, MemoryEstimateError, methods, probes
from grass_llm.memory.report import UNITS, format_table
from grass_llm.memory.result import MemoryEstimate, whole_run
from grass_llm.memory.workspaces import GPUS

__all__ = ["add_cli_arguments", "cli_main", "estimate_main", "plan_main"]


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``grass-llm memory``: the estimator's, and ``--budget``."""
    _estimator_arguments(parser)
    parser.description += (
        " With --budget SIZE: the fastest settings that fit SIZE instead (micro-batch x grad_accum keeping "
        "--batch-size, activation_checkpointing, grass.offload; KEY=VALUE activation_checkpointing=... or "
        "grass.offload=... restricts the search to that value; docs/fit.md)."
    )
    parser.add_argument(
        "--budget",
        metavar="SIZE",
        default=None,
        help="device memory to fit (24GiB, 24GB, 24 GiB, or a number of GiB): print, per method, the fastest "
        "configuration whose whole-run peak + margin fits and the faster ones rejected with their peaks; "
        "exit 2 when no method fits",
    )


def cli_main(args: argparse.Namespace) -> int:
    """Run ``grass-llm memory``: the estimator's table, or with ``--budget`` the plans. Returns the exit code."""
    return estimate_main(args) if args.budget is None else plan_main(args)


def _check_common(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    """What both modes refuse before any estimate runs (:class:`MemoryEstimateError`)."""
    if args.json and Path(args.json).expanduser().is_dir():
        raise MemoryEstimateError(f"--json {args.json!r} is a directory; allowed: a file path (e.g. estimates.json)")
    if "memory_budget" in overrides:
        raise MemoryEstimateError("memory_budget is a grass-llm train key; allowed here: --budget SIZE")


def _estimator_arguments(parser: argparse.ArgumentParser) -> None:
    """The estimator's options (``grass-llm memory`` without ``--budget``)."""
    parser.description = (
        "Estimate the peak device memory of a training run without a GPU: the model is built from fake "
        "tensors and the method exactly as `grass-llm train` builds it on a CUDA device, and its real "
        "optimizer steps. The headline is each method's whole-run peak: for GRASS the larger of its probing "
        "and training steps (worst-case layers). Comparable with torch.cuda.max_memory_allocated: PyTorch's "
        "cuBLAS workspaces are counted for the GPU named by --gpu (default hopper: 2 x 32 MiB); the CUDA "
        "context is not. key=value settings are grass-llm train keys (grass.offload=off, lora.dtype=fp32, "
        "grass.fp32_master_weights=false ...)."
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="NAME_OR_PATH",
        help="config.json file, directory holding one, or hub name already in the local cache (never downloaded)",
    )
    parser.add_argument(
        "--method",
        action="append",
        default=None,
        help=f"method(s) to estimate, repeatable or comma separated: {', '.join(methods())} (default grass)",
    )
    parser.add_argument(
        "--active-layers",
        type=int,
        default=None,
        help="gamma of the layer-wise methods (default: the method's, 2 for grass and lisa, 1 for badam)",
    )
    parser.add_argument("--rank", type=int, default=128, help="LoRA / DoRA rank r, alpha = 2r (default 128)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size B (default 1)")
    parser.add_argument("--seq-len", type=int, default=1024, help="sequence length T (default 1024)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="weight dtype (default bf16)")
    _step_arguments(parser)
    _output_arguments(parser)


def _step_arguments(parser: argparse.ArgumentParser) -> None:
    """What is estimated beyond the method and the batch, and the table's unit."""
    from grass_llm.activation_checkpointing import MODES

    parser.add_argument(
        "--activation-checkpointing",
        choices=MODES,
        default="none",
        help="none, full (every block) or frozen (only frozen blocks above the lowest trained one)",
    )
    parser.add_argument(
        "--optimizer-impl",
        choices=OPTIMIZER_IMPLS,
        default="auto",
        help="torch.optim AdamW implementation (default auto: what grass-llm train builds on CUDA, fused)",
    )
    parser.add_argument(
        "--unit", choices=tuple(UNITS), default="GiB", help="unit of the table (default GiB)"
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=1,
        metavar="N",
        help="estimate one rank of an N-rank FSDP2 run (distributed.strategy=fsdp2; default 1: one device)",
    )
    parser.add_argument(
        "--phase",
        choices=(*PHASES, "both"),
        default="both",
        help="run: the whole run's peak (a layer-wise method's probing or training step, whichever is larger; "
        "with grass.offload=off plus every layer's states, which such a run keeps); train: a training step; "
        "probe: a probing step (backward through every layer); both (default): the whole run first (bold), "
        "then the training and probing steps it comes from",
    )
    parser.add_argument(
        "--gpu",
        choices=GPUS,
        default=None,
        help="the GPU the estimate stands for, which sizes PyTorch's cuBLAS workspaces (one per thread that "
        "runs matmuls: forward and backward): hopper (H100/H200, sm90: 32 MiB each; the default, or with "
        "--measure the measured GPU's kind) or other (other NVIDIA GPUs: 8.1 MiB each); "
        "CUBLAS_WORKSPACE_CONFIG, when set, sizes them as it does for PyTorch",
    )


def _output_arguments(parser: argparse.ArgumentParser) -> None:
    """The JSON file, the measurement, the train settings."""
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the estimates as JSON here")
    parser.add_argument(
        "--measure",
        action="store_true",
        help="also run the step on the CUDA device and report torch.cuda.max_memory_allocated",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="grass-llm train settings")


def estimate_main(args: argparse.Namespace) -> int:
    """``grass-llm memory`` without ``--budget``: print a Markdown table of the estimates, optionally write
    JSON. Returns the exit code."""
    try:
        chosen = _methods(args.method or [])
        overrides = parse_overrides(args.overrides or [])
        _check_common(args, overrides)
        if args.measure and not torch.cuda.is_available():
            raise MemoryEstimateError("--measure needs a CUDA device; torch.cuda.is_available() is False")
        if args.measure and args.world_size > 1:
            raise MemoryEstimateError("--measure runs one device; allowed with --world-size 1")
        shown, rows = [], []
        for method in chosen:
            kwargs = dict(
                active_layers=args.active_layers,
                rank=args.rank,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                dtype=args.dtype,
                activation_checkpointing=args.activation_checkpointing,
                optimizer_impl=args.optimizer_impl,
                overrides=overrides,
            )
            a, b = _method_rows(args, method, kwargs, overrides)
            shown += a
            rows += b
        if not rows:
            raise MemoryEstimateError(
                f"--phase probe: none of the methods {', '.join(chosen)} probes with these settings"
            )
    except MemoryEstimateError as err:
        print(f"grass-llm memory: error: {err}", file=sys.stderr)
        return 2
    print(format_table(shown, unit=args.unit))
    if args.phase == "probe" and len(rows) < len(chosen):
        missing = [m for m in chosen if not probes(m, overrides)]
        print(f"(no probing step: {', '.join(missing)}; --phase run gives their whole run)")
    if args.json:
        _write_json(args.json, [e.to_dict() for e in rows])
    return 0


def _method_rows(args: argparse.Namespace, method: str, kwargs: dict[str, Any], overrides: dict[str, Any]):
    """(the rows the table shows, the rows the JSON holds) of one method. Only what is reported is computed
    (and measured): a whole run is composed from its steps' estimates, and measured as one run."""
    probing = probes(method, overrides)
    gpu = args.gpu or (cuda_gpu() if args.measure else "hopper")
    wanted = {"both": ["train", "probe", "run"], "run": ["train", "probe", "run"]}.get(args.phase, [args.phase])
    steps: dict[str, MemoryEstimate] = {}
    for phase in ("train", "probe"):
        if phase in wanted and (phase == "train" or probing):
            steps[phase] = estimate_memory(
                args.model, method, world_size=args.world_size, phase=phase, gpu=gpu, **kwargs
            )
    run = whole_run(steps["train"], steps.get("probe")) if "run" in wanted else None
    if args.measure:
        for phase, est in steps.items():
            if args.phase != "run":
                est.measured_peak = measure_cuda_step(args.model, method, phase=phase, **kwargs)
        if run is not None:
            single = not probing and steps["train"].measured_peak is not None
            run.measured_peak = (
                steps["train"].measured_peak if single else measure_cuda_step(args.model, method, phase="run", **kwargs)
            )
    if args.phase == "run":
        return [run], [run]
    if args.phase != "both":
        return list(steps.values()), list(steps.values())
    rows = [run, *steps.values()]
    # a method with one kind of step and nothing added: its whole run is that step (one row in the table)
    shown = rows if probing or run.other_layers_states else [run]
    return shown, rows


def _methods(values: Sequence[str]) -> list[str]:
    known = methods()
    out: list[str] = []
    for v in values:
        for m in v.split(","):
            m = m.strip().lower()
            if not m:
                continue
            if m not in known:
                raise MemoryEstimateError(f"--method {m!r} is invalid; allowed: {', '.join(known)}")
            if m not in out:
                out.append(m)
    return out or ["grass"]


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` settings -> ``{key: value}``, each value read as ``grass-llm train`` reads it."""
    from grass_llm.recipes.config_values import parse_scalar

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise MemoryEstimateError(
                f"setting {item!r} is invalid; allowed: key=value with a grass-llm train key (e.g. grass.offload=false)"
            )
        key, value = item.split("=", 1)
        out[key.strip()] = parse_scalar(value)
    return out


def plan_main(args: argparse.Namespace) -> int:
    """``grass-llm memory --budget SIZE``: print each method's plan; exit code 0 when at least one method
    fits, 2 when none does (or on bad input)."""
    t0 = time.perf_counter()
    try:
        budget = parse_budget("--budget", args.budget)
        chosen = _methods(args.method or [])
        overrides = parse_overrides(args.overrides or [])
        _check_common(args, overrides)
        restrict = _restrictions(args, overrides)
        plans = []
        for method in chosen:
            kw = dict(restrict)
            if "residencies" in kw and method not in _layer_wise_methods():
                kw.pop("residencies")
            plans.append(
                plan(
                    args.model,
                    budget,
                    method,
                    batch_size=args.batch_size,
                    seq_len=args.seq_len,
                    dtype=args.dtype,
                    rank=args.rank,
                    active_layers=args.active_layers,
                    optimizer_impl=args.optimizer_impl,
                    overrides=overrides,
                    **kw,
                )
            )
    except (FitError, BudgetError, MemoryEstimateError) as err:
        print(f"grass-llm memory: error: {err}", file=sys.stderr)
        return 2
    _print_plans(plans, budget, args, time.perf_counter() - t0)
    if args.json:
        _write_json(args.json, [p.to_dict() for p in plans])
    if not any(p.fits for p in plans):
        print(f"grass-llm memory: nothing fits {format_size(budget)}", file=sys.stderr)
        return 2
    return 0


def _restrictions(args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    """The search's restrictions that ``--activation-checkpointing`` and the ``KEY=VALUE`` settings of the keys
    the plan chooses ask for (taken out of ``overrides``); :class:`FitError` for what ``--budget`` refuses."""
    if args.world_size != 1:
        raise FitError("--budget plans one device; allowed: --world-size 1")
    if args.measure:
        raise FitError("--measure cannot be combined with --budget (benchmarks/fit_check.py measures a plan)")
    if args.phase != "both":
        raise FitError(f"--phase {args.phase} cannot be combined with --budget (a plan is for the whole run)")
    if args.unit != "GiB":
        raise FitError(f"--unit {args.unit} cannot be combined with --budget (plans are printed in GiB)")
    restrict: dict[str, Any] = {}
    given = overrides.pop("activation_checkpointing", None)
    if given is None and args.activation_checkpointing != "none":
        given = args.activation_checkpointing
    if given is not None:
        restrict["checkpointing"] = [given]
    if "grass.offload" in overrides:
        restrict["residencies"] = [_residency(overrides.pop("grass.offload"))]
    for key in ("batch_size", "grad_accum"):
        if key in overrides:
            raise FitError(f"{key} is what --budget chooses; allowed: the effective batch as --batch-size")
    return restrict


def _print_plans(plans: Sequence[FitPlan], budget: int, args: argparse.Namespace, seconds: float) -> None:
    print(plan_header(budget, args.batch_size, args.seq_len, plans[0].margin))
    for p in plans:
        print()
        print(format_plan(p))
    estimates = sum(p.estimates for p in plans)
    cached = sum(p.cached for p in plans)
    print(
        f"\nplanned in {seconds:.1f} s: {estimates} estimate{'s' if estimates != 1 else ''} ({cached} reused)"
    )


def _write_json(path: str, rows: list[dict[str, Any]]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out}")


def _residency(value: Any) -> str:
    """``grass.offload`` as the planner names it (true / false are step / off; auto is period on CUDA)."""
    aliases = {"true": "step", "false": "off", "auto": "period"}
    mapped = aliases.get(str(value).lower(), value)
    if mapped not in RESIDENCIES:
        raise FitError(f"grass.offload={value!r} is invalid; allowed: {', '.join(RESIDENCIES)}")
    return mapped


def _layer_wise_methods() -> set[str]:
    from grass_llm.recipes.methods import METHODS

    return {name for name, m in METHODS.items() if m.layer_wise}
