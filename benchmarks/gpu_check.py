"""One command that checks the memory estimates and times the methods on a GPU, within a time budget.

1. **CUDA tests** (optional here: ``benchmarks/gpu_all.sh`` runs them as its own stage): ``pytest -m gpu tests``.
2. **Memory**: for random-init TinyLlama-1.1B, Gemma-2B and LLaMA2-7B shapes (bf16, batch 1 x 1024, the worst
   layers): FFT, LoRA r=128, LISA γ=2, GRASS γ=2 and GRASS γ=2 + ``activation_checkpointing=frozen``, each
   ``grass-llm memory``'s whole-run estimate (``phase="run"``: the larger of the probing and training steps)
   next to ``torch.cuda.max_memory_allocated`` of a real run of the same steps
   (``grass_llm.memory.measure_cuda_step(phase="run")``: probing steps, then training steps with layers
   0..γ-1, in one process). A row passes within 3%. Rows run in parallel processes, as many as fit the GPU.
3. **Throughput**, default settings, TinyLlama b1 x 1024 and LLaMA2-7B b4 x 1024, one row at a time, each in
   a fresh process: FFT and LoRA r=128 (training steps); LISA γ=2 across 3 real sampling periods (resamples
   and their state transfers included); GRASS γ=2's run average (``--probe-steps`` probing steps, 3 of them
   timed, the last, which ends probing, untimed; then 3 real sampling periods of ``period`` steps timed,
   combined in the paper's shape: T=3750 steps of which Tp=150 probe, tokens/s = T x tokens / (Tp x t_probe +
   (T - Tp) x t_train)); and GRASS γ=2's worst case (layers 0..γ-1 forced after probing). The peak column is
   the whole-run peak of that process (``max_memory_allocated`` over its probing and training steps). A run
   average also comes with the first uses of the layers' host states amortized: the timed periods pay the
   first use (host buffer allocated, pinned, initialised) of every layer they draw, which a whole run pays
   once per layer.

    python benchmarks/gpu_check.py --budget-s 300 --out $OUT          # memory, then throughput, on cuda:0
    python benchmarks/gpu_check.py --skip-memory --models llama2-7b --out $OUT
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check     # no GPU: the same code on CPU, tiny shapes

With ``--budget-s`` a row is started only while the budget allows it and is stopped at the budget; rows not
run are marked in the report, which is rewritten (atomically) after every row, so the report is complete up
to the budget whatever happens. Writes ``gpu_check.md`` and ``gpu_check.json`` (per row: method, settings,
tokens/s, whole-run peak bytes, device, date, commit) to ``--out`` (default ``benchmarks/results``; a dry run
must name another directory) and prints a short table last. Exit status 0 when every check ran and passed, 1
when one failed or was not run, 2 for bad input or no GPU. ``--dry-run`` runs every row on the CPU with a
tiny Llama (the "measurement" is then a real CPU run of the estimator, offload off): it checks the script,
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
)

RESULTS = HERE / "results"
#: a memory row passes when the estimate is within this fraction of the measurement (issue 17)
TOLERANCE = 0.03
#: name -> key in benchmarks/common.py's MODEL_SHAPES
MODELS = {"tinyllama": "TinyLlama-1.1B", "gemma-2b": "Gemma-2B", "llama2-7b": "LLaMA2-7B"}
#: (label, method, estimate_memory / measure_cuda_step keyword arguments); each a whole run
MEMORY_CHECKS = [
    ("FFT", "fft", {}),
    ("LoRA r=128", "lora", {"rank": 128}),
    ("LISA γ=2", "lisa", {}),
    ("GRASS γ=2", "grass", {}),
    ("GRASS γ=2 +AC frozen", "grass", {"activation_checkpointing": "frozen"}),
]
#: whole-run peak (GiB, rounded up) that grass-llm memory estimates for each memory row at b1 x 1024: only
#: to pack rows onto the GPU (a row that runs out of memory anyway is run again alone)
EXPECTED_GIB = {
    "tinyllama": {"FFT": 9, "LoRA r=128": 4, "LISA γ=2": 5, "GRASS γ=2": 4, "GRASS γ=2 +AC frozen": 3},
    "gemma-2b": {"FFT": 20, "LoRA r=128": 8, "LISA γ=2": 12, "GRASS γ=2": 8, "GRASS γ=2 +AC frozen": 7},
    "llama2-7b": {"FFT": 51, "LoRA r=128": 19, "LISA γ=2": 20, "GRASS γ=2": 18, "GRASS γ=2 +AC frozen": 16},
}
#: (model, batch size, sequence length) of the throughput rows: the paper's Figure 5 setting and TinyLlama's
THROUGHPUT_SETUPS = [("llama2-7b", 4, 1024), ("tinyllama", 1, 1024)]
#: (label, method, kwargs, how it is timed); the order the rows run in (the targets first)
THROUGHPUT = [
    ("LoRA r=128", "lora", {"rank": 128}, "steps"),
    ("GRASS γ=2, run average", "grass", {}, "run"),
    ("FFT", "fft", {}, "steps"),
    ("GRASS γ=2, worst case (layers 0..γ-1)", "grass", {}, "worst"),
    ("LISA γ=2, run average", "lisa", {}, "run"),
]
#: the paper's run shape for the run average: T steps of which Tp probe (Table 8)
RUN_STEPS, RUN_PROBE = 3750, 150
#: seconds a row is given at most, and what it takes at least to be worth starting
ROW_LIMIT_S = {"memory": 240, "throughput": 150}
ROW_MIN_S = {"memory": 25, "throughput": 15}


def tiny_config():
    return model_config("tiny", "tiny (dry run)")


def _config(name: str, dry_run: bool):
    return tiny_config() if dry_run else model_config(MODELS.get(name, name))


def _model_label(name: str, dry_run: bool) -> str:
    return "tiny" if dry_run else MODELS.get(name, name)


# ------------------------------------------------------------------------------------------------
# 1. tests
def run_tests(dry_run: bool, timeout: float | None, log=print) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider"]
    if dry_run:
        cmd.insert(-3, "--collect-only")
    log("$ " + " ".join(cmd[1:]))
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
        out, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), 124
    lines = [ln for ln in out.splitlines() if ln.strip()]
    summary = lines[-1] if lines else "no output"
    if rc == 124:
        summary = f"timed out after {timeout:.0f} s; last line: {summary}"
    log(summary)
    return {
        "command": "python " + " ".join(cmd[1:]),
        "returncode": rc,
        "summary": summary,
        "passed": rc == 0,
        "collected_only": dry_run,
        "seconds": round(time.time() - t0, 1),
        "tail": out[-4000:],
    }


# ------------------------------------------------------------------------------------------------
# rows in fresh processes
ROW_PREFIX = "GPU_CHECK_ROW "


def _row_command(spec: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    import grass_llm

    env = dict(os.environ)
    src = str(Path(grass_llm.__file__).resolve().parents[1])  # the same grass_llm as this process
    env["PYTHONPATH"] = os.pathsep.join([src, str(HERE), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONUNBUFFERED"] = "1"
    return [sys.executable, str(Path(__file__).resolve()), "--row", json.dumps(spec)], env


def _base_row(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": spec["kind"],
        "model": _model_label(spec.get("model", ""), spec["dry_run"]),
        "label": spec["label"],
        "method": spec["method"],
        "passed": False,
    }


def _parse_row(spec: dict[str, Any], rc: int | None, stdout: str, stderr: str, timeout: float) -> dict[str, Any]:
    base = _base_row(spec)
    if rc is None:
        return dict(base, error=f"timed out after {timeout:.0f} s", timed_out=True)
    lines = [ln for ln in stdout.splitlines() if ln.startswith(ROW_PREFIX)]
    if rc != 0 or not lines:
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        oom = "OutOfMemoryError" in stderr or "out of memory" in stderr
        return dict(base, error=f"row process failed (exit {rc}): {tail[-300:]}", oom=oom)
    return json.loads(lines[-1][len(ROW_PREFIX) :])


def in_fresh_process(spec: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """Run one row (``spec``: memory_row's or throughput_row's) in a new Python process and return its result;
    a process that fails or runs out of time gives a row with its ``error``."""
    cmd, env = _row_command(spec)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return _parse_row(spec, None, "", "", timeout)
    return _parse_row(spec, proc.returncode, proc.stdout, proc.stderr, timeout)


class _Running:
    def __init__(self, spec: dict[str, Any], gib: float, timeout: float) -> None:
        self.spec, self.gib, self.timeout = spec, gib, timeout
        cmd, env = _row_command(spec)
        self.dir = Path(os.environ.get("TMPDIR", "/tmp"))
        self.out = open(self.dir / f"gpu_check_{os.getpid()}_{id(self)}.out", "w+")  # noqa: SIM115
        self.err = open(self.dir / f"gpu_check_{os.getpid()}_{id(self)}.err", "w+")  # noqa: SIM115
        self.started = time.time()
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=self.err, text=True, env=env, cwd=REPO_ROOT)

    def poll(self) -> dict[str, Any] | None:
        rc = self.proc.poll()
        timed_out = rc is None and time.time() - self.started > self.timeout
        if rc is None and not timed_out:
            return None
        if timed_out:
            self.proc.kill()
            self.proc.wait()
        out, err = (self._read(f) for f in (self.out, self.err))
        return _parse_row(self.spec, None if timed_out else rc, out, err, self.timeout)

    @staticmethod
    def _read(f) -> str:
        f.flush()
        f.seek(0)
        text = f.read()
        f.close()
        Path(f.name).unlink(missing_ok=True)
        return text


def _row_main(spec_json: str) -> int:
    """``--row SPEC``: one row in this (fresh) process; its result on one line of stdout."""
    warnings.simplefilter("ignore")
    spec = json.loads(spec_json)
    t0 = time.time()
    row = memory_row(spec) if spec["kind"] == "memory" else throughput_row(spec)
    row.update(pid=os.getpid(), seconds=round(time.time() - t0, 1))
    print(ROW_PREFIX + json.dumps(row), flush=True)
    return 0


class Budget:
    """Seconds left until ``deadline`` (None: no limit)."""

    def __init__(self, seconds: float | None) -> None:
        self.deadline = None if seconds is None else time.time() + seconds

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def until(self, reserve: float) -> Budget:
        """A budget ending ``reserve`` seconds before this one."""
        b = Budget(None)
        b.deadline = None if self.deadline is None else self.deadline - reserve
        return b


def _not_run(spec: dict[str, Any], why: str) -> dict[str, Any]:
    return dict(_base_row(spec), error=f"not run: {why}", not_run=True)


# ------------------------------------------------------------------------------------------------
# 2. memory: estimate vs max_memory_allocated, rows in parallel processes
def memory_specs(models: list[str], dry_run: bool, seq_len: int) -> list[dict[str, Any]]:
    common = {"kind": "memory", "dry_run": dry_run, "seq_len": seq_len}
    return [
        dict(common, model=name, label=label, method=method, kw=kw)
        for name in models
        for label, method, kw in MEMORY_CHECKS
    ]


def check_memory(
    specs: list[dict[str, Any]],
    budget: Budget,
    capacity_gib: float,
    parallel: int,
    on_row=lambda row: None,
    log=print,
) -> list[dict[str, Any]]:
    """Every spec, each in a fresh process, as many at once as fit ``capacity_gib`` (by EXPECTED_GIB plus
    1.5 GiB of CUDA context each; 90% of the GPU) and ``parallel``; a row that ran out of memory runs again
    alone."""
    def key(spec: dict[str, Any]) -> tuple[str, str]:
        return spec["model"], spec["label"]

    pending = sorted(specs, key=lambda s: -_expected_gib(s))
    rows: dict[int, dict[str, Any]] = {}
    order = {key(s): i for i, s in enumerate(specs)}
    running: list[_Running] = []
    while pending or running:
        for r in list(running):
            row = r.poll()
            if row is None:
                continue
            running.remove(r)
            if row.get("oom") and not r.spec.get("alone"):
                pending.append(dict(r.spec, alone=True))
                log(f"{row['model']:15s} {r.spec['label']:22s} out of memory beside other rows: again, alone")
                continue
            rows[order[key(r.spec)]] = row
            _log_memory(row, log)
            on_row([rows[k] for k in sorted(rows)])
        used = sum(r.gib for r in running)
        for spec in list(pending):
            if budget.left() < ROW_MIN_S["memory"]:
                for s in pending:
                    rows[order[key(s)]] = _not_run(s, "time budget spent")
                pending.clear()
                break
            alone = spec.get("alone")
            if running and (alone or any(r.spec.get("alone") for r in running)):
                break
            gib = _expected_gib(spec) + 1.5
            if len(running) >= parallel or (running and used + gib > capacity_gib):
                continue
            timeout = min(ROW_LIMIT_S["memory"], budget.left())
            running.append(_Running(spec, gib, timeout))
            used += gib
            pending.remove(spec)
        time.sleep(0.2)
    out = [rows[k] for k in sorted(rows)]
    on_row(out)
    return out


def _expected_gib(spec: dict[str, Any]) -> float:
    if spec["dry_run"]:
        return 1.0
    return float(EXPECTED_GIB.get(spec["model"], {}).get(spec["label"], 20))


def _log_memory(row: dict[str, Any], log=print) -> None:
    if "error" in row:
        log(f"{row['model']:15s} {row['label']:22s} {row['error']}")
    else:
        log(
            f"{row['model']:15s} {row['label']:22s} estimate {row['estimate'] / 2**30:7.3f} GiB  measured "
            f"{row['measured'] / 2**30:7.3f} GiB ({100 * row['relative_error']:+.1f}%)"
        )


def memory_row(spec: dict[str, Any]) -> dict[str, Any]:
    """One whole-run estimate against its measurement (this process: run by ``--row``)."""
    from grass_llm.memory import estimate_memory, measure_cuda_step
    from grass_llm.memory.estimate import cuda_gpu

    cfg = _config(spec["model"], spec["dry_run"])
    kw = dict(spec["kw"], batch_size=1, seq_len=spec["seq_len"], phase="run")
    row = _base_row(spec)
    try:
        if spec["dry_run"]:  # the "measurement" is a real CPU run: no separate host memory, no foreach, no cuBLAS
            kw.update(overrides={"grass.offload": False}, optimizer_impl="for-loop")
            est = estimate_memory(cfg, spec["method"], gpu=None, **kw)
            measured = estimate_memory(cfg, spec["method"], fake=False, **kw).peak
        else:
            measured = measure_cuda_step(cfg, spec["method"], **kw)
            est = estimate_memory(cfg, spec["method"], gpu=cuda_gpu(), **kw)
    except torch.cuda.OutOfMemoryError as e:
        return dict(row, error=f"out of memory: {str(e).splitlines()[0]}", oom=True)
    rel = (est.peak - measured) / measured
    return dict(
        row,
        estimate=est.peak,
        measured=measured,
        relative_error=rel,
        passed=abs(rel) <= TOLERANCE,
        whole_run_from=est.extra.get("whole_run_from"),
        estimate_steps=est.extra.get("steps"),
        breakdown=est.breakdown(),
        settings=_settings_of(est),
    )


def _settings_of(est) -> dict[str, Any]:
    out = {"activation_checkpointing": est.activation_checkpointing, "gpu": est.gpu}
    for key in ("offload", "precision"):
        if key in est.extra:
            out[key] = est.extra[key]
    return out


# ------------------------------------------------------------------------------------------------
# 3. throughput
def throughput_specs(setups, dry_run: bool, probe_steps: int, periods: int, warmup: int, steps: int, worst_steps: int):
    common = dict(
        kind="throughput",
        probe_steps=probe_steps,
        periods=periods,
        warmup=warmup,
        steps=steps,
        worst_steps=worst_steps,
        dry_run=dry_run,
    )
    return [
        dict(common, model=model, label=label, method=method, kw=kw, mode=mode, batch=batch, seq_len=seq)
        for model, batch, seq in setups
        for label, method, kw, mode in THROUGHPUT
    ]


def check_throughput(specs: list[dict[str, Any]], budget: Budget, on_row=lambda rows: None, log=print):
    """Every spec in a fresh process, strictly one at a time."""
    rows = []
    for spec in specs:
        if budget.left() < ROW_MIN_S["throughput"]:
            rows.append(_not_run(spec, "time budget spent"))
        else:
            rows.append(in_fresh_process(spec, timeout=min(ROW_LIMIT_S["throughput"], budget.left())))
        row = rows[-1]
        row.update(batch=spec["batch"], seq_len=spec["seq_len"])
        if "error" in row:
            log(f"{row['model']:15s} {spec['label']:40s} {row['error']}")
        else:
            log(
                f"{row['model']:15s} b{spec['batch']} {spec['label']:40s} {row['tokens_per_s']:8.0f} tokens/s  "
                f"peak {row['peak_bytes'] / 2**30:6.2f} GiB"
            )
        on_row(rows)
    return rows


def throughput_row(spec: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s and whole-run peak of one method (this process: run by ``--row``)."""
    from grass_llm.memory import training_step

    device = torch.device("cpu" if spec["dry_run"] else "cuda")
    batch, seq_len, mode = spec["batch"], spec["seq_len"], spec["mode"]
    tokens = batch * seq_len
    cfg = _config(spec["model"], spec["dry_run"])
    row = _base_row(spec)
    row.update(mode=mode, batch=batch, seq_len=seq_len)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        kw = dict(spec["kw"], device=device, batch_size=batch, seq_len=seq_len)
        if mode == "steps":
            step = training_step(cfg, spec["method"], **kw)
            t_probe = None
            t_train = _time(step, batch, seq_len, spec["warmup"], spec["steps"], device)
        else:
            layer_wise = spec["method"] in ("grass", "grass-static", "lisa", "badam")
            overrides = dict(kw.pop("overrides", None) or {})
            if spec["method"] == "grass":
                overrides.setdefault("grass.probe_steps", spec["probe_steps"])
            step = training_step(
                cfg, spec["method"], phase="run" if layer_wise else "train", overrides=overrides,
                force_layers=mode == "worst", **kw,
            )  # fmt: skip
            opt = step.opt
            first_use = _time_first_uses(opt)
            t_probe = None
            if opt.probing:  # 3 probing steps timed; the last probing step ends probing (and draws the layers)
                n = opt.config.probe_steps
                t_probe = _time(step, batch, seq_len, n - 4, 3, device)
                _time(step, batch, seq_len, 1, 0, device)  # (the end of probing: once per run)
            assert not opt.probing
            first_use.update(s=0.0, units=0)
            if mode == "worst":  # layers 0..γ-1 forced until the end of this first period: time inside it
                n = max(min(spec["worst_steps"], opt.config.period - 3), 1)  # (no resample inside the timing)
                t_train = _time(step, batch, seq_len, 2, n, device)
                row["active_layers"] = list(opt.active_layers)
            else:  # whole sampling periods: each ends with a resample and its state transfers, all timed
                if spec["method"] == "lisa":
                    _time(step, batch, seq_len, opt.config.period, 0, device)  # (its first period: warm-up)
                    first_use.update(s=0.0, units=0)
                n = spec["periods"] * opt.config.period
                draws = [list(opt.active_layers)]
                t_train = _time(
                    step, batch, seq_len, 0, n, device,
                    each=lambda: draws.append(list(opt.active_layers)) if draws[-1] != opt.active_layers else None,
                )  # fmt: skip
                row["draws"] = draws
                if first_use["units"]:
                    # a unit's first use (host buffer allocated, pinned, initialised) is paid once per layer in a
                    # run: over T - Tp steps rather than in every one of these few periods
                    per_unit = first_use["s"] / first_use["units"]
                    amortized = t_train - first_use["s"] / n + per_unit * opt.num_layers / (RUN_STEPS - RUN_PROBE)
                    row.update(first_use_s=first_use["s"], first_use_units=first_use["units"], t_train_amortized_s=amortized)
    except torch.cuda.OutOfMemoryError as e:
        return dict(row, error=f"out of memory: {str(e).splitlines()[0]}")
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0
    off = getattr(step.opt, "offloader", None)
    row.update(
        t_train_s=t_train,
        train_tokens_per_s=tokens / t_train,
        peak_bytes=peak,
        settings=_run_settings(step),
        bytes_to_device=off.bytes_to_device if off is not None else 0,
        bytes_to_host=off.bytes_to_host if off is not None else 0,
        passed=True,
    )
    if t_probe is not None:
        avg = RUN_STEPS * tokens / (RUN_PROBE * t_probe + (RUN_STEPS - RUN_PROBE) * t_train)
        row.update(t_probe_s=t_probe, probe_tokens_per_s=tokens / t_probe, run_average_tokens_per_s=avg)
    if row.get("t_train_amortized_s"):
        t_am, t_p = row["t_train_amortized_s"], t_probe or row["t_train_amortized_s"]
        row["amortized_tokens_per_s"] = RUN_STEPS * tokens / (RUN_PROBE * t_p + (RUN_STEPS - RUN_PROBE) * t_am)
    # the headline: a real run's average where the row times one, else the training steps'
    row["tokens_per_s"] = row["run_average_tokens_per_s"] if mode == "run" and t_probe else row["train_tokens_per_s"]
    return row


