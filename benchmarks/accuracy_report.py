"""Tables and plots of ``accuracy.py``'s results (Markdown + PNG)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from accuracy_stats import mean_ci, paired
from common import hardware_lines

LABELS = {
    "grass": "GRASS",
    "grass-uniform": "GRASS-uniform",
    "grass-static": "GRASS*",
    "lisa": "LISA",
    "lora": "LoRA",
    "fft": "FFT",
    "badam-pkg": "BAdam (badam pkg)",
    "badam": "BAdam-style (cyclic)",
}
#: the primary comparison's decision, worded as the protocol's rule (benchmarks/README.md)
PRIMARY_VERDICT = {
    "grass better": "GRASS beats uniform sampling",
    "grass-uniform better": "uniform beats GRASS",
    "not separable": "not separable at this power",
}
TASK_TITLES = {"arith": "arithmetic (word problems)", "common": "commonsense-style (4-option fact questions)"}


def _test_runs(res: dict[str, Any], task: str, method: str, config: str = "") -> dict[int, dict[str, Any]]:
    return {
        r["seed"]: r
        for r in res["runs"]
        if r["task"] == task and r["method"] == method and r["config"] == config and r["purpose"] == "test"
    }


def _header(res: dict[str, Any], title: str) -> list[str]:
    hw, num, pre, s = res["hardware"], res["numerics"], res["pretrain"], res["settings"]
    env = ", ".join(f"{k}={v}" for k, v in num["env"].items())
    versions = ", ".join(f"{k} {v}" for k, v in num["versions"].items())
    share = pre["embeddings_head_params"] / pre["params"]
    know = res["base"]["knowledge"]
    lines = [
        f"# {title}" + (" (SMOKE RUN: not a result)" if res["smoke"] else ""),
        "",
        "Command:",
        "",
        f"    {res['command']}",
        "",
        "Hardware and numerics:",
        "",
        *hardware_lines(hw),
        f"- {hw['workers']} worker process(es) x {num['torch_threads']} torch thread(s) (interop "
        f"{num['torch_interop_threads']}); ATen CPU kernels {num['cpu_capability']} (CPU has AVX-512: "
        f"{num['cpu_has_avx512']}); {env}" + ("" if num["pinned"] else " (NOT the pinned numerics)"),
        f"- {versions}, Python {num['python']}",
        *(
            [
                f"- load while the runs ran (1-minute average, sampled after each run): min "
                f"{hw['load_avg_min']:.1f}, mean {hw['load_avg_mean']:.1f}, max {hw['load_avg_max']:.1f}"
            ]
            if "load_avg_mean" in hw
            else []
        ),
        f"- wall time: {res['wall_seconds'] / 60:.1f} min"
        + (
            " (the longest of processes run side by side, one per task subset: "
            + ", ".join(
                f"{'+'.join(m['tasks'])} {m['wall_seconds'] / 60:.1f} min" for m in res["merged_from"]
            )
            + ")"
            if res.get("merged_from")
            else ""
        )
        + ("" if pre.get("cached") is not False else f" + pretraining {pre['seconds'] / 60:.1f} min")
        + " (the machine was shared: see the load average above)",
        "",
        f"Pretrained model (the starting point of every run): Llama-shaped, {s['layers']} decoder layers, hidden "
        f"{s['hidden']}, MLP {s['intermediate']}, {s['heads']} heads, vocab {pre['vocab']} (word-level, digits "
        f"split), {pre['params'] / 1e6:.3f}M parameters, of which embeddings + head {share:.1%}; pretrained "
        f"{s['pretrain_steps']} steps x {s['pretrain_batch']} x {s['pretrain_len']} tokens on the synthetic corpus "
        f"({pre['tokens']:,} tokens, {pre['documents']:,} documents), final LM loss {pre['final_loss']:.3f}. It "
        f"completes {know['arithmetic_facts']:.1f}% of the {len(res.get('facts', [])) or 245} arithmetic facts and "
        f"{know['world_facts']:.1f}% of the world facts. **Weights sha256 `{pre['weights_sha256']}`** "
        f"(cache {pre['path']}).",
        "",
    ]
    return lines


def _fmt_lr(lr: float) -> str:
    return f"{lr:.1e}"


def render_main(res: dict[str, Any]) -> str:
    s = res["settings"]
    methods = [m for m in s["methods"]]
    lines = _header(res, "Accuracy: GRASS vs uniform sampling and the baselines, paired over seeds (CPU)")
    lines += [
        f"Budget, every method: {s['steps']} optimizer steps x batch {s['batch']} (GRASS's Tp = {s['probe']} probing "
        f"steps count inside it, for GRASS-uniform too), linear schedule with {s['warmup']:.0%} warmup (starting "
        f"after probing), clip 1.0, AdamW without weight decay. GRASS / GRASS-uniform / GRASS*: gamma = "
        f"{s['gamma']} of {s['layers']} layers, Ts = {s['period']}, Tp = {s['probe']}, tau = {s['temperature']}, "
        f"embeddings and head frozen. LISA: gamma = {s['gamma']}, Ts = {s['lisa_period']}, embeddings + head "
        f"trained, no probing. BAdam: one layer at a time, K = {s['badam_period']} steps, random order per "
        f"cycle, state reset at each switch. LoRA: r = {s['lora_rank']}, alpha {2 * s['lora_rank']}.",
        "",
        f"LR: for each method and task the same procedure: grid {', '.join(f'{f:.3g}' for f in s['lr_grid'])} x "
        f"the method's centre (FFT {s['lr_center_fft']:g}, then the paper's Table 9 ratios), extended past an "
        f"end when the best LR is there; chosen by mean VALIDATION accuracy over seeds "
        f"{', '.join(map(str, s['select_seeds']))} (ties: validation loss). Test seeds "
        f"{s['seeds'][0]}..{s['seeds'][-1]} ({len(s['seeds'])}), paired: seed s gives every method the same data "
        "order and starting weights (and LoRA init / layer-sampling seed s). Test accuracy is scored once per "
        "run on the held-out test split; 95% intervals are Student t over seeds.",
        "",
    ]
    if res.get("skipped"):
        lines += [f"Skipped: {m}: {why}" for m, why in res["skipped"].items()] + [""]
    for task in s["tasks"]:
        lines += _task_section(res, task, methods)
    lines += _selection_section(res)
    if res.get("plots"):
        lines += ["Plots:", ""] + [f"- `{p}`" for p in res["plots"]] + [""]
    return "\n".join(lines)


def _task_section(res: dict[str, Any], task: str, methods: list[str]) -> list[str]:
    s = res["settings"]
    base = res["base"][task]
    lines = [
        f"## Task {task}: {TASK_TITLES.get(task, task)}",
        "",
        f"{s['n_train']} train / {s['n_val']} validation / {s['n_test']} test records; pretrained model without "
        f"fine-tuning: {base['no_finetune']:.1f}% on test.",
        "",
        "| method | LR | test accuracy %, mean [95% CI] | sd | per seed | final train loss | final val loss | s / run |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    chosen = {r["method"]: r for r in res["selection"] if r["task"] == task and not r["config"]}
    for m in methods:
        runs = _test_runs(res, task, m)
        if not runs:
            continue
        accs = [runs[k]["accuracy"] for k in sorted(runs)]
        ci = mean_ci(accs)
        sel = chosen.get(m)
        edge = " (grid end)" if sel and sel["at_edge"] else ""
        lines.append(
            f"| {LABELS.get(m, m)} | {_fmt_lr(runs[min(runs)]['lr'])}{edge} | {ci.fmt()} | {ci.sd:.1f} | "
            f"{', '.join(f'{a:.0f}' for a in accs)} | "
            f"{statistics.fmean(r['final_train_loss'] for r in runs.values()):.3f} | "
            f"{statistics.fmean(r['val_loss_curve'][-1][1] for r in runs.values()):.3f} | "
            f"{statistics.fmean(r['seconds'] for r in runs.values()):.1f} |"
        )
    lines += [
        "",
        "Paired differences (A - B, percentage points, over the same seeds; the first row is the primary "
        "comparison, also given with its Bonferroni interval for two tasks, 97.5%, which decides its verdict as "
        "the protocol's rule says; the other verdicts read the 95% interval, descriptively):",
        "",
        "| A - B | mean [95% CI] | A better / tie / B better | verdict |",
        "|---|---:|---|---|",
    ]
    for i, (a, b) in enumerate(res["comparisons"]):
        ra, rb = _test_runs(res, task, a), _test_runs(res, task, b)
        if not ra or not rb:
            continue
        xs = {k: v["accuracy"] for k, v in ra.items()}
        ys = {k: v["accuracy"] for k, v in rb.items()}
        p = paired(a, b, xs, ys)
        extra = ""
        verdict = p.verdict.replace(a, LABELS.get(a, a)).replace(b, LABELS.get(b, b))
        if i == 0:  # the pre-registered rule: the 97.5% interval (Bonferroni for two tasks), in its words
            p975 = paired(a, b, xs, ys, level=0.975)
            extra = f"; 97.5%: [{p975.diff.low:.1f}, {p975.diff.high:.1f}]"
            verdict = PRIMARY_VERDICT.get(p975.verdict, p975.verdict)
        name = (
            f"**{LABELS.get(a, a)} - {LABELS.get(b, b)}** (primary)"
            if i == 0
            else f"{LABELS.get(a, a)} - {LABELS.get(b, b)}"
        )
        lines.append(f"| {name} | {p.diff.fmt()}{extra} | {p.wins} / {p.ties} / {p.losses} | {verdict} |")
    lines += ["", *_layer_lines(res, task), ""]
    return lines


def _layer_lines(res: dict[str, Any], task: str) -> list[str]:
    out = []
    fft = [r["fft_layer_mgn"] for r in _test_runs(res, task, "fft").values() if "fft_layer_mgn" in r]
    if fft:
        prof = _normalised(
            [statistics.fmean(w[i] for run in fft for w in run) for i in range(len(fft[0][0]))]
        )
        top = sorted(range(len(prof)), key=lambda i: -prof[i])[:3]
        out.append(
            "Layer importance (FFT's full-gradient MGN per layer, whole run, mean over seeds, / mean over layers): "
            + ", ".join(f"{v:.2f}" for v in prof)
            + f"; highest: layers {', '.join(map(str, top))}."
        )
    for m in ("grass", "grass-uniform"):
        runs = [r for r in _test_runs(res, task, m).values() if "trained_steps_per_layer" in r]
        if runs:
            tot = [
                sum(r["trained_steps_per_layer"][i] for r in runs)
                for i in range(len(runs[0]["trained_steps_per_layer"]))
            ]
            share = [100.0 * t / max(1, sum(tot)) for t in tot]
            out.append(
                f"{LABELS[m]}: share of layer-steps per layer (%): "
                + ", ".join(f"{v:.0f}" for v in share)
                + "."
            )
    return out


def _normalised(xs: list[float]) -> list[float]:
    m = statistics.fmean(xs) or 1.0
    return [x / m for x in xs]


def _selection_section(res: dict[str, Any]) -> list[str]:
    rows = [r for r in res["selection"] if r["grid"] and r["grid"][0]["val_accuracy"] is not None]
    if not rows:
        return ["LR selection: a single grid point (no selection runs).", ""]
    lines = ["## LR selection (validation accuracy %, mean over the selection seeds; chosen in bold)", ""]
    lines += ["| task | method | LR -> validation % |", "|---|---|---|"]
    for r in rows:
        cells = [
            (
                f"**{_fmt_lr(g['lr'])} -> {g['val_accuracy']:.1f}**"
                if g["lr"] == r["chosen"]
                else f"{_fmt_lr(g['lr'])} -> {g['val_accuracy']:.1f}"
            )
            for g in r["grid"]
        ]
        label = LABELS.get(r["method"], r["method"]) + (f" {r['config']}" if r["config"] else "")
        lines.append(f"| {r['task']} | {label} | {', '.join(cells)} |")
    return [*lines, ""]


# ------------------------------------------------------------------------------------------------
def render_sensitivity(res: dict[str, Any]) -> str:
    s = res["settings"]
    task = res["task"]
    lines = _header(
        res, f"Sensitivity of GRASS on task {task}: Ts x gamma (Table 6), Tp (Table 10), temperature"
    )
    lines += [
        f"GRASS on task {task} at the LR its validation selection chose ({_fmt_lr(res['lr'])}), one setting changed "
        f"at a time from the default (gamma {s['gamma']}, Ts {s['period']}, Tp {s['probe']}, tau {s['temperature']}); "
        f"{s['steps']} steps x batch {s['batch']}, test seeds {s['seeds'][0]}..{s['seeds'][-1]}. Cells: test "
        "accuracy %, mean [95% CI]; 'vs default' is the paired difference to the default configuration.",
        "",
    ]
    default = {k: v["accuracy"] for k, v in _test_runs(res, task, "grass").items()}

    present = {r["config"] for r in res["runs"]}

    def cell(cfg: str) -> tuple[str, str]:
        if cfg not in present:  # equal to the default configuration
            d = mean_ci(list(default.values()))
            return f"{d.fmt()} (default)", "0"
        runs = _test_runs(res, task, "grass", cfg)
        xs = {k: v["accuracy"] for k, v in runs.items()}
        ci = mean_ci(list(xs.values()))
        d = paired(cfg, "default", xs, default)
        return ci.fmt(), d.diff.fmt()

    ts_values = sorted({ts for ts, _ in s["sens_ts_gamma"]})
    gammas = sorted({g for _, g in s["sens_ts_gamma"]})
    lines += ["Ts x gamma (test accuracy %):", ""]
    lines += ["| gamma \\ Ts | " + " | ".join(map(str, ts_values)) + " |", "|---|" + "---:|" * len(ts_values)]
    for g in gammas:
        cells = []
        for ts in ts_values:
            if [ts, g] in [list(x) for x in s["sens_ts_gamma"]]:
                acc, diff = cell(f"Ts={ts} gamma={g}")
                cells.append(f"{acc} (vs default {diff})")
            else:
                cells.append("-")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    for title, key, fmt in (
        ("Tp (probing steps)", "sens_tp", "Tp={}"),
        ("temperature tau", "sens_temperature", "tau={:g}"),
    ):
        lines += ["", f"{title}:", "", "| setting | test accuracy % | vs default |", "|---|---:|---:|"]
        for v in s[key]:
            acc, diff = cell(fmt.format(v))
            lines.append(f"| {fmt.format(v)} | {acc} | {diff} |")
    d = mean_ci(list(default.values())) if default else None
    lines += ["", f"Default configuration: {d.fmt() if d else '-'}.", ""]
    lines += _selection_section(res)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
def plot_main(res: dict[str, Any], out: Path) -> list[str]:
    """Figure 1/6 (MGN per layer per task, and over training), Figure 7 (validation loss per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["settings"]
    tasks = list(s["tasks"])
    files = []
    # Figure 1 / 6: normalised MGN per layer, per task (FFT's full gradients), early / late / whole run
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ax_prof, ax_share = axes
    for task in tasks:
        runs = [r["fft_layer_mgn"] for r in _test_runs(res, task, "fft").values() if "fft_layer_mgn" in r]
        if not runs:
            continue
        n = len(runs[0][0])
        whole = _normalised([statistics.fmean(w[i] for run in runs for w in run) for i in range(n)])
        ax_prof.plot(range(n), whole, marker="o", label=f"{task}: whole run")
        first = _normalised([statistics.fmean(run[0][i] for run in runs) for i in range(n)])
        last = _normalised([statistics.fmean(run[-1][i] for run in runs) for i in range(n)])
        ax_prof.plot(range(n), first, ls=":", alpha=0.7, label=f"{task}: first {100 // s['curve_points']}%")
        ax_prof.plot(range(n), last, ls="--", alpha=0.7, label=f"{task}: last {100 // s['curve_points']}%")
        for m, style in (("grass", "-"), ("grass-uniform", ":")):
            g = [r for r in _test_runs(res, task, m).values() if "trained_steps_per_layer" in r]
            if g:
                tot = [sum(r["trained_steps_per_layer"][i] for r in g) for i in range(n)]
                share = [100.0 * t / max(1, sum(tot)) for t in tot]
                ax_share.plot(range(n), share, marker="s", ls=style, label=f"{task}: {LABELS[m]}")
    ax_share.axhline(100.0 / s["layers"], color="gray", lw=0.8, label="1 / layers")
    ax_prof.set(
        xlabel="decoder layer", ylabel="MGN / mean over layers", title="Layer importance (FFT gradients)"
    )
    ax_share.set(
        xlabel="decoder layer", ylabel="% of layer-steps (all test seeds)", title="Which layers were trained"
    )
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax.set_xticks(range(s["layers"]))
    fig.tight_layout()
    fig.savefig(out / "mgn_layers.png", dpi=110)
    plt.close(fig)
    files.append("mgn_layers.png")
    # MGN over training (heatmaps, one per task)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        runs = [r["fft_layer_mgn"] for r in _test_runs(res, task, "fft").values() if "fft_layer_mgn" in r]
        if not runs:
            continue
        windows = len(runs[0])
        grid = [
            _normalised([statistics.fmean(run[w][i] for run in runs) for i in range(len(runs[0][0]))])
            for w in range(windows)
        ]
        im = ax.imshow(list(map(list, zip(*grid))), aspect="auto", origin="lower", cmap="viridis",
                       extent=(0, s["steps"], -0.5, len(grid[0]) - 0.5))  # fmt: skip
        ax.set(
            xlabel="fine-tuning step", ylabel="decoder layer", title=f"{task}: MGN / mean over layers (FFT)"
        )
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "mgn_over_training.png", dpi=110)
    plt.close(fig)
    files.append("mgn_over_training.png")
    # Figure 7: validation loss per method
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for m in s["methods"]:
            runs = list(_test_runs(res, task, m).values())
            if not runs:
                continue
            xs = [x for x, _ in runs[0]["val_loss_curve"]]
            cis = [mean_ci([r["val_loss_curve"][i][1] for r in runs]) for i in range(len(xs))]
            line = ax.plot(xs, [c.mean for c in cis], label=LABELS.get(m, m), lw=2 if m == "grass" else 1)
            if len(runs) > 1:
                ax.fill_between(
                    xs, [c.low for c in cis], [c.high for c in cis], alpha=0.15, color=line[0].get_color()
                )
        ax.set(
            xlabel="fine-tuning step",
            ylabel="validation loss",
            title=f"{task}: validation loss (mean, 95% CI)",
            yscale="log",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "val_loss.png", dpi=110)
    plt.close(fig)
    files.append("val_loss.png")
    return files


