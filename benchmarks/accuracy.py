"""Accuracy of GRASS, GRASS*, LISA, LoRA and FFT fine-tuning a small PRETRAINED model, on 2 CPU cores.

Command (the committed results, benchmarks/results/accuracy.md)::

    nice -n 10 python benchmarks/accuracy.py

No model hub is reachable here, so the pretrained starting point is built by this script, reproducibly
(fixed seeds, fixed step counts, no wall-clock dependence) and cached under ``runs/bench/accuracy/``:

1. Tokenizer: word-level, with every digit a token of its own (as in Llama's tokenizer), built from
   the pretraining corpus (tokens seen at least twice). ``<pad>``, ``<eos>``, ``<unk>`` specials.
2. Pretraining corpus (corpus A, plain text, no prompt format):
   - the question + rationale text of LLM-Adapters' ``ft-training_set/math_data.json`` (3,260 word
     problems: English, numbers, "The answer is N." endings);
   - synthetic equation lines ``a + b = c`` (a, b in 0..9) and ``x - y = z`` (x in 0..18, y in 0..9,
     y <= x): the arithmetic "facts" the fine-tuning task needs;
   - number-free sentences built from the task's word lists ("Mia likes pens. Mia buys pens at the
     store."), so that every word of the task has a pretrained embedding, as in a real LLM.
   math_data records are written in the Alpaca prompt format (``format_prompt``), as instruction
   data found in a real pretraining corpus, so the prompt's tokens are pretrained too.
3. Model: Llama-shaped, 8 decoder layers, hidden 64, MLP 176, 4 heads (about 0.6M parameters),
   pretrained from scratch with AdamW for a fixed number of steps (600 x 32 x 48 tokens).

Fine-tuning task (task B, synthetic, in the LLM-Adapters math format): one- and two-step word
problems whose ``output`` is a math_10k-style rationale ending in "The answer is N."; e.g.
"Mia has 7 pens. She buys 5 more. How many pens does Mia have now?" ->
"7 + 5 = 12. The answer is 12." The model has to map the problem to an equation (which numbers,
which order, which operator) and recall the fact it saw in pretraining. Prompts are
``grass_llm.data.format_prompt`` (Alpaca, no input), loss on the response only (+ EOS). Train,
validation and test sets are disjoint (by full text). Scoring: ``grass_llm.evaluate`` rules for the
arithmetic sets: greedy decoding, the last number of the response, correct within 1e-3.

Methods, all from the same pretrained weights, with the SAME number of optimizer steps (GRASS's
probing steps count inside the budget, as in the paper), batch size, LR schedule (5% warmup, linear
decay; for GRASS the schedule starts after probing) and gradient clipping at 1.0:

- fft: AdamW on every parameter; lora: peft r=4 (rank/hidden 1/16, TinyLlama r128's ratio),
  alpha 8, q/k/v/up/down; lisa: gamma=2, Ts=budget/25 (paper: 10 vs GRASS's 25), embeddings + head
  trained; grass: gamma=2, Ts=budget/10, Tp=5% of budget, adaptive; grass-static (GRASS*): same, with
  the probabilities fixed after probing.
- Learning rates: the paper's Table 9 TinyLlama-arithmetic ratios to FFT (LoRA 10x, LISA 5x,
  GRASS and GRASS* 3x), with FFT's LR from a 3-point sweep (1/3x, 1x, 3x of 1e-3; seed 0) scored on
  the VALIDATION set (``--sweep all`` sweeps every method the same way, about twice the time). The
  chosen LRs then run with every seed and are scored on TEST, which no choice ever looks at.
- Seeds change the fine-tuning data order, LoRA init and layer sampling; the pretrained model is the
  same for all runs (one pretraining seed).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import random
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import (
    REPO_ROOT,
    clip,
    command_line,
    count_params,
    hardware,
    hardware_lines,
    make_method,
    write_results,
)

from grass_llm.data import default_data_dir, format_prompt
from grass_llm.evaluate import NUMBER_TOLERANCE, extract_response, greedy_generate

try:  # the shipped LLM-Adapters extraction rule
    from grass_llm.evaluate import extract_number
except ImportError:  # pragma: no cover
    extract_number = None

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = REPO_ROOT / "runs" / "bench" / "accuracy"
METHODS = ("fft", "lora", "lisa", "grass", "grass-static")
#: Table 9, TinyLlama arithmetic: FFT 1e-5, LoRA 1e-4, LISA 5e-5, GRASS 3e-5 -> ratios to FFT
PAPER_LR_RATIO = {"fft": 1.0, "lora": 10.0, "lisa": 5.0, "grass": 3.0, "grass-static": 3.0}
#: ablations of GRASS (not run by default; ``--methods``): what LISA does differently, one at a time
ABLATIONS = {
    "grass+emb+head": ("grass", {"train_embeddings": True, "train_head": True}),  # LISA's trained set
    "grass-lisa-ts": ("grass", {"period": "lisa"}),  # LISA's (shorter) sampling period
}
PAPER_LR_RATIO.update({name: PAPER_LR_RATIO[base] for name, (base, _) in ABLATIONS.items()})

NAMES = ["Mia", "Tom", "Ana", "Ben", "Lily", "Sam", "Emma", "Jack", "Nina", "Max", "Sara", "Leo"]
PRONOUN = {n: ("She" if n in {"Mia", "Ana", "Lily", "Emma", "Nina", "Sara"} else "He") for n in NAMES}
FACTS = [f"{a} + {b} = {a + b}" for a in range(10) for b in range(10)]
FACTS += [f"{x} - {y} = {x - y}" for x in range(19) for y in range(10) if y <= x]
OBJECTS = ["apples", "pens", "books", "marbles", "cookies", "stickers", "cards", "balls", "shells", "toys"]


# ------------------------------------------------------------------------------------------------
# settings
@dataclass
class Settings:
    layers: int = 8
    hidden: int = 64
    intermediate: int = 176
    heads: int = 4
    min_count: int = 10  # tokenizer: tokens seen at least this often in the pretraining corpus
    corpus: tuple[int, int, int] = (1500, 6000, 1500)  # math_data records, fact documents, vocab documents
    pretrain_steps: int = 600
    pretrain_batch: int = 32
    pretrain_len: int = 48
    pretrain_lr: float = 3e-3
    pretrain_seed: int = 0
    steps: int = 100  # fine-tuning budget (optimizer steps) for every method
    batch: int = 16
    n_train: int = 1600
    n_val: int = 150
    n_test: int = 300
    lr_center_fft: float = 1e-3
    sweep: tuple[float, ...] = (1 / 3, 1.0, 3.0)
    sweep_methods: str = "fft"  # fft: sweep FFT, others by the paper's ratios; all: sweep every method
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    lora_rank: int = 4
    max_new_tokens: int = 28
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def period(self) -> int:
        return max(1, self.steps // 10)

    @property
    def lisa_period(self) -> int:
        return max(1, self.steps // 25)

    @property
    def probe(self) -> int:
        return max(1, round(0.05 * self.steps))


SMOKE = dict(
    layers=4,
    hidden=32,
    intermediate=64,
    heads=2,
    pretrain_steps=4,
    pretrain_batch=4,
    steps=6,
    batch=4,
    n_train=32,
    n_val=8,
    n_test=8,
    sweep=(1.0,),
    seeds=(0,),
    max_new_tokens=12,
    corpus=(50, 50, 50),
    min_count=2,
)


# ------------------------------------------------------------------------------------------------
# tokenizer
_TOKEN_RE = re.compile(r" ?\d| ?[A-Za-z]+| ?[^\sA-Za-z\d]|\n| +")


class WordTokenizer:
    """Word-level tokenizer; digits are single tokens; a leading space belongs to the token."""

    PAD, EOS, UNK = 0, 1, 2

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = vocab
        self.index = {t: i for i, t in enumerate(vocab)}

    @classmethod
    def build(cls, texts: list[str], min_count: int = 2) -> WordTokenizer:
        counts = collections.Counter(t for text in texts for t in _TOKEN_RE.findall(text))
        words = sorted(t for t, c in counts.items() if c >= min_count)
        return cls(["<pad>", "<eos>", "<unk>", *words])

    def encode(self, text: str) -> list[int]:
        return [self.index.get(t, self.UNK) for t in _TOKEN_RE.findall(text)]

    def decode(self, ids: list[int]) -> str:
        out = []
        for i in ids:
            if i == self.EOS:
                break
            if i != self.PAD:
                out.append(self.vocab[i])
        return "".join(out)

    def __len__(self) -> int:
        return len(self.vocab)


# ------------------------------------------------------------------------------------------------
# data
def problem(rng: random.Random) -> dict[str, str]:
    """One word problem in LLM-Adapters' math format (instruction, empty input, rationale, answer)."""
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    pron = PRONOUN[name]
    kind = rng.choice(["add", "sub", "together", "two-step"])
    if kind == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        q = f"{name} has {a} {obj}. {pron} buys {b} more. How many {obj} does {name} have now?"
        out, ans = f"{a} + {b} = {a + b}. The answer is {a + b}.", a + b
    elif kind == "together":
        other = rng.choice([n for n in NAMES if n != name])
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        q = f"{name} has {a} {obj} and {other} has {b} {obj}. How many {obj} do they have together?"
        out, ans = f"{a} + {b} = {a + b}. The answer is {a + b}.", a + b
    elif kind == "sub":
        b = rng.randint(0, 9)
        a = rng.randint(b, 18)
        q = f"{name} has {a} {obj}. {pron} gives {b} to a friend. How many {obj} does {name} have left?"
        out, ans = f"{a} - {b} = {a - b}. The answer is {a - b}.", a - b
    else:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        c = rng.randint(0, min(9, a + b))
        s = a + b
        q = (
            f"{name} has {a} {obj}. {pron} buys {b} more and then gives {c} to a friend. "
            f"How many {obj} does {name} have left?"
        )
        out, ans = f"{a} + {b} = {s}. {s} - {c} = {s - c}. The answer is {s - c}.", s - c
    return {"instruction": q, "input": "", "output": out, "answer": str(ans), "kind": kind}


