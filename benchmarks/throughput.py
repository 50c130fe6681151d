"""Training throughput of FFT, LoRA, LISA and GRASS side by side, and GRASS's overhead (paper Figure 5, Table 8).

Command (the committed CPU results, benchmarks/results/throughput.md)::

    nice -n 5 python benchmarks/throughput.py --threads 1

GPU setting of the paper (random-init TinyLlama shape, bf16, batch 4, sequence 1024)::

    python benchmarks/throughput.py --device cuda --preset tinyllama

Method
------
Every method gets its own copy of the same randomly initialised model and sees the same batches
(random token ids). All methods live in ONE process and are timed in alternation: each repetition
runs a window of ``--window`` optimizer steps of every method, in an order rotated from one
repetition to the next; the first ``--warmup`` windows of each method are discarded (allocator
warm-up, AdamW state creation, GRASS probing, which lasts exactly the first window). A step is forward + backward + optimizer step +
zero_grad, with a device synchronisation around each window. GRASS's and LISA's sampling period
Ts is set to the window length, so each timed window is one period with its own layer draw and the
median covers several draws (with the paper's Ts = 25 a short run would time one or two draws, and
the depth of backward, set by the lowest active layer, would dominate); per-period costs (the MGN
host transfer, the draw, first-use AdamW state creation) are then counted more often than with
Ts = 25, which can only lower GRASS's numbers. We report the median step time over
the repetitions and tokens/s = batch * seq / median step time, as ratios to FFT and to LoRA r128.

Overhead (Table 8 layout), in a second phase with three more copies, also interleaved:

- ``grass`` : GRASS gamma=2 training steps, MGN observation on (the shipped code path);
- ``no-mgn``: the same, with the optimizer's gradient hooks reading no norm and
  ``ImportanceTracker.observe`` a no-op, on that optimizer only, so the step-time difference isolates
  the MGN computation (the norms read in the hooks and their observation). Both use a
  seeded fixed layer schedule (policy ``uniform``, same seed) so they train the same layers step
  for step; with policy ``grass`` the no-op variant would draw other layers and the depth of
  backward would confound the difference;
- ``probe``: GRASS in its probing phase (forward + backward through every layer, no update).

The per-period part of the MGN cost is also timed directly (``observe`` + ``end_period`` wrapped with
a timer, synchronised on CUDA; the norms read in the hooks are only in the A/B difference). The probing phase is compared with an equal number of training steps.
Shares of a whole run use the measured per-step times and a run of ``--total-steps`` optimizer
steps with ``--probe-steps`` probing steps (defaults 3750 and 150: math_10k, 3 epochs at batch 8,
and the paper's Tp; the paper does not state T, so this is our assumption).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    TINYLLAMA,
    Shape,
    command_line,
    count_params,
    hardware,
    hardware_lines,
    llama,
    load_average,
    make_method,
    sync,
    write_results,
)

CPU_SHAPE = Shape("cpu-small", hidden=256, intermediate=704, layers=8, heads=8, kv_heads=2, vocab=2048)
SMOKE_SHAPE = Shape("smoke", hidden=32, intermediate=64, layers=4, heads=2, kv_heads=2, vocab=128)
RESULTS = Path(__file__).resolve().parent / "results"


class Runner:
    """One method: its model copy, its optimizer, and a cursor over the shared batches."""

    def __init__(
        self, name: str, model, optimizer, batches: list[torch.Tensor], device: torch.device
    ) -> None:
        self.name = name
        self.model = model
        self.opt = optimizer
        self.batches = batches
        self.device = device
        self.cursor = 0
        self.windows: list[float] = []  # seconds per step, one entry per timed window
        self.model.train()

    def step(self) -> None:
        batch = self.batches[self.cursor % len(self.batches)]
        self.cursor += 1
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def window(self, steps: int, record: bool) -> None:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        dt = (time.perf_counter() - t0) / steps
        if record:
            self.windows.append(dt)

    def summary(self, tokens_per_step: int) -> dict[str, Any]:
        med = statistics.median(self.windows)
        return {
            "step_s_median": med,
            "step_s_min": min(self.windows),
            "step_s_max": max(self.windows),
            "windows": len(self.windows),
            "tokens_per_s": tokens_per_step / med,
        }


def interleave(runners: list[Runner], repeats: int, window: int, warmup: int, log=print) -> None:
    """Warm-up windows, then ``repeats`` rounds of one window per runner, order rotated each round."""
    n = len(runners)
    for r in range(warmup + repeats):
        order = runners[r % n :] + runners[: r % n]
        for run in order:
            run.window(window, record=r >= warmup)
        tag = "warm-up" if r < warmup else f"rep {r - warmup + 1}/{repeats}"
        log(f"  {tag}: " + ", ".join(f"{x.name} {x.windows[-1] * 1e3:.0f} ms" for x in runners if x.windows))


def build_main_runners(args, shape: Shape, base, batches, device) -> list[Runner]:
    dtype = next(base.parameters()).dtype
    specs: list[tuple[str, str, dict[str, Any]]] = [
        ("fft", "fft", {}),
        ("lora-r128", "lora", {"lora_rank": 128}),
    ]
    scaled = max(1, round(128 * shape.hidden / TINYLLAMA.hidden))
    if scaled != 128:
        specs.append((f"lora-r{scaled}", "lora", {"lora_rank": scaled}))
    specs.append(("lisa-g2", "lisa", {}))
    specs.append(("grass-g2", "grass", {"offload": False}))
    specs.append(("grass-g2-offload", "grass", {"offload": True, "overlap": True}))
    if device.type == "cuda":
        specs.append(("grass-g2-offload-nooverlap", "grass", {"offload": True, "overlap": False}))
    runners = []
    for name, method, kw in specs:
        model = copy.deepcopy(base)
        grass = {"active_layers": 2, "period": args.window_steps}
        if method == "grass":
            grass["probe_steps"] = args.warmup_probe
        lora = {"lora_rank": kw.pop("lora_rank")} if "lora_rank" in kw else {}
        model, opt = make_method(method, model, lr=1e-5, seed=0, **lora, **grass, **kw)
        if method == "lora":
            # adapters in the model dtype (bf16 in the GPU setting); make_method casts them
            assert all(p.dtype == dtype for p in model.parameters() if p.requires_grad)
        runners.append(Runner(name, model, opt, batches, device))
    return runners


def build_overhead_runners(args, base, batches, device) -> tuple[list[Runner], dict[str, float]]:
    from grass_llm import GrassConfig, GrassOptimizer

    direct = {"mgn_s": 0.0, "mgn_steps": 0}

    def grass_copy(probe: int):
        model = copy.deepcopy(base)
        cfg = GrassConfig(
            active_layers=2,
            period=args.window_steps,
            probe_steps=probe,
            policy="uniform",
            seed=0,
            offload=False,
        )
        return model, GrassOptimizer(model, cfg, lr=1e-5)

    model_a, opt_a = grass_copy(0)
    tracker = opt_a.importance_tracker
    observe, end_period = tracker.observe, tracker.end_period

    def timed(fn, count: bool):
        def wrapper(*a, **k):
            sync(device)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync(device)
            direct["mgn_s"] += time.perf_counter() - t0
            direct["mgn_steps"] += int(count)
            return out

        return wrapper

    tracker.observe = timed(observe, True)
    tracker.end_period = timed(end_period, False)

    # MGN off, this copy only: the hooks read no norm and nothing is observed (the per-step
    # non-finite check stays: it is not part of the MGN). The hook still marks the backward pass, which
    # step() requires (without one it skips the step: a no-op that would look like a fast step).
    model_b, opt_b = grass_copy(0)
    opt_b.importance_tracker.observe = lambda sumsq, layers: None
    probe_b = opt_b.probe

    def no_norm(p) -> None:
        if not probe_b.in_backward:
            probe_b._on_backward_start()  # (private: the one part of the hook this variant keeps)

    opt_b._on_grad = no_norm

    model_p, opt_p = grass_copy(10**9)  # probing for ever
    runners = [
        Runner("grass", model_a, opt_a, batches, device),
        Runner("no-mgn", model_b, opt_b, batches, device),
        Runner("probe", model_p, opt_p, batches, device),
    ]
    return runners, direct


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--preset", choices=["cpu-small", "tinyllama"], default=None, help="model shape (default: by device)"
    )
    p.add_argument(
        "--dtype", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 on CUDA"
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="default: 128 on CPU, 1024 on CUDA")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed windows per method (default 6 CPU, 10 CUDA)"
    )
    p.add_argument("--window", type=int, default=None, help="steps per window (default 3 CPU, 10 CUDA)")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="discarded windows per method (the first one is GRASS's probing)",
    )
    p.add_argument("--total-steps", type=int, default=3750, help="run length T for the Table 8 shares")
    p.add_argument("--probe-steps", type=int, default=150, help="Tp for the Table 8 shares")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: steadiest on a shared machine)"
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for throughput.md / throughput.json")
    p.add_argument("--smoke", action="store_true", help="tiny model, one window: checks the script runs")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = device.type == "cuda"
    shape = (
        SMOKE_SHAPE
        if args.smoke
        else {"cpu-small": CPU_SHAPE, "tinyllama": TINYLLAMA}[
            args.preset or ("tinyllama" if on_gpu else "cpu-small")
        ]
    )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if on_gpu else "fp32")]
    seq = args.seq_len or (16 if args.smoke else 1024 if on_gpu else 128)
    bs = 2 if args.smoke else args.batch_size
    repeats = 1 if args.smoke else args.repeats or (10 if on_gpu else 6)
    window = 1 if args.smoke else args.window or (10 if on_gpu else 3)
    # GRASS probes for exactly one (warm-up) window, and Ts = LISA's Ts = the window length, so every
    # timed window is one sampling period with a fresh layer draw
    args.window_steps = window
    args.warmup_probe = window
    if args.warmup < 2:
        print("error: --warmup must be >= 2 (one window of GRASS probing, one of training)", file=sys.stderr)
        return 2
    tokens = bs * seq
    hw = hardware(device)
    print(
        f"throughput: {shape.describe()}, {dtype}, batch {bs} x seq {seq} on {hw['gpu'] if on_gpu else hw['cpu']}"
    )

    base = llama(shape, max_positions=max(seq, 64), seed=0, dtype=dtype).to(device)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, shape.vocab, (bs, seq), generator=gen).to(device) for _ in range(8)]

    # phase 1: the methods side by side
    runners = build_main_runners(args, shape, base, batches, device)
    trainable = {}
    for r in runners:
        if hasattr(r.opt, "trainable_parameters"):
            trainable[r.name] = "2 sampled layers" + (
                " + embeddings + head" if r.name.startswith("lisa") else ""
            )
        else:
            trainable[r.name] = f"{count_params(r.model, trainable_only=True):,}"
    print(
        f"phase 1: {len(runners)} methods, {args.warmup} warm-up + {repeats} windows of {window} steps each"
    )
    interleave(runners, repeats, window, args.warmup)
    main_rows = {r.name: r.summary(tokens) for r in runners}
    del runners
    # phase 2: overhead
    over_runners, direct = build_overhead_runners(args, base, batches, device)
    print(f"phase 2: overhead, {len(over_runners)} variants")
    interleave(over_runners, repeats, window, args.warmup)
    over = {r.name: r.summary(tokens) for r in over_runners}
    over["direct_mgn_s_per_step"] = direct["mgn_s"] / max(direct["mgn_steps"], 1)
    hw["load_avg_end"] = load_average()
    run_avg = run_average(main_rows, over, tokens, args.total_steps, args.probe_steps)

    result = {
        "command": command_line(),
        "hardware": hw,
        "model": shape.describe(),
        "params": count_params(base),
        "dtype": str(dtype).replace("torch.", ""),
        "batch_size": bs,
        "seq_len": seq,
        "repeats": repeats,
        "window_steps": window,
        "warmup_windows": args.warmup,
        "trainable": trainable,
        "methods": main_rows,
        "overhead": over,
        "run_average": run_avg,
        "total_steps": args.total_steps,
        "probe_steps": args.probe_steps,
        "smoke": args.smoke,
    }
    md = render(result)
    write_results(args.out, "throughput", result, md)
    print(md)
    return 0


def run_average(rows: dict[str, Any], over: dict[str, Any], tokens: int, total: int, probe: int) -> dict[str, Any]:
    """GRASS's tokens/s over a whole run in the paper's shape: ``probe`` probing steps (the overhead phase's
    probing step time) and ``total - probe`` training steps (``grass-g2``'s step time, its windows each one
    sampling period with a fresh draw): T x tokens / (Tp x t_probe + (T - Tp) x t_train)."""
    t_train, t_probe = rows["grass-g2"]["step_s_median"], over["probe"]["step_s_median"]
    tps = total * tokens / (probe * t_probe + (total - probe) * t_train)
    return {
        "tokens_per_s": tps,
        "vs_lora": tps / rows["lora-r128"]["tokens_per_s"],
        "vs_fft": tps / rows["fft"]["tokens_per_s"],
        "t_train_s": t_train,
        "t_probe_s": t_probe,
    }


def render(res: dict[str, Any]) -> str:
    rows = res["methods"]
    fft = rows["fft"]["tokens_per_s"]
    lora = rows["lora-r128"]["tokens_per_s"]
    on_gpu = res["hardware"]["device"].startswith("cuda")
    lines = [
        "# Throughput: FFT, LoRA, LISA, GRASS side by side"
        + (" (SMOKE RUN: not a result)" if res["smoke"] else ""),
        "",
        "Command:",
        "",
        f"    {res['command']}",
        "",
        "Hardware:",
        "",
        *hardware_lines(res["hardware"]),
        "",
        f"Model: {res['model']} ({res['params'] / 1e6:.1f}M parameters, random init), {res['dtype']}, "
        f"batch {res['batch_size']} x sequence {res['seq_len']} = {res['batch_size'] * res['seq_len']} tokens/step.",
        f"Timing: all methods in one process, {res['warmup_windows']} warm-up window(s) discarded, then "
        f"{res['repeats']} windows of {res['window_steps']} steps per method in rotated order; median over windows. "
        f"GRASS / LISA Ts = {res['window_steps']} (one fresh layer draw per window).",
        "",
    ]
    load = max(res["hardware"].get("load_avg_start") or 0.0, res["hardware"].get("load_avg_end") or 0.0)
    if load - res["hardware"]["torch_threads"] >= 0.5:
        lines += [
            f"**The machine was shared**: other jobs kept it busy while this ran (load average up to {load:.2f} "
            f"on {res['hardware']['cpu_cores_visible']} cores). Absolute step times are therefore noisier and "
            "may be slower than on an idle machine; every method was timed in alternation (windows "
            "interleaved side by side, order rotated), so all saw the same background load and the ratios "
            "between methods are the numbers to read.",
            "",
        ]
    if not on_gpu:
        lines += [
            "**This run is on the CPU.** These are CPU numbers for a small Llama-shaped model, not the paper's GPU",
            "setting (`benchmarks/gpu_check.py` times the paper's shapes on a GPU). Offloading on CPU copies host",
            "buffers to host buffers (no PCIe transfer), and copy/compute overlap needs CUDA streams: n/a on CPU.",
            "",
        ]
    lines += [
        "| method | trainable | step (ms), median [min-max] | tokens/s | vs FFT | vs LoRA r128 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {res['trainable'][name]} | {r['step_s_median'] * 1e3:.1f} "
            f"[{r['step_s_min'] * 1e3:.1f}-{r['step_s_max'] * 1e3:.1f}] | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s'] / fft:.2f}x | {r['tokens_per_s'] / lora:.2f}x |"
        )
    if not on_gpu:
        lines.append("| grass-g2-offload-nooverlap | 2 sampled layers | n/a on CPU | | | |")
    ra = res.get("run_average")
    if ra:
        lines.append(
            f"| **grass-g2, run average** | T = {res['total_steps']} steps, Tp = {res['probe_steps']} probing | "
            f"{ra['t_train_s'] * 1e3:.1f} / probing {ra['t_probe_s'] * 1e3:.1f} | {ra['tokens_per_s']:,.0f} | "
            f"{ra['vs_fft']:.2f}x | {ra['vs_lora']:.2f}x |"
        )
    lines += [
        "",
        "LoRA: peft, targets q/k/v/up/down_proj, alpha = 2r, no dropout, adapters in the model dtype. "
        "The scaled-rank row keeps TinyLlama r128's rank/hidden ratio (128/2048) at this width. "
        "Run average: a whole GRASS run in the paper's shape, Tp probing steps (the probing step time of the "
        "overhead phase below) and T - Tp training steps (grass-g2's: each timed window is one sampling period "
        "with its own draw, so the median covers several draws, not only the worst one): T x tokens / (Tp x "
        "t_probe + (T - Tp) x t_train). On a GPU, `benchmarks/gpu_check.py` times real runs the same way.",
        "",
    ]
    # overhead, Table 8 layout
    o = res["overhead"]
    t_train = o["grass"]["step_s_median"]
    t_nomgn = o["no-mgn"]["step_s_median"]
    t_probe = o["probe"]["step_s_median"]
    T, Tp = res["total_steps"], res["probe_steps"]
    mgn_diff = max(t_train - t_nomgn, 0.0)
    mgn_direct = o["direct_mgn_s_per_step"]
    total = Tp * t_probe + (T - Tp) * t_train
    probe_time = Tp * t_probe
    probe_extra = Tp * (t_probe - t_train)
    mgn_time_direct = (T - Tp) * mgn_direct
    mgn_time_diff = (T - Tp) * mgn_diff
    lines += [
        "## Overhead of probing and MGN (Table 8 layout)",
        "",
        f"Measured per step (median): GRASS training step {t_train * 1e3:.1f} ms, same with MGN observation "
        f"disabled {t_nomgn * 1e3:.1f} ms, probing step {t_probe * 1e3:.1f} ms; MGN timed directly "
        f"(observe_grads + end_period) {mgn_direct * 1e3:.2f} ms/step.",
        f"Shares of a run of T = {T} steps with Tp = {Tp} probing steps (T is our assumption; time = "
        "Tp x probe step + (T - Tp) x training step):",
        "",
        "| model | probing phase | probing minus Tp training steps | MGN update (direct) | "
        "MGN update (A/B difference) | total training time |",
        "|---|---:|---:|---:|---:|---:|",
        f"| {res['model'].split(':')[0]} (ours, {'GPU' if on_gpu else 'CPU'}) | {probe_time:.1f} s "
        f"({100 * probe_time / total:.2f}%) | {probe_extra:.1f} s ({100 * probe_extra / total:.2f}%) | "
        f"{mgn_time_direct:.1f} s ({100 * mgn_time_direct / total:.2f}%) | {mgn_time_diff:.1f} s "
        f"({100 * mgn_time_diff / total:.2f}%) | {total:.0f} s (100%) |",
        "| TinyLlama (paper, GPU) | 34 s (3.24%) | | 32 s (3.09%) | | 1050 s (100%) |",
        "| Gemma-2B (paper, GPU) | 30 s (0.99%) | | 42 s (1.37%) | | 3036 s (100%) |",
        "| Llama2-7B (paper, GPU) | 54 s (0.95%) | | 60 s (1.06%) | | 5708 s (100%) |",
        "",
        "## Goals",
        "",
    ]
    grass = rows["grass-g2"]["tokens_per_s"]
    ratio = grass / lora
    share = (probe_time + mgn_time_direct) / total
    avg = (ra or {}).get("vs_lora", ratio)
    lines += [
        f"- GRASS gamma=2 at least 1.1x LoRA r128's tokens/s: training steps {ratio:.2f}x, run average "
        f"{avg:.2f}x -> {'met' if avg >= 1.1 else 'NOT met'} (in this setting).",
        f"- Probing + MGN overhead under 3% of training time: measured {100 * share:.2f}% "
        f"(probing phase + direct MGN time) -> {'met' if share < 0.03 else 'NOT met'} (in this setting).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
