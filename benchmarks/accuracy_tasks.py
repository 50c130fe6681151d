"""The synthetic world, pretraining corpus, tokenizer and the two fine-tuning tasks of ``accuracy.py``.

Everything here is a pure function of fixed seeds (``random.Random``), so the corpus, the vocabulary and
every split are the same on every machine.

* The world: 48 things (``lemon``, ``tiger``, ``hammer``...), each with a colour, a place, a kind and a
  size drawn at random once (seed 11). Random, so no fact can be guessed from another: a model knows a
  fact only if it read it in pretraining.
* Corpus A (pretraining, plain text): descriptions of every thing in several sentence templates and
  orders (the augmentation that lets a small model extract stored facts, Allen-Zhu & Li 2023),
  arithmetic facts ``a + b = c`` / ``x - y = z``, and short sentences about people and objects.
* Task ``arith`` (arithmetic reasoning, math_10k style): one- and two-step word problems; the response
  is the equation(s) and "the answer is N ."; scored with LLM-Adapters' last-number rule.
* Task ``common`` (commonsense style, as LLM-Adapters' SIQA / ARC / OBQA records): a question about a
  property of a thing with four options ``answer1``..``answer4``; the response is "the correct answer
  is answerK"; scored with LLM-Adapters' first-label rule. Train, validation and test ask about
  DISJOINT facts: a test question asks about a fact the model read in pretraining but was never asked
  about in fine-tuning, so fine-tuning must teach the model to retrieve what it knows.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

NAMES = ["Mia", "Tom", "Ana", "Ben", "Lily", "Sam", "Emma", "Jack", "Nina", "Max", "Sara", "Leo"]
PRONOUN = {n: ("she" if n in {"Mia", "Ana", "Lily", "Emma", "Nina", "Sara"} else "he") for n in NAMES}
OBJECTS = ["apples", "pens", "books", "marbles", "cookies", "stickers", "cards", "balls", "shells", "toys"]
FACTS = [f"{a} + {b} = {a + b}" for a in range(10) for b in range(10)]
FACTS += [f"{x} - {y} = {x - y}" for x in range(19) for y in range(10) if y <= x]

THINGS = [
    "lemon", "tiger", "hammer", "boat", "violin", "carrot", "owl", "kettle", "rocket", "tulip",
    "whale", "drum", "pillow", "cactus", "lamp", "zebra", "ladder", "candle", "spoon", "horse",
    "mango", "shark", "brush", "kite", "robot", "camel", "anchor", "basket", "bucket", "crown",
    "dragon", "feather", "guitar", "helmet", "igloo", "jacket", "koala", "magnet", "needle", "onion",
    "parrot", "quilt", "rabbit", "saddle", "teapot", "umbrella", "wagon", "yacht",
    "badger", "bottle", "cherry", "donkey", "engine", "fossil", "goose", "hammock", "jelly", "kitten",
    "lizard", "mitten", "noodle", "oyster", "peach", "pirate", "radio", "scarf", "tomato", "turtle",
    "vase", "walrus", "pepper", "zipper",
]  # fmt: skip
ATTRIBUTES = {
    "color": ["red", "yellow", "green", "blue", "brown", "white", "black", "pink"],
    "place": ["farm", "sea", "forest", "kitchen", "garage", "school", "garden", "desert"],
    "kind": ["animal", "food", "tool", "toy", "plant", "machine"],
    "size": ["tiny", "small", "big", "huge"],
}
#: pretraining sentence templates per attribute (several, so the fact is stored, not one string)
STATEMENTS = {
    "color": ["the {t} is {v} .", "a {t} has a {v} color .", "the color of the {t} is {v} ."],
    "place": [
        "the {t} is found in the {v} .",
        "you can see a {t} in the {v} .",
        "the {t} lives in the {v} .",
    ],
    "kind": ["the {t} is a kind of {v} .", "a {t} is a {v} .", "people say the {t} is a {v} ."],
    "size": ["the {t} is {v} .", "a {t} is a {v} thing .", "the size of the {t} is {v} ."],
}
#: fine-tuning questions (never seen in pretraining)
QUESTIONS = {
    "color": "what color is the {t} ?",
    "place": "where can you find the {t} ?",
    "kind": "what kind of thing is the {t} ?",
    "size": "how big is the {t} ?",
}
TASKS = ("arith", "common")
PROMPT = "Q : {q}\nA :"


def world() -> dict[str, dict[str, str]]:
    """thing -> attribute -> value, drawn once from seed 11."""
    rng = random.Random(11)
    return {t: {a: rng.choice(vals) for a, vals in ATTRIBUTES.items()} for t in THINGS}


# ------------------------------------------------------------------------------------------------
# tokenizer
_TOKEN_RE = re.compile(r" ?\d| ?[A-Za-z]+| ?[^\sA-Za-z\d]|\n| +")


class WordTokenizer:
    """Word-level tokenizer; every digit is a token of its own (as in Llama's); a leading space belongs
    to the token. ``<pad>``, ``<eos>``, ``<unk>`` specials."""

    PAD, EOS, UNK = 0, 1, 2

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = vocab
        self.index = {t: i for i, t in enumerate(vocab)}

    @classmethod
    def build(cls, texts: list[str]) -> WordTokenizer:
        words = sorted({t for text in texts for t in _TOKEN_RE.findall(text)})
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
# pretraining corpus
def story(rng: random.Random) -> str:
    """A short worked story: someone's count of objects changes, the equation and the result follow
    (the worked arithmetic a real pretraining corpus holds); no question."""
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    pron = PRONOUN[name]
    kind = rng.choice(["add", "sub", "together", "two-step"])
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if kind == "add":
        return f"{name} has {a} {obj} . {pron} buys {b} more . {a} + {b} = {a + b} . now {name} has {a + b} {obj} ."
    if kind == "together":
        other = rng.choice([n for n in NAMES if n != name])
        return (
            f"{name} has {a} {obj} and {other} has {b} {obj} . {a} + {b} = {a + b} . "
            f"together they have {a + b} {obj} ."
        )
    if kind == "sub":
        a = rng.randint(b, 18)
        return (
            f"{name} has {a} {obj} . {pron} gives {b} to a friend . {a} - {b} = {a - b} . "
            f"now {name} has {a - b} {obj} left ."
        )
    c = rng.randint(0, min(9, a + b))
    return (
        f"{name} has {a} {obj} . {pron} buys {b} more and then gives {c} to a friend . {a} + {b} = {a + b} . "
        f"{a + b} - {c} = {a + b - c} . now {name} has {a + b - c} {obj} left ."
    )


def pretrain_corpus(n_world: int, n_facts: int, n_people: int, n_quiz: int) -> list[str]:
    """Documents of corpus A: ``n_world`` descriptions of things, ``n_facts`` lists of 8 arithmetic
    facts, ``n_people`` short stories in which a count changes, ``n_quiz`` quiz-like snippets that use
    the tasks' words with no content (so that every token of the tasks has a pretrained embedding, as
    in a real LLM, and no test fact is given away); shuffled (seed 7)."""
    rng = random.Random(7)
    w = world()
    docs = []
    for _ in range(n_world):
        things = rng.sample(THINGS, 2)
        sentences = []
        for t in things:
            attrs = list(ATTRIBUTES)
            rng.shuffle(attrs)
            sentences += [rng.choice(STATEMENTS[a]).format(t=t, v=w[t][a]) for a in attrs[:3]]
        docs.append(" ".join(sentences))
    for _ in range(n_facts):
        docs.append("\n".join(rng.sample(FACTS, 8)))
    for _ in range(n_people):
        docs.append(story(rng))
    for _ in range(n_quiz):
        attr = rng.choice(list(ATTRIBUTES))
        values = rng.sample(ATTRIBUTES[attr], 4)
        opts = "options : " + " , ".join(values)
        name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
        question = rng.choice(
            [
                QUESTIONS[attr].replace("the {t}", "it") + " " + opts,
                f"how many {obj} does {name} have now ?",
                f"how many {obj} do they have together ?",
            ]
        )
        answer = rng.choice(
            [f"the correct answer is {rng.choice(values)}", "the answer is not known .", f"ask {name} ."]
        )
        docs.append(PROMPT.format(q=question) + " " + answer)
    rng.shuffle(docs)
    return docs


# ------------------------------------------------------------------------------------------------
# fine-tuning tasks
@dataclass(frozen=True)
class Task:
    """A fine-tuning task: its name, the scoring rule and the generation length."""

    name: str
    rule: str  # "number" (last number) or "choice" (first of the record's options named)
    max_new_tokens: int


TASK_INFO = {
    "arith": Task("arith", "number", 24),
    "common": Task("common", "choice", 8),
}


def word_problem(rng: random.Random) -> dict[str, str]:
    """One word problem in the math format (instruction, rationale + answer, answer, kind)."""
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    pron = PRONOUN[name]
    kind = rng.choice(["add", "sub", "together", "two-step"])
    if kind == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        q = f"{name} has {a} {obj} . {pron} buys {b} more . how many {obj} does {name} have now ?"
        out, ans = f"{a} + {b} = {a + b} . the answer is {a + b} .", a + b
    elif kind == "together":
        other = rng.choice([n for n in NAMES if n != name])
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        q = f"{name} has {a} {obj} and {other} has {b} {obj} . how many {obj} do they have together ?"
        out, ans = f"{a} + {b} = {a + b} . the answer is {a + b} .", a + b
    elif kind == "sub":
        b = rng.randint(0, 9)
        a = rng.randint(b, 18)
        q = f"{name} has {a} {obj} . {pron} gives {b} to a friend . how many {obj} does {name} have left ?"
        out, ans = f"{a} - {b} = {a - b} . the answer is {a - b} .", a - b
    else:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        c = rng.randint(0, min(9, a + b))
        s = a + b
        q = (
            f"{name} has {a} {obj} . {pron} buys {b} more and then gives {c} to a friend . "
            f"how many {obj} does {name} have left ?"
        )
        out, ans = f"{a} + {b} = {s} . {s} - {c} = {s - c} . the answer is {s - c} .", s - c
    return {"instruction": q, "output": out, "answer": str(ans), "kind": kind}


def choice_question(rng: random.Random, thing: str, attr: str) -> dict[str, str]:
    """A question about ``thing``'s ``attr`` with four options in a random order; the response names
    the right one."""
    gold = world()[thing][attr]
    options = [gold, *rng.sample([v for v in ATTRIBUTES[attr] if v != gold], 3)]
    rng.shuffle(options)
    q = f"{QUESTIONS[attr].format(t=thing)} options : {' , '.join(options)}"
    return {
        "instruction": q,
        "output": f"the correct answer is {gold}",
        "answer": gold,
        "options": " ".join(options),
        "kind": attr,
    }


def fact_split() -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, validation, test) facts (thing, attribute) of the commonsense task: disjoint, each
    attribute in the same proportion (1/2, 1/6, 1/3), seed 13."""
    rng = random.Random(13)
    train, val, test = [], [], []
    for attr in ATTRIBUTES:
        facts = [(t, attr) for t in THINGS]
        rng.shuffle(facts)
        n = len(facts)
        test += facts[: n // 3]
        val += facts[n // 3 : n // 3 + n // 6]
        train += facts[n // 3 + n // 6 :]
    return train, val, test


def task_splits(
    task: str, n_train: int, n_val: int, n_test: int
) -> tuple[list[dict], list[dict], list[dict]]:
    """Disjoint train / validation / test records of ``task`` (fixed seeds).

    arith: disjoint by problem text. common: disjoint by fact (see ``fact_split``); each split's
    records cycle through its facts so every fact is asked about equally often.
    """
    if task == "arith":
        seen: set[str] = set()
        splits = []
        for n, seed in ((n_test, 101), (n_val, 102), (n_train, 103)):
            rng, out = random.Random(seed), []
            while len(out) < n:
                rec = word_problem(rng)
                if rec["instruction"] not in seen:
                    seen.add(rec["instruction"])
                    out.append(rec)
            splits.append(out)
        test, val, train = splits
        return train, val, test
    if task == "common":
        facts = fact_split()
        out = []
        for part, n, seed in zip(facts, (n_train, n_val, n_test), (201, 202, 203)):
            rng = random.Random(seed)
            order = list(part)
            rng.shuffle(order)
            out.append([choice_question(rng, *order[i % len(order)]) for i in range(n)])
        return out[0], out[1], out[2]
    raise ValueError(f"task {task!r} is unknown; allowed: {', '.join(TASKS)}")


def encode_task(tok: WordTokenizer, rec: dict[str, str]) -> tuple[list[int], list[int]]:
    """(input_ids, labels): prompt + response + EOS, loss on the response and EOS only."""
    prompt = tok.encode(PROMPT.format(q=rec["instruction"]))
    response = [*tok.encode(" " + rec["output"]), tok.EOS]
    return prompt + response, [-100] * len(prompt) + response


def prompt_ids(tok: WordTokenizer, rec: dict[str, str]) -> list[int]:
    return tok.encode(PROMPT.format(q=rec["instruction"]))


def collate(items: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, labels (-100 on padding), attention_mask, each (B, T)."""
    n = max(len(x) for x, _ in items)
    ids = torch.full((len(items), n), WordTokenizer.PAD)
    labels = torch.full((len(items), n), -100)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for i, (x, y) in enumerate(items):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def unknown_tokens(tok: WordTokenizer, records: list[dict[str, str]]) -> int:
    """Tokens of ``records`` (prompt + response) that are not in the vocabulary (should be 0)."""
    return sum(t == tok.UNK for r in records for t in encode_task(tok, r)[0])
