"""Does MGN-adaptive layer sampling beat uniform sampling when everything else is equal? A seeded,
paired accuracy study of GRASS against GRASS-uniform, GRASS*, LISA, LoRA, FFT and BAdam, on 2 CPU cores.

Commands (the committed results, ``benchmarks/results/accuracy/``)::

    nice -n 10 python benchmarks/accuracy.py --workers 1 --seeds 6                       # main study (accuracy.md)
    nice -n 10 python benchmarks/accuracy.py --workers 1 --seeds 6 --study sensitivity   # sensitivity.md

(6 test seeds: the protocol's amendment for the compute limit, see benchmarks/README.md.)

The protocol (model, tasks, methods, LR selection, seeds, the primary comparison and how it is
judged) is written in ``benchmarks/README.md`` ("Accuracy"), fixed before the committed runs.

No model hub is reachable here, so the script pretrains its own Llama-shaped model (12 decoder layers,
hidden 48; embeddings + head 6% of the parameters) on a synthetic corpus (``accuracy_tasks.py``),
caches it under ``runs/bench/accuracy/``, and fine-tunes copies of it on two tasks with each method.

Determinism: every number is a function of the command and the commit. Before torch is imported
the script pins the CPU numerics that differ between machines of one kind (ATen's vector ISA and
MKL's code path: ``CPU_NUMERICS``), runs torch with a fixed thread count (``--threads``, default 1),
seeds every run (data order, LoRA init, layer sampling) from its seed alone, and names the starting
weights by the sha256 of the pretrained state dict, recorded in the results. The pretrained cache is
keyed by everything the weights depend on (the settings, the token stream of the corpus, the
pretraining code version, torch / transformers versions, threads, the pinned numerics) and the
sha256 is verified on every load. ``--workers`` changes the wall time, not the numbers.
"""

from __future__ import annotations

import os

from cpu_numerics import CPU_NUMERICS, pin

if __name__ == "__main__":
    pin()  # before torch loads

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import platform
import random
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accuracy_tasks import (
    ATTRIBUTES,
    FACTS,
    TASK_INFO,
    TASKS,
    THINGS,
    WordTokenizer,
    collate,
    encode_task,
    pretrain_corpus,
    prompt_ids,
    task_splits,
    unknown_tokens,
    world,
)
from common import REPO_ROOT, clip, command_line, count_params, hardware, load_average, make_method

from grass_llm.evaluate import NUMBER_TOLERANCE, extract_choice, extract_number, greedy_generate
from grass_llm.recipes.methods import METHODS as REGISTRY
from grass_llm.recipes.methods import Method, register_method
from grass_llm.schedule import LRSchedule, resolve_warmup

RESULTS = Path(__file__).resolve().parent / "results" / "accuracy"
CACHE = REPO_ROOT / "runs" / "bench" / "accuracy"
#: bump when pretrain() changes what it computes (part of the cache key)
PRETRAIN_VERSION = 3

# ------------------------------------------------------------------------------------------------
# methods
# The primary control: GRASS with uniform sampling and everything else equal (gamma, Ts, trained groups,
# the probing phase and its budget). Benchmark-local, registered like any method.
if "grass-uniform" not in REGISTRY:
    register_method(
        Method(
            "grass-uniform",
            "GRASS with uniform layer sampling (everything else as grass: probing, period, trained groups)",
            "gamma uniformly sampled decoder layers",
            3e-5,
            grass={},
            grass_fixed={"policy": "uniform"},
        )
    )


@dataclass(frozen=True)
class Arm:
    """A method of the study: how it is built and where its LR grid is centred."""

    name: str
    label: str
    lr_ratio: float  # LR grid centre / FFT's (the paper's Table 9 ratios; 3x for the block methods)
    registry: str | None  # grass-llm method name; None: the BAdam package
    grass: Callable[[Settings], dict[str, Any]] | None = None  # grass.* settings given to the method


def _grass_settings(s: Settings) -> dict[str, Any]:
    return {
        "active_layers": s.gamma,
        "period": s.period,
        "probe_steps": s.probe,
        "temperature": s.temperature,
    }


