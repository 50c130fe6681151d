"""Peak-memory benchmark: the paper's Table 4 and Figure 4 (right), estimated without a GPU.

Writes ``benchmarks/results/memory.md``, ``memory.json`` (raw numbers) and ``memory_seqlen.png``.

    python benchmarks/memory.py                 # Table 4 + sequence-length sweep
    python benchmarks/memory.py --quick         # Table 4 only
    python benchmarks/memory.py --sweep-only    # keep Table 4 from memory.json, run the sweep
    python benchmarks/memory.py --report-only   # rebuild memory.md/png from memory.json

The committed results came from ``python benchmarks/memory.py`` (Table 4; its sweep did not finish
then) followed by ``python benchmarks/memory.py --sweep-only``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from grass_llm.memory import CATEGORIES, estimate_memory, format_table

RESULTS = Path(__file__).resolve().parent / "results"

#: Table 4 of arXiv:2604.07808 (peak GPU memory, "GB"; bs 1, seq 1024).
PAPER_TABLE4 = {
    "TinyLlama-1.1B": [8.76, 4.71, 5.03, 5.71, 4.93, 5.31, 4.49, 4.55],
    "Gemma-2B": [21.19, 11.26, 11.81, 11.64, 13.33, 14.27, 12.45, 12.46],
    "LLaMA2-7B": [51.32, 19.97, 20.86, 23.23, 20.68, 22.31, 19.08, 19.22],
}
#: (method, kwargs, label) in the column order of Table 4.
METHODS = [
    ("fft", {}, "FFT"),
    ("lora", {"rank": 128}, "LoRA r=128"),
    ("lora", {"rank": 256}, "LoRA r=256"),
    ("dora", {"rank": 128}, "DoRA r=128"),
    ("lisa", {"active_layers": 2}, "LISA γ=2"),
    ("lisa", {"active_layers": 4}, "LISA γ=4"),
    ("grass", {"active_layers": 2}, "GRASS γ=2"),
    ("grass", {"active_layers": 4}, "GRASS γ=4"),
]
SWEEP_METHODS = [
    ("lora", {"rank": 128}, "LoRA r=128"),
    ("dora", {"rank": 128}, "DoRA r=128"),
    ("grass", {"active_layers": 2}, "GRASS γ=2"),
]
SWEEP_SEQ = [256, 512, 1024, 1792, 2048]


def configs():
    from transformers import GemmaConfig, LlamaConfig

    tiny = LlamaConfig(
        hidden_size=2048,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
        vocab_size=32000,
        max_position_embeddings=2048,
    )
    tiny._name_or_path = "TinyLlama-1.1B"
    gemma = GemmaConfig(
        hidden_size=2048,
        num_hidden_layers=18,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        intermediate_size=16384,
        vocab_size=256000,
        max_position_embeddings=8192,
    )
    gemma._name_or_path = "Gemma-2B"
    llama7 = LlamaConfig(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    llama7._name_or_path = "LLaMA2-7B"
    return {"TinyLlama-1.1B": tiny, "Gemma-2B": gemma, "LLaMA2-7B": llama7}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="Table 4 only, no sequence-length sweep")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument(
        "--sweep-only",
        action="store_true",
        help="keep Table 4 from memory.json and run only the sequence-length sweep",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild memory.md and the plot from memory.json, run nothing",
    )
    args = parser.parse_args(argv)
    if args.report_only:
        return _rebuild(args.out)
    warnings.simplefilter("ignore")
    command = (
        "python benchmarks/memory.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    started = time.time()
    cfgs = configs()

    table: list[dict] = []
    md_tables = []
    if args.sweep_only:
        old_command, old_elapsed, table, md_tables = _load_table4(args.out)
        command = f"{old_command} && {command}"
        started -= old_elapsed  # the reported wall time covers both runs
    for name, cfg in ({} if args.sweep_only else cfgs).items():
        estimates, paper = [], {}
        for (method, kw, label), ref in zip(METHODS, PAPER_TABLE4[name]):
            t0 = time.time()
            est = estimate_memory(cfg, method, batch_size=1, seq_len=1024, **kw)
            est.extra["seconds"] = round(time.time() - t0, 1)
            print(
                f"{name:15s} {label:11s} peak {est.peak / 2**30:6.2f} GiB  ({est.extra['seconds']} s)",
                flush=True,
            )
            estimates.append(est)
            paper[est.label] = ref
            d = est.to_dict()
            d["paper_gb"] = ref
            table.append(d)
        md_tables.append(f"### {name}\n\n" + format_table(estimates, paper=paper))
        _write(args.out, command, md_tables, table, [], time.time() - started)

    sweep: list[dict] = []
    if not args.quick:
        llama7 = cfgs["LLaMA2-7B"]
        for method, kw, label in SWEEP_METHODS:
            for T in SWEEP_SEQ:
                est = estimate_memory(llama7, method, batch_size=1, seq_len=T, **kw)
                print(f"sweep {label:11s} T={T:5d} peak {est.peak / 2**30:6.2f} GiB", flush=True)
                d = est.to_dict()
                d["label"] = label
                sweep.append(d)
            _write(args.out, command, md_tables, table, sweep, time.time() - started)

    elapsed = time.time() - started
    _write(args.out, command, md_tables, table, sweep, elapsed)
    print(f"wrote {args.out / 'memory.md'} in {elapsed:.0f} s")
    return 0


def _rebuild(out: Path) -> int:
    """Rebuild the report from ``memory.json`` (keeps the header of the run that produced it)."""
    data = json.loads((out / "memory.json").read_text())
    command, elapsed, table, md_tables = _load_table4(out)
    old = (out / "memory.md").read_text().splitlines()
    date = next(ln for ln in old if ln.startswith("- date:")).split("- date: ")[1].split(";")[0]
    _write(out, command, md_tables, table, data["seqlen_sweep"], elapsed, date=date)
    print(f"rebuilt {out / 'memory.md'}")
    return 0


def _load_table4(out: Path) -> tuple[str, float, list[dict], list[str]]:
    """(command, wall time, rows, Markdown tables) of the Table 4 run recorded in ``out``."""
    import dataclasses

    from grass_llm.memory import MemoryEstimate

    data = json.loads((out / "memory.json").read_text())
    old = (out / "memory.md").read_text().splitlines()
    command = next(ln.split("`")[1] for ln in old if ln.startswith("- command:"))
    elapsed = float(next(ln for ln in old if ln.startswith("- date:")).split("wall time ")[1].split(" s")[0])
    names = {f.name for f in dataclasses.fields(MemoryEstimate)}
    md_tables = []
    for model in PAPER_TABLE4:
        rows = [r for r in data["table4"] if r["model"] == model]
        if rows:
            ests = [MemoryEstimate(**{k: v for k, v in r.items() if k in names}) for r in rows]
            paper = {e.label: r["paper_gb"] for e, r in zip(ests, rows)}
            md_tables.append(f"### {model}\n\n" + format_table(ests, paper=paper))
    return command, elapsed, data["table4"], md_tables


def _write(out: Path, command: str, md_tables, table, sweep, elapsed: float, date: str | None = None) -> None:
    """Write the results so far (the run is long: a partial run still leaves its rows)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps({"table4": table, "seqlen_sweep": sweep}, indent=2) + "\n")
    if sweep:
        _plot(sweep, out / "memory_seqlen.png")
    (out / "memory.md").write_text(_report(command, md_tables, table, sweep, elapsed, date))


