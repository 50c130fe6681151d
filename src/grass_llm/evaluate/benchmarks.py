"""The 14 LLM-Adapters benchmarks of the GRASS paper (Tables 2 and 3): their names, folders, groups and
answer kinds, ``--benchmarks`` resolution and where each test file lives."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from grass_llm.data import DATA_DIR_ENV, default_data_dir

__all__ = [
    "BENCHMARKS",
    "DEFAULT_MAX_NEW_TOKENS",
    "GROUPS",
    "Benchmark",
    "EvalInputError",
    "benchmark_path",
    "llm_adapters_root",
    "resolve_benchmarks",
]

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


def _aliases() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, b in BENCHMARKS.items():
        for alias in (name, b.folder, b.column, b.column.rstrip(".")):
            out[alias.lower()] = name
    return out


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


def llm_adapters_root(data_dir: str | os.PathLike[str] | None) -> Path:
    """The LLM-Adapters directory: ``data_dir`` (default ``$GRASS_DATA_DIR``) or its ``llm-adapters/``."""
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
    path = llm_adapters_root(data_dir) / bench.relpath
    if not path.is_file():
        hint = (
            " (HellaSwag's test set is not in the shared data; see its SOURCE.md)"
            if bench.name == "HellaSwag"
            else ""
        )
        raise EvalInputError(f"{bench.name}: test file not found: {path}{hint}")
    return path