def merge_main(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One main-study result from runs of disjoint task subsets (``--tasks arith`` and ``--tasks common``
    run side by side to halve the wall time). Every run and every LR choice depends on its own task and
    method alone, so the merge holds the numbers one run over both tasks gives; it refuses parts that
    differ in anything but the tasks (settings, starting weights, numerics, commit)."""
    first = parts[0]
    same = {
        "settings": lambda r: {k: v for k, v in r["settings"].items() if k != "tasks"},
        "weights": lambda r: r["pretrain"]["weights_sha256"],
        "numerics": lambda r: r["numerics"],
        "commit": lambda r: (r["hardware"]["git_commit"], r["hardware"].get("git_uncommitted")),
        "comparisons": lambda r: r["comparisons"],
        "smoke": lambda r: r["smoke"],
    }
    for part in parts[1:]:
        for what, get in same.items():
            if get(part) != get(first):
                raise ValueError(f"cannot merge: the parts differ in {what}")
    tasks = [t for part in parts for t in part["settings"]["tasks"]]
    if len(tasks) != len(set(tasks)):
        raise ValueError(f"cannot merge: a task is in two parts ({tasks})")
    loads = [part["hardware"] for part in parts if "load_avg_mean" in part["hardware"]]
    hw = dict(first["hardware"])
    if loads:
        hw["load_avg_min"] = min(h["load_avg_min"] for h in loads)
        hw["load_avg_max"] = max(h["load_avg_max"] for h in loads)
        hw["load_avg_mean"] = round(statistics.fmean(h["load_avg_mean"] for h in loads), 2)
    hw["workers"] = sum(part["hardware"]["workers"] for part in parts)
    return {
        **first,
        "command": "\n    ".join(f"{part['command']}  # {part['hardware']['date_utc']}" for part in parts),
        "hardware": hw,
        "settings": {**first["settings"], "tasks": tasks},
        "base": {k: v for part in parts for k, v in part["base"].items()},
        "skipped": {k: v for part in parts for k, v in part["skipped"].items()},
        "selection": [row for part in parts for row in part["selection"]],
        "runs": [run for part in parts for run in part["runs"]],
        "wall_seconds": max(part["wall_seconds"] for part in parts),  # side by side
        "merged_from": [
            {
                "command": part["command"],
                "tasks": part["settings"]["tasks"],
                "wall_seconds": part["wall_seconds"],
            }
            for part in parts
        ],
    }


def main(argv: list[str] | None = None) -> int:
    """Re-render the reports and plots of a results directory from its JSON (no runs); with --merge,
    first write its accuracy.json from the accuracy.json files of runs over disjoint task subsets."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("out", type=Path, help="results directory (holding accuracy.json / sensitivity.json)")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="accuracy.json files of main-study runs over disjoint --tasks (same commit and settings)",
    )
    args = p.parse_args(argv)
    if args.merge:
        merged = merge_main([json.loads(f.read_text()) for f in args.merge])
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "accuracy.json").write_text(json.dumps(merged, indent=1) + "\n")
    if (args.out / "accuracy.json").exists():
        res = json.loads((args.out / "accuracy.json").read_text())
        res["plots"] = plot_main(res, args.out)
        (args.out / "accuracy.md").write_text(render_main(res))
    if (args.out / "sensitivity.json").exists():
        res = json.loads((args.out / "sensitivity.json").read_text())
        (args.out / "sensitivity.md").write_text(render_sensitivity(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