def task_splits(s: Settings) -> tuple[list[dict], list[dict], list[dict]]:
    """Disjoint (by instruction text) train / validation / test sets, from fixed seeds."""
    seen: set[str] = set()
    splits = []
    for n, seed in ((s.n_test, 101), (s.n_val, 102), (s.n_train, 103)):
        rng, out = random.Random(seed), []
        while len(out) < n:
            rec = problem(rng)
            if rec["instruction"] not in seen:
                seen.add(rec["instruction"])
                out.append(rec)
        splits.append(out)
    test, val, train = splits
    return train, val, test


def pretrain_corpus(
    data_dir: Path, n_math: int = 1500, n_facts: int = 6000, n_vocab: int = 1500
) -> list[str]:
    """Documents of corpus A (see the module docstring)."""
    rng = random.Random(7)
    docs = []
    path = data_dir / "llm-adapters" / "ft-training_set" / "math_data.json"
    records = json.loads(path.read_text())
    for rec in rng.sample(records, min(n_math, len(records))):
        rec = {
            "instruction": rec["instruction"].strip(),
            "input": rec["input"],
            "output": rec["output"].strip(),
        }
        docs.append(format_prompt(rec))
    for _ in range(n_facts):
        docs.append("\n".join(rng.sample(FACTS, 8)))
    verbs = [
        "likes {o}.",
        "buys {o} at the store.",
        "gives {o} to a friend.",
        "has {o} at home.",
        "sees {o}.",
    ]
    for _ in range(n_vocab):
        name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
        other = rng.choice(NAMES)
        parts = [
            f"{name} {rng.choice(verbs).format(o=obj)}",
            f"{PRONOUN[name]} {rng.choice(verbs).format(o=obj)}",
        ]
        parts.append(f"{name} and {other} have {obj} together. How many {obj} are left now?")
        rng.shuffle(parts)
        docs.append(" ".join(parts))
    rng.shuffle(docs)
    return docs


