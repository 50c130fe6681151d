"""Where does a real CUDA training step's peak memory go, and what does the estimator count instead?

For one model shape, method and setting (the vocabulary of ``grass-llm memory`` and
``grass_llm.memory.measure_cuda_step``), in THIS process:

1. ``steps`` training steps on the GPU exactly as ``measure_cuda_step`` runs them
   (``grass_llm.memory.training_step``) -> ``measured`` = ``torch.cuda.max_memory_allocated``;
2. one more step, recorded: the CUDA caching allocator's history
   (``torch.cuda.memory._record_memory_history``) is replayed to find the moment of the peak and the
   blocks live then, and the step runs under ``LiveBytesTracker(origins=True)`` (the estimator's counter
   of op outputs, on real tensors), which labels every block an op made with its op, section, module or
   autograd node. A block no op returned (a cuBLAS workspace, a kernel's internal buffer) keeps only its
   Python stack;
3. ``estimate_memory`` for the same settings with ``peak_detail=True``: the estimate and the storages
   live at ITS peak, labelled the same way;
4. both "live at the peak" lists grouped by label (layer indices folded to ``N``) and diffed.

It also reports the SDPA backend the GPU picked for the model's attention calls
(``torch._fused_sdp_choice`` on the recorded shapes), the device capability and the environment that
sizes cuBLAS workspaces. ``--cublas-probe`` instead measures, in a fresh process, what one bf16 matmul
forward + backward leaves allocated (PyTorch takes each cuBLAS/cuBLASLt workspace from the caching
allocator per (handle, stream), and autograd's backward runs on its own thread, i.e. another handle).

    PYTHONPATH=src:benchmarks python benchmarks/memory_diagnose.py --model gemma-2b --method lora --out lora.json
    PYTHONPATH=src:benchmarks python benchmarks/memory_diagnose.py --cublas-probe --out cublas.json
    python benchmarks/memory_diagnose.py --dry-run --model gemma-2b --method lisa --out /tmp/d.json  # CPU

``--dry-run`` runs on the CPU with a tiny model of the same family (no allocator history: the "measured"
side is the tracker's count of the real CPU step), which checks the script, not a GPU. JSON goes to
``--out`` (default stdout only); a short summary is printed. Exit 0 when it ran, 2 for bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import sys
import time
import warnings
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import MODEL_SHAPES, model_config  # noqa: E402

#: --model name -> MODEL_SHAPES key
MODELS = {"tinyllama": "TinyLlama-1.1B", "gemma-2b": "Gemma-2B", "llama2-7b": "LLaMA2-7B", "tiny": "tiny"}
#: the 512-wide model of tests/test_memory.py::test_estimate_matches_cuda_max_memory_allocated (kept equal by
#: tests/test_benchmarks.py); run it with --rank 8 --seq-len 256 as that test does
SMALL = dict(MODEL_SHAPES["tiny"][1], hidden_size=512, intermediate_size=1024, vocab_size=4096)
MODELS["small"] = "small"
#: dry runs: a tiny model of the same family (Gemma: tied embeddings, head_dim 256 -> 32, MQA)
TINY_GEMMA = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    intermediate_size=256,
    vocab_size=512,
    max_position_embeddings=256,
)
MARKER_BYTES = 12345 * 512 + 1  # an odd size: the allocation that marks the start of the recorded step
#: Python frames that say nothing about who allocated (hooks, dispatch, module call plumbing)
_BORING = (
    "torch/nn/modules/module.py",
    "torch/utils/_python_dispatch.py",
    "torch/utils/_contextlib.py",
    "torch/_tensor.py",
    "torch/autograd/__init__.py",
    "torch/autograd/graph.py",
    "torch/overrides.py",
    "grass_llm/memory/tracker.py",
    "benchmarks/memory_diagnose.py",
    "contextlib.py",
    "threading.py",
)


# ------------------------------------------------------------------------------------------------
# small helpers
def log(msg: str) -> None:
    print(msg, flush=True)


def mib(n: int | float | None) -> float | None:
    return None if n is None else round(n / 2**20, 3)


def group_key(label: str | None, category: str | None = None) -> str:
    """A label with its layer indices folded (``layers.7.mlp`` -> ``layers.N.mlp``), per-tensor names of
    weights / gradients / optimizer states folded to their category, code lines dropped."""
    kinds = ("weights", "gradients", "optimizer_states")
    if label and label.split(" ", 1)[0] in kinds:
        return label.split(" ", 1)[0]
    if category in kinds or not label:
        return category or "(unlabelled)"
    label = re.sub(r"\.\d+(?=\.|\s|$)", ".N", label)
    return re.sub(r"\.py:\d+", ".py", label)


def trim_frames(frames: list[dict[str, Any]] | None, keep: int = 6) -> list[str]:
    """The interesting Python frames of an allocation, innermost first: ``file:line function``."""
    out = []
    for f in frames or []:
        name = str(f.get("filename", ""))
        if not name or name == "??" or any(b in name.replace(os.sep, "/") for b in _BORING):
            continue
        if not name.endswith(".py") and "/" in name:  # C++ frame (stacks="all"): library + function
            out.append(f"{f.get('name', '?')} [{os.path.basename(name)}]")
        else:
            parts = name.replace(os.sep, "/").split("/")
            short = "/".join(parts[-2:])
            out.append(f"{short}:{f.get('line', '?')} {f.get('name', '?')}")
        if len(out) >= keep:
            break
    return out


def grouped(items: list[dict[str, Any]], top: int) -> list[dict[str, Any]]:
    """``items`` (``bytes``, ``group``) summed per group, largest first."""
    acc: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for it in items:
        a = acc[it["group"]]
        a[0] += it["bytes"]
        a[1] += 1
    rows = [{"group": g, "bytes": b, "mib": mib(b), "count": c} for g, (b, c) in acc.items()]
    return sorted(rows, key=lambda r: -r["bytes"])[:top]


def diff_groups(cuda: list[dict[str, Any]], est: list[dict[str, Any]], top: int) -> list[dict[str, Any]]:
    """Per group: bytes live at the CUDA peak, bytes live at the estimate's peak, and the difference."""
    a: dict[str, int] = defaultdict(int)
    b: dict[str, int] = defaultdict(int)
    for it in cuda:
        a[it["group"]] += it["bytes"]
    for it in est:
        b[it["group"]] += it["bytes"]
    rows = [
        {
            "group": g,
            "cuda_mib": mib(a[g]),
            "estimate_mib": mib(b[g]),
            "cuda_minus_estimate_mib": mib(a[g] - b[g]),
        }
        for g in set(a) | set(b)
        if a[g] != b[g]
    ]
    return sorted(rows, key=lambda r: -abs(r["cuda_minus_estimate_mib"]))[:top]


