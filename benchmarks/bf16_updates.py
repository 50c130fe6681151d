"""Are bf16 updates lost? Fraction of weights that change and loss against an fp32 reference.

In pure bf16 (weights, gradients and AdamW moments in bf16, the paper's setting) an AdamW update of
about ``lr`` is rounded away whenever it is below half a bf16 step of the weight it is added to:
for a weight of magnitude 0.05 a bf16 step is 2.4e-4, so at lr 3e-5 most updates vanish. This
benchmark fine-tunes the same pretrained model for the same steps, on the same data and the same
layers, with every way ``GrassOptimizer`` can write updates into bf16 weights, and compares them
with an fp32 run:

* ``fp32``: fp32 weights and moments (the reference);
* ``bf16 nearest``: ``update_rounding=nearest``, no masters (the paper's pure bf16);
* ``bf16 kahan``: ``update_rounding=kahan`` (a bf16 compensation buffer per weight);
* ``bf16 stochastic``: ``update_rounding=stochastic``;
* ``bf16 fp32-master``: ``offload=true`` (on the CPU here), ``fp32_master_weights=auto``: fp32 master
  weights in host memory, the default on a GPU.

The model is ``benchmarks/accuracy.py``'s pretrained 12-layer Llama (pretrained reproducibly by that
script's code with its pinned CPU numerics, cached under ``runs/bench/accuracy/`` and named by the
sha256 of its weights, which the report prints), fine-tuned on its word-problem task (``arith``).
GRASS gamma=2, period 25, with uniform sampling (seeded) so that every variant trains the same layers
at the same steps (GRASS's adaptive draws follow the gradients, which differ between precisions),
clipping at 1.0, constant learning rate.

Measured: the share of the bf16 weights of the trained layers that differ from their start after 10
steps (the first period's two layers) and after all steps (every layer drawn at some point); the update error
``||W - W_fp32|| / ||W_fp32 - W_0||`` over the trained layers at the end (W: the weights the model
computes with); the training loss's mean absolute difference from the fp32 run's, step by step; the
validation loss of the final weights, evaluated in fp32.

    python benchmarks/bf16_updates.py                  # lr 3e-5 and 3e-4, 200 steps (a few minutes on CPU)
    python benchmarks/bf16_updates.py --smoke          # tiny, checks the script runs
    python benchmarks/bf16_updates.py --report-only    # rebuild the .md from the .json (the reading)

Writes ``benchmarks/results/bf16_updates.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_numerics import pin

if __name__ == "__main__":
    pin()  # before torch loads: the same numerics, hence the same cached model, as accuracy.py

import accuracy
import torch
from accuracy_tasks import collate, encode_task, task_splits
from common import command_line, hardware, hardware_lines, load_average, write_results

from grass_llm import GrassConfig, GrassOptimizer

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "fp32": dict(dtype=torch.float32, offload=False),
    "bf16 nearest": dict(
        dtype=torch.bfloat16, offload=False, fp32_master_weights=False, update_rounding="nearest"
    ),
    "bf16 kahan": dict(
        dtype=torch.bfloat16, offload=False, fp32_master_weights=False, update_rounding="kahan"
    ),
    "bf16 stochastic": dict(
        dtype=torch.bfloat16, offload=False, fp32_master_weights=False, update_rounding="stochastic"
    ),
    "bf16 fp32-master": dict(dtype=torch.bfloat16, offload=True, fp32_master_weights="auto"),
}


def batches(train: list[dict], tok, steps: int, batch: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    encoded = [encode_task(tok, r) for r in train]
    out = []
    for _ in range(steps):
        idx = torch.randint(0, len(encoded), (batch,), generator=g).tolist()
        out.append(collate([encoded[i] for i in idx]))
    return out


def layer_params(model) -> list[list[torch.nn.Parameter]]:
    return [list(layer.parameters()) for layer in model.model.layers]


@torch.no_grad()
def val_loss(base, model, val: list[dict[str, torch.Tensor]]) -> float:
    """Token-mean loss of ``model``'s weights evaluated in fp32 (in a copy of ``base``, the fp32 model)."""
    m = copy.deepcopy(base).eval()
    m.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    total = count = 0.0
    for b in val:
        n = int((b["labels"][:, 1:] != -100).sum())
        total += float(m(**b).loss) * n
        count += n
    return total / count


def effective(opt: GrassOptimizer, p: torch.Tensor) -> torch.Tensor:
    """The fp32 value the optimizer holds for ``p`` (master, or weight + compensation), else the weight."""
    st = opt.state_dict()["state"] if opt.offloader is not None else None
    if st is not None:
        index = {id(q): i for i, q in enumerate(q for g in opt.param_groups for q in g["params"])}
        s = st.get(index[id(p)], {})
    else:
        s = opt.state.get(p, {})
    if "master" in s:
        return s["master"].float()
    if "compensation" in s:
        return p.detach().float() + s["compensation"].float()
    return p.detach().float()


