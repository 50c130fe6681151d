"""A few LLaMA2-7B rows on a GPU, each in a fresh process: tokens/s and max_memory_allocated of steps built by
``grass_llm.memory.training_step`` (the same TrainConfig, method registry, loss and optimizer as grass-llm train),
and the pinned host <-> device copy bandwidth. This is how the rows of
``benchmarks/results/gpu-h200-2026-12-04/rows.log`` were measured (its ROWS then were the four below the fused
pair); ``benchmarks/gpu_check.py`` is the full check.

    PYTHONPATH=src:benchmarks python benchmarks/gpu_rows.py            # the rows, one process each
    PYTHONPATH=src:benchmarks python benchmarks/gpu_rows.py bw         # copy bandwidth
    QR_DEVICE=cpu QR_MODEL=tiny QR_SEQ=32 python benchmarks/gpu_rows.py   # the same code on the CPU (a check)

Each row: build, 2 warm-up steps, 5 timed steps (host clock around a device synchronize); the layers given are
forced active (``activate``), so no resample happens inside the timed steps.
"""

import json
import os
import subprocess
import sys
import time

#: (method, grass-llm train overrides, active layers or None, batch size); LLaMA2-7B shape, sequence 1024
ROWS = [
    ("lora", {}, None, 4),
    ("grass", {}, [10, 20], 4),
    ("grass", {}, [0, 1], 4),
    ("grass", {"grass.probe_steps": 1000}, None, 4),
    ("grass", {"grass.fused_update": True}, [0, 1], 4),
]


def row(method, ov, ids, b):
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import model_config

    from grass_llm.memory import training_step

    cfg = model_config(os.environ.get("QR_MODEL", "LLaMA2-7B"))
    t0 = time.time()
    kw = dict(batch_size=b, overrides=ov)
    if method == "lora":
        kw["rank"] = 128
    if ids is not None:
        kw["active_layer_ids"] = ids
    dev = os.environ.get("QR_DEVICE", "cuda")
    kw["seq_len"] = seq = int(os.environ.get("QR_SEQ", 1024))
    step = training_step(cfg, method, device=dev, **kw)
    build = time.time() - t0
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for _ in range(2):
        step.run(b, seq)
    sync()
    n = 5
    t = time.time()
    for _ in range(n):
        step.run(b, seq)
    sync()
    dt = (time.time() - t) / n
    off = getattr(step.opt, "offloader", None)
    out = dict(
        method=method, ov=ov, ids=ids, b=b, ms=round(dt * 1e3, 1), tok_s=round(b * seq / dt),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3) if dev == "cuda" else None,
        build_s=round(build, 1), residency=getattr(step.opt, "residency", None),
        precision=getattr(step.opt, "precision", None), h2d=getattr(off, "bytes_to_device", None),
        d2h=getattr(off, "bytes_to_host", None),
    )  # fmt: skip
    print("ROW " + json.dumps(out), flush=True)


def bandwidth():
    import torch

    n = 1 << 30
    h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(n, dtype=torch.uint8, device="cuda")
    for name, f in (("h2d", lambda: d.copy_(h, non_blocking=True)), ("d2h", lambda: h.copy_(d, non_blocking=True))):
        f()
        torch.cuda.synchronize()
        t = time.time()
        for _ in range(5):
            f()
        torch.cuda.synchronize()
        print("BW", name, round(5 * n / (time.time() - t) / 1e9, 1), "GB/s", flush=True)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    h2 = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    d2 = torch.empty(n, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    t = time.time()
    for _ in range(5):
        with torch.cuda.stream(s1):
            d.copy_(h, non_blocking=True)
        with torch.cuda.stream(s2):
            h2.copy_(d2, non_blocking=True)
    torch.cuda.synchronize()
    print("BW duplex", round(10 * n / (time.time() - t) / 1e9, 1), "GB/s total", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "row":
        row(*json.loads(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "bw":
        bandwidth()
    else:
        for r in ROWS:
            p = subprocess.run(
                [sys.executable, __file__, "row", json.dumps(list(r))], capture_output=True, text=True, timeout=120
            )
            rows = [line for line in p.stdout.splitlines() if line.startswith("ROW")]
            print("\n".join(rows) or f"FAIL {r} {p.stderr[-1500:]}", flush=True)
