"""Data files: where a data path is resolved (``$GRASS_DATA_DIR``), and LLM-Adapters JSON/JSONL loading
with validation of every record before any training starts. Errors name the file, the 1-based record
and the fault."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DATA_DIR_ENV",
    "TRAIN_FIELDS",
    "DataError",
    "default_data_dir",
    "load_records",
    "records_fingerprint",
    "resolve_data_path",
]

#: Fields a training record must have; ``input`` is optional (missing / null / "" = no input).
TRAIN_FIELDS = ("instruction", "output")


class DataError(ValueError):
    """A data file or record is unusable. The message names the file, the record (1-based) and the fault."""


# ------------------------------------------------------------------------------------------------
# locations
DATA_DIR_ENV = "GRASS_DATA_DIR"


def default_data_dir() -> Path | None:
    """The data root from ``$GRASS_DATA_DIR``, or None when it is not set."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else None


def resolve_data_path(path: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``path`` as given if it exists or is absolute, else relative to ``data_dir`` (default: ``default_data_dir()``).

    Raises ``DataError`` naming both candidates when neither exists.
    """
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        if not p.exists():
            raise DataError(f"{p}: data file does not exist")
        return p
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if root is None:
        raise DataError(
            f"{path}: data file not found at {p.resolve()}; to resolve it against a data directory, give "
            f"data_dir or set {DATA_DIR_ENV}"
        )
    candidate = root / p
    if candidate.exists():
        return candidate
    raise DataError(f"{path}: data file not found (looked at {p.resolve()} and {candidate})")


# ------------------------------------------------------------------------------------------------
# loading and validation
def _locate_json_array_error(text: str) -> tuple[int | None, str]:
    """For a JSON array that fails to parse: (1-based number of the bad record or None, message)."""
    decoder = json.JSONDecoder()
    n = len(text)

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    i = skip_ws(0)
    if i >= n or text[i] != "[":
        return None, "not a JSON array (the file must start with '[')"
    i = skip_ws(i + 1)
    if i < n and text[i] == "]":
        return None, "trailing content after the array"
    record = 1
    while True:
        try:
            _, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            return record, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        i = skip_ws(i)
        if i < n and text[i] == ",":
            i = skip_ws(i + 1)
            record += 1
            continue
        if i < n and text[i] == "]":
            return None, "trailing content after the array"
        line = text.count("\n", 0, i) + 1
        return record, f"invalid JSON at line {line}: expected ',' or ']' after the record"


def _read_json_array(path: Path, text: str) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        record, what = _locate_json_array_error(text)
        where = f"record {record}: " if record is not None else ""
        if record is None and what == "trailing content after the array":
            what = f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        raise DataError(f"{path}: {where}{what}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got a JSON {type(data).__name__}")
    return data


def _read_jsonl(path: Path, text: str) -> list[Any]:
    data = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: record {len(data) + 1} (line {lineno}): invalid JSON at column {e.colno}: {e.msg}"
            ) from None
    return data


def _check_record(path: Path, number: int, rec: Any, required: Sequence[str]) -> dict[str, Any]:
    where = f"{path}: record {number}"
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in required:
        if key not in rec:
            raise DataError(f"{where}: missing required field {key!r} (fields present: {sorted(rec)})")
    out = dict(rec)
    for key in ("instruction", "output", "input"):
        if key not in out:
            continue
        value = out[key]
        if value is None and key not in required:
            out[key] = ""
        elif not isinstance(value, str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    answer = out.get("answer")
    if "answer" in out and not (answer is None and "answer" not in required):
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(
                f"{where}: field 'answer' must be a string or a number, got {type(answer).__name__}"
            )
        if "answer" in required and not str(answer).strip():
            raise DataError(f"{where}: field 'answer' is empty")
    if "instruction" in required and not out["instruction"].strip():
        raise DataError(f"{where}: field 'instruction' is empty")
    out.setdefault("input", "")
    return out


def load_records(
    path: str | os.PathLike[str], required: Sequence[str] = TRAIN_FIELDS, limit: int | None = None
) -> list[dict[str, Any]]:
    """Read and validate an LLM-Adapters data file before any training starts.

    Args:
        path: a ``.json`` file holding a JSON array of objects, or a ``.jsonl`` file with one object
            per line (blank lines are skipped).
        required: fields every record must have (training: ``instruction`` and ``output``;
            evaluation: ``instruction`` and ``answer``). ``instruction``/``input``/``output`` must be
            strings (``input`` may be missing or null, which means no input); ``answer`` a string or
            a number.
        limit: keep only the first ``limit`` records (validation still covers only those).

    Returns:
        The records as dicts (a copy; ``input`` is always present, ``""`` when absent).

    Raises:
        DataError: missing/empty file, bad JSON, not an array, a record that is not an object, a
            missing field or a field of the wrong type. The message names the file, the 1-based
            record number and what is wrong.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: data file does not exist" if not p.exists() else f"{p}: not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{p}: the file is empty")
    data = _read_jsonl(p, text) if p.suffix.lower() == ".jsonl" else _read_json_array(p, text)
    if not data:
        raise DataError(f"{p}: no records (empty {'file' if p.suffix.lower() == '.jsonl' else 'array'})")
    if limit is not None:
        if limit < 1:
            raise DataError(f"{p}: limit must be >= 1, got {limit}")
        data = data[:limit]
    return [_check_record(p, i, rec, required) for i, rec in enumerate(data, 1)]


def records_fingerprint(records: Sequence[Any]) -> str:
    """The SHA-256 of the records' content (each record as canonical JSON, in order): the same data gives
    the same fingerprint wherever its file lives and however it is laid out (JSON or JSONL, whitespace,
    key order); any changed, added, removed or reordered record gives another."""
    h = hashlib.sha256()
    for rec in records:
        h.update(json.dumps(rec, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
