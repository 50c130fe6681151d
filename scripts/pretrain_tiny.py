"""Pretrain the tiny Llama shipped with grass-llm (``model=builtin:tiny-pretrained``, the demo's model).

Command (the committed asset was written with ``--out`` a temporary path and copied into the package; the
path does not change the bytes; 36 minutes on one thread of a shared 2-core machine)::

    python scripts/pretrain_tiny.py

It writes ``src/grass_llm/assets/tiny-pretrained.safetensors`` (the weights, fp32) and
``tiny-pretrained.json`` (the model's shape for ``grass_llm.models.tiny_llama``, the weights'
SHA-256, and how they were made: this command, the corpus, the schedule, the final loss, the
accuracy on the arithmetic facts, versions, hardware, date). ``load_tiny_pretrained`` refuses
weights that do not match the recorded checksum; ``tests/test_pretrain_asset.py`` checks the shipped
pair and runs this script for a few steps.

Reproducible: fixed seeds, one CPU thread, a fixed number of steps, no wall-clock dependence; the same
torch build on the same CPU gives the same bytes (another CPU or torch version may round differently).

What it learns, from ``grass_llm.data.builtin_corpus`` (byte-level ``builtin_tokenizer``): arithmetic as
plain text ("What is 7 * 8? 7 * 8 = 56. The answer is 56"; a, b in 0..12; +, -, *) and the Alpaca prompt
format on OTHER instruction tasks (counting, comparing). It has never seen an arithmetic question in the
prompt format: fine-tuning on the built-in sample teaches it, and ``grass-llm train`` shows the held-out
accuracy before -> after.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import platform
import random
import re
import shlex
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "src" / "grass_llm" / "assets" / "tiny-pretrained"

# the model: builtin:tiny's shape (8 decoder layers, so that GRASS has layers to choose from)
SHAPE = {"hidden_size": 64, "num_layers": 8, "intermediate_size": 128, "num_heads": 4, "max_positions": 512}


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def facts_accuracy(model, tok) -> float:
    """Greedy continuation of ``a op b =`` for every fact of the corpus: % whose first number is ``c``."""
    from grass_llm.data import builtin_facts
    from grass_llm.evaluate import greedy_generate

    facts = builtin_facts()
    prompts = [tok(f.rsplit("=", 1)[0] + "=")["input_ids"] for f in facts]
    outs = greedy_generate(model, prompts, tok.pad_token_id, tok.eos_token_id, 6, 128)
    ok = 0
    for o, f in zip(outs, facts):
        found = re.match(r"\s*(-?\d+)", tok.decode(o, skip_special_tokens=True))
        ok += found is not None and found.group(1) == f.rsplit("= ", 1)[1]
    return 100.0 * ok / len(facts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="asset path without suffix (default: %(default)s)"
    )
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="rows per step (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row (default %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default %(default)s)")
    p.add_argument(
        "--hidden", type=int, default=SHAPE["hidden_size"], help="hidden size (default %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from grass_llm.data import builtin_corpus, builtin_tokenizer
    from grass_llm.models import tiny_llama

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    tok = builtin_tokenizer()
    docs = builtin_corpus(seed=args.seed)
    stream: list[int] = []
    for d in docs:
        stream += [*tok(d)["input_ids"], tok.eos_token_id]
    data = torch.tensor(stream)
    spec = {
        "vocab_size": len(tok),
        **SHAPE,
        "hidden_size": args.hidden,
        "intermediate_size": 2 * args.hidden,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    model = tiny_llama(**spec, seed=args.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    warmup = max(1, args.steps // 30)
    t0 = time.perf_counter()
    loss_value = float("nan")
    print(
        f"pretraining: {len(docs)} documents, {len(stream)} tokens, {args.steps} steps of {args.batch} x {args.seq_len}"
    )
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup)
        starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([data[i : i + args.seq_len] for i in starts.tolist()])  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"  step {step}: loss {loss_value:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    seconds = time.perf_counter() - t0
    model.eval()
    facts = facts_accuracy(model, tok)
    print(f"facts accuracy: {facts:.1f}%")

    from safetensors.torch import save

    blob = save(
        {k: v.detach().contiguous() for k, v in model.state_dict().items()}, metadata={"format": "pt"}
    )
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".safetensors").write_bytes(blob)
    import transformers

    record = {
        "model": spec,
        "dtype": "float32",
        "sha256": hashlib.sha256(blob).hexdigest(),
        "bytes": len(blob),
        "params": sum(p.numel() for p in model.parameters()),
        "pretraining": {
            "command": shlex.join(
                ["python", "scripts/pretrain_tiny.py", *(argv if argv is not None else sys.argv[1:])]
            ),
            "corpus": f"grass_llm.data.builtin_corpus(seed={args.seed})",
            "documents": len(docs),
            "tokens": len(stream),
            "steps": args.steps,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "lr": args.lr,
            "schedule": f"linear warmup {warmup} steps, cosine to 10%",
            "optimizer": "AdamW(weight_decay=0.01), clip 1.0",
            "seed": args.seed,
            "final_loss": round(loss_value, 4),
            "facts_accuracy_percent": round(facts, 2),
            "seconds": round(seconds, 1),
        },
        "made_with": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, 1 thread",
            "date": datetime.date.today().isoformat(),
        },
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out.with_suffix('.safetensors')} ({len(blob)} bytes, sha256 {record['sha256'][:16]}...)")
    return 0


if __name__ == "__main__":
    random.seed(0)
    sys.exit(main())
