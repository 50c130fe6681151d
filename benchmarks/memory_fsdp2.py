"""Per-rank peak memory on FSDP2 (issue #12's goal): LLaMA2-70B, 8 ranks, bf16, batch 1, sequence 1024.

Every number is ``grass-llm memory --world-size 8``'s estimate: the model on fake tensors, every decoder
block and the root ``fully_shard``-ed over a fake process group of 8 ranks (as ``grass-llm train
distributed.strategy=fsdp2`` shards it), each method built as ``grass-llm train`` builds it on CUDA
(GRASS with its offloader, host buffers out of the count; FFT with fused AdamW; LoRA through peft), its
real optimizer stepped; the peak of one rank. GRASS is shown for its training step (worst case: the two
lowest layers active) and for its probing step (backward through every layer).

    python benchmarks/memory_fsdp2.py            # LLaMA2-70B (minutes per row on 2 CPU cores)
    python benchmarks/memory_fsdp2.py --smoke    # a tiny model, checks the script runs

Writes ``benchmarks/results/memory_fsdp2.md`` and ``memory_fsdp2.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, hardware, hardware_lines, load_average, model_config, write_results

from grass_llm.memory import estimate_memory, format_table

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_GIB = 30.0  # issue #12: GRASS per rank on 8 ranks of 40 GB GPUs
#: (method, kwargs) rows, in table order
ROWS = [
    ("grass", {"activation_checkpointing": "frozen"}),
    ("grass", {"activation_checkpointing": "frozen", "phase": "probe"}),
    ("grass", {"activation_checkpointing": "full"}),
    ("grass", {"activation_checkpointing": "full", "phase": "probe"}),
    ("fft", {"activation_checkpointing": "full"}),
    ("lora", {"activation_checkpointing": "full", "rank": 128}),
]


def llama2_70b():
    return model_config("LLaMA2-70B")


def tiny():
    return model_config("tiny")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rows", default="all", help="comma-separated row numbers (0-based), default all")
    parser.add_argument("--smoke", action="store_true", help="a tiny model: checks the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    config = tiny() if args.smoke else llama2_70b()
    seq = 32 if args.smoke else args.seq_len
    chosen = range(len(ROWS)) if args.rows == "all" else [int(i) for i in args.rows.split(",")]
    hw = hardware(__import__("torch").device("cpu"))
    rows, estimates = [], []
    t0 = time.perf_counter()
    for i in chosen:
        method, kw = ROWS[i]
        kw = dict(kw)
        phase = kw.pop("phase", "train")
        t = time.perf_counter()
        est = estimate_memory(config, method, seq_len=seq, world_size=args.world_size, phase=phase, **kw)
        seconds = time.perf_counter() - t
        print(
            f"{est.label} {est.activation_checkpointing}: {est.peak / 2**30:.2f} GiB ({seconds:.0f} s)",
            flush=True,
        )
        estimates.append(est)
        rows.append({**est.to_dict(), "seconds": seconds})
    hw["load_avg_end"] = load_average()
    table = format_table(estimates)
    grass = [e for e in estimates if e.method == "grass"]
    worst = max((e.peak for e in grass), default=0) / 2**30
    lines = [
        f"# Per-rank peak memory on FSDP2: {config._name_or_path}, {args.world_size} ranks"
        + (" (SMOKE RUN: not a result)" if args.smoke else ""),
        "",
        "Command:",
        "",
        f"    {command_line()}",
        "",
        "Hardware (the estimate runs on fake tensors; no GPU was used):",
        "",
        *hardware_lines(hw),
        f"- wall time: {(time.perf_counter() - t0) / 60:.1f} min",
        "",
        f"bf16, batch 1, sequence {seq}; GB = GiB (2^30 bytes). AC: activation checkpointing (frozen: the frozen "
        "blocks above the lowest active one; full: every block). GRASS's training step has the two lowest "
        "layers active (the worst case); its probing step runs backward through every layer.",
        "",
        table,
        "",
    ]
    if not args.smoke and grass:
        lines.append(
            f"Goal (issue #12): GRASS per rank <= {GOAL_GIB:.0f} GiB on 8 ranks. Largest GRASS row: {worst:.2f} GiB "
            f"-> {'met' if worst <= GOAL_GIB else 'NOT met'}."
        )
        lines.append("")
    write_results(
        args.out,
        "memory_fsdp2_smoke" if args.smoke else "memory_fsdp2",
        {"hardware": hw, "rows": rows},
        "\n".join(lines),
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
