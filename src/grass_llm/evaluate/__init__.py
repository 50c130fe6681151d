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

Modules: ``benchmarks`` (the 14 sets, ``--benchmarks``, test files), ``scoring`` (the extraction rules
and correctness, pure Python), ``generation`` (greedy decoding), ``run`` (``evaluate_model``),
``results`` (the tables) and ``cli`` (``grass-llm eval``). ``transformers`` is imported only inside
functions.
"""

from grass_llm.evaluate.benchmarks import (
    BENCHMARKS,
    DEFAULT_MAX_NEW_TOKENS,
    GROUPS,
    Benchmark,
    EvalInputError,
    benchmark_path,
    resolve_benchmarks,
)
from grass_llm.evaluate.cli import add_cli_arguments, cli_main, default_out_dir
from grass_llm.evaluate.generation import generate_responses, greedy_generate
from grass_llm.evaluate.results import format_results_markdown
from grass_llm.evaluate.run import evaluate_model
from grass_llm.evaluate.scoring import (
    NUMBER_TOLERANCE,
    RESPONSE_MARKER,
    extract_choice,
    extract_letter,
    extract_number,
    extract_response,
    is_correct,
    predict,
)

__all__ = [
    "BENCHMARKS",
    "DEFAULT_MAX_NEW_TOKENS",
    "GROUPS",
    "NUMBER_TOLERANCE",
    "RESPONSE_MARKER",
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