def run(name: str, spec: dict[str, Any], base, data, val, lr: float, steps: int, log=print) -> dict[str, Any]:
    spec = dict(spec)
    dtype = spec.pop("dtype")
    model = copy.deepcopy(base).to(dtype)
    model.train()
    cfg = GrassConfig(
        active_layers=2, period=25, probe_steps=0, policy="uniform", max_grad_norm=1.0, seed=0, **spec
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = GrassOptimizer(model, cfg, lr=lr, weight_decay=0.0)
    start = [[p.detach().clone() for p in ps] for ps in layer_params(model)]
    losses, trained, changed10 = [], set(), None
    t0 = time.perf_counter()
    for step, b in enumerate(data):
        trained |= set(opt.active_layers)
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step + 1 == 10:
            changed10 = changed_share(model, start, trained)
    seconds = time.perf_counter() - t0
    final_model = [[p.detach().float() for p in ps] for ps in layer_params(model)]
    held = [[effective(opt, p) for p in ps] for ps in layer_params(model)]
    result = {
        "name": name,
        "lr": lr,
        "steps": steps,
        "precision": opt.precision if dtype != torch.float32 else "fp32",
        "changed_after_10": changed10,
        "changed_after_all": changed_share(model, start, trained),
        "trained_layers": sorted(trained),
        "losses": losses,
        "val_loss": val_loss(base, model, val),
        "seconds": round(seconds, 1),
        "_weights": final_model,
        "_held": held,
        "_start": [[p.float() for p in ps] for ps in start],
    }
    log(
        f"  lr {lr:g} {name:17s} changed@10 {changed10:.3f} changed@{steps} {result['changed_after_all']:.3f} "
        f"val {result['val_loss']:.4f} ({seconds:.0f} s)"
    )
    return result


def changed_share(model, start, layers) -> float:
    diff = total = 0
    for i in layers:
        for p, p0 in zip(layer_params(model)[i], start[i]):
            diff += int((p.detach() != p0).sum())
            total += p.numel()
    return diff / max(total, 1)


def compare(results: list[dict[str, Any]]) -> None:
    """Update error and loss difference of each run against the fp32 run (same lr)."""
    ref = next(r for r in results if r["name"] == "fp32")
    layers = ref["trained_layers"]
    for r in results:
        num = den = num_held = 0.0
        for i in layers:
            for w, w_ref, w0, h in zip(r["_weights"][i], ref["_weights"][i], ref["_start"][i], r["_held"][i]):
                num += float((w - w_ref).pow(2).sum())
                num_held += float((h - w_ref).pow(2).sum())
                den += float((w_ref - w0).pow(2).sum())
        r["update_error"] = (num / den) ** 0.5 if den else float("nan")
        r["held_update_error"] = (num_held / den) ** 0.5 if den else float("nan")
        r["loss_abs_diff"] = sum(abs(a - b) for a, b in zip(r["losses"], ref["losses"])) / len(r["losses"])
        r["loss_first"] = sum(r["losses"][:10]) / 10 if len(r["losses"]) >= 10 else r["losses"][0]
        r["loss_last"] = sum(r["losses"][-20:]) / min(20, len(r["losses"]))


def render(res: dict[str, Any]) -> str:
    lines = [
        "# bf16 updates: how much of the update survives",
        "",
        *(
            [f"**SMOKE RUN** (tiny settings, numbers meaningless): `{res['command']}`", ""]
            if res["smoke"]
            else []
        ),
        f"- command: `{res['command']}`",
        *hardware_lines(res["hardware"]),
        f"- model: `benchmarks/accuracy.py`'s pretrained Llama ({res['model']['params']} parameters, "
        f"{res['model']['layers']} layers, hidden {res['model']['hidden']}, weights sha256 "
        f"{res['model']['pretrained']['weights_sha256'][:16]}), fine-tuned on its word-problem task; "
        f"batch {res['batch']}, {res['steps']} steps, GRASS γ=2, period 25, uniform sampling (seed 0: every "
        "variant trains the same layers at the same steps), clipping 1.0, constant LR, no weight decay",
        f"- wall time {res['seconds']:.0f} s",
        "",
        "Columns: share of the trained layers' bf16 weights that differ from their start after 10 steps (the two "
        "layers of the first period) and at the end (every layer drawn at some point); update error "
        "`||W - W_fp32|| / ||W_fp32 - W_0||` of the weights the model computes with (bf16 for the bf16 runs), "
        "and of the value the optimizer holds (master, or weight + compensation); mean |loss - loss_fp32| over "
        "the steps; training loss over the first 10 and last 20 steps; validation loss of the final weights "
        "(evaluated in fp32).",
        "",
    ]
    for lr in res["lrs"]:
        rows = [r for r in res["runs"] if r["lr"] == lr]
        lines += [
            f"## lr {lr:g}",
            "",
            "| variant | changed @10 | changed @end | update error (model) | update error (held) | "
            "mean abs loss diff | loss first 10 | loss last 20 | val loss | s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['name']} | {100 * r['changed_after_10']:.1f}% | {100 * r['changed_after_all']:.1f}% | "
                f"{r['update_error']:.3f} | {r['held_update_error']:.3f} | {r['loss_abs_diff']:.5f} | "
                f"{r['loss_first']:.4f} | {r['loss_last']:.4f} | {r['val_loss']:.4f} | {r['seconds']:.0f} |"
            )
        lines.append("")
    lines += ["## Reading", "", *res.get("notes", []), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per run (default 200)")
    p.add_argument("--lrs", default="3e-5,3e-4", help="comma-separated learning rates (default 3e-5,3e-4)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--cache", type=Path, default=accuracy.CACHE, help="where the pretrained model is cached")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for bf16_updates.md / .json")
    p.add_argument("--smoke", action="store_true", help="tiny everything: checks the script runs")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild bf16_updates.md from bf16_updates.json, run nothing",
    )
    args = p.parse_args(argv)
    if args.report_only:
        import json

        res = json.loads((args.out / "bf16_updates.json").read_text())
        res["notes"] = NOTES
        write_results(args.out, "bf16_updates", res, render(res))
        print(f"rebuilt {args.out / 'bf16_updates.md'}")
        return 0
    torch.set_num_threads(args.threads)
    started = time.time()
    hw = hardware(torch.device("cpu"))
    s = accuracy.Settings(**(accuracy.SMOKE if args.smoke else {}))
    steps = 12 if args.smoke else args.steps
    lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    s = dataclasses.replace(s, tasks=("arith",))
    blob, info = accuracy.pretrain(s, args.cache / ("smoke" if args.smoke else ""))
    ctx = accuracy.load_context(s, blob)
    base, tok = ctx["model"].float(), ctx["tok"]
    train, val_records, _test = task_splits("arith", s.n_train, s.n_val, s.n_test)
    data = batches(train, tok, steps, 4 if args.smoke else args.batch, seed=0)
    val = [
        collate([encode_task(tok, r) for r in val_records[i : i + 50]])
        for i in range(0, len(val_records), 50)
    ]
    runs = []
    for lr in lrs:
        results = [run(name, spec, base, data, val, lr, steps) for name, spec in VARIANTS.items()]
        compare(results)
        runs += results
    for r in runs:
        for k in ("_weights", "_held", "_start"):
            r.pop(k)
    hw["load_avg_end"] = load_average()
    res = {
        "command": command_line(),
        "hardware": hw,
        "smoke": args.smoke,
        "steps": steps,
        "batch": 4 if args.smoke else args.batch,
        "lrs": lrs,
        "model": {"params": info["params"], "layers": s.layers, "hidden": s.hidden, "pretrained": info},
        "runs": runs,
        "seconds": time.time() - started,
        "notes": NOTES,
    }
    write_results(args.out, "bf16_updates", res, render(res))
    print(f"wrote {args.out / 'bf16_updates.md'}")
    return 0


#: The reading of the committed results, written after looking at them (see the tables above it).
NOTES: list[str] = [
    "- **Round to nearest loses the update at lr 3e-5.** 87.1% of the trained layers' bf16 weights had not moved "
    "after 10 steps and 84.2% after 200; the distance of the weights to the fp32 run's is 94.5% of what the fp32 "
    "run moved them, and the validation loss stays at 3.243 where fp32 reaches 1.759: the fine-tuning mostly "
    "did not happen. At lr 3e-4 it loses less but still shows (0.453 against 0.433).",
    "- **fp32 master weights** (the default with offload, where they live in host memory) and **Kahan "
    "compensation** (the default without offload) behave the same: 95.1-95.2% of the weights move, the "
    "validation loss is within 0.007 of fp32 at lr 3e-5 and 0.0004 at 3e-4, and the weights stay closest to the "
    "fp32 run's (update error 0.185 for the bf16 weights, 0.140 for the value the optimizer holds at 3e-5; "
    "0.046-0.048 and 0.037-0.040 at 3e-4; the rest comes from the bf16 forward and backward, which every bf16 "
    "variant shares).",
    "- **Stochastic rounding** also reaches the fp32 loss (the smallest mean loss difference, 0.004 at 3e-5 and "
    "0.001 at 3e-4, and a validation loss 0.003 closer to fp32's than Kahan's at 3e-5) with no extra memory, but "
    "its weights are a noisy version of the trajectory: update error 0.489 at lr 3e-5 and 0.171 at lr 3e-4, "
    "2.6 and 3.7 times Kahan's.",
    "- Chosen defaults: `fp32_master_weights: auto` (masters in host memory under offload) and "
    "`update_rounding: kahan` without offload (deterministic, closest to the fp32 weights, 2 bytes per trained "
    "parameter in the optimizer state); `stochastic` when those 2 bytes matter more (its losses are as close to "
    "fp32's here, its weights are not). `nearest` with `fp32_master_weights: false` is the paper's pure bf16.",
    "- Timings are CPU timings on a shared machine (bf16 arithmetic is slow on this CPU; two benchmarks ran "
    "beside this one); they say nothing about a GPU.",
]

if __name__ == "__main__":
    sys.exit(main())
