"""Evaluation on the 14 LLM-Adapters benchmarks of the GRASS paper (Tables 2 and 3), and ``grass-llm eval``.

The answer-extraction rules are those of LLM-Adapters' ``evaluate.py`` (arithmetic) and
``commonsense_evaluate.py``:

* the response is the text after ``### Response:`` in the decoded prompt + generation;
* MultiArith, AddSub, GSM8K, SingleEq, SVAMP: commas removed, the last match of ``-?\\d+\\.?\\d*``
  is the prediction, correct if ``|prediction - float(answer)| <= 1e-3``;
* AQuA: the first match of ``A|B|C|D|E`` (case-sensitive, anywhere: the "A" of "Answer" counts,
  as upstream), compared with the record's ``answer`` (never with ``output``, which is a stored
  rationale, not gold);
* BoolQ ``true|false``, PIQA ``solution1|solution2``, SIQA / ARC-e / ARC-c / OBQA
  ``answer1..answer5``, HellaSwag ``ending1..ending4``, WinoGrande ``option1|option2``: the first
  match, compared with ``answer``.

Generation is batched greedy decoding (``do_sample=False``) with left padding. Outputs:
``out_dir/<benchmark>.jsonl`` (one line per item: index, prompt, response, prediction, gold,
correct), ``out_dir/results.md`` (Markdown tables laid out as the paper's Table 2 / Table 3,
accuracy in percent) and ``out_dir/results.json``. ``grass-llm eval`` writes them where the model
lives (``RUN/eval`` for ``--model RUN/final``; see ``default_out_dir``) unless ``--out`` says otherwise,
and never over earlier results without ``--overwrite``.

``transformers`` is imported only inside functions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grass_llm.data import (
    DATA_DIR_ENV,
    PROMPT_STYLES,
    DataError,
    default_data_dir,
    format_prompt,
    load_records,
)

__all__ = [
    "BENCHMARKS",
    "GROUPS",
    "Benchmark",
    "EvalInputError",
    "add_cli_arguments",
    "benchmark_path",
    "cli_main",
    "default_out_dir",
    "evaluate_model",
    "extract_choice",
    "extract_letter",
    "extract_number",
    "extract_response",
    "format_results_markdown",
    "generate_responses",
    "greedy_generate",
    "is_correct",
    "predict",
    "resolve_benchmarks",
]

#: Maximum |prediction - gold| for an arithmetic answer to count (LLM-Adapters ``miss = 0.001``).
NUMBER_TOLERANCE = 1e-3
_NUMBER_RE = re.compile(r"-?\d+\.?\d*")
_LETTER_RE = re.compile(r"A|B|C|D|E")
RESPONSE_MARKER = "### Response:"
#: LLM-Adapters' max_new_tokens: 256 in evaluate.py (arithmetic), 32 in commonsense_evaluate.py.
DEFAULT_MAX_NEW_TOKENS = {"arithmetic": 256, "commonsense": 32}


class EvalInputError(ValueError):
    """Bad input to evaluation (unknown benchmark, missing file or model). The message names the value."""


@dataclass(frozen=True)
class Benchmark:
    """One evaluation set.

    Attributes:
        name: the paper's name (``GSM8K``, ``ARC-e``...).
        folder: the LLM-Adapters folder under ``dataset/`` holding ``test.json``.
        group: ``arithmetic`` (Table 2) or ``commonsense`` (Table 3).
        kind: ``number`` (numeric answer), ``letter`` (A-E) or ``choice`` (one of ``labels``).
        column: the column header in the results table.
        labels: for ``choice``: the label strings, in the order of the upstream regex.
    """

    name: str
    folder: str
    group: str
    kind: str
    column: str
    labels: tuple[str, ...] = ()

    @property
    def relpath(self) -> str:
        """``dataset/<folder>/test.json``, relative to the LLM-Adapters root."""
        return f"dataset/{self.folder}/test.json"


def _choice(name: str, folder: str, labels: Sequence[str], column: str | None = None) -> Benchmark:
    return Benchmark(name, folder, "commonsense", "choice", column or name, tuple(labels))


_ANSWERS = [f"answer{i}" for i in range(1, 6)]
#: The 14 benchmarks in the column order of the paper's Tables 2 and 3.
BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        Benchmark("MultiArith", "MultiArith", "arithmetic", "number", "MultiArith"),
        Benchmark("AddSub", "AddSub", "arithmetic", "number", "AddSub"),
        Benchmark("GSM8K", "gsm8k", "arithmetic", "number", "GSM8K"),
        Benchmark("AQuA", "AQuA", "arithmetic", "letter", "AQuA"),
        Benchmark("SingleEq", "SingleEq", "arithmetic", "number", "SingleEq"),
        Benchmark("SVAMP", "SVAMP", "arithmetic", "number", "SVAMP"),
        _choice("BoolQ", "boolq", ["true", "false"]),
        _choice("PIQA", "piqa", ["solution1", "solution2"]),
        _choice("SIQA", "social_i_qa", _ANSWERS),
        _choice("HellaSwag", "hellaswag", [f"ending{i}" for i in range(1, 5)], "HellaS."),
        _choice("WinoGrande", "winogrande", ["option1", "option2"], "WinoG."),
        _choice("ARC-e", "ARC-Easy", _ANSWERS),
        _choice("ARC-c", "ARC-Challenge", _ANSWERS),
        _choice("OBQA", "openbookqa", _ANSWERS),
    ]
}
#: Benchmark groups accepted by ``--benchmarks``.
GROUPS: dict[str, tuple[str, ...]] = {
    "arithmetic": tuple(n for n, b in BENCHMARKS.items() if b.group == "arithmetic"),
    "commonsense": tuple(n for n, b in BENCHMARKS.items() if b.group == "commonsense"),
    "all": tuple(BENCHMARKS),
}
_TABLE_TITLES = {
    "arithmetic": "Arithmetic reasoning (accuracy %, layout of Table 2)",
    "commonsense": "Commonsense reasoning (accuracy %, layout of Table 3)",
}


def _aliases() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, b in BENCHMARKS.items():
        for alias in (name, b.folder, b.column, b.column.rstrip(".")):
            out[alias.lower()] = name
    return out


# ------------------------------------------------------------------------------------------------
# answer extraction (LLM-Adapters rules)
def extract_response(text: str) -> str:
    """The text after ``### Response:``, stripped (``text.split("### Response:")[1]`` as upstream).

    Text without the marker is returned stripped as a whole.
    """
    parts = text.split(RESPONSE_MARKER)
    return (parts[1] if len(parts) > 1 else parts[0]).strip()


def extract_number(response: str) -> float | None:
    """The last number of ``response`` after removing commas, or None if there is none."""
    found = _NUMBER_RE.findall(response.replace(",", ""))
    if not found:
        return None
    try:
        return float(found[-1])
    except ValueError:  # pragma: no cover - the regex only matches float syntax
        return None


def extract_letter(response: str) -> str | None:
    """The first of the capital letters A-E anywhere in ``response`` (AQuA), or None."""
    found = _LETTER_RE.findall(response.strip())
    return found[0] if found else None


def extract_choice(response: str, labels: Sequence[str]) -> str | None:
    """The first occurrence of any of ``labels`` in ``response`` (case-sensitive), or None."""
    found = re.findall("|".join(re.escape(label) for label in labels), response.strip())
    return found[0] if found else None


def predict(bench: Benchmark, response: str) -> float | str | None:
    """The prediction that ``bench``'s rule extracts from ``response`` (None: nothing found)."""
    if bench.kind == "number":
        return extract_number(response)
    if bench.kind == "letter":
        return extract_letter(response)
    return extract_choice(response, bench.labels)


