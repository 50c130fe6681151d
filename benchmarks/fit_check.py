"""Will it fit? The README's table of plans, and the GPU check of one plan (grass_llm.memory.fit).

    python benchmarks/fit_check.py --table                        # TinyLlama, Gemma-2B, LLaMA2-7B at 16/24/40/80 GiB
    python benchmarks/fit_check.py --table --smoke                # the same on the tiny model (checks the script)
    python benchmarks/fit_check.py --model LLaMA2-7B --budget 24GiB     # on CUDA: plan, run it, measure it
    python benchmarks/fit_check.py --model LLaMA2-7B --budget 24GiB --dry-run   # CPU: the tiny model, same path
    python benchmarks/fit_check.py --model LLaMA2-7B --budget 24GiB --compare 4  # + time the model's next 4

``--table`` prints, for each model, budget and method (GRASS, LoRA r=128, FFT; effective batch 4 x 1024), the
configuration ``grass-llm memory --budget`` chooses, its estimated whole-run peak and the speed model's
tokens/s. Estimated, not measured.

The check plans ``--method`` (default grass) for ``--model`` at ``--budget``, then runs the chosen settings on
the CUDA device, in this process, with the code ``grass-llm memory`` estimates (a randomly initialised model
from its config, the method built as ``grass-llm train`` builds it): ``--steps`` optimizer steps of
``grad_accum`` micro-batches each, in the training phase with the worst-case active layers and, for the
methods that probe, in the probing phase. For each it prints the estimate, ``max_memory_allocated``,
``max_memory_reserved``, the device memory in use (``mem_get_info``: what an out-of-memory error is about),
the budget, and PASS when allocated + the plan's margin and the memory in use both fit the budget; and the
measured tokens/s beside the speed model's. ``grass.offload=off`` grows over a run to every layer's state,
which a few steps do not show (the check says so). ``--compare N`` also times the N configurations that come
next in the speed model's order (training phase; on a GPU larger than the budget they all run), to test the
order. ``--dry-run`` runs the same path on the tiny model on the CPU (no memory figures).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, hardware, hardware_lines, model_config

from grass_llm.memory.budget import format_size, parse_budget
from grass_llm.memory.fit import FitPlan, plan

TABLE_MODELS = ("TinyLlama-1.1B", "Gemma-2B", "LLaMA2-7B")
TABLE_BUDGETS = ("16GiB", "24GiB", "40GiB", "80GiB")
TABLE_METHODS = (("grass", "GRASS γ=2"), ("lora", "LoRA r=128"), ("fft", "FFT"))


def _cell(p: FitPlan) -> str:
    if not p.fits:
        small = p.smallest
        low = small.peak if small is not None else min(e.lower_bound for e in p.candidates)
        return f"does not fit (smallest {'peak' if small is not None else 'bound'} {low / 2**30:.1f} GiB)"
    c = p.chosen
    knobs = f"{c.candidate.micro_batch}x{c.candidate.grad_accum}, AC {c.candidate.activation_checkpointing}"
    if c.candidate.residency is not None:
        knobs += f", {c.candidate.residency}"
    return f"{knobs}: {c.peak / 2**30:.1f} GiB, {c.tokens_per_s / 1000:.1f}k tok/s"


def table(models: dict[str, Any], budgets=TABLE_BUDGETS, methods=TABLE_METHODS, batch_size=4, seq_len=1024):
    """(Markdown table, plans as dicts, seconds): each model x budget x method."""
    t0 = time.perf_counter()
    lines = [
        "| model | budget | " + " | ".join(label for _, label in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    plans = []
    for name, config in models.items():
        for budget in budgets:
            cells = []
            for method, _ in methods:
                p = plan(config, budget, method, batch_size=batch_size, seq_len=seq_len)
                plans.append(p.to_dict())
                cells.append(_cell(p))
            lines.append(
                f"| {name} | {format_size(parse_budget('budget', budget))} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines), plans, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# the check on a device
def _measure(
    config, p: FitPlan, phase: str, device: torch.device, steps: int, settings: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run ``steps`` optimizer steps of the chosen settings (or ``settings``) in ``phase``; memory, tokens/s."""
    from grass_llm.loss import causal_lm_loss
    from grass_llm.memory.estimate import training_step

    s = p.settings if settings is None else settings
    m, a = s["batch_size"], s["grad_accum"]
    overrides = {"grass.offload": s["grass.offload"]} if "grass.offload" in s else {}
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = training_step(
        config,
        p.method,
        device=device,
        batch_size=m,
        seq_len=p.seq_len,
        activation_checkpointing=s["activation_checkpointing"],
        overrides=overrides,
        phase=phase,
    )

    def one_step(step) -> None:
        for _ in range(a - 1):  # every micro-batch but the last: forward and backward (gradients accumulate)
            ids = torch.randint(0, step.vocab, (m, p.seq_len), device=device)  # (m, T)
            n_items = torch.tensor(m * (p.seq_len - 1) * a, device=device)
            loss = causal_lm_loss(
                step.model,
                {"input_ids": ids, "labels": ids},
                step.loss_fn,
                n_items,
                step.cfg.compact_activations,
            )
            loss.backward()
            del loss, ids
        step.run(m, p.seq_len)  # the last micro-batch, the optimizer step, zero_grad

    one_step(step)  # warm-up (creates the optimizer states)
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(max(steps - 1, 1)):
        one_step(step)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - t0) / max(steps - 1, 1)
    out: dict[str, Any] = {
        "phase": phase,
        "step_seconds": seconds,
        "tokens_per_s": m * a * p.seq_len / seconds,
    }
    if cuda:
        free, total = torch.cuda.mem_get_info(device)
        outside = int(total - free - torch.cuda.memory_reserved(device))  # context, kernels (the GPU is ours)
        reserved = int(torch.cuda.max_memory_reserved(device))
        out.update(
            allocated=int(torch.cuda.max_memory_allocated(device)),
            reserved=reserved,
            in_use=reserved + outside,  # the most this process held on the device: what an OOM is about
            outside_allocator=outside,
        )
    del step
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def check(args: argparse.Namespace) -> int:
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fit_check: no CUDA device; use --dry-run on a CPU", file=sys.stderr)
        return 2
    name = "tiny" if args.dry_run else args.model
    config = model_config(name)
    t0 = time.perf_counter()
    p = plan(config, args.budget, args.method, batch_size=args.batch_size, seq_len=args.seq_len)
    planned = time.perf_counter() - t0
    print(
        f"plan for {name} at {format_size(p.budget)} ({p.method}, batch {p.batch_size} x {p.seq_len}), {planned:.1f} s:"
    )
    if not p.fits:
        print(p.refusal())
        return 2
    c = p.chosen
    print(
        f"  {' '.join(p.train_args())}: estimated whole-run peak {format_size(c.peak)} + margin "
        f"{format_size(p.margin.of(c.peak))} = {format_size(c.needed)}; model {c.tokens_per_s:,.0f} tokens/s"
    )
    phases = ["train"] + (["probe"] if c.probe_peak is not None else [])
    rows = []
    for phase in phases:
        r = _measure(config, p, phase, device, 1 if args.dry_run else args.steps)
        r["estimate"] = c.train_peak if phase == "train" else c.probe_peak
        rows.append(r)
    lines = [
        "| phase | estimate | max_memory_allocated | + margin | max_memory_reserved | device memory in use | "
        "outside the allocator | budget | tokens/s measured | tokens/s model | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ok = True
    for r in rows:
        if "allocated" in r:
            passed = p.margin.needed(r["allocated"]) <= p.budget and r["in_use"] <= p.budget
            ok &= passed
            mem = [format_size(r[k]) for k in ("allocated",)] + [format_size(p.margin.needed(r["allocated"]))]
            mem += [format_size(r["reserved"]), format_size(r["in_use"]), format_size(r["outside_allocator"])]
            verdict = "PASS" if passed else "FAIL"
        else:
            mem, verdict = ["n/a (CPU dry run)"] * 5, "dry run"
        model = f"{c.tokens_per_s:,.0f}" if r["phase"] == "train" else "-"
        lines.append(
            f"| {r['phase']} | {format_size(r['estimate'])} | "
            + " | ".join(mem)
            + f" | {format_size(p.budget)} | {r['tokens_per_s']:,.0f} | {model} | {verdict} |"
        )
    report = "\n".join(lines)
    print(report)
    compared = []
    if args.compare:
        # the model's order tested: the next fastest configurations (train phase, worst-case layers), whatever
        # their memory (a GPU larger than the budget runs them all)
        others = [e for e in p.candidates if e is not c][: args.compare]
        lines = [
            "| configuration | model tokens/s | measured tokens/s | max_memory_allocated |",
            "|---|---|---|---|",
        ]
        for e in [c, *others]:
            r = (
                rows[0]
                if e is c
                else _measure(
                    config, p, "train", device, 1 if args.dry_run else args.steps, e.candidate.settings
                )
            )
            compared.append({"settings": e.candidate.settings, "model_tokens_per_s": e.tokens_per_s, **r})
            mem = format_size(r["allocated"]) if "allocated" in r else "n/a"
            lines.append(
                f"| {e.candidate.describe()} | {e.tokens_per_s:,.0f} | {r['tokens_per_s']:,.0f} | {mem} |"
            )
        print("\n".join(lines))
        report += "\n\n" + "\n".join(lines)
    if c.candidate.residency == "off":
        print(
            "note: grass.offload=off grows over a run to every trained layer's state; the estimate includes it, "
            "these few steps do not"
        )
    print(
        f"{'PASS' if ok else 'FAIL'}: {'dry run, nothing measured' if args.dry_run else 'measured on ' + torch.cuda.get_device_name(device)}"
        f" ({time.perf_counter() - t0:.1f} s in all)"
    )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        data = {
            "command": command_line(),
            "hardware": hardware(device),
            "plan": p.to_dict(),
            "measured": rows,
            "compared": compared,
            "pass": ok,
        }
        (out / "fit_check.json").write_text(json.dumps(data, indent=2) + "\n")
        md = [
            f"# fit check: {name} at {format_size(p.budget)}",
            "",
            f"Command: `{command_line()}`",
            "",
            *hardware_lines(data["hardware"]),
            "",
            f"Plan: `{' '.join(p.train_args())}`",
            "",
            report,
            "",
        ]
        (out / "fit_check.md").write_text("\n".join(md))
        print(f"wrote {out / 'fit_check.md'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true", help="the README's table of plans (estimated)")
    parser.add_argument("--smoke", action="store_true", help="with --table: the tiny model only")
    parser.add_argument("--model", default="LLaMA2-7B", help="benchmarks/common.py MODEL_SHAPES name")
    parser.add_argument("--budget", default="24GiB")
    parser.add_argument("--method", default="grass")
    parser.add_argument("--batch-size", type=int, default=4, help="effective batch (default 4)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument(
        "--steps", type=int, default=3, help="optimizer steps per phase (the first is a warm-up)"
    )
    parser.add_argument("--dry-run", action="store_true", help="the tiny model on the CPU (no GPU needed)")
    parser.add_argument(
        "--compare",
        type=int,
        default=0,
        metavar="N",
        help="also time the N next configurations of the speed model's order (training phase, memory not "
        "checked against the budget): tests the order",
    )
    parser.add_argument(
        "--out", default=None, help="write fit_check.md / .json (or fit_table.md / .json) here"
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if not args.table:
        return check(args)
    names = ("tiny",) if args.smoke else TABLE_MODELS
    models = {n: model_config(n) for n in names}
    seq_len = 64 if args.smoke else 1024
    md, plans, seconds = table(models, batch_size=4, seq_len=seq_len)
    print(md)
    print(
        f"\nplanned in {seconds:.0f} s (effective batch 4 x {seq_len}, estimated, margin as grass-llm memory --budget)"
    )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fit_table.md").write_text(f"Command: `{command_line()}`\n\n{md}\n")
        (out / "fit_table.json").write_text(json.dumps(plans, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