def encode_task(tok: WordTokenizer, rec: dict[str, str]) -> tuple[list[int], list[int]]:
    """(input_ids, labels): Alpaca prompt + response + EOS, loss on the response and EOS only."""
    prompt = tok.encode(format_prompt(rec, with_response=False))
    full = [*tok.encode(format_prompt(rec)), tok.EOS]
    assert full[: len(prompt)] == prompt, "prompt tokens must be a prefix of the full text's"
    return full, [-100] * len(prompt) + full[len(prompt) :]


def collate(items: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    n = max(len(x) for x, _ in items)
    ids = torch.full((len(items), n), WordTokenizer.PAD)
    labels = torch.full((len(items), n), -100)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for i, (x, y) in enumerate(items):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ------------------------------------------------------------------------------------------------
# model, pretraining
def build_model(s: Settings, vocab: int, seed: int):
    from grass_llm.recipes.models import tiny_llama

    return tiny_llama(
        vocab,
        s.hidden,
        s.layers,
        s.intermediate,
        s.heads,
        max_positions=256,
        seed=seed,
        pad_token_id=WordTokenizer.PAD,
        eos_token_id=WordTokenizer.EOS,
        bos_token_id=WordTokenizer.EOS,
        use_cache=False,
    )


def lr_factor(t: int, total: int, warmup: int) -> float:
    """Linear warmup then linear decay to 0 (t counts update steps from 0)."""
    if t < warmup:
        return (t + 1) / warmup
    return max(0.0, (total - t) / max(1, total - warmup))


def pretrain(
    s: Settings, data_dir: Path, cache: Path, log=print
) -> tuple[Any, WordTokenizer, dict[str, Any]]:
    """The pretrained model and tokenizer (cached by a hash of the settings that define them)."""
    key = {k: getattr(s, k) for k in ("layers", "hidden", "intermediate", "heads")}
    key.update(
        {k: getattr(s, k) for k in ("pretrain_steps", "pretrain_batch", "pretrain_len", "pretrain_lr")}
    )
    key.update(min_count=s.min_count, corpus=list(s.corpus))
    key["seed"] = s.pretrain_seed
    key["version"] = 1
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = cache / f"pretrained-{digest}.pt"
    docs = pretrain_corpus(data_dir, *s.corpus)
    tok = WordTokenizer.build(docs, s.min_count)
    if path.exists():
        blob = torch.load(path, weights_only=False)
        assert blob["vocab"] == tok.vocab
        model = build_model(s, len(tok), s.pretrain_seed)
        model.load_state_dict(blob["model"])
        log(f"pretrained model loaded from {path}")
        return model, tok, blob["info"]
    log(f"pretraining {digest}: {len(docs)} documents, vocab {len(tok)}, {s.pretrain_steps} steps")
    stream: list[int] = []
    for d in docs:
        stream.extend([*tok.encode(d), tok.EOS])
    data = torch.tensor(stream)
    model = build_model(s, len(tok), s.pretrain_seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=s.pretrain_lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(s.pretrain_seed)
    t0 = time.perf_counter()
    warm = max(1, s.pretrain_steps // 20)
    loss_val = float("nan")
    for step in range(s.pretrain_steps):
        for g in opt.param_groups:
            g["lr"] = s.pretrain_lr * lr_factor(step, s.pretrain_steps, warm)
        starts = torch.randint(0, len(data) - s.pretrain_len - 1, (s.pretrain_batch,), generator=gen)
        batch = torch.stack([data[i : i + s.pretrain_len] for i in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_val = loss.item()
        if step % 100 == 0 or step == s.pretrain_steps - 1:
            log(f"  pretrain step {step}: loss {loss_val:.3f} ({time.perf_counter() - t0:.0f} s)")
    info = {
        "digest": digest,
        "tokens": len(stream),
        "documents": len(docs),
        "vocab": len(tok),
        "final_loss": loss_val,
        "seconds": time.perf_counter() - t0,
        "params": count_params(model),
        "path": str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path),
    }
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "vocab": tok.vocab, "info": info, "key": key}, path)
    return model, tok, info


# ------------------------------------------------------------------------------------------------
# fine-tuning, evaluation
def last_number(response: str) -> float | None:
    if extract_number is not None:
        return extract_number(response)
    found = re.findall(r"-?\d+\.?\d*", response.replace(",", ""))  # pragma: no cover
    return float(found[-1]) if found else None


@torch.no_grad()
def evaluate(model, tok: WordTokenizer, records: list[dict], max_new_tokens: int, batch: int = 100) -> dict:
    """Greedy decoding (``grass_llm.evaluate.greedy_generate``); LLM-Adapters' last-number rule."""
    correct, by_kind, samples = 0, collections.defaultdict(lambda: [0, 0]), []
    prompts = [tok.encode(format_prompt(r, with_response=False)) for r in records]
    outputs = greedy_generate(model, prompts, tok.PAD, tok.EOS, max_new_tokens, batch)
    for rec, new in zip(records, outputs):
        text = format_prompt(rec, with_response=False) + tok.decode(new)
        response = extract_response(text)
        pred = last_number(response)
        ok = pred is not None and abs(pred - float(rec["answer"])) <= NUMBER_TOLERANCE
        correct += ok
        by_kind[rec["kind"]][0] += ok
        by_kind[rec["kind"]][1] += 1
        if len(samples) < 3:
            samples.append({"question": rec["instruction"], "response": response, "gold": rec["answer"]})
    return {
        "accuracy": 100.0 * correct / len(records),
        "by_kind": {k: 100.0 * c / n for k, (c, n) in sorted(by_kind.items())},
        "samples": samples,
    }


@torch.no_grad()
def facts_accuracy(model, tok: WordTokenizer) -> float:
    """Share of the pretraining arithmetic facts the model completes correctly (greedy, 3 tokens)."""
    prompts = [tok.encode(f.split("=")[0] + "=") for f in FACTS]
    outputs = greedy_generate(model, prompts, tok.PAD, None, 3, len(prompts))  # no EOS: 3 tokens each
    correct = 0
    for f, new in zip(FACTS, outputs):
        got = re.match(r"\s*\d+", tok.decode(new) + " ")
        correct += got is not None and int(got.group()) == int(f.split("=")[1])
    return 100.0 * correct / len(FACTS)


def finetune(
    s: Settings, method: str, lr: float, seed: int, pretrained, tok, train: list[dict]
) -> tuple[Any, dict]:
    """Fine-tune a copy of the pretrained model for ``s.steps`` optimizer steps."""
    import copy

    from grass_llm import GrassOptimizer

    torch.manual_seed(seed)
    model = copy.deepcopy(pretrained)
    base, extra = ABLATIONS.get(method, (method, {}))
    extra = dict(extra)
    period = s.lisa_period if extra.pop("period", None) == "lisa" else s.period
    grass = {"active_layers": 2, **extra}
    if base in ("grass", "grass-static"):
        grass.update(period=period, probe_steps=s.probe)
    elif base == "lisa":
        grass.update(period=s.lisa_period)
    model, opt = make_method(base, model, lr, lora_rank=s.lora_rank, max_grad_norm=1.0, seed=seed, **grass)
    model.train()
    encoded = [encode_task(tok, r) for r in train]
    order = list(range(len(encoded)))
    rng = random.Random(seed)
    rng.shuffle(order)
    probe = s.probe if base in ("grass", "grass-static") else 0
    updates = s.steps - probe
    warm = max(1, round(0.05 * updates))
    t0 = time.perf_counter()
    losses, pos = [], 0
    for step in range(s.steps):
        if pos + s.batch > len(order):
            rng.shuffle(order)
            pos = 0
        batch = collate([encoded[i] for i in order[pos : pos + s.batch]])
        pos += s.batch
        t = step - probe  # update-step index; the schedule starts after probing
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(max(t, 0), updates, warm)
        loss = model(**batch).loss
        loss.backward()
        clip(model, opt, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    info: dict[str, Any] = {
        "seconds": time.perf_counter() - t0,
        "final_loss": statistics.fmean(losses[-10:]),
        "trainable": count_params(model, trainable_only=True),
    }
    if isinstance(opt, GrassOptimizer):
        info["importance"] = [round(float(x), 5) for x in opt.importance]
        info["trainable"] = "2 layers" + (" + emb + head" if opt.config.train_head else "")
    return model, info


# ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per method (0..n-1)")
    p.add_argument(
        "--steps", type=int, default=None, help=f"fine-tuning step budget (default {Settings.steps})"
    )
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated subset of " + ", ".join(METHODS) + "; GRASS ablations: " + ", ".join(ABLATIONS),
    )
    p.add_argument(
        "--sweep",
        choices=["fft", "all", "none"],
        default="fft",
        help="LR sweep on validation: fft (others by the paper's ratios), all methods, or none (centres)",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared machine)"
    )
    p.add_argument("--data-dir", type=Path, default=None, help="shared data root (default: GRASS_DATA_DIR)")
    p.add_argument("--cache", type=Path, default=CACHE, help="where the pretrained model is cached")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for accuracy.md / accuracy.json")
    p.add_argument("--smoke", action="store_true", help="tiny everything: checks the script runs")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    s = Settings(**SMOKE) if args.smoke else Settings()
    if not args.smoke:
        s.seeds = tuple(range(args.seeds))
    if args.steps:
        s.steps = args.steps
    s.methods = tuple(m for m in args.methods.split(",") if m)
    unknown = set(s.methods) - set(METHODS) - set(ABLATIONS)
    if unknown:
        print(f"error: unknown methods {sorted(unknown)}", file=sys.stderr)
        return 2
    if args.sweep == "none":
        s.sweep = (1.0,)
    s.sweep_methods = args.sweep
    data_dir = args.data_dir or default_data_dir() or REPO_ROOT.parent / "shared" / "data"
    t_start = time.perf_counter()
    hw = hardware(torch.device("cpu"))

    pretrained, tok, pre_info = pretrain(s, data_dir, args.cache / ("smoke" if args.smoke else ""))
    train, val, test = task_splits(s)
    unk = sum(t == tok.UNK for r in train + val + test for t in encode_task(tok, r)[0])
    print(f"task: {len(train)} train / {len(val)} val / {len(test)} test, <unk> tokens in task data: {unk}")
    base_eval = evaluate(pretrained, tok, test, s.max_new_tokens)
    print(f"pretrained model, no fine-tuning: test accuracy {base_eval['accuracy']:.1f}%")

    facts_acc = facts_accuracy(pretrained, tok)
    print(f"pretrained model completes {facts_acc:.1f}% of the arithmetic facts")

    # 1. LR sweep on validation, seed 0 (FFT only: the others keep the paper's ratios to FFT's LR)
    sweep_rows: list[dict] = []
    swept = [m for m in (METHODS if s.sweep_methods == "all" else ("fft",)) if len(s.sweep) > 1]
    best_factor = {}
    for m in swept:
        center = s.lr_center_fft * PAPER_LR_RATIO[m]
        best = None
        for f in s.sweep:
            model, info = finetune(s, m, center * f, 0, pretrained, tok, train)
            acc = evaluate(model, tok, val, s.max_new_tokens)["accuracy"]
            sweep_rows.append(
                {"method": m, "lr": center * f, "val_accuracy": acc, "seconds": info["seconds"]}
            )
            print(f"sweep {m} lr {center * f:.2e}: val {acc:.1f}% ({info['seconds']:.0f} s)")
            if best is None or acc > best[0]:
                best = (acc, f)
        best_factor[m] = best[1]
    chosen = {}
    for m in s.methods:
        f = best_factor.get(m, best_factor.get("fft", 1.0))
        chosen[m] = s.lr_center_fft * PAPER_LR_RATIO[m] * f

    # 2. every method x seed at its chosen LR, scored on test
    runs = []
    for seed in s.seeds:
        for m in s.methods:
            model, info = finetune(s, m, chosen[m], seed, pretrained, tok, train)
            ev = evaluate(model, tok, test, s.max_new_tokens)
            runs.append({"method": m, "seed": seed, "lr": chosen[m], **info, **ev})
            print(
                f"{m} seed {seed}: test {ev['accuracy']:.1f}% loss {info['final_loss']:.3f} ({info['seconds']:.0f} s)"
            )

    result = {
        "command": command_line(),
        "hardware": hw,
        "settings": {**asdict(s), "period": s.period, "lisa_period": s.lisa_period, "probe": s.probe},
        "pretrain": pre_info,
        "no_finetune": base_eval,
        "facts_accuracy": facts_acc,
        "chosen_lr": chosen,
        "sweep": sweep_rows,
        "runs": runs,
        "wall_seconds": time.perf_counter() - t_start,
        "smoke": args.smoke,
    }
    md = render(result)
    write_results(args.out, "accuracy", result, md)
    print(md)
    return 0


def render(res: dict[str, Any]) -> str:
    s = res["settings"]
    pre = res["pretrain"]
    by_method: dict[str, list[dict]] = collections.defaultdict(list)
    for r in res["runs"]:
        by_method[r["method"]].append(r)
    lines = [
        "# Accuracy: GRASS vs GRASS*, LISA, LoRA, FFT on a small pretrained model (CPU)"
        + (" (SMOKE RUN: not a result)" if res["smoke"] else ""),
        "",
        "Command:",
        "",
        f"    {res['command']}",
        "",
        "Hardware:",
        "",
        *hardware_lines(res["hardware"]),
        f"- wall time of the whole benchmark: {res['wall_seconds'] / 60:.1f} min "
        f"(pretraining {pre['seconds'] / 60:.1f} min when not cached)",
        "",
        f"Pretrained model: Llama-shaped, {s['layers']} layers, hidden {s['hidden']}, MLP {s['intermediate']}, "
        f"{s['heads']} heads, vocab {pre['vocab']} (word-level, digits split), {pre['params'] / 1e6:.2f}M parameters; "
        f"pretrained {s['pretrain_steps']} steps x {s['pretrain_batch']} x {s['pretrain_len']} tokens on "
        f"math_data.json text + arithmetic facts + task-vocabulary sentences ({pre['tokens']:,} tokens), "
        f"final LM loss {pre['final_loss']:.3f}; it completes {res['facts_accuracy']:.1f}% of the {len(FACTS)} "
        f"arithmetic facts 'a + b =' / 'x - y =' correctly (greedy). Cached as {pre['path']}.",
        "",
        f"Task: synthetic one/two-step word problems in the LLM-Adapters math format (Alpaca prompt, "
        f"math_10k-style rationale ending 'The answer is N.'), {s['n_train']} train / {s['n_val']} validation / "
        f"{s['n_test']} test, disjoint. Score: LLM-Adapters arithmetic rule (last number of the response, "
        f"tolerance 1e-3), greedy decoding, at most {s['max_new_tokens']} new tokens. Pretrained model without "
        f"fine-tuning: {res['no_finetune']['accuracy']:.1f}%.",
        "",
        f"Budget: {s['steps']} optimizer steps x batch {s['batch']} for every method (GRASS's Tp = {s['probe']} "
        f"probing steps count inside it), 5% warmup + linear decay, clip 1.0, gamma = 2 of {s['layers']} layers, "
        f"GRASS Ts = {s['period']}, LISA Ts = {s['lisa_period']}, LoRA r = {s['lora_rank']} (alpha {2 * s['lora_rank']}, "
        f"q/k/v/up/down). Seeds: {', '.join(map(str, s['seeds']))} ({len(s['seeds'])} per method).",
        "",
        "| method | LR (chosen on validation) | test accuracy %, mean +- std over seeds | per seed | "
        "add / sub / together / two-step % (mean) | final train loss | s per run |",
        "|---|---:|---:|---|---|---:|---:|",
    ]
    for m, rs in by_method.items():
        accs = [r["accuracy"] for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        kinds = sorted(rs[0]["by_kind"])
        kind_means = " / ".join(f"{statistics.fmean(r['by_kind'][k] for r in rs):.1f}" for k in kinds)
        lines.append(
            f"| {m} | {rs[0]['lr']:.2e} | {statistics.fmean(accs):.1f} +- {std:.1f} | "
            f"{', '.join(f'{a:.1f}' for a in accs)} | {kind_means} | "
            f"{statistics.fmean(r['final_loss'] for r in rs):.3f} | {statistics.fmean(r['seconds'] for r in rs):.0f} |"
        )
    if res["sweep"]:
        lines += [
            "",
            "LR sweep (seed 0, validation accuracy %; methods not swept use the paper's ratio to FFT):",
            "",
        ]
        lines += ["| method | " + " | ".join(["LR -> val %"] * len(s["sweep"])) + " |"]
        lines += ["|---|" + "---|" * len(s["sweep"])]
        for m in dict.fromkeys(r["method"] for r in res["sweep"]):
            cells = [f"{r['lr']:.1e} -> {r['val_accuracy']:.1f}" for r in res["sweep"] if r["method"] == m]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