ARMS = {
    a.name: a
    for a in (
        Arm("grass", "GRASS", 3.0, "grass", _grass_settings),
        Arm("grass-uniform", "GRASS-uniform", 3.0, "grass-uniform", _grass_settings),
        Arm("grass-static", "GRASS*", 3.0, "grass-static", _grass_settings),
        Arm("lisa", "LISA", 5.0, "lisa", lambda s: {"active_layers": s.gamma, "period": s.lisa_period}),
        Arm("lora", "LoRA", 10.0, "lora"),
        Arm("fft", "FFT", 1.0, "fft"),
        Arm("badam-pkg", "BAdam (badam package)", 3.0, None),
        Arm("badam", "BAdam-style (grass-llm cyclic)", 3.0, "badam", lambda s: {"period": s.badam_period}),
    )
}
#: (A, B) comparisons reported as paired differences A - B; the first is the primary one
COMPARISONS = [
    ("grass", "grass-uniform"),
    ("grass", "grass-static"),
    ("grass", "lisa"),
    ("grass", "lora"),
    ("grass", "fft"),
    ("grass", "badam-pkg"),
    ("grass", "badam"),
]


def badam_available() -> str | None:
    """None when the ``badam`` package imports, else why not (the BAdam row is then skipped)."""
    try:
        import badam  # noqa: F401
    except ImportError as e:
        return f"package badam not installed ({e}); pip install 'grass-llm[bench]' to add the row"
    return None


# ------------------------------------------------------------------------------------------------
# settings
@dataclass
class Settings:
    # the pretrained model
    layers: int = 12
    hidden: int = 48
    intermediate: int = 128
    heads: int = 4
    corpus: tuple[int, int, int, int] = (8000, 4000, 4000, 2000)  # world, facts, stories, quiz documents
    pretrain_steps: int = 1200
    pretrain_batch: int = 32
    pretrain_len: int = 64
    pretrain_lr: float = 3e-3
    pretrain_seed: int = 0
    # fine-tuning, the same for every method
    tasks: tuple[str, ...] = TASKS
    steps: int = 150
    batch: int = 8
    warmup: float = 0.05
    n_train: int = 1600
    n_val: int = 200
    n_test: int = 400
    n_val_loss: int = 96  # validation records of the loss curve
    curve_points: int = 10
    max_new_tokens: int | None = None  # generation length; None: the task's (longer than any answer)
    # the methods
    gamma: int = 2
    period: int = 10  # GRASS Ts
    probe: int = 8  # GRASS Tp (inside the step budget)
    temperature: float = 1.0
    lisa_period: int = 4  # LISA's Ts: the paper's LISA/GRASS ratio 10/25
    badam_period: int = 12  # BAdam's K: steps // layers, so that one block epoch fits the budget
    lora_rank: int = 3  # rank / hidden = 1/16, TinyLlama's r=128 / 2048
    # learning-rate selection on validation, the same for every method
    lr_center_fft: float = 3e-3
    lr_grid: tuple[float, ...] = (1 / 3, 1.0, 3.0)
    lr_extend: int = 2  # grid points added beyond an end of the grid when the best LR is there
    select_seeds: tuple[int, ...] = (1000, 1001)
    seeds: tuple[int, ...] = tuple(range(10))
    methods: tuple[str, ...] = tuple(ARMS)
    # the sensitivity study (GRASS on one task)
    sens_task: str = "arith"
    sens_ts_gamma: tuple[tuple[int, int], ...] = tuple((ts, g) for g in (1, 2, 4) for ts in (3, 10, 30))
    sens_tp: tuple[int, ...] = (2, 4, 8, 15, 30)
    sens_temperature: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Settings:
        known = {f.name for f in dataclasses.fields(cls)}
        out = cls(**{k: v for k, v in d.items() if k in known})
        for f in dataclasses.fields(cls):  # JSON turned tuples into lists
            v = getattr(out, f.name)
            if isinstance(v, list):
                setattr(out, f.name, tuple(tuple(x) if isinstance(x, list) else x for x in v))
        return out


SMOKE = dict(
    layers=4,
    hidden=16,
    intermediate=32,
    heads=2,
    corpus=(40, 40, 40, 40),
    pretrain_steps=4,
    pretrain_batch=4,
    pretrain_len=32,
    steps=6,
    batch=4,
    n_train=24,
    n_val=6,
    n_test=8,
    n_val_loss=6,
    curve_points=2,
    max_new_tokens=4,
    period=2,
    probe=1,
    lisa_period=1,
    badam_period=2,
    lr_grid=(1.0,),
    select_seeds=(1000,),
    seeds=(0, 1),
    sens_ts_gamma=((2, 2), (1, 1)),
    sens_tp=(1,),
    sens_temperature=(1.0, 2.0),
)