def _time_first_uses(opt) -> dict[str, float]:
    """Host seconds and count of the offloaded units' first uses (their host buffer allocated and initialised)
    from now on; the counters are reset by the caller. (The offloader's private ``_ensure_host`` is wrapped on
    this instance only: a benchmark's instrumentation.)"""
    counts = {"s": 0.0, "units": 0}
    off = getattr(opt, "offloader", None)
    if off is None or not hasattr(off, "_ensure_host"):
        return counts
    ensure = off._ensure_host

    def timed(unit, init: bool = True) -> None:
        first = init and (unit.host is None or not unit.initialized)
        t0 = time.perf_counter()
        ensure(unit, init)
        if first:
            counts["s"] += time.perf_counter() - t0
            counts["units"] += 1

    off._ensure_host = timed
    return counts


def _time(step, batch: int, seq_len: int, warmup: int, steps: int, device: torch.device, each=None) -> float:
    """Seconds per step of ``steps`` steps after ``warmup`` untimed ones (device synchronised around them)."""
    for _ in range(warmup):
        step.run(batch, seq_len)
    if steps <= 0:
        return 0.0
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step.run(batch, seq_len)
        if each is not None:
            each()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def _run_settings(step) -> dict[str, Any]:
    opt, cfg = step.opt, step.cfg
    out: dict[str, Any] = {"method": cfg.method, "dtype": cfg.dtype, "chunked_loss": cfg.chunked_loss}
    if step.method.layer_wise:
        out.update(
            active_layers=cfg.grass.active_layers,
            period=opt.config.period,
            probe_steps=opt.config.probe_steps,
            offload=opt.residency,
            overlap=opt.offloader is not None and opt.offloader.copy_stream is not None,
            precision=opt.precision,
            probe_checkpointing=getattr(opt.config, "probe_checkpointing", None),
        )
    elif cfg.method in ("lora", "dora"):
        out.update(rank=cfg.lora.rank, alpha=cfg.lora.alpha)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# report