# ------------------------------------------------------------------------------------------------
# the allocator's history: the live blocks at the peak of the recorded step
def rounded(nbytes: int) -> int:
    """A request as the estimator counts it: rounded up to the allocator's 512 bytes. (The allocator's
    statistics count whole blocks, which can be larger: it does not split off a remainder under 1 MiB.
    Its history records the requested sizes only.)"""
    return -(-int(nbytes) // 512) * 512


def live_blocks(snapshot: dict[str, Any], device: int = 0) -> dict[int, dict[str, Any]]:
    """address -> {size (requested, rounded), block_size, frames} of every allocated block of ``device`` in a
    ``torch.cuda.memory._snapshot()``."""
    out = {}
    for seg in snapshot.get("segments", []):
        if seg.get("device", device) != device:
            continue
        for blk in seg.get("blocks", []):
            if blk.get("state") == "active_allocated":
                size = int(blk["size"])
                out[int(blk["address"])] = {
                    "size": rounded(blk.get("requested_size") or size),
                    "block_size": size,
                    "frames": blk.get("frames") or [],
                }
    return out


def find_marker(trace: list[dict[str, Any]], addr: int) -> int:
    """Index of the marker's ``alloc`` in ``trace`` (the first alloc of MARKER_BYTES at ``addr``, freed by
    the next event at that address); -1 when absent (the ring buffer overflowed: raise --max-entries)."""
    for i, e in enumerate(trace):
        if (
            e.get("action") == "alloc"
            and int(e.get("addr", -1)) == addr
            and int(e.get("size", 0)) == MARKER_BYTES
        ):
            for nxt in trace[i + 1 :]:
                if int(nxt.get("addr", -1)) == addr:
                    if nxt.get("action") in ("free_requested", "free_completed"):
                        return i
                    break
    return -1


def replay(
    before: dict[int, dict[str, Any]], trace: list[dict[str, Any]], start: int
) -> tuple[int, int, dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """Replay ``trace[start:]`` from the blocks live ``before`` it: (bytes at start, peak bytes, blocks live at
    the peak, every alloc event with a "seq" number). Allocated bytes change at ``alloc`` and
    ``free_requested``, as ``torch.cuda.memory_allocated`` does."""
    live = {a: dict(b, seq=None) for a, b in before.items()}
    current = initial = sum(b["size"] for b in live.values())
    peak, peak_at = current, start - 1
    for i in range(start, len(trace)):
        e = trace[i]
        act, addr, size = e.get("action"), int(e.get("addr", 0)), rounded(e.get("size", 0))
        if act == "alloc":
            live[addr] = {"size": size, "frames": e.get("frames") or [], "seq": i}
            current += size
        elif act == "free_requested":
            blk = live.pop(addr, None)
            current -= blk["size"] if blk is not None else size
        if current > peak:
            peak, peak_at = current, i
    # the live set at the peak: replay again up to it
    live = {a: dict(b, seq=None) for a, b in before.items()}
    for i in range(start, peak_at + 1):
        e = trace[i]
        act, addr = e.get("action"), int(e.get("addr", 0))
        if act == "alloc":
            live[addr] = {"size": rounded(e.get("size", 0)), "frames": e.get("frames") or [], "seq": i}
        elif act == "free_requested":
            live.pop(addr, None)
    allocs = [dict(e, seq=i) for i, e in enumerate(trace) if i >= start and e.get("action") == "alloc"]
    return initial, peak, live, allocs


def tracked_storages(tracker) -> list[tuple[int, int, str]]:
    """(address, bytes, label) of every storage ``tracker`` (``origins=True``) counted, in order; weights,
    gradients and optimizer states are labelled by their category first."""
    kinds = ("weights", "gradients", "optimizer_states")
    out = []
    for e in tracker.allocations:
        label = e.origin or ""
        if e.category in kinds and not label.startswith(e.category):
            label = f"{e.category} ({label})"
        out.append((e.ptr, e.nbytes, label))
    return out


def label_allocs(allocs: list[dict[str, Any]], tracked: list[tuple[int, int, str]]) -> dict[int, str]:
    """seq -> tracker label for the allocator's alloc events of the recorded step: each storage the tracker
    saw (address, rounded bytes, label, in order) is matched to the next alloc at its address of that size
    (an alloc that no op returned, at the same address just before, is skipped)."""
    queues: dict[int, deque] = defaultdict(deque)
    for ptr, nbytes, label in tracked:
        if ptr:
            queues[ptr].append((nbytes, label))
    out: dict[int, str] = {}
    for e in allocs:
        q = queues.get(int(e["addr"]))
        if q:
            nbytes, label = q[0]
            if rounded(e["size"]) == nbytes:
                q.popleft()
                out[e["seq"]] = label
    return out


def describe_peak(
    live: dict[int, dict[str, Any]],
    labels: dict[int, str],
    names: dict[int, str],
    top: int,
    labelled: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The blocks live at the peak (largest first, ``top`` of them) and all of them, with a group each.
    ``labelled``: the step ran under the labelling tracker (an unlabelled block is then no op's output)."""
    items = []
    for addr, b in live.items():
        if b["seq"] is None:  # allocated before the recorded step
            label = names.get(addr)
            where = "before step" if label is None else "tracked before step"
        else:
            label = labels.get(b["seq"])
            where = (
                "step, op output" if label is not None else "step, not an op output" if labelled else "step"
            )
        frames = trim_frames(b["frames"])
        group = group_key(label) if label else f"[{where}] " + (frames[0] if frames else "(no Python frames)")
        items.append(
            {
                "bytes": b["size"],
                "mib": mib(b["size"]),
                "where": where,
                "label": label,
                "group": group,
                "frames": frames,
            }
        )
    items.sort(key=lambda d: -d["bytes"])
    return items[:top], items


# ------------------------------------------------------------------------------------------------
# SDPA: what the model calls, and which kernel the device picks for it
@contextlib.contextmanager
def record_sdpa(calls: list[dict[str, Any]]):
    """Record the arguments of every ``F.scaled_dot_product_attention`` call (the call is unchanged)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    seen: set = set()

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        shapes = (tuple(query.shape), tuple(key.shape), attn_mask is None, is_causal, kw.get("enable_gqa"))
        if shapes not in seen and len(calls) < 4:  # each distinct call once (the layers are alike)
            seen.add(shapes)
            calls.append(
                {
                    "query": list(query.shape),
                    "key": list(key.shape),
                    "dtype": str(query.dtype).replace("torch.", ""),
                    "attn_mask": None if attn_mask is None else list(attn_mask.shape),
                    "is_causal": bool(is_causal),
                    "dropout_p": float(dropout_p),
                    "scale": scale,
                    "enable_gqa": bool(kw.get("enable_gqa", False)),
                    "requires_grad": bool(query.requires_grad or key.requires_grad),
                    "device": str(query.device),
                    # (shapes and strides only: keeping the tensors would add to the measured peak)
                    "_args": [(tuple(t.shape), t.stride(), t.dtype, t.device) for t in (query, key, value)],
                    "_mask": None if attn_mask is None else (tuple(attn_mask.shape), attn_mask.dtype),
                }
            )
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kw)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def sdpa_choices(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each recorded call with the backend ``torch._fused_sdp_choice`` picks for it (grad on, as in training)."""
    out = []
    for c in calls:
        specs, mask_spec = c.pop("_args"), c.pop("_mask")
        try:
            args = [
                torch.empty_strided(shape, stride, dtype=dtype, device=device).requires_grad_(
                    c["requires_grad"]
                )
                for shape, stride, dtype, device in specs
            ]
            mask = None
            if mask_spec is not None:
                mask = torch.zeros(mask_spec[0], dtype=mask_spec[1], device=args[0].device)
            idx = torch._fused_sdp_choice(
                *args, mask, c["dropout_p"], c["is_causal"], scale=c["scale"], enable_gqa=c["enable_gqa"]
            )
            try:
                from torch.nn.attention import SDPBackend

                choice: Any = SDPBackend(idx).name
            except (ImportError, ValueError):
                choice = int(idx)
        except Exception as e:  # (a diagnostic: report, never stop)
            choice = f"unknown: {type(e).__name__}: {e}"
        out.append(dict(c, backend=choice))
    return out


def sdpa_flags() -> dict[str, Any]:
    b = torch.backends.cuda
    out = {}
    for name in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled", "cudnn_sdp_enabled"):
        fn = getattr(b, name, None)
        if callable(fn):
            out[name] = bool(fn())
    with contextlib.suppress(Exception):
        out["fp16_bf16_reduction_math_sdp_allowed"] = bool(b.allow_fp16_bf16_reduction_math_sdp())
    return out


def environment(device: torch.device) -> dict[str, Any]:
    env_keys = (
        "CUBLAS_WORKSPACE_CONFIG",
        "CUBLASLT_WORKSPACE_SIZE",
        "TORCH_CUBLASLT_UNIFIED_WORKSPACE",
        "PYTORCH_CUDA_ALLOC_CONF",
        "PYTORCH_ALLOC_CONF",
        "TORCH_BLAS_PREFER_CUBLASLT",
        "TORCH_SDPA_BACKEND",
    )
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "env": {k: os.environ.get(k) for k in env_keys},
        "sdpa_flags": sdpa_flags(),
    }
    with contextlib.suppress(Exception):
        import transformers

        info["transformers"] = transformers.__version__
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["capability"] = list(torch.cuda.get_device_capability(device))
        with contextlib.suppress(Exception):
            info["preferred_blas_library"] = str(torch.backends.cuda.preferred_blas_library())
        with contextlib.suppress(Exception):
            info["cudnn"] = torch.backends.cudnn.version()
    return info


# ------------------------------------------------------------------------------------------------
# the run
def config_for(name: str, dry_run: bool):
    if dry_run:
        import transformers

        if name == "gemma-2b":
            cfg = transformers.GemmaConfig(**TINY_GEMMA)
        else:
            cfg = transformers.LlamaConfig(**MODEL_SHAPES["tiny"][1])
        cfg._name_or_path = f"{name} (dry run: tiny)"
        return cfg
    if name == "small":
        import transformers

        cfg = transformers.LlamaConfig(**SMALL)
        cfg._name_or_path = "small (512-wide test model)"
        return cfg
    return model_config(MODELS[name])


def history_kwargs(**want: Any) -> dict[str, Any]:
    params = inspect.signature(torch.cuda.memory._record_memory_history).parameters
    return {k: v for k, v in want.items() if k in params}


def run_device(cfg, method: str, kw: dict[str, Any], args, res: dict[str, Any], dev: torch.device) -> None:
    """Steps 1 and 2 (see the module docstring); fills ``res["device_run"]``."""
    from grass_llm.memory import LiveBytesTracker, training_step
    from grass_llm.memory.estimate import tag_gradients

    cuda = dev.type == "cuda"
    out: dict[str, Any] = {}
    res["device_run"] = out
    if cuda:
        torch.cuda.memory._record_memory_history(
            **history_kwargs(enabled="all", context="alloc", stacks=args.stacks, max_entries=args.max_entries)
        )
        out["history"] = {"stacks": args.stacks, "max_entries": args.max_entries}
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.time()
    step = training_step(cfg, method, device=dev, **kw)
    out["build_s"] = round(time.time() - t0, 1)
    if cuda:
        torch.cuda.synchronize(dev)
        out["after_build_allocated"] = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    calls: list[dict[str, Any]] = []
    t0 = time.time()
    for i in range(args.steps):
        with record_sdpa(calls) if i == 0 else contextlib.nullcontext():
            step.run(args.batch_size, args.seq_len)
    if cuda:
        torch.cuda.synchronize(dev)
        out["measured"] = int(torch.cuda.max_memory_allocated(dev))
        out["allocated_after_steps"] = torch.cuda.memory_allocated(dev)
        log(f"measured max_memory_allocated over {args.steps} steps: {mib(out['measured'])} MiB")
    out["steps_s"] = round(time.time() - t0, 2)
    res["sdpa_calls"] = sdpa_choices(calls)
    for c in res["sdpa_calls"]:
        log(f"SDPA call: {c}")
    write(res, args)

    # the recorded steps: allocator history, first without and then with the labelling tracker (a Python
    # dispatch mode, which can change what autograd does in place: compare the two peaks)
    names = param_names(step)
    index = dev.index or 0
    if cuda:
        rec = record_step(step, args, dev, index, None, names)
        out["plain_step"] = {k: v for k, v in rec.items() if k != "_items"}
        log(
            f"plain recorded step: max_memory_allocated {mib(rec['recorded_step_peak'])} MiB, replayed peak "
            f"{mib(rec.get('replay_peak'))} MiB"
        )
    tracker = LiveBytesTracker(device=dev, origins=True)
    model = step.model
    named = [*model.named_parameters(), *model.named_buffers()]
    tracker.track([t for _, t in named], "weights", names=[n for n, _ in named])
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    tracker.track([g for _, g in grads], "gradients", names=[n for n, _ in grads])
    states = step.state_tensors()
    tracker.track(states, "optimizer_states", names=[f"state {i}" for i in range(len(states))])
    hooks = tag_gradients(model, tracker)
    if cuda:
        rec = record_step(step, args, dev, index, tracker, names)
        out.update(rec)
        log(
            f"labelled recorded step: max_memory_allocated {mib(rec['recorded_step_peak'])} MiB, replayed peak "
            f"{mib(rec.get('replay_peak'))} MiB, op outputs (tracker) {mib(rec['tracker_peak'])} MiB"
        )
    else:  # dry run: the tracker's own view of the real CPU step stands for the allocator's
        with tracker.label_modules(model), tracker:
            step.run(args.batch_size, args.seq_len, tracker)
        out["tracker_peak"] = out["measured"] = tracker.peak
        items = [
            dict(d, mib=mib(d["bytes"]), group=group_key(d["origin"], d["category"]))
            for d in tracker.peak_storages()
        ]
        out["live_at_peak_top"] = items[: args.top]
        out["live_at_peak_groups"] = grouped(items, 3 * args.top)
        out["_items"] = items
    out["tracker_live_at_peak_groups"] = grouped(
        [dict(d, group=group_key(d["origin"], d["category"])) for d in tracker.peak_storages()], 3 * args.top
    )
    if cuda:
        torch.cuda.memory._record_memory_history(enabled=None)
    for h in hooks:
        h.remove()
    del step, model, tracker
    write(res, args)


def param_names(step) -> dict[int, str]:
    """address -> "weights NAME" / "gradients NAME" / "optimizer_states N" of what lives across steps."""
    names: dict[int, str] = {}
    for n, t in [*step.model.named_parameters(), *step.model.named_buffers()]:
        names.setdefault(t.untyped_storage().data_ptr(), f"weights {n}")
    for n, p in step.model.named_parameters():
        if p.grad is not None:
            names.setdefault(p.grad.untyped_storage().data_ptr(), f"gradients {n}")
    for i, t in enumerate(step.state_tensors()):
        names.setdefault(t.untyped_storage().data_ptr(), f"optimizer_states {i}")
    return names


def allocate_marker(dev: torch.device) -> int:
    """Allocate and free MARKER_BYTES: the first event of the recorded step in the trace; returns its address."""
    marker = torch.empty(MARKER_BYTES, dtype=torch.uint8, device=dev)
    return marker.data_ptr()


def record_step(step, args, dev: torch.device, index: int, tracker, names: dict[int, str]) -> dict[str, Any]:
    """One more step with a fresh allocator trace (under ``tracker`` and its module labels when given): its
    peak, the blocks live then (labelled), grouped."""
    out: dict[str, Any] = {}
    torch.cuda.synchronize(dev)
    torch.cuda.memory._record_memory_history(  # a fresh trace (the live blocks keep their stacks)
        **history_kwargs(
            enabled="all",
            context="alloc",
            stacks=args.stacks,
            max_entries=args.max_entries,
            clear_history=True,
        )
    )
    before = live_blocks(torch.cuda.memory._snapshot(), index)
    out["allocated_before_recorded_step"] = torch.cuda.memory_allocated(dev)
    marker_addr = allocate_marker(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    if tracker is None:
        step.run(args.batch_size, args.seq_len)
    else:
        with tracker.label_modules(step.model), tracker:
            step.run(args.batch_size, args.seq_len, tracker)
        out["tracker_peak"] = tracker.peak  # op outputs only, as the estimator counts them, on the real step
    torch.cuda.synchronize(dev)
    out["recorded_step_peak"] = int(torch.cuda.max_memory_allocated(dev))
    snap = torch.cuda.memory._snapshot()
    traces = snap.get("device_traces") or [[]]
    trace = traces[index] if len(traces) > index else []
    m = find_marker(trace, marker_addr)
    out["trace_events"] = len(trace)
    if m < 0:
        out["error"] = "the marker of the recorded step is not in the trace: raise --max-entries"
        log(out["error"])
        return out
    initial, peak, live, allocs = replay(before, trace, m + 2)
    labels = label_allocs(allocs, tracked_storages(tracker)) if tracker is not None else {}
    top, items = describe_peak(live, labels, names, args.top, labelled=tracker is not None)
    out.update(
        replay_initial=initial,
        replay_peak=peak,
        # (requests rounded to 512 B; the allocator counts whole blocks: the difference is its slack)
        allocator_minus_replay_peak=out["recorded_step_peak"] - peak,
        allocator_minus_replay_initial=out["allocated_before_recorded_step"] - initial,
        allocs_in_step=len(allocs),
        allocs_labelled=len(labels),
        live_at_peak_top=top,
        live_at_peak_groups=grouped(items, 3 * args.top),
        _items=items,
    )
    return out


def run_estimate(cfg, method: str, kw: dict[str, Any], args, res: dict[str, Any]) -> None:
    from grass_llm.memory import estimate_memory
    from grass_llm.memory.estimate import cuda_gpu

    t0 = time.time()
    ekw = dict(kw)
    if args.dry_run:  # the CPU step has no host/device split, no foreach/fused kernels, no cuBLAS workspace
        ekw.update(optimizer_impl="for-loop", gpu=None)
    else:
        ekw["gpu"] = cuda_gpu()
    est = estimate_memory(cfg, method, steps=args.steps, peak_detail=True, **ekw)
    storages = est.extra.pop("peak_storages")
    items = [dict(d, mib=mib(d["bytes"]), group=group_key(d["origin"], d["category"])) for d in storages]
    res["estimate"] = {
        "peak": est.peak,
        "breakdown": est.breakdown(),
        "seconds": round(time.time() - t0, 1),
        "extra": est.extra,
        "live_at_peak_top": items[: args.top],
        "live_at_peak_groups": grouped(items, 3 * args.top),
    }
    res["_estimate_items"] = items
    log(f"estimate: {mib(est.peak)} MiB ({res['estimate']['seconds']} s)")


def write(res: dict[str, Any], args) -> None:
    """The result so far (a stage killed by its timeout still leaves what it had)."""
    if args.out is None:
        return
    clean = {k: v for k, v in res.items() if not k.startswith("_")}
    if "device_run" in clean:
        clean["device_run"] = {k: v for k, v in clean["device_run"].items() if not k.startswith("_")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(clean, indent=1, default=str) + "\n")
    tmp.replace(args.out)


# ------------------------------------------------------------------------------------------------
# cuBLAS workspaces
def cublas_probe(args) -> dict[str, Any]:
    """What one bf16 matmul forward + backward leaves allocated, step by step, in a fresh process."""
    import threading

    dev = torch.device("cuda")
    torch.cuda.init()
    if args.stacks:
        torch.cuda.memory._record_memory_history(
            **history_kwargs(enabled="all", context="alloc", stacks=args.stacks, max_entries=100000)
        )
    alloc = lambda: int(torch.cuda.memory_allocated(dev))  # noqa: E731
    n = 1024
    steps: list[dict[str, Any]] = []

    def mark(what: str, tensor_bytes: int) -> None:
        torch.cuda.synchronize(dev)
        now = alloc()
        prev = steps[-1]["allocated"] if steps else 0
        steps.append(
            {
                "step": what,
                "allocated": now,
                "delta": now - prev,
                "tensor_bytes": tensor_bytes,
                "unexplained_mib": mib(now - prev - tensor_bytes),
            }
        )
        log(
            f"{what:55s} allocated {mib(now):9.3f} MiB  delta {mib(now - prev):8.3f}  of which not tensors "
            f"{mib(now - prev - tensor_bytes):8.3f} MiB"
        )

    mark("start", 0)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16, requires_grad=True)
    mark("a, b (2 x 2 MiB bf16)", 2 * n * n * 2)
    c = a @ b
    mark("c = a @ b (main thread, default stream)", n * n * 2)
    c.backward(torch.ones_like(c))
    mark("c.backward(ones) (autograd's device thread)", 2 * n * n * 2)  # a.grad, b.grad (ones freed)
    c2 = a @ b
    c2.backward(torch.ones_like(c2))
    del c2
    mark("again: forward + backward (grads accumulate in place)", 0)
    lin = torch.nn.functional.linear(a, b, torch.zeros(n, device=dev, dtype=torch.bfloat16))
    mark("F.linear with bias (addmm: cuBLASLt)", n * n * 2 + 512 * ((n * 2 + 511) // 512))
    s = torch.cuda.Stream(dev)
    with torch.cuda.stream(s):
        d = a @ b
    s.synchronize()
    mark("a @ b on a side stream", n * n * 2)
    results: list[torch.Tensor] = []
    th = threading.Thread(target=lambda: results.append(a @ b))
    th.start()
    th.join()
    mark("a @ b on a new Python thread", n * n * 2)
    res: dict[str, Any] = {"steps": steps}
    if args.stacks:  # every block live now, the tensors named: the others are workspaces
        tensors = [(a, "a"), (b, "b"), (a.grad, "a.grad"), (b.grad, "b.grad"), (c, "c"), (lin, "linear out")]
        tensors += [(d, "d"), (results[0], "thread out")]
        known = {t.data_ptr(): name for t, name in tensors}
        live = live_blocks(torch.cuda.memory._snapshot())
        res["live_blocks"] = sorted(
            (
                {
                    "bytes": v["block_size"],
                    "mib": mib(v["block_size"]),
                    "tensor": known.get(addr),
                    "frames": trim_frames(v["frames"], 12),
                }
                for addr, v in live.items()
            ),
            key=lambda d_: -d_["bytes"],
        )[:20]
        for blk in res["live_blocks"]:
            if blk["tensor"] is None:
                log(f"not a tensor: {blk['mib']} MiB allocated by {blk['frames'][:6]}")
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    res["cleared_workspaces"] = callable(clear)
    if callable(clear):
        clear()
        mark("torch._C._cuda_clearCublasWorkspaces()", 0)
    if args.stacks:
        torch.cuda.memory._record_memory_history(enabled=None)
    return res


# ------------------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=tuple(MODELS), default="tiny", help="model shape (default tiny)")
    p.add_argument("--method", default="grass", help="a grass-llm train method (default grass)")
    p.add_argument("--active-layers", type=int, default=None, help="gamma of the layer-wise methods")
    p.add_argument("--rank", type=int, default=128, help="LoRA / DoRA rank (default 128)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--activation-checkpointing", choices=("none", "full", "frozen"), default="none")
    p.add_argument("--optimizer-impl", choices=("auto", "fused", "foreach", "for-loop"), default="auto")
    p.add_argument("--phase", choices=("train", "probe"), default="train")
    p.add_argument("--steps", type=int, default=2, help="steps before the recorded one (default 2)")
    p.add_argument("--top", type=int, default=25, help="largest blocks listed (default 25)")
    p.add_argument("--max-entries", type=int, default=2_000_000, help="allocator history ring buffer")
    p.add_argument(
        "--stacks", choices=("python", "all"), default="python", help="stacks recorded: python, or all (+C++)"
    )
    p.add_argument("--skip-estimate", action="store_true", help="the device run only")
    p.add_argument("--cublas-probe", action="store_true", help="measure cuBLAS workspaces instead")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model of the same family, no GPU")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="grass-llm train settings")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    warnings.simplefilter("ignore")
    started = time.time()
    if not args.dry_run and not torch.cuda.is_available():
        print("memory_diagnose: error: no CUDA device; --dry-run runs the script on the CPU", file=sys.stderr)
        return 2
    for name in ("steps", "top", "seq_len", "batch_size", "max_entries"):
        if getattr(args, name) < 1:
            print(f"memory_diagnose: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    dev = torch.device("cpu" if args.dry_run else "cuda")
    res: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "environment": environment(dev)}
    if args.cublas_probe:
        if args.dry_run:
            print("memory_diagnose: error: --cublas-probe needs a GPU", file=sys.stderr)
            return 2
        res["cublas_probe"] = cublas_probe(args)
        res["seconds"] = round(time.time() - started, 1)
        write(res, args)
        return 0
    from grass_llm.memory import MemoryEstimateError, methods
    from grass_llm.memory.cli import parse_overrides

    if args.method not in methods():
        print(
            f"memory_diagnose: error: --method {args.method!r}; allowed: {', '.join(methods())}",
            file=sys.stderr,
        )
        return 2
    try:
        overrides = parse_overrides(args.overrides)
    except MemoryEstimateError as e:
        print(f"memory_diagnose: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:  # the CPU step holds everything on one device (no offload)
        overrides.setdefault("grass.offload", False)
    seq = min(args.seq_len, 64) if args.dry_run else args.seq_len
    args.seq_len = seq
    kw = dict(
        active_layers=args.active_layers,
        rank=args.rank,
        batch_size=args.batch_size,
        seq_len=seq,
        dtype=args.dtype,
        activation_checkpointing=args.activation_checkpointing,
        optimizer_impl=args.optimizer_impl,
        overrides=overrides,
        phase=args.phase,
    )
    cfg = config_for(args.model, args.dry_run)
    res["setting"] = {
        "model": args.model,
        "config": cfg._name_or_path,
        "method": args.method,
        **{k: v for k, v in kw.items()},
        "steps": args.steps,
        "dry_run": args.dry_run,
    }
    log(f"{args.model} {args.method} {kw}")
    try:
        run_device(cfg, args.method, kw, args, res, dev)
    except MemoryEstimateError as e:
        print(f"memory_diagnose: error: {e}", file=sys.stderr)
        return 2
    if not args.skip_estimate:
        run_estimate(cfg, args.method, kw, args, res)
        measured = res["device_run"].get("measured")
        peak = res["estimate"]["peak"]
        res["summary"] = {
            "measured_mib": mib(measured),
            "estimate_mib": mib(peak),
            "measured_minus_estimate_mib": mib(measured - peak) if measured is not None else None,
            "relative_error": None if not measured else round((peak - measured) / measured, 4),
            "tracker_on_device_step_mib": mib(res["device_run"].get("tracker_peak")),
            # the same step recorded without and with the labelling dispatch mode (max_memory_allocated)
            "plain_recorded_step_mib": mib(res["device_run"].get("plain_step", {}).get("recorded_step_peak")),
            "labelled_recorded_step_mib": mib(res["device_run"].get("recorded_step_peak")),
        }
        items = res["device_run"].pop("_items", None)
        if items is not None:
            res["diff_live_at_peak"] = diff_groups(items, res.pop("_estimate_items"), 2 * args.top)
        log(f"summary: {res['summary']}")
        for row in res.get("diff_live_at_peak", [])[:15]:
            log(f"  {row['cuda_minus_estimate_mib']:+10.2f} MiB  {row['group']}")
    res["seconds"] = round(time.time() - started, 1)
    write(res, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