# ------------------------------------------------------------------------------------------------
# provenance
def numerics() -> dict[str, Any]:
    """What the bits depend on besides the code: threads, pinned numerics, library versions."""
    import transformers

    versions = {"torch": str(torch.__version__), "transformers": str(transformers.__version__)}
    for name in ("peft", "badam", "numpy"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[name] = version(name)
    flags = ""
    with contextlib.suppress(OSError):
        flags = next(
            (ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), ""
        )
    return {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_has_avx512": " avx512f" in flags,
        "env": {k: os.environ.get(k) for k in (*CPU_NUMERICS, "OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        "pinned": all(os.environ.get(k) == v for k, v in CPU_NUMERICS.items()),
        "python": platform.python_version(),
        "versions": versions,
    }


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict: every tensor's name, dtype, shape and bytes, in key order."""
    h = hashlib.sha256()
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# the pretrained model
def build_model(s: Settings, vocab: int, seed: int):
    from grass_llm.recipes.models import tiny_llama

    return tiny_llama(
        vocab,
        s.hidden,
        s.layers,
        s.intermediate,
        s.heads,
        max_positions=128,
        seed=seed,
        pad_token_id=WordTokenizer.PAD,
        eos_token_id=WordTokenizer.EOS,
        bos_token_id=WordTokenizer.EOS,
    )


def corpus_and_tokenizer(s: Settings) -> tuple[list[str], WordTokenizer, torch.Tensor]:
    docs = pretrain_corpus(*s.corpus)
    tok = WordTokenizer.build(docs)
    stream: list[int] = []
    for d in docs:
        stream.extend([*tok.encode(d), tok.EOS])
    return docs, tok, torch.tensor(stream)


def pretrain(s: Settings, cache: Path, log=print) -> tuple[Path, dict[str, Any]]:
    """The cached pretrained model (path of the blob, info with the weights' sha256); trains it when
    no blob matches the key."""
    docs, tok, data = corpus_and_tokenizer(s)
    num = numerics()
    key = {
        "model": [s.layers, s.hidden, s.intermediate, s.heads],
        "steps": [s.pretrain_steps, s.pretrain_batch, s.pretrain_len, s.pretrain_lr, s.pretrain_seed],
        "corpus_sha256": hashlib.sha256(data.numpy().tobytes() + "\n".join(tok.vocab).encode()).hexdigest(),
        "version": PRETRAIN_VERSION,
        "torch": num["versions"]["torch"],
        "transformers": num["versions"]["transformers"],
        "threads": num["torch_threads"],
        "numerics": num["env"],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"pretrained-{digest}.pt"
    if path.exists():
        blob = torch.load(path, weights_only=True)
        sha = state_sha256(blob["model"])
        if sha != blob["info"]["weights_sha256"] or blob["vocab"] != tok.vocab:
            raise RuntimeError(
                f"{path}: the cached weights do not match their recorded sha256; delete the file"
            )
        log(f"pretrained model {path.name} loaded (weights sha256 {sha[:16]})")
        return path, {**blob["info"], "cached": True}
    log(f"pretraining {digest}: {len(docs)} documents, {len(data):,} tokens, vocab {len(tok)}")
    model = build_model(s, len(tok), s.pretrain_seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=s.pretrain_lr, weight_decay=0.01)
    schedule = LRSchedule("linear", resolve_warmup(0.05, s.pretrain_steps), s.pretrain_steps)
    gen = torch.Generator().manual_seed(s.pretrain_seed)
    t0 = time.perf_counter()
    losses: list[float] = []
    for step in range(s.pretrain_steps):
        for g in opt.param_groups:
            g["lr"] = s.pretrain_lr * schedule(step)
        starts = torch.randint(0, len(data) - s.pretrain_len - 1, (s.pretrain_batch,), generator=gen)
        batch = torch.stack([data[i : i + s.pretrain_len] for i in starts.tolist()])  # (B, T)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0 or step == s.pretrain_steps - 1:
            log(f"  pretrain step {step}: loss {losses[-1]:.3f} ({time.perf_counter() - t0:.0f} s)")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    info = {
        "key": key,
        "digest": digest,
        "weights_sha256": state_sha256(state),
        "tokens": len(data),
        "documents": len(docs),
        "vocab": len(tok),
        "final_loss": statistics.fmean(losses[-20:]),
        "seconds": time.perf_counter() - t0,
        "params": count_params(model),
        "embeddings_head_params": model.get_input_embeddings().weight.numel()
        + model.get_output_embeddings().weight.numel(),
        "path": str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path),
    }
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": state, "vocab": tok.vocab, "info": info}, tmp)
    tmp.replace(path)
    return path, {**info, "cached": False}


@torch.no_grad()
def knowledge(model, tok: WordTokenizer) -> dict[str, float]:
    """What the pretrained model knows: % of arithmetic facts and of world facts it completes (greedy)."""
    prompts = [tok.encode(f.split("=")[0] + "=") for f in FACTS]
    outs = greedy_generate(model, prompts, tok.PAD, None, 3, len(prompts))
    facts = 0
    for f, new in zip(FACTS, outs):
        got = re.match(r"\s*\d+", tok.decode(new) + " ")
        facts += got is not None and int(got.group()) == int(f.split("=")[1])
    w = world()
    lead = {"color": "the color of the {t} is", "place": "the {t} is found in the", "kind": "the {t} is a kind of",
            "size": "the size of the {t} is"}  # fmt: skip
    items = [(tok.encode(lead[a].format(t=t)), w[t][a]) for t in THINGS for a in ATTRIBUTES]
    outs = greedy_generate(model, [p for p, _ in items], tok.PAD, None, 1, len(items))
    known = sum(tok.decode(o).strip() == v for (_, v), o in zip(items, outs))
    return {"arithmetic_facts": 100.0 * facts / len(FACTS), "world_facts": 100.0 * known / len(items)}


# ------------------------------------------------------------------------------------------------
# one fine-tuning run
@dataclass(frozen=True)
class Spec:
    """One fine-tuning run. ``purpose``: select (scored on validation) or test."""

    task: str
    method: str
    lr: float
    seed: int
    purpose: str
    overrides: tuple[tuple[str, Any], ...] = ()  # grass.* settings replacing the arm's (sensitivity)
    config: str = ""  # label of the sensitivity configuration

    @property
    def key(self) -> tuple:
        return (self.task, self.method, self.config, self.purpose, self.lr, self.seed)


_CTX: dict[str, Any] = {}


def load_context(s: Settings, blob_path: Path) -> dict[str, Any]:
    blob = torch.load(blob_path, weights_only=True)
    tok = WordTokenizer(blob["vocab"])
    model = build_model(s, len(tok), s.pretrain_seed)
    model.load_state_dict(blob["model"])
    data = {}
    for task in s.tasks:
        train, val, test = task_splits(task, s.n_train, s.n_val, s.n_test)
        data[task] = {
            "train": [encode_task(tok, r) for r in train],
            "val": val,
            "test": test,
            "val_loss": collate([encode_task(tok, r) for r in val[: s.n_val_loss]]),
        }
    return {"settings": s, "model": model, "tok": tok, "data": data}


def _init_worker(settings: dict[str, Any], blob_path: str, threads: int) -> None:
    torch.set_num_threads(threads)
    _CTX.update(load_context(Settings.from_dict(settings), Path(blob_path)))


def _run_in_worker(spec: Spec) -> tuple[Spec, dict[str, Any]]:
    return spec, finetune(_CTX, spec)


def build_arm(spec: Spec, s: Settings, model):
    """(model, optimizer, description of what trains) for the run's method."""
    arm = ARMS[spec.method]
    if arm.registry is None:  # BAdam through its public API
        from badam import BlockOptimizer

        base = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "BAdam expect model to be loaded in fp16/bf16": fp32 here
            opt = BlockOptimizer(
                base_optimizer=base,
                named_parameters_list=list(model.named_parameters()),
                switch_block_every=s.badam_period,
                switch_mode="random",
                verbose=0,
            )
        return model, opt
    grass = {**(arm.grass(s) if arm.grass else {}), **dict(spec.overrides)}
    with warnings.catch_warnings():
        # peft reads model.is_gradient_checkpointing, which transformers 5 deprecates (not ours to fix)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return make_method(
            arm.registry, model, spec.lr, lora_rank=s.lora_rank, max_grad_norm=1.0, seed=spec.seed, **grass
        )


def layer_mgn(groups, num_layers: int) -> list[float]:
    """Eq. 2's observation per decoder layer from the current gradients: sqrt(||g_l||^2 / N_l)."""
    out = []
    for i in range(num_layers):
        gs = [p.grad for p in groups.block_params[i] if p.grad is not None]
        sq = sum(float(g.double().square().sum()) for g in gs)
        out.append(math.sqrt(sq / groups.numel(i)))
    return out


@torch.no_grad()
def val_loss(model, batch: dict[str, torch.Tensor]) -> float:
    was = model.training
    model.eval()
    loss = model(**batch, use_cache=False).loss.item()
    model.train(was)
    return loss


@torch.no_grad()
def score(
    model, tok: WordTokenizer, task: str, records: list[dict], max_new_tokens: int | None = None
) -> dict[str, Any]:
    """Greedy decoding; LLM-Adapters' rules: last number (arith), first option named (common)."""
    info = TASK_INFO[task]
    prompts = [prompt_ids(tok, r) for r in records]
    outs = greedy_generate(model, prompts, tok.PAD, tok.EOS, max_new_tokens or info.max_new_tokens, 200)
    correct, by_kind, samples = 0, {}, []
    for rec, new in zip(records, outs):
        response = tok.decode(new).strip()
        if info.rule == "number":
            pred = extract_number(response)
            ok = pred is not None and abs(pred - float(rec["answer"])) <= NUMBER_TOLERANCE
        else:
            ok = extract_choice(response, rec["options"].split()) == rec["answer"]
        correct += ok
        c, n = by_kind.get(rec["kind"], (0, 0))
        by_kind[rec["kind"]] = (c + ok, n + 1)
        if len(samples) < 2:
            samples.append({"prompt": rec["instruction"], "response": response, "gold": rec["answer"]})
    return {
        "accuracy": 100.0 * correct / len(records),
        "by_kind": {k: 100.0 * c / n for k, (c, n) in sorted(by_kind.items())},
        "samples": samples,
    }


def finetune(ctx: dict[str, Any], spec: Spec) -> dict[str, Any]:
    """Fine-tune a copy of the pretrained model for ``s.steps`` optimizer steps; score it."""
    from grass_llm import GrassOptimizer
    from grass_llm.layers import discover_layers

    s: Settings = ctx["settings"]
    tok, data = ctx["tok"], ctx["data"][spec.task]
    torch.manual_seed(spec.seed)  # LoRA init, BAdam's block order
    model = copy.deepcopy(ctx["model"])
    model, opt = build_arm(spec, s, model)
    model.train()
    grass_opt = opt if isinstance(opt, GrassOptimizer) else None
    # the schedule starts after probing, whichever method probes (keyed on the optimizer, not the name)
    probe = grass_opt.config.probe_steps if grass_opt is not None else 0
    updates = s.steps - probe
    schedule = LRSchedule("linear", resolve_warmup(s.warmup, updates), s.steps, delay_steps=probe)
    groups = discover_layers(model) if spec.method == "fft" else None
    encoded = data["train"]
    order = list(range(len(encoded)))
    rng = random.Random(spec.seed)
    rng.shuffle(order)
    every = max(1, s.steps // s.curve_points)
    curve: list[tuple[int, float]] = [(0, val_loss(model, data["val_loss"]))]
    mgn_windows: list[list[float]] = []
    window: list[list[float]] = []
    trained_steps = [0] * s.layers
    mgn_history: list[list[float]] = []
    losses: list[float] = []
    quiet = (
        contextlib.redirect_stdout(io.StringIO())
        if ARMS[spec.method].registry is None
        else contextlib.nullcontext()
    )
    t0 = time.perf_counter()
    pos = 0
    with quiet:
        for step in range(s.steps):
            if pos + s.batch > len(order):
                rng.shuffle(order)
                pos = 0
            batch = collate([encoded[i] for i in order[pos : pos + s.batch]])  # (B, T) each
            pos += s.batch
            for g in opt.param_groups:
                g["lr"] = spec.lr * schedule(step)
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            if groups is not None:
                window.append(layer_mgn(groups, s.layers))
            if grass_opt is not None and not grass_opt.probing:
                for i in grass_opt.active_layers:
                    trained_steps[i] += 1
            clip(model, opt, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if grass_opt is not None and (
                step + 1 == probe or (step + 1 > probe and (step + 1 - probe) % grass_opt.config.period == 0)
            ):
                mgn_history.append([round(float(x), 6) for x in grass_opt.importance])
            if (step + 1) % every == 0 or step + 1 == s.steps:
                curve.append((step + 1, val_loss(model, data["val_loss"])))
                if window:
                    mgn_windows.append([statistics.fmean(col) for col in zip(*window)])
                    window = []
    seconds = time.perf_counter() - t0
    records = data["val"] if spec.purpose == "select" else data["test"]
    result = {
        **asdict(spec),
        **score(model, tok, spec.task, records, s.max_new_tokens),
        "scored_on": "validation" if spec.purpose == "select" else "test",
        "final_train_loss": statistics.fmean(losses[-10:]),
        "val_loss_curve": curve,
        "seconds": seconds,
        "trainable_params": count_params(model, trainable_only=True),
    }
    if mgn_windows:
        result["fft_layer_mgn"] = mgn_windows
    if grass_opt is not None:
        result["trained_steps_per_layer"] = trained_steps
        result["mgn_history"] = mgn_history
        result["final_probabilities"] = [round(float(x), 6) for x in grass_opt.probabilities]
    return result


# ------------------------------------------------------------------------------------------------
# the studies
class Runner:
    """Runs specs in this process (workers=1) or in a pool of spawned processes; the numbers do not
    depend on which (each run depends on its spec alone)."""

    def __init__(self, ctx: dict[str, Any], blob: Path, workers: int, threads: int, log) -> None:
        self.log, self.done, self.t0 = log, 0, time.perf_counter()
        self.cache: dict[tuple, dict[str, Any]] = {}
        self.loads: list[float | None] = []  # 1-minute load average after each run
        self.pool = None
        if workers > 1:
            mp = multiprocessing.get_context("spawn")
            self.pool = mp.Pool(workers, _init_worker, (asdict(ctx["settings"]), str(blob), threads))
        else:
            _CTX.update(ctx)

    def run(self, specs: Iterable[Spec]) -> list[dict[str, Any]]:
        todo = [sp for sp in dict.fromkeys(specs) if sp.key not in self.cache]
        results = self.pool.imap_unordered(_run_in_worker, todo) if self.pool else map(_run_in_worker, todo)
        for spec, r in results:
            self.cache[spec.key] = r
            self.done += 1
            self.loads.append(load_average())
            self.log(
                f"[{self.done} runs, {(time.perf_counter() - self.t0) / 60:.1f} min] {r['task']} {r['method']}"
                f"{' ' + r['config'] if r['config'] else ''} lr {r['lr']:.1e} seed {r['seed']}: "
                f"{r['scored_on']} {r['accuracy']:.1f}% (train loss {r['final_train_loss']:.3f}, {r['seconds']:.1f} s)"
            )
        return [self.cache[sp.key] for sp in specs]

    def close(self) -> None:
        if self.pool:
            self.pool.close()
            self.pool.join()


def select_lr(runner: Runner, s: Settings, pairs: list[tuple[str, str, tuple, str]]) -> tuple[dict, list]:
    """LR of each (task, method, overrides, config) by validation accuracy, mean over the selection
    seeds (ties: lower final validation loss). The grid is ``lr_grid`` around the arm's centre; when
    the best LR is at an end, the grid is extended past it, up to ``lr_extend`` points."""
    grids = {p: [s.lr_center_fft * ARMS[p[1]].lr_ratio * f for f in s.lr_grid] for p in pairs}
    step = (s.lr_grid[-1] / s.lr_grid[0]) ** (1 / max(1, len(s.lr_grid) - 1)) if len(s.lr_grid) > 1 else 1.0
    extended = dict.fromkeys(pairs, 0)
    chosen: dict[tuple, float] = {}
    rows: list[dict[str, Any]] = []
    pending = list(pairs)
    while pending:
        specs = [
            Spec(t, m, lr, seed, "select", ov, cfg)
            for (t, m, ov, cfg) in pending
            for lr in grids[(t, m, ov, cfg)]
            for seed in s.select_seeds
        ]
        if len(s.lr_grid) > 1:
            runner.run(specs)
        nxt = []
        for p in pending:
            t, m, ov, cfg = p
            scores = []
            for lr in sorted(grids[p]):
                if len(s.lr_grid) == 1:
                    scores.append((lr, None, None))
                    continue
                rs = [runner.cache[Spec(t, m, lr, seed, "select", ov, cfg).key] for seed in s.select_seeds]
                acc = statistics.fmean(r["accuracy"] for r in rs)
                loss = statistics.fmean(r["val_loss_curve"][-1][1] for r in rs)
                scores.append((lr, acc, loss))
            best = max(scores, key=lambda x: (x[1], -x[2])) if len(scores) > 1 else scores[0]
            lrs = [x[0] for x in scores]
            edge = best[0] in (lrs[0], lrs[-1]) and len(lrs) > 1
            if edge and extended[p] < s.lr_extend:
                grids[p] = [*grids[p], best[0] * step if best[0] == lrs[-1] else best[0] / step]
                extended[p] += 1
                nxt.append(p)
                continue
            chosen[p] = best[0]
            rows.append(
                {"task": t, "method": m, "config": cfg, "chosen": best[0], "at_edge": edge,
                 "grid": [{"lr": lr, "val_accuracy": a, "val_loss": lo} for lr, a, lo in scores]}
            )  # fmt: skip
        pending = nxt
    return chosen, rows


def main_study(runner: Runner, s: Settings, methods: list[str]) -> dict[str, Any]:
    pairs = [(t, m, (), "") for t in s.tasks for m in methods]
    chosen, selection = select_lr(runner, s, pairs)
    specs = [
        Spec(t, m, chosen[(t, m, (), "")], seed, "test") for t in s.tasks for m in methods for seed in s.seeds
    ]
    runs = runner.run(specs)
    return {"selection": selection, "runs": runs}


def sensitivity_configs(s: Settings) -> list[tuple[str, tuple[tuple[str, Any], ...]]]:
    """(label, grass.* overrides) of the sensitivity study. A configuration equal to the default is
    the default's runs (label "")."""
    default = _grass_settings(s)
    out = [(f"Ts={ts} gamma={g}", (("period", ts), ("active_layers", g))) for ts, g in s.sens_ts_gamma]
    out += [(f"Tp={tp}", (("probe_steps", tp),)) for tp in s.sens_tp]
    out += [(f"tau={tau:g}", (("temperature", tau),)) for tau in s.sens_temperature]
    return [(label, ov) if any(default[k] != v for k, v in ov) else ("", ()) for label, ov in out]


def sensitivity_study(runner: Runner, s: Settings) -> dict[str, Any]:
    """GRASS on ``sens_task`` at the LR the main study's procedure chooses for it, one configuration
    changed at a time (Table 6: Ts x gamma, Table 10: Tp, and the temperature)."""
    task = s.sens_task
    chosen, selection = select_lr(runner, s, [(task, "grass", (), "")])
    lr = chosen[(task, "grass", (), "")]
    configs = [("", ()), *sensitivity_configs(s)]  # the default first
    specs = [
        Spec(task, "grass", lr, seed, "test", ov, cfg)
        for cfg, ov in dict.fromkeys(configs)
        for seed in s.seeds
    ]
    runs = runner.run(specs)
    return {"selection": selection, "runs": runs, "lr": lr, "task": task}


# ------------------------------------------------------------------------------------------------
def _load_summary(loads: list[float | None]) -> dict[str, float]:
    xs = [x for x in loads if x is not None]
    if not xs:
        return {}
    return {"load_avg_min": min(xs), "load_avg_mean": round(statistics.fmean(xs), 2), "load_avg_max": max(xs)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--study", choices=["main", "sensitivity", "all", "pretrain"], default="main",
                   help="main: every method on both tasks (accuracy.md); sensitivity: GRASS's Ts x gamma, Tp and "
                   "temperature on one task (sensitivity.md); all: both; pretrain: only build (or verify) the "
                   "cached pretrained model and print what it knows")  # fmt: skip
    p.add_argument("--methods", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ", ".join(TASKS))
    p.add_argument(
        "--sens-task",
        choices=TASKS,
        default=Settings.sens_task,
        help=f"task of the sensitivity study (default {Settings.sens_task})",
    )
    p.add_argument("--seeds", type=int, default=None, help="test seeds 0..n-1 (default 10)")
    p.add_argument(
        "--steps", type=int, default=None, help=f"fine-tuning steps per run (default {Settings.steps})"
    )
    p.add_argument(
        "--workers", type=int, default=1, help="runs in parallel processes (the numbers do not change)"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (part of the result's identity)"
    )
    p.add_argument("--cache", type=Path, default=CACHE, help="where the pretrained model is cached")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the reports, JSON and plots")
    p.add_argument("--smoke", action="store_true", help="tiny everything: checks the script runs (seconds)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = Settings(**SMOKE) if args.smoke else Settings()
    methods = [m for m in args.methods.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    bad = [m for m in methods if m not in ARMS] + [t for t in tasks if t not in TASKS]
    if bad or args.workers < 1 or args.threads < 1 or (args.seeds is not None and args.seeds < 2):
        print(
            f"error: unknown methods/tasks {bad} (allowed: {', '.join(ARMS)}; {', '.join(TASKS)}), "
            "or --workers/--threads < 1, or --seeds < 2",
            file=sys.stderr,
        )
        return 2
    skipped = {}
    if "badam-pkg" in methods and (why := badam_available()):
        methods.remove("badam-pkg")
        skipped["badam-pkg"] = why
        print(f"skipping badam-pkg: {why}")
    s.methods, s.tasks, s.sens_task = tuple(methods), tuple(tasks), args.sens_task
    if args.study in ("sensitivity", "all") and s.sens_task not in s.tasks:
        s.tasks = (*s.tasks, s.sens_task)
    if args.seeds:
        s.seeds = tuple(range(args.seeds))
    if args.steps:
        s.steps = args.steps
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    hw = hardware(torch.device("cpu"))
    hw["workers"] = args.workers
    cache = args.cache / ("smoke" if args.smoke else "")
    blob, pre = pretrain(s, cache)
    ctx = load_context(s, blob)
    base = {"knowledge": knowledge(ctx["model"], ctx["tok"])}
    for t in s.tasks:
        d = task_splits(t, s.n_train, s.n_val, s.n_test)
        base[t] = {
            "no_finetune": score(ctx["model"], ctx["tok"], t, ctx["data"][t]["test"], s.max_new_tokens)[
                "accuracy"
            ],
            "unknown_tokens": unknown_tokens(ctx["tok"], d[0] + d[1] + d[2]),
        }
    print(f"pretrained model: weights sha256 {pre['weights_sha256']}, {base}")
    if args.study == "pretrain":
        return 0
    runner = Runner(ctx, blob, args.workers, args.threads, print)
    header = {
        "command": command_line(),
        "hardware": hw,
        "numerics": numerics(),
        "settings": asdict(s),
        "pretrain": pre,
        "base": base,
        "skipped": skipped,
        "smoke": args.smoke,
    }
    from accuracy_report import plot_main, render_main, render_sensitivity

    args.out.mkdir(parents=True, exist_ok=True)
    try:
        if args.study in ("main", "all"):
            t0 = time.perf_counter()
            res = {**header, **main_study(runner, s, methods), "comparisons": COMPARISONS}
            res["wall_seconds"] = time.perf_counter() - t0
            res["hardware"] = {**hw, "load_avg_end": load_average(), **_load_summary(runner.loads)}
            runner.loads = []
            res["plots"] = plot_main(res, args.out)
            (args.out / "accuracy.json").write_text(json.dumps(res, indent=1) + "\n")
            (args.out / "accuracy.md").write_text(render_main(res))
            print((args.out / "accuracy.md").read_text())
        if args.study in ("sensitivity", "all"):
            t0 = time.perf_counter()
            res = {**header, **sensitivity_study(runner, s)}
            res["wall_seconds"] = time.perf_counter() - t0
            res["hardware"] = {**hw, "load_avg_end": load_average(), **_load_summary(runner.loads)}
            (args.out / "sensitivity.json").write_text(json.dumps(res, indent=1) + "\n")
            (args.out / "sensitivity.md").write_text(render_sensitivity(res))
            print((args.out / "sensitivity.md").read_text())
    finally:
        runner.close()
    print(f"total wall time {(time.perf_counter() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