def _gold(bench: Benchmark, answer: Any) -> float | str:
    if bench.kind == "number":
        return float(str(answer).replace(",", ""))
    return str(answer).strip()


def is_correct(bench: Benchmark, prediction: float | str | None, gold: Any) -> bool:
    """Whether ``prediction`` matches ``gold`` (the record's ``answer``) under ``bench``'s rule."""
    if prediction is None:
        return False
    if bench.kind == "number":
        return abs(float(prediction) - _gold(bench, gold)) <= NUMBER_TOLERANCE
    return prediction == _gold(bench, gold)


# ------------------------------------------------------------------------------------------------
# benchmarks and files
def resolve_benchmarks(spec: str | Sequence[str]) -> tuple[list[Benchmark], bool]:
    """Benchmarks named by ``spec``: a comma list of names and/or groups (``arithmetic``,
    ``commonsense``, ``all``), case-insensitive; dataset folder names also work (``gsm8k``,
    ``ARC-Easy``). Returns ``(benchmarks in paper order, whether a group was named)``.

    Raises ``EvalInputError`` naming an unknown value and the allowed ones.
    """
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    items = [s for s in items if s]
    if not items:
        raise EvalInputError(f"no benchmark given; allowed: {', '.join([*GROUPS, *BENCHMARKS])}")
    aliases = _aliases()
    chosen: set[str] = set()
    used_group = False
    for item in items:
        key = item.lower()
        if key in GROUPS:
            chosen.update(GROUPS[key])
            used_group = True
        elif key in aliases:
            chosen.add(aliases[key])
        else:
            raise EvalInputError(
                f"unknown benchmark {item!r}; allowed: groups {', '.join(GROUPS)} or "
                f"benchmarks {', '.join(BENCHMARKS)}"
            )
    return [b for n, b in BENCHMARKS.items() if n in chosen], used_group


