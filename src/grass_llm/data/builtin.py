"""The built-in demo data and tokenizer: a small arithmetic sample, held-out questions, the pretraining
corpus of ``builtin:tiny-pretrained``, and a byte-level tokenizer built in memory (no download)."""

from __future__ import annotations

import random

from grass_llm.data.prompt import PROMPT_PHRASES, format_prompt

__all__ = ["builtin_corpus", "builtin_facts", "builtin_heldout", "builtin_sample", "builtin_tokenizer"]

_HIGH = 12  # operands of the built-in arithmetic: 0..12
_OPS = (("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b))


def _arith_record(a: int, sym: str, b: int, result: int) -> dict[str, str]:
    return {
        "instruction": f"What is {a} {sym} {b}?",
        "input": "",
        "output": f"{a} {sym} {b} = {result}. The answer is {result}",
        "answer": str(result),
    }


def builtin_sample(n: int = 64, seed: int = 0) -> list[dict[str, str]]:
    """``n`` small arithmetic instruction records, generated deterministically (for the demo and tests).

    Example: ``{"instruction": "What is 3 + 5?", "input": "", "output": "3 + 5 = 8. The answer is 8",
    "answer": "8"}``. Operations are +, - and * on numbers 0..12 (``-`` may go negative).
    """
    rng = random.Random(seed)
    records = []
    for i in range(n):
        sym, fn = _OPS[i % len(_OPS)]
        a, b = rng.randint(0, _HIGH), rng.randint(0, _HIGH)
        records.append(_arith_record(a, sym, b, fn(a, b)))
    return records


def builtin_heldout(n: int = 64, seed: int = 1) -> list[dict[str, str]]:
    """``n`` arithmetic questions like ``builtin_sample``'s that are not in ``builtin_sample()`` (the
    training sample of ``data=builtin:arith``), for the held-out accuracy of the demo (``eval_heldout``).
    Deterministic: the first ``n`` of a fixed order."""
    seen = {r["instruction"] for r in builtin_sample()}
    rng = random.Random(seed)
    pool = [(a, sym, b, fn(a, b)) for sym, fn in _OPS for a in range(_HIGH + 1) for b in range(_HIGH + 1)]
    rng.shuffle(pool)
    records = [_arith_record(*q) for q in pool if f"What is {q[0]} {q[1]} {q[2]}?" not in seen]
    if n > len(records):
        raise ValueError(f"builtin_heldout: n={n} is invalid; allowed: at most {len(records)}")
    return records[:n]


def builtin_facts() -> list[str]:
    """Every fact ``"a op b = c"`` of the built-in arithmetic: a, b in 0..12, op in +, -, * (507 lines)."""
    return [
        f"{a} {sym} {b} = {fn(a, b)}" for sym, fn in _OPS for a in range(_HIGH + 1) for b in range(_HIGH + 1)
    ]


def builtin_corpus(seed: int = 0) -> list[str]:
    """The pretraining text of ``builtin:tiny-pretrained`` (``scripts/pretrain_tiny.py``), shuffled.

    * every fact of :func:`builtin_facts` as a plain-text question and answer, three times:
      ``"What is 7 * 8? 7 * 8 = 56. The answer is 56"`` (what the model knows: arithmetic, as text on
      the web);
    * 300 instruction records of OTHER tasks in the Alpaca prompt format (``format_prompt``), answered
      "... The answer is N": "What number comes after / before N?" and "Which is larger, a or b?"
      (N, a, b in 0..99). This is how the model knows the prompt format.

    Never in it: an arithmetic question in the prompt format. Answering those ("What is 7 * 8?" ->
    "7 * 8 = 56. The answer is 56") is what the demo's fine-tuning on ``builtin_sample`` teaches.
    """
    rng = random.Random(seed)
    qa = [f"What is {f.split(' =')[0]}? {f}. The answer is {f.rsplit('= ', 1)[1]}" for f in builtin_facts()]
    tasks: list[tuple[str, str]] = []
    while len(tasks) < 300:
        kind, n, m = rng.randrange(3), rng.randint(0, 99), rng.randint(0, 99)
        if kind == 0:
            tasks.append((f"What number comes after {n}?", f"After {n} comes {n + 1}. The answer is {n + 1}"))
        elif kind == 1:
            tasks.append(
                (f"What number comes before {n}?", f"Before {n} comes {n - 1}. The answer is {n - 1}")
            )
        elif n != m:
            hi, lo = max(n, m), min(n, m)
            tasks.append((f"Which is larger, {n} or {m}?", f"{hi} is larger than {lo}. The answer is {hi}"))
    docs = qa * 3 + [format_prompt({"instruction": q, "output": o}) for q, o in tasks]
    rng.shuffle(docs)
    return docs


def builtin_tokenizer(padding_side: str = "right"):
    """A tiny byte-level tokenizer built in memory: for the demo and tests only, never for real models.

    Every UTF-8 byte is one token (256 tokens, no merges) plus ``<pad>`` (id 0), ``<eos>`` (id 1)
    and ``<unk>`` (id 2), plus one token for each fixed phrase of the prompt template (the two
    header sentences, the ``### ...:`` markers and the 16-space indent): any text round-trips
    through ``decode`` exactly, with no download, and a prompt costs about 30 tokens. It is
    a ``transformers`` fast tokenizer, so ``save_pretrained`` / ``AutoTokenizer.from_pretrained``,
    ``__call__`` with padding, ``decode`` and ``padding_side`` all work. Size it with ``len(tok)``.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    # The prompt template's fixed phrases as single tokens, so a prompt costs ~30 tokens, not ~230.
    backend.add_tokens([AddedToken(t, normalized=False, single_word=False) for t in PROMPT_PHRASES])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side=padding_side,
        model_max_length=1 << 20,
    )
