"""``evaluate_model``: a model on a set of benchmarks -> per-item JSONL files and the result tables."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from grass_llm.data import PROMPT_STYLES, format_prompt, load_records
from grass_llm.evaluate.benchmarks import (
    DEFAULT_MAX_NEW_TOKENS,
    Benchmark,
    EvalInputError,
    benchmark_path,
    llm_adapters_root,
    resolve_benchmarks,
)
from grass_llm.evaluate.generation import generate_responses
from grass_llm.evaluate.results import format_results_markdown, group_averages
from grass_llm.evaluate.scoring import gold_answer, is_correct, predict

__all__ = ["benchmark_files", "evaluate_model"]


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
    _check_settings(prompt_style, limit, batch_size, max_new_tokens)
    benches, used_group = resolve_benchmarks(benchmarks)
    say = _printer(verbose)
    paths, skipped = benchmark_files(benches, data_dir, used_group if skip_missing is None else skip_missing, say)
    # every file is read (and checked) before anything is generated
    records = {
        name: load_records(p, required=("instruction", "answer"), limit=limit) for name, p in paths.items()
    }
    out = Path(out_dir).expanduser()
    with _staging(out) as staging:
        scores: dict[str, dict[str, Any]] = {}
        for b in benches:
            if b.name in records:
                budget = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[b.group]
                t0 = time.perf_counter()
                scores[b.name] = _score_benchmark(
                    model, tokenizer, b, records[b.name], staging, batch_size, budget, prompt_style
                )
                n, total = scores[b.name]["correct"], scores[b.name]["total"]
                say(f"{b.name}: {n}/{total} = {100.0 * n / total:.2f}% ({time.perf_counter() - t0:.1f} s)")
        settings = _settings(benches, data_dir, batch_size, max_new_tokens, limit, prompt_style)
        results = {"model": model_name, "method": method_name, "benchmarks": scores}
        results.update(averages=group_averages(scores), skipped=skipped, settings=settings)
        (staging / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (staging / "results.md").write_text(format_results_markdown(results), encoding="utf-8")
    say(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return results


def _settings(
    benches: Sequence[Benchmark],
    data_dir: str | os.PathLike[str] | None,
    batch_size: int,
    max_new_tokens: int | None,
    limit: int | None,
    prompt_style: str,
) -> dict[str, Any]:
    return {
        "benchmarks": [b.name for b in benches],
        "data_dir": str(llm_adapters_root(data_dir)),
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "limit": limit,
        "prompt_style": prompt_style,
        "decoding": "greedy",
    }


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A directory in ``out`` to write the results into; once they are all written they replace the
    files of the same names in ``out`` (``results.json`` last, each with a rename). Nothing in ``out``
    changes before that: a failure or a signal (Ctrl-C) leaves ``out`` as it was, and an ``out`` this
    created is removed again."""
    created = [p for p in [*reversed(out.parents), out] if not p.exists()]
    staging = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".grass-llm-eval-", dir=out))
        yield staging
        names = sorted(p.name for p in staging.iterdir())
        for name in sorted(names, key=lambda n: n == "results.json"):
            os.replace(staging / name, out / name)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            for d in reversed(created):  # (only while empty)
                d.rmdir()


def _check_settings(prompt_style: str, limit: int | None, batch_size: int, max_new_tokens: int | None) -> None:
    if prompt_style not in PROMPT_STYLES:
        raise EvalInputError(f"prompt style {prompt_style!r} is unknown; allowed: {', '.join(PROMPT_STYLES)}")
    if limit is not None and limit < 1:
        raise EvalInputError(f"limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise EvalInputError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise EvalInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def _printer(verbose: bool) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if verbose:
            print(msg, file=sys.stderr, flush=True)

    return say


def benchmark_files(
    benches: Sequence[Benchmark],
    data_dir: str | os.PathLike[str] | None,
    skip_missing: bool,
    say: Callable[[str], None],
) -> tuple[dict[str, Path], dict[str, str]]:
    """``({name: test file}, {name: why skipped})``; a missing file raises unless ``skip_missing``, and
    nothing to evaluate raises (``grass-llm eval`` checks this before it loads the model)."""
    llm_adapters_root(data_dir)  # (no data directory at all: said once, not once per benchmark)
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
    return paths, skipped


def _score_benchmark(
    model: Any,
    tokenizer: Any,
    bench: Benchmark,
    records: list[dict[str, Any]],
    out: Path,
    batch_size: int,
    max_new_tokens: int,
    prompt_style: str,
) -> dict[str, Any]:
    """Generate, score and write ``out/<benchmark>.jsonl`` (one line per item); returns its score."""
    prompts = [format_prompt(r, with_response=False, style=prompt_style) for r in records]
    responses = generate_responses(model, tokenizer, prompts, batch_size, max_new_tokens)
    correct = 0
    file = out / f"{bench.name}.jsonl"
    with open(file, "w", encoding="utf-8") as f:
        for i, (rec, prompt, response) in enumerate(zip(records, prompts, responses)):
            pred = predict(bench, response)
            ok = is_correct(bench, pred, rec["answer"])
            correct += ok
            row = {
                "index": i,
                "prompt": prompt,
                "response": response,
                "prediction": pred,
                "gold": gold_answer(bench, rec["answer"]),
                "correct": ok,
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {
        "accuracy": round(100.0 * correct / len(records), 4),
        "correct": correct,
        "total": len(records),
        "file": file.name,
        "group": bench.group,
    }