def _plot(sweep: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for _, _, label in SWEEP_METHODS:
        rows = [r for r in sweep if r["label"] == label]
        ax.plot([r["seq_len"] for r in rows], [r["peak"] / 2**30 for r in rows], marker="o", label=label)
    ax.axhline(24, color="grey", linestyle="--", linewidth=0.8)
    ax.text(SWEEP_SEQ[0], 24.2, "24 GiB", color="grey", fontsize=8)
    ax.set_xlabel("sequence length (batch size 1)")
    ax.set_ylabel("estimated peak device memory (GiB)")
    ax.set_title("LLaMA2-7B, bf16, estimated with FakeTensorMode (no GPU)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _gib(x: int) -> str:
    return f"{x / 2**30:.2f}"


def _report(
    command: str, md_tables: list[str], table: list[dict], sweep: list[dict], elapsed: float, date: str | None
) -> str:
    now = date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = platform.processor() or platform.machine()
    lines = [
        "# Peak device memory of one training step (paper Table 4, Figure 4 right)",
        "",
        f"- command: `{command}`",
        f"- date: {now}; wall time {elapsed:.0f} s",
        f"- hardware: estimated on CPU with FakeTensorMode; no GPU ({cpu}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, Python {platform.python_version()})",
        "- what is counted: the bytes of every live tensor storage during two training steps (forward, backward, "
        "AdamW step, zero_grad) of the randomly initialised model, each storage rounded up to 512 B like the CUDA "
        "caching allocator; comparable with `torch.cuda.max_memory_allocated`. Not counted: the CUDA context "
        "(~0.3-0.5 GiB), cuBLAS workspaces, allocator fragmentation and cached free blocks, which nvidia-smi "
        "would show.",
        '- units: **GiB (2^30 bytes)** in our columns. The paper\'s column is its "GB" as printed; the paper '
        "does not say whether it means 1e9 or 2^30 (PyTorch and nvidia-smi report 2^30-based numbers, so GiB "
        "is the likely meaning). `memory.json` holds the exact byte counts.",
        "- setting: pure bf16 (weights, gradients, AdamW states in bf16), batch 1, seq 1024, SDPA attention, no "
        "gradient checkpointing, AdamW with the fused update (no temporaries; the transformers Trainer default "
        "on torch >= 2.8). LoRA/DoRA: peft, alpha 2r, on q,k,v,o,gate,up,down, dropout 0, **adapters in bf16** "
        "(peft's fp32 default would use more). LISA: active layers + embeddings + final norm + head trained, all "
        "their AdamW states on the device. GRASS: only the active layers trained, embeddings/norm/head frozen, "
        "optimizer states offloaded per layer (at most two layers' states on the device). LISA and GRASS are "
        "reported for the WORST case, the two (four) lowest layers active, since activations are saved from the "
        "lowest active layer upward.",
        "",
        "## Table 4: estimate vs paper",
        "",
        "Columns: breakdown of the storages live at the peak (GiB), our peak (GiB), the paper's figure.",
        "",
    ]
    lines += [t + "\n" for t in md_tables]
    lines += ["## Summary", "", "| model | " + " | ".join(label for _, _, label in METHODS) + " |"]
    lines.append("|---|" + "---|" * len(METHODS))
    models = list(PAPER_TABLE4)
    for m in models:
        rows = [r for r in table if r["model"] == m]
        if not rows:
            continue
        cells = [f"{_gib(r['peak'])} ({r['paper_gb']:.2f})" for r in rows]
        cells += [""] * (len(METHODS) - len(cells))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: our estimate in GiB (paper's figure in parentheses).", "", "## Goal check", ""]
    for m in models:
        rows = {r["label"]: r for r in table if r["model"] == m}
        if "GRASS γ=2" not in rows:
            continue
        g2, l128 = rows["GRASS γ=2"], rows["LoRA r=128"]
        paper_g2 = g2["paper_gb"]
        below_paper = g2["peak"] / 2**30 < paper_g2
        below_lora = g2["peak"] < l128["peak"]
        lines.append(
            f"- {m}: GRASS γ=2 {_gib(g2['peak'])} GiB — {'below' if below_paper else 'NOT below'} the paper's "
            f"GRASS γ=2 ({paper_g2:.2f}); {'below' if below_lora else 'NOT below'} our LoRA r=128 "
            f"({_gib(l128['peak'])} GiB)."
        )
    if sweep:
        lines += [
            "",
            "## Sequence-length sweep (Figure 4 right): LLaMA2-7B, batch 1",
            "",
            "![peak memory vs sequence length](memory_seqlen.png)",
            "",
            "| method | " + " | ".join(str(t) for t in SWEEP_SEQ) + " |",
            "|---|" + "---|" * len(SWEEP_SEQ),
        ]
        for _, _, label in SWEEP_METHODS:
            by_t = {r["seq_len"]: r for r in sweep if r["label"] == label}
            lines.append(
                f"| {label} | "
                + " | ".join(_gib(by_t[t]["peak"]) if t in by_t else "" for t in SWEEP_SEQ)
                + " |"
            )
        lines += [
            "",
            "Peak in GiB. The paper reports GRASS at 23.25 GB and LoRA/DoRA above 24 GB at T = 1792.",
            "",
        ]
        lines += ["Breakdown at T = 2048 (GiB):", ""]
        lines.append("| method | " + " | ".join(CATEGORIES) + " | peak |")
        lines.append("|---|" + "---|" * (len(CATEGORIES) + 1))
        for _, _, label in SWEEP_METHODS:
            r = next((r for r in sweep if r["label"] == label and r["seq_len"] == SWEEP_SEQ[-1]), None)
            if r is None:
                continue
            lines.append(
                f"| {label} | " + " | ".join(_gib(r[c]) for c in CATEGORIES) + f" | {_gib(r['peak'])} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