def _llm_adapters_root(data_dir: str | os.PathLike[str] | None) -> Path:
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if root is None:
        raise EvalInputError(
            f"no data directory: pass --data-dir (the directory holding llm-adapters/ or LLM-Adapters' "
            f"dataset/) or set {DATA_DIR_ENV}"
        )
    if (root / "llm-adapters" / "dataset").is_dir():
        return root / "llm-adapters"
    return root


def benchmark_path(bench: Benchmark | str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The test file of ``bench``: ``<data_dir>/llm-adapters/dataset/<folder>/test.json``.

    ``data_dir`` is the shared data root (default ``default_data_dir()``) or the LLM-Adapters
    directory itself. Raises ``EvalInputError`` naming the path when the file is missing.
    """
    if isinstance(bench, str):
        bench = resolve_benchmarks(bench)[0][0]
    path = _llm_adapters_root(data_dir) / bench.relpath
    if not path.is_file():
        hint = (
            " (HellaSwag's test set is not in the shared data; see its SOURCE.md)"
            if bench.name == "HellaSwag"
            else ""
        )
        raise EvalInputError(f"{bench.name}: test file not found: {path}{hint}")
    return path


# ------------------------------------------------------------------------------------------------
# generation
def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def greedy_generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    eos_id: int | None,
    max_new_tokens: int,
    batch_size: int,
) -> list[list[int]]:
    """Greedy continuations (new token ids only) of tokenised ``prompts``, batched with left padding.

    Prompts are sorted by length so that a batch holds similar lengths; results come back in the order
    of ``prompts``. ``eos_id=None``: generate ``max_new_tokens`` tokens. The model's train/eval mode is
    restored afterwards.
    """
    from transformers import GenerationConfig

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    gen_cfg = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id
    )
    device = _model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)  # (B, T) left-padded
            attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids = list(prompts[i])
                input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[r, width - len(ids) :] = 1
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=gen_cfg,
            )  # (B, T + new)
            out = out.cpu()
            for r, i in enumerate(idx):
                outputs[i] = out[r, width:].tolist()
    finally:
        if was_training:
            model.train()
    return outputs


def generate_responses(
    model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy responses to text ``prompts`` (``greedy_generate``; the text after ``### Response:`` of
    prompt + generation). Decoding skips special tokens, as LLM-Adapters does."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise EvalInputError("the tokenizer has neither a pad nor an eos token; cannot batch prompts")
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    new = greedy_generate(model, encoded, pad_id, tokenizer.eos_token_id, max_new_tokens, batch_size)
    responses = []
    for ids, gen in zip(encoded, new):
        full = tokenizer.decode(list(ids) + gen, skip_special_tokens=True)
        if RESPONSE_MARKER in full:
            responses.append(extract_response(full))
        else:  # a tokenizer whose decode does not reproduce the prompt text
            responses.append(tokenizer.decode(gen, skip_special_tokens=True).strip())
    return responses


# ------------------------------------------------------------------------------------------------
# evaluation
def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def format_results_markdown(results: Mapping[str, Any]) -> str:
    """Markdown tables of ``results`` (as returned by ``evaluate_model``), one per group evaluated.

    Columns follow the paper (Table 2: ``| Model | Method | MultiArith | AddSub | GSM8K | AQuA |
    SingleEq | SVAMP | Avg. |``; Table 3: ``BoolQ PIQA SIQA HellaS. WinoG. ARC-e ARC-c OBQA Avg.``);
    a benchmark not evaluated shows ``-``; ``Avg.`` is the mean over the benchmarks evaluated.
    """
    scores = results["benchmarks"]
    lines: list[str] = []
    for group, names in GROUPS.items():
        if group == "all" or not any(n in scores for n in names):
            continue
        cols = [BENCHMARKS[n].column for n in names]
        cells = [_fmt(scores[n]["accuracy"]) if n in scores else "-" for n in names]
        lines += [
            f"### {_TABLE_TITLES[group]}",
            "",
            "| Model | Method | " + " | ".join(cols) + " | Avg. |",
            "|---|---|" + "---:|" * (len(cols) + 1),
            f"| {results['model']} | {results['method']} | "
            + " | ".join(cells)
            + f" | {_fmt(results['averages'][group])} |",
            "",
        ]
    limit = results["settings"].get("limit")
    if limit:
        lines.append(
            f"Evaluated on the first {limit} items of each benchmark (`--limit {limit}`), not the full sets."
        )
        lines.append("")
    for name, reason in results.get("skipped", {}).items():
        lines.append(f"- {name} skipped: {reason}")
    if results.get("skipped"):
        lines.append("")
    return "\n".join(lines)


def evaluate_model(
    model: Any,
    tokenizer: Any,
    benchmarks: str | Sequence[str],
    data_dir: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    model_name: str = "model",
    method_name: str = "-",
    prompt_style: str = "finetune",
    skip_missing: bool | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``benchmarks`` and write the per-item JSONL files and the result tables.

    Args:
        model: a causal LM with ``generate`` (Hugging Face), on its device, in its dtype.
        tokenizer: its tokenizer (pad token: its own, else EOS).
        benchmarks: names and/or groups (``arithmetic``, ``commonsense``, ``all``), a comma string or
            a list; see ``resolve_benchmarks``.
        data_dir: the data root holding ``llm-adapters/`` or LLM-Adapters' ``dataset/`` (``None``:
            ``$GRASS_DATA_DIR``).
        out_dir: where ``<benchmark>.jsonl``, ``results.md`` and ``results.json`` are written.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: generation budget; None = LLM-Adapters' 256 (arithmetic) / 32 (commonsense).
        limit: evaluate only the first ``limit`` items of each benchmark (quick runs).
        model_name, method_name: the ``Model`` and ``Method`` cells of the table row.
        prompt_style: ``finetune`` (the training prompt, default) or ``evaluate`` (the whitespace of
            LLM-Adapters' evaluation scripts); see ``grass_llm.data.format_prompt``.
        skip_missing: skip benchmarks whose test file is missing (with a message) instead of raising;
            None = skip only when ``benchmarks`` names a group.
        verbose: print progress to stderr.

    Returns:
        The content of ``results.json``: ``model``, ``method``, ``benchmarks`` (name -> accuracy in
        percent, correct, total, file), ``averages`` (group -> mean accuracy over the benchmarks
        evaluated), ``skipped`` (name -> reason) and ``settings``.

    Raises:
        EvalInputError: unknown benchmark, missing test file (unless skipped), nothing to evaluate.
        DataError: a malformed test file.
    """
    if prompt_style not in PROMPT_STYLES:
        raise EvalInputError(f"prompt style {prompt_style!r} is unknown; allowed: {', '.join(PROMPT_STYLES)}")
    if limit is not None and limit < 1:
        raise EvalInputError(f"limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise EvalInputError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise EvalInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    benches, used_group = resolve_benchmarks(benchmarks)
    if skip_missing is None:
        skip_missing = used_group

    def say(msg: str) -> None:
        if verbose:
            print(msg, file=sys.stderr, flush=True)

    # Check every file before generating anything.
    paths: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for b in benches:
        try:
            paths[b.name] = benchmark_path(b, data_dir)
        except EvalInputError as e:
            if not skip_missing:
                raise
            skipped[b.name] = str(e)
            say(f"skipping {e}")
    if not paths:
        raise EvalInputError("no benchmark to evaluate: " + "; ".join(skipped.values()))
    records = {
        name: load_records(p, required=("instruction", "answer"), limit=limit) for name, p in paths.items()
    }

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    scores: dict[str, dict[str, Any]] = {}
    for b in benches:
        if b.name not in records:
            continue
        recs = records[b.name]
        budget = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[b.group]
        t0 = time.perf_counter()
        prompts = [format_prompt(r, with_response=False, style=prompt_style) for r in recs]
        responses = generate_responses(model, tokenizer, prompts, batch_size, budget)
        correct = 0
        file = out / f"{b.name}.jsonl"
        with open(file, "w", encoding="utf-8") as f:
            for i, (rec, prompt, response) in enumerate(zip(recs, prompts, responses)):
                pred = predict(b, response)
                ok = is_correct(b, pred, rec["answer"])
                correct += ok
                row = {
                    "index": i,
                    "prompt": prompt,
                    "response": response,
                    "prediction": pred,
                    "gold": _gold(b, rec["answer"]),
                    "correct": ok,
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        acc = 100.0 * correct / len(recs)
        scores[b.name] = {
            "accuracy": round(acc, 4),
            "correct": correct,
            "total": len(recs),
            "file": file.name,
            "group": b.group,
        }
        say(f"{b.name}: {correct}/{len(recs)} = {acc:.2f}% ({time.perf_counter() - t0:.1f} s)")

    averages: dict[str, float | None] = {}
    for group in ("arithmetic", "commonsense"):
        accs = [100.0 * s["correct"] / s["total"] for n, s in scores.items() if BENCHMARKS[n].group == group]
        averages[group] = round(sum(accs) / len(accs), 4) if accs else None
    results = {
        "model": model_name,
        "method": method_name,
        "benchmarks": scores,
        "averages": averages,
        "skipped": skipped,
        "settings": {
            "benchmarks": [b.name for b in benches],
            "data_dir": str(_llm_adapters_root(data_dir)),
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "limit": limit,
            "prompt_style": prompt_style,
            "decoding": "greedy",
        },
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(format_results_markdown(results), encoding="utf-8")
    say(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return results


# ------------------------------------------------------------------------------------------------
# CLI
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``grass-llm eval``."""
    parser.add_argument(
        "--model",
        required=True,
        help="local model directory (works offline) or hub name, loaded with AutoModelForCausalLM/AutoTokenizer",
    )
    parser.add_argument(
        "--benchmarks",
        default="all",
        help=(
            "comma list of benchmarks and/or groups (arithmetic, commonsense, all); benchmarks: "
            f"{', '.join(BENCHMARKS)}. Missing test files are skipped only inside a group. Default: all"
        ),
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="data root holding llm-adapters/ or LLM-Adapters' dataset/ (default: $GRASS_DATA_DIR)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help=(
            "output directory (default: RUN/eval for a run's final model RUN/final, RUN/eval-adapter for "
            "RUN/final/adapter, <model dir>/eval for another local model, eval/<org>--<name> for a hub model)"
        ),
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results already in the output directory (without it they are kept and eval stops)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="generation budget (default: 256 arithmetic, 32 commonsense, as LLM-Adapters)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="evaluate only the first N items of each benchmark"
    )
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default=None,
        help="model weight dtype (default: bf16 on a CUDA GPU that supports it, else fp32)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument(
        "--model-name", default=None, help="Model cell of the table row (default: model dir name)"
    )
    parser.add_argument("--method-name", default="-", help="Method cell of the table row, e.g. GRASS")
    parser.add_argument(
        "--prompt-style",
        choices=PROMPT_STYLES,
        default="finetune",
        help="finetune: the training prompt (default); evaluate: LLM-Adapters' evaluation-script whitespace",
    )


def _check_cli_args(args: argparse.Namespace) -> None:
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--max-new-tokens", args.max_new_tokens),
        ("--limit", args.limit),
    ):
        if value is not None and value < 1:
            raise EvalInputError(f"{flag} must be >= 1, got {value}")
    from grass_llm.models import looks_like_path

    local = Path(args.model).expanduser()
    if local.exists():
        has_config = (local / "config.json").is_file() or (local / "adapter_config.json").is_file()
        if not local.is_dir() or not has_config:
            raise EvalInputError(f"--model {args.model!r}: not a model directory (no config.json in {local})")
    elif looks_like_path(args.model):
        raise EvalInputError(f"--model {args.model!r}: model directory does not exist")
    if args.device is not None:
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            raise EvalInputError(
                f"--device {args.device!r} is not a device; allowed: cpu, cuda, cuda:N"
            ) from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise EvalInputError(f"--device {args.device!r}: CUDA is not available on this machine")


def _is_run_dir(path: Path) -> bool:
    return (path / "log.jsonl").is_file() or (path / "checkpoints").is_dir()


def default_out_dir(model: str) -> Path:
    """Where ``grass-llm eval --model MODEL`` writes without ``--out``: a place that belongs to the model.

    ``RUN/final`` of a ``grass-llm train`` run -> ``RUN/eval``; ``RUN/final/adapter`` ->
    ``RUN/eval-adapter``; another local model directory -> ``<dir>/eval``; a hub name ``org/name`` ->
    ``eval/org--name``.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        if local.name == "final" and _is_run_dir(local.parent):
            return local.parent / "eval"
        if local.name == "adapter" and local.parent.name == "final" and _is_run_dir(local.parent.parent):
            return local.parent.parent / "eval-adapter"
        return local / "eval"
    return Path("eval") / model.strip("/").replace("/", "--")


_RESULT_FILES = ("results.json", "results.md")


def _existing_results(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    names = {*_RESULT_FILES, *(f"{b}.jsonl" for b in BENCHMARKS)}
    return sorted(p for p in out.iterdir() if p.name in names)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write over earlier results without ``--overwrite``; with it, delete them first."""
    if out.exists() and not out.is_dir():
        raise EvalInputError(f"--out {str(out)!r} is a file; allowed: a directory")
    found = _existing_results(out)
    if found and not overwrite:
        raise EvalInputError(
            f"{out} already holds results ({', '.join(p.name for p in found)}); pass --overwrite to replace "
            "them, or --out DIR to write elsewhere"
        )
    for p in found:
        p.unlink()


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from grass_llm.models import ModelLoadError, load_model_and_tokenizer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype == "bf16":
        dtype = torch.bfloat16
    elif args.dtype == "fp32":
        dtype = torch.float32
    else:
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if use_bf16 else torch.float32
    try:
        return load_model_and_tokenizer(args.model, dtype, device)
    except ModelLoadError as e:
        raise EvalInputError(f"--model {args.model!r}: {e}") from None


def cli_main(args: argparse.Namespace) -> int:
    """Run ``grass-llm eval``; bad input prints ``grass-llm eval: error: ...`` and returns 2."""
    try:
        _check_cli_args(args)
        benches, used_group = resolve_benchmarks(args.benchmarks)
        for b in benches:  # fail before loading the model
            try:
                benchmark_path(b, args.data_dir)
            except EvalInputError as e:
                if not used_group:
                    raise
                del e
        out = Path(args.out).expanduser() if args.out else default_out_dir(args.model)
        _check_out_dir(out, args.overwrite)
        model, tokenizer = _load(args)
        model_name = args.model_name or Path(args.model.rstrip("/")).name or args.model
        results = evaluate_model(
            model,
            tokenizer,
            args.benchmarks,
            args.data_dir,
            out,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            limit=args.limit,
            model_name=model_name,
            method_name=args.method_name,
            prompt_style=args.prompt_style,
        )
    except (EvalInputError, DataError) as e:
        print(f"grass-llm eval: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"grass-llm eval: error: cannot write the results: {e}", file=sys.stderr)
        return 1
    print(format_results_markdown(results))
    return 0