def render(res: dict[str, Any]) -> str:
    hw = res["hardware"]
    lines = [
        "# GPU check: whole-run memory estimates against max_memory_allocated, throughput, CUDA tests",
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
        f"- CUDA {hw.get('cuda') or 'n/a'}; wall time {res['seconds']:.0f} s"
        + (f" (budget {res['budget_s']:.0f} s)" if res.get("budget_s") else ""),
        f"- result: **{_verdict(res)}**",
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
    if res.get("memory") is not None:
        lines += [
            f"## Whole-run peak: estimate vs torch.cuda.max_memory_allocated (bf16, batch 1 x {res['seq_len']})",
            "",
            "Each row in a fresh process: `grass-llm memory --phase run` (for GRASS the larger of its probing and "
            "training steps, layers 0..γ-1) against a real run of the same steps (GRASS: probing steps, then "
            f"training steps with layers 0..γ-1). A row passes within {100 * TOLERANCE:.0f}%.",
            "",
            "| model | method | estimate (GiB) | set by | measured (GiB) | error | pass |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["memory"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['label']} | | | | {r['error']} | no |")
                continue
            steps = r.get("estimate_steps") or {}
            by = {"train": "training step", "probe": "probing step"}.get(r.get("whole_run_from"), "")
            if len(steps) > 1:
                by += " (" + ", ".join(f"{k} {v / 2**30:.3f}" for k, v in steps.items()) + ")"
            lines.append(
                f"| {r['model']} | {r['label']} | {r['estimate'] / 2**30:.3f} | {by} | {r['measured'] / 2**30:.3f} | "
                f"{100 * r['relative_error']:+.2f}% | {'yes' if r['passed'] else 'NO'} |"
            )
        lines.append("")
    for setup in res.get("throughput_setups", []):
        rows = [r for r in res.get("throughput", []) if r["model"] == setup["model"] and r.get("batch") == setup["batch"]]
        if not rows:
            continue
        lines += _throughput_table(setup, rows, res)
    return "\n".join(lines)


def _throughput_table(setup: dict[str, Any], rows: list[dict[str, Any]], res: dict[str, Any]) -> list[str]:
    ok = {r["label"]: r for r in rows if "error" not in r}
    lora, fft = ok.get("LoRA r=128"), ok.get("FFT")
    lines = [
        f"## Throughput: {setup['model']}, bf16, batch {setup['batch']} x {setup['seq_len']}, default settings",
        "",
        "Each row in a fresh process. tokens/s: FFT and LoRA over "
        f"{res['timing']['steps']} training steps after {res['timing']['warmup']}; the run averages time "
        f"{res['timing']['periods']} real sampling periods (every resample and its state transfers included) and, "
        f"for GRASS, 3 of {res['timing']['probe_steps']} probing steps, combined as a run of T = {RUN_STEPS} "
        f"steps with Tp = {RUN_PROBE} probing: T x tokens / (Tp x t_probe + (T - Tp) x t_train); the worst case "
        "trains layers 0..γ-1 (its tokens/s: training steps). Amortized: the same with the first uses of the "
        "layers drawn in the timed periods (host buffer allocated, pinned and initialised) counted once per layer "
        "over the run. Peak: `max_memory_allocated` of the process over all its probing and training steps.",
        "",
        "| method | tokens/s | vs LoRA | vs FFT | amortized | training step tokens/s | probing step tokens/s "
        "| whole-run peak (GiB) | peak vs LoRA | state to GPU / to host (GB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['error']} | | | | | | | | |")
            continue
        tps = r["tokens_per_s"]
        probe = f"{r['probe_tokens_per_s']:.0f}" if r.get("probe_tokens_per_s") else ""
        am = r.get("amortized_tokens_per_s")
        am = f"{am:.0f} ({_ratio(am, lora, 'tokens_per_s')}x LoRA)" if am else ""
        lines.append(
            f"| {r['label']} | **{tps:.0f}** | {_ratio(tps, lora, 'tokens_per_s')} | {_ratio(tps, fft, 'tokens_per_s')} | "
            f"{am} | {r['train_tokens_per_s']:.0f} | {probe} | {r['peak_bytes'] / 2**30:.2f} | "
            f"{_ratio(r['peak_bytes'], lora, 'peak_bytes')} | {r['bytes_to_device'] / 1e9:.1f} / {r['bytes_to_host'] / 1e9:.1f} |"
        )
    lines.append("")
    avg, worst = ok.get("GRASS γ=2, run average"), ok.get("GRASS γ=2, worst case (layers 0..γ-1)")
    if setup["model"] == MODELS["llama2-7b"] and setup["batch"] == 4 and lora and fft:
        lines += ["Issue 19's targets (LLaMA2-7B, batch 4 x 1024):", ""]
        checks = []
        if avg:
            checks += [
                ("GRASS run average >= 1.10x LoRA r128", avg["tokens_per_s"] / lora["tokens_per_s"], 1.10, True),
                ("GRASS run average >= 1.45x FFT", avg["tokens_per_s"] / fft["tokens_per_s"], 1.45, True),
                ("GRASS whole-run peak <= 0.90x LoRA's", avg["peak_bytes"] / lora["peak_bytes"], 0.90, False),
            ]
        if worst:
            checks.append(("GRASS worst case >= 0.95x LoRA", worst["tokens_per_s"] / lora["tokens_per_s"], 0.95, True))
        for name, value, goal, higher in checks:
            met = value >= goal if higher else value <= goal
            lines.append(f"- {name}: {value:.2f}x: {'met' if met else 'MISSED'}")
        lines.append("")
    return lines


def _ratio(value: float, ref: dict[str, Any] | None, key: str) -> str:
    return "" if ref is None or not ref.get(key) else f"{value / ref[key]:.2f}"


def _verdict(res: dict[str, Any]) -> str:
    rows = (res.get("memory") or []) + (res.get("throughput") or [])
    not_run = sum(1 for r in rows if r.get("not_run"))
    failed = sum(1 for r in rows if not r.get("passed") and not r.get("not_run"))
    if res.get("tests") and not res["tests"]["passed"]:
        failed += 1
    if res.get("in_progress"):
        return f"IN PROGRESS ({len(rows)} rows so far)"
    if not failed and not not_run:
        return "all checks passed"
    parts = [f"{failed} FAILED"] if failed else []
    parts += [f"{not_run} NOT RUN (time budget)"] if not_run else []
    return ", ".join(parts)


def short_table(res: dict[str, Any]) -> str:
    """The few lines printed last."""
    out = [f"gpu_check on {res['device_name']}: {_verdict(res)}"]
    for r in res.get("memory") or []:
        val = r.get("error") or (
            f"est {r['estimate'] / 2**30:6.2f} GiB  meas {r['measured'] / 2**30:6.2f} GiB  {100 * r['relative_error']:+5.1f}%"
            f"  {'ok' if r['passed'] else 'FAIL'}"
        )
        out.append(f"  mem  {r['model']:15s} {r['label']:22s} {val}")
    for r in res.get("throughput") or []:
        val = r.get("error") or f"{r['tokens_per_s']:8.0f} tok/s  peak {r['peak_bytes'] / 2**30:6.2f} GiB"
        out.append(f"  tput {r['model']:15s} b{r.get('batch', '?')} {r['label']:40s} {val}")
    return "\n".join(out)


def _write(out: Path, res: dict[str, Any]) -> None:
    """gpu_check.json and gpu_check.md, each replaced only once its new content is complete."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps(res, indent=2) + "\n"), ("gpu_check.md", render(res) + "\n")):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for gpu_check.md / .json")
    p.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated models of the memory and throughput rows: {', '.join(MODELS)} (default all)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods whose rows run: fft, lora, lisa, grass (default all)",
    )
    p.add_argument("--seq-len", type=int, default=1024, help="sequence length of the memory rows (default 1024)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting rows after this many seconds")
    p.add_argument(
        "--throughput-reserve-s",
        type=float,
        default=170,
        help="with --budget-s: seconds kept for the throughput rows (the memory rows stop earlier; default 170)",
    )
    p.add_argument("--parallel", type=int, default=8, help="memory rows at once at most (default 8)")
    p.add_argument(
        "--probe-steps",
        type=int,
        default=5,
        help="GRASS probing steps per throughput row, >= 4: the 3 before the last are timed (default 5)",
    )
    p.add_argument("--periods", type=int, default=3, help="sampling periods timed per run average (default 3)")
    p.add_argument("--steps", type=int, default=6, help="timed steps of FFT / LoRA (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps of FFT / LoRA (default 2)")
    p.add_argument("--worst-steps", type=int, default=15, help="timed steps of the worst case (default 15)")
    p.add_argument("--tests", action="store_true", help="also run the CUDA tests first (gpu_all.sh runs them)")
    p.add_argument("--skip-tests", action="store_true", help=argparse.SUPPRESS)  # (the default now)
    p.add_argument("--skip-memory", action="store_true", help="do not compare estimates with measurements")
    p.add_argument("--skip-throughput", action="store_true", help="do not time the methods")
    p.add_argument("--commit", default=None, help="the commit the tree is at (a copy without .git reports unknown)")
    p.add_argument("--dry-run", action="store_true", help="no GPU: run every row on the CPU with tiny shapes")
    p.add_argument("--row", metavar="JSON", default=None, help=argparse.SUPPRESS)  # one row, in a fresh process
    args = p.parse_args(argv)
    if args.row is not None:
        return _row_main(args.row)
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in MODELS]
    if unknown:
        print(f"gpu_check: error: --models {unknown[0]!r} is unknown; allowed: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    known = sorted({m for _, m, _ in MEMORY_CHECKS} | {m for _, m, _, _ in THROUGHPUT})
    methods = [m.strip() for m in (args.methods or ",".join(known)).split(",") if m.strip()]
    if not methods or any(m not in known for m in methods):
        bad = next((m for m in methods if m not in known), "")
        print(f"gpu_check: error: --methods {bad!r} is unknown; allowed: {', '.join(known)}", file=sys.stderr)
        return 2
    for name in ("seq_len", "steps", "parallel", "probe_steps", "periods", "worst_steps"):
        if getattr(args, name) < 1:
            print(f"gpu_check: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.probe_steps < 4:
        print("gpu_check: error: --probe-steps must be >= 4 (3 timed, then the one that ends probing)", file=sys.stderr)
        return 2
    if args.budget_s is not None and args.budget_s <= 0:
        print("gpu_check: error: --budget-s must be > 0", file=sys.stderr)
        return 2
    if args.dry_run and args.out.resolve() == RESULTS.resolve():
        print("gpu_check: error: a dry run must not overwrite the GPU report; give --out DIR", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_check: error: no CUDA device (torch.cuda.is_available() is False). This script checks the memory "
            "estimates and throughput on a GPU; --dry-run --out DIR runs the same code on the CPU with tiny shapes.",
            file=sys.stderr,
        )
        return 2
    warnings.simplefilter("ignore")
    budget = Budget(args.budget_s)
    device = torch.device("cpu" if args.dry_run else "cuda")
    started = time.time()
    hw = hardware(device)
    if args.commit:
        hw["git_commit"] = args.commit
    res: dict[str, Any] = {
        "command": command_line(),
        "dry_run": args.dry_run,
        "device_name": "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(device),
        "hardware": hw,
        "date_utc": hw["date_utc"],
        "commit": hw["git_commit"],
        "seq_len": 64 if args.dry_run else args.seq_len,
        "budget_s": args.budget_s,
        "in_progress": True,
        "seconds": 0.0,
    }

    def save(key: str):
        def on_row(rows):
            for r in rows:  # each row names what it was measured on
                r.setdefault("device", res["device_name"])
                r.setdefault("date_utc", res["date_utc"])
                r.setdefault("commit", res["commit"])
            res[key] = rows
            res["seconds"] = time.time() - started
            _write(args.out, res)

        return on_row

    _write(args.out, res)
    if args.tests and not args.skip_tests:
        res["tests"] = run_tests(args.dry_run, timeout=max(budget.left() - args.throughput_reserve_s, 30))
        _write(args.out, res)
    models = ["tiny"] if args.dry_run else chosen
    if not args.skip_memory:
        specs = [s for s in memory_specs(models, args.dry_run, res["seq_len"]) if s["method"] in methods]
        if args.dry_run:
            capacity, parallel = 4.0, min(args.parallel, 2)
        else:
            capacity, parallel = 0.9 * torch.cuda.mem_get_info(device)[1] / 2**30, args.parallel
        reserve = 0 if args.skip_throughput else args.throughput_reserve_s
        res["memory"] = []
        check_memory(specs, budget.until(reserve), capacity, parallel, on_row=save("memory"))
    if not args.skip_throughput:
        setups = [("tiny", 1, 64)] if args.dry_run else [s for s in THROUGHPUT_SETUPS if s[0] in chosen]
        res["throughput_setups"] = [
            {"model": _model_label(m, args.dry_run), "batch": b, "seq_len": t} for m, b, t in setups
        ]
        res["timing"] = {
            "probe_steps": args.probe_steps,
            "periods": args.periods,
            "steps": args.steps,
            "warmup": args.warmup,
            "worst_steps": args.worst_steps,
        }
        specs = throughput_specs(
            setups, args.dry_run, args.probe_steps, args.periods, args.warmup, args.steps, args.worst_steps
        )
        specs = [s for s in specs if s["method"] in methods]
        res["throughput"] = []
        check_throughput(specs, budget, on_row=save("throughput"))
    hw["load_avg_end"] = load_average()
    res["in_progress"] = False
    res["seconds"] = time.time() - started
    res["passed"] = _verdict(res) == "all checks passed"
    _write(args.out, res)
    print(f"wrote {args.out / 'gpu_check.md'} and gpu_check.json")
    print(short_table(res))
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
