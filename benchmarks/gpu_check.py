"""One command that checks the memory work on a GPU and writes a report naming the device.

1. **CUDA tests**: ``pytest -m gpu tests`` (the offloader's stream/event invariants, the estimate
   against ``torch.cuda.max_memory_allocated`` on small models, ...).
2. **Estimate vs measurement**: for random-init TinyLlama-1.1B, Gemma-2B and LLaMA2-7B shapes (bf16,
   batch 1, seq 1024), ``grass-llm memory``'s estimate next to ``torch.cuda.max_memory_allocated`` of
   the same two training steps run for real (``grass_llm.memory.measure_cuda_step``: the same
   ``TrainConfig``, ``build_method``, loss and optimizer). A check passes within 5%.
3. **Throughput** of FFT, LoRA r=128, LISA and GRASS (γ=2) with offload and overlap on and off, on
   the TinyLlama shape, as ``grass-llm train`` builds them.

    python benchmarks/gpu_check.py                          # everything, on cuda:0
    python benchmarks/gpu_check.py --skip-tests --models tinyllama
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check   # no GPU: the same code on CPU, tiny shapes

Each memory and throughput row runs in a fresh Python process (``--row``, one JSON line back), so a row
neither counts nor inherits what an earlier one left allocated (cuBLAS workspaces, the caching allocator's
state, objects awaiting the garbage collector). Writes ``gpu_check.md`` and ``gpu_check.json`` to ``--out``
(default ``benchmarks/results``; a dry run must name another directory). Exit status 0 when every check passed, 1 when one failed, 2 for bad
input or no GPU. ``--dry-run`` runs every step on the CPU with a tiny Llama (the "measurement" is then
a real CPU run of the estimator, offload off, and the tests are only collected): it checks the script,
not the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (  # noqa: E402
    REPO_ROOT,
    command_line,
    hardware,
    hardware_lines,
    load_average,
    model_config,
    write_results,
)

RESULTS = HERE / "results"
TOLERANCE = 0.05
#: name -> key in benchmarks/memory.py's configs()
MODELS = {"tinyllama": "TinyLlama-1.1B", "gemma-2b": "Gemma-2B", "llama2-7b": "LLaMA2-7B"}
#: (label, method, estimate_memory / training_step keyword arguments)
MEMORY_CHECKS = [
    ("GRASS γ=2", "grass", {}),
    ("GRASS γ=2 +AC frozen", "grass", {"activation_checkpointing": "frozen"}),
    ("LISA γ=2", "lisa", {}),
    ("LoRA r=128", "lora", {"rank": 128}),
    ("FFT", "fft", {}),
]
THROUGHPUT = [
    ("FFT", "fft", {}),
    ("LoRA r=128", "lora", {"rank": 128}),
    ("LISA γ=2, offload + overlap", "lisa", {"overrides": {"grass.offload": True}}),
    ("LISA γ=2, offload, no overlap", "lisa", {"overrides": {"grass.offload": True, "grass.overlap": False}}),
    ("LISA γ=2, no offload", "lisa", {"overrides": {"grass.offload": False}}),
    ("GRASS γ=2, offload + overlap", "grass", {"overrides": {"grass.offload": True}}),
    (
        "GRASS γ=2, offload, no overlap",
        "grass",
        {"overrides": {"grass.offload": True, "grass.overlap": False}},
    ),
    ("GRASS γ=2, no offload", "grass", {"overrides": {"grass.offload": False}}),
]


def tiny_config():
    return model_config("tiny", "tiny (dry run)")


# ------------------------------------------------------------------------------------------------
# 1. tests
def run_tests(dry_run: bool, log=print) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"]
    if dry_run:
        cmd.insert(-1, "--collect-only")
    log("$ " + " ".join(cmd[1:]))
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-300:]
    log(summary)
    return {
        "command": "python " + " ".join(cmd[1:]),
        "returncode": proc.returncode,
        "summary": summary,
        "passed": proc.returncode == 0,
        "collected_only": dry_run,
        "seconds": round(time.time() - t0, 1),
        "tail": proc.stdout[-4000:],
    }


# ------------------------------------------------------------------------------------------------
# 2. estimate vs max_memory_allocated
def check_memory(models: list[str], dry_run: bool, seq_len: int, log=print) -> list[dict[str, Any]]:
    """Every (model, MEMORY_CHECKS row), each in a fresh process (:func:`memory_row`)."""
    rows = []
    for name in models:
        for label, method, kw in MEMORY_CHECKS:
            spec = {"kind": "memory", "model": name, "label": label, "method": method, "kw": kw}
            row = in_fresh_process(dict(spec, dry_run=dry_run, seq_len=seq_len))
            if "error" in row:
                log(f"{row['model']:15s} {label:22s} {row['error']}")
            else:
                log(
                    f"{row['model']:15s} {label:22s} estimate {row['estimate'] / 2**30:7.3f} GiB  measured "
                    f"{row['measured'] / 2**30:7.3f} GiB ({100 * row['relative_error']:+.1f}%)"
                )
            rows.append(row)
    return rows


def memory_row(spec: dict[str, Any]) -> dict[str, Any]:
    """One estimate against its measurement (this process: run by ``--row``)."""
    from grass_llm.memory import estimate_memory, measure_cuda_step

    name, label, method = spec["model"], spec["label"], spec["method"]
    cfg = _config(name, spec["dry_run"])
    kw = dict(spec["kw"], batch_size=1, seq_len=spec["seq_len"])
    row: dict[str, Any] = {"model": _model_label(name, spec["dry_run"]), "label": label, "method": method}
    try:
        if spec["dry_run"]:  # the "measurement" is a real CPU run: no separate host memory, no foreach
            kw.update(overrides={"grass.offload": False}, optimizer_impl="for-loop")
            est = estimate_memory(cfg, method, **kw)
            measured = estimate_memory(cfg, method, fake=False, **kw).peak
        else:
            est = estimate_memory(cfg, method, **kw)
            measured = measure_cuda_step(cfg, method, **kw)
    except torch.cuda.OutOfMemoryError as e:
        return dict(row, error=f"out of memory: {str(e).splitlines()[0]}", passed=False)
    rel = (est.peak - measured) / measured
    return dict(
        row,
        estimate=est.peak,
        measured=measured,
        relative_error=rel,
        passed=abs(rel) <= TOLERANCE,
        breakdown=est.breakdown(),
    )


def _config(name: str, dry_run: bool):
    if dry_run:
        return tiny_config()
    from memory import configs

    return configs()[MODELS.get(name, name)]


def _model_label(name: str, dry_run: bool) -> str:
    return "tiny" if dry_run else MODELS.get(name, name)


ROW_PREFIX = "GPU_CHECK_ROW "


def in_fresh_process(spec: dict[str, Any], timeout: int = 900) -> dict[str, Any]:
    """Run one row (``spec``: memory_row's or throughput_row's) in a new Python process and return its result;
    a process that fails gives a row with its ``error``."""
    import grass_llm

    env = dict(os.environ)
    src = str(Path(grass_llm.__file__).resolve().parents[1])  # the same grass_llm as this process
    env["PYTHONPATH"] = os.pathsep.join([src, str(HERE), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--row", json.dumps(spec)]
    base = {
        "model": _model_label(spec.get("model", ""), spec["dry_run"]),
        "label": spec["label"],
        "method": spec["method"],
        "passed": False,
    }
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return dict(base, error=f"timed out after {timeout} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(ROW_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(base, error=f"row process failed (exit {proc.returncode}): {tail[-300:]}")
    return json.loads(lines[-1][len(ROW_PREFIX) :])


def _row_main(spec_json: str) -> int:
    """``--row SPEC``: one row in this (fresh) process; its result on one line of stdout."""
    warnings.simplefilter("ignore")
    spec = json.loads(spec_json)
    row = memory_row(spec) if spec["kind"] == "memory" else throughput_row(spec)
    row["pid"] = os.getpid()
    print(ROW_PREFIX + json.dumps(row), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------
# 3. throughput
def check_throughput(batch: int, seq_len: int, warmup: int, steps: int, dry_run: bool, log=print):
    """Every THROUGHPUT row on the TinyLlama shape (tiny in a dry run), each in a fresh process."""
    rows = []
    for label, method, kw in THROUGHPUT:
        spec = {"kind": "throughput", "model": "tinyllama", "label": label, "method": method, "kw": kw}
        spec.update(batch=batch, seq_len=seq_len, warmup=warmup, steps=steps, dry_run=dry_run)
        row = in_fresh_process(spec)
        row.update({k: v for k, v in kw.items() if k != "overrides"}, settings=kw.get("overrides", {}))
        if "error" in row:
            log(f"{label:32s} {row['error']}")
        else:
            log(
                f"{label:32s} {row['tokens_per_s']:10.0f} tokens/s  ({row['seconds_per_step'] * 1e3:.1f} ms/step)"
            )
        rows.append(row)
    return rows


def throughput_row(spec: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s of one method (this process: run by ``--row``)."""
    from grass_llm.memory import training_step

    device = torch.device("cpu" if spec["dry_run"] else "cuda")
    batch, seq_len, steps = spec["batch"], spec["seq_len"], spec["steps"]
    cfg = _config(spec["model"], spec["dry_run"])
    row: dict[str, Any] = {"label": spec["label"], "method": spec["method"]}
    try:
        step = training_step(
            cfg, spec["method"], device=device, batch_size=batch, seq_len=seq_len, **spec["kw"]
        )
        for _ in range(spec["warmup"]):
            step.run(batch, seq_len)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step.run(batch, seq_len)
        _sync(device)
        seconds = time.perf_counter() - t0
    except torch.cuda.OutOfMemoryError as e:
        return dict(row, error=f"out of memory: {str(e).splitlines()[0]}")
    off = getattr(step.opt, "offloader", None)
    return dict(
        row,
        tokens_per_s=batch * seq_len * steps / seconds,
        seconds_per_step=seconds / steps,
        offload=off is not None,
        overlap=off is not None and off.copy_stream is not None,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# report
def render(res: dict[str, Any]) -> str:
    hw = res["hardware"]
    lines = [
        "# GPU check: memory estimates against max_memory_allocated, throughput, CUDA tests",
        "",
        *(
            [
                "**DRY RUN on the CPU** (tiny shapes; the 'measured' column is a real CPU run, not a GPU): this "
                "report checks the script, not a GPU.",
                "",
            ]
            if res["dry_run"]
            else []
        ),
        f"- device: **{res['device_name']}**",
        f"- command: `{res['command']}`",
        *hardware_lines(hw),
        f"- CUDA {hw.get('cuda') or 'n/a'}; wall time {res['seconds']:.0f} s",
        f"- result: **{'all checks passed' if res['passed'] else 'SOME CHECKS FAILED'}**",
        "",
    ]
    if res.get("tests"):
        t = res["tests"]
        lines += [
            "## CUDA tests",
            "",
            f"`{t['command']}`: {t['summary']} ({'passed' if t['passed'] else 'FAILED'}, {t['seconds']:.0f} s)",
            "",
        ]
    if res.get("memory"):
        lines += [
            f"## Estimate vs torch.cuda.max_memory_allocated (bf16, batch 1, seq {res['seq_len']}, random init)",
            "",
            f"A row passes when the estimate is within {100 * TOLERANCE:.0f}% of the measurement.",
            "",
            "| model | method | estimate (GiB) | measured (GiB) | error | pass |",
            "|---|---|---|---|---|---|",
        ]
        for r in res["memory"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['label']} | | | {r['error']} | no |")
                continue
            lines.append(
                f"| {r['model']} | {r['label']} | {r['estimate'] / 2**30:.3f} | {r['measured'] / 2**30:.3f} | "
                f"{100 * r['relative_error']:+.1f}% | {'yes' if r['passed'] else 'NO'} |"
            )
        lines.append("")
    if res.get("throughput"):
        tp = res["throughput_setup"]
        lines += [
            f"## Throughput: {tp['model']}, bf16, batch {tp['batch']} x {tp['seq_len']} tokens, "
            f"{tp['steps']} timed steps after {tp['warmup']} warm-up steps",
            "",
            "LISA / GRASS with their two lowest layers active (the worst case for backward length).",
            "",
            "| method | offload | overlap | tokens/s | ms/step |",
            "|---|---|---|---|---|",
        ]
        for r in res["throughput"]:
            if "error" in r:
                lines.append(f"| {r['label']} | | | {r['error']} | |")
                continue
            lines.append(
                f"| {r['label']} | {r['offload']} | {r['overlap']} | {r['tokens_per_s']:.0f} | "
                f"{1e3 * r['seconds_per_step']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for gpu_check.md / .json")
    p.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated models of the memory check: {', '.join(MODELS)} (default all)",
    )
    p.add_argument(
        "--seq-len", type=int, default=1024, help="sequence length of the memory check (default 1024)"
    )
    p.add_argument("--batch", type=int, default=1, help="batch size of the throughput check (default 1)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per throughput row (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per throughput row (default 3)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the CUDA tests")
    p.add_argument("--skip-memory", action="store_true", help="do not compare estimates with measurements")
    p.add_argument("--skip-throughput", action="store_true", help="do not time the methods")
    p.add_argument(
        "--dry-run", action="store_true", help="no GPU: run every step on the CPU with tiny shapes"
    )
    p.add_argument(
        "--row", metavar="JSON", default=None, help=argparse.SUPPRESS
    )  # one row, in a fresh process
    args = p.parse_args(argv)
    if args.row is not None:
        return _row_main(args.row)
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in MODELS]
    if unknown:
        print(
            f"gpu_check: error: --models {unknown[0]!r} is unknown; allowed: {', '.join(MODELS)}",
            file=sys.stderr,
        )
        return 2
    for name in ("seq_len", "batch", "steps"):
        if getattr(args, name) < 1:
            print(f"gpu_check: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.dry_run and args.out.resolve() == RESULTS.resolve():
        print(
            "gpu_check: error: a dry run must not overwrite the GPU report; give --out DIR", file=sys.stderr
        )
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_check: error: no CUDA device (torch.cuda.is_available() is False). This script checks the memory "
            "estimates and throughput on a GPU; --dry-run --out DIR runs the same code on the CPU with tiny shapes.",
            file=sys.stderr,
        )
        return 2
    warnings.simplefilter("ignore")
    device = torch.device("cpu" if args.dry_run else "cuda")
    started = time.time()
    hw = hardware(device)
    res: dict[str, Any] = {
        "command": command_line(),
        "dry_run": args.dry_run,
        "device_name": "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(device),
        "hardware": hw,
        "seq_len": 64 if args.dry_run else args.seq_len,
    }
    passed = True
    if not args.skip_tests:
        res["tests"] = run_tests(args.dry_run)
        passed &= res["tests"]["passed"]
    models = ["tiny"] if args.dry_run else chosen
    if not args.skip_memory:
        res["memory"] = check_memory(models, args.dry_run, res["seq_len"])
        passed &= all(r["passed"] for r in res["memory"])
    if not args.skip_throughput:
        seq = 64 if args.dry_run else 1024
        steps, warmup = (2, 1) if args.dry_run else (args.steps, args.warmup)
        res["throughput_setup"] = {
            "model": "tiny" if args.dry_run else "TinyLlama-1.1B",
            "batch": args.batch,
            "seq_len": seq,
            "steps": steps,
            "warmup": warmup,
        }
        res["throughput"] = check_throughput(args.batch, seq, warmup, steps, args.dry_run)
        passed &= all("error" not in r for r in res["throughput"])
    hw["load_avg_end"] = load_average()
    res["passed"] = bool(passed)
    res["seconds"] = time.time() - started
    write_results(args.out, "gpu_check", res, render(res))
    print(f"wrote {args.out / 'gpu_check.md'}: {'all checks passed' if passed else 'SOME CHECKS FAILED'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
