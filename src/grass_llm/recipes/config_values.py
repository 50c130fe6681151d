"""Values of a training config: ``key=value`` scalars, dotted keys nested into sections, YAML files,
coercion to a field's type and range checks. Every error is a ``TrainConfigError`` that names the key
and what is allowed. (``grass_llm.recipes.train_config`` builds ``TrainConfig`` with these.)"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "TrainConfigError",
    "build_dataclass",
    "check_bool",
    "check_choice",
    "check_int",
    "check_non_negative",
    "check_positive",
    "coerce",
    "deep_update",
    "dotted_help",
    "nest",
    "parse_scalar",
    "read_yaml_mapping",
    "section_class",
    "unknown_key",
]


class TrainConfigError(ValueError):
    """A training setting is unknown or out of range. The message names the key and what is allowed."""


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (empty file: ``{}``); ``TrainConfigError`` says what is wrong."""
    import yaml

    p = Path(path)
    if p.is_dir():
        raise TrainConfigError(f"config file {str(p)!r} is a directory; allowed: a YAML file")
    if not p.is_file():
        raise TrainConfigError(f"config file {str(p)!r} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:  # (one line: the problem and where, e.g. line 2, column 1)
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise TrainConfigError(f"config file {str(p)!r} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise TrainConfigError(f"config file {str(p)!r} is not a text file; allowed: a YAML file") from None
    except OSError as e:
        raise TrainConfigError(f"config file {str(p)!r} cannot be read: {e.strerror}") from None
    if not isinstance(loaded, dict):
        raise TrainConfigError(f"config file {str(p)!r} must hold a mapping of key: value")
    return loaded


def parse_scalar(text: str) -> Any:
    """A command-line value: YAML scalars/lists (``4``, ``true``, ``null``, ``[a, b]``), else the text."""
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def nest(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise TrainConfigError(f"config key {key!r} is invalid; allowed: a string")
        if isinstance(value, dict):
            value = nest(value)
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"config key {key!r}: {part!r} is not a section")
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            deep_update(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return out


def deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_update(dst[k], v)
        else:
            dst[k] = v


def section_class(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def dotted_help(cls: type) -> dict[str, str]:
    """Every settable key of the dataclass ``cls`` (a section's keys dotted: ``grass.active_layers``)
    -> its help text (``field(metadata={"help": ...})``)."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = section_class(hints[f.name])
        if sub is None:
            out[f.name] = f.metadata.get("help", "")
        else:
            out.update({f"{f.name}.{g.name}": g.metadata.get("help", "") for g in dataclasses.fields(sub)})
    return out


def build_dataclass(
    cls: type,
    data: dict[str, Any],
    unknown: Callable[[str], str],
    prefix: str = "",
    raw_sections: tuple[type, ...] = (),
) -> Any:
    """``cls(**data)`` with every value coerced to its field's type and each section built the same way,
    except that a section whose class is in ``raw_sections`` is handed over as the dict of the keys
    given (coerced, not completed). An unknown key raises ``TrainConfigError(unknown(dotted key))``."""
    return cls(**_coerced_fields(cls, data, unknown, prefix, raw_sections))


def _coerced_fields(
    cls: type, data: dict[str, Any], unknown: Callable[[str], str], prefix: str, raw: tuple[type, ...]
) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:  # (an unknown section is named by its first key: gras.period, not gras)
            leaf = f"{prefix}{key}"
            while isinstance(value, dict) and value:
                key, value = next(iter(value.items()))
                leaf += f".{key}"
            raise TrainConfigError(unknown(leaf))
        sub = section_class(hints[key])
        if sub is None:
            kwargs[key] = coerce(prefix + key, value, hints[key])
        elif not isinstance(value, dict):
            raise TrainConfigError(f"{prefix}{key} is a section; set its keys, e.g. {prefix}{key}.<name>=...")
        elif sub in raw:
            kwargs[key] = _coerced_fields(sub, value, unknown, f"{prefix}{key}.", raw)
        else:
            kwargs[key] = build_dataclass(sub, value, unknown, f"{prefix}{key}.", raw)
    return kwargs


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert a YAML / command-line value to the field's type, or raise naming the key."""
    args = typing.get_args(tp)
    optional = type(None) in args
    base = [a for a in args if a is not type(None)] if args and typing.get_origin(tp) is not list else [tp]
    target = base[0] if len(base) == 1 else tp
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and optional):
        if optional or tp is Any:
            return None
        raise TrainConfigError(f"{name}=null is invalid; allowed: a value of type {_type_name(target)}")
    if target is Any:
        return value
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise TrainConfigError(f"{name}={value!r} is invalid; allowed: true or false")
    if target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise TrainConfigError(f"{name}={value!r} is invalid; allowed: an integer")
    if target is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-5 as a string
            except ValueError:
                pass
        raise TrainConfigError(f"{name}={value!r} is invalid; allowed: a number")
    if typing.get_origin(target) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise TrainConfigError(f"{name}={value!r} is invalid; allowed: a list of strings (or a,b,c)")
    if target is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TrainConfigError(f"{name}={value!r} is invalid; allowed: a string")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise TrainConfigError(f"{name}={value!r} is unknown{hint}; allowed: {', '.join(allowed)}")


def check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise TrainConfigError(f"{name}={value!r} is invalid; allowed: an integer >= {low}")


def check_real(name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise TrainConfigError(f"{name}={value!r} is invalid; allowed: a finite number")
    return float(value)


def check_positive(name: str, value: Any) -> None:
    if check_real(name, value) <= 0:
        raise TrainConfigError(f"{name}={value!r} is invalid; allowed: a number > 0")


def check_non_negative(name: str, value: Any) -> None:
    if check_real(name, value) < 0:
        raise TrainConfigError(f"{name}={value!r} is invalid; allowed: a number >= 0")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TrainConfigError(f"{name}={value!r} is invalid; allowed: true or false")


#: keys of earlier versions and the names other trainers (HF TrainingArguments, TRL, torchtune) give to keys
#: of ours, with what to write instead
OTHER_NAMES = {
    "gradient_checkpointing": "activation_checkpointing=full",
    "learning_rate": "lr",
    "gradient_accumulation_steps": "grad_accum",
    "per_device_train_batch_size": "batch_size",
    "max_seq_length": "max_length",
    "max_seq_len": "max_length",
    "seq_len": "max_length",
    "num_train_epochs": "epochs",
    "warmup_steps": "warmup",
    "output_dir": "out_dir",
    "model_name_or_path": "model",
}


def unknown_key(full: str, known: list[str]) -> str:
    """The message for the unknown dotted key ``full``: what to write instead (another trainer's name, a key
    of an earlier version, the key in other letter case) or the closest ``known`` keys."""
    close = difflib.get_close_matches(full, known, n=3, cutoff=0.6)
    if full.lower() in OTHER_NAMES or full.lower() in known:  # (LR, Batch_Size)
        close = [OTHER_NAMES.get(full.lower(), full.lower())]
    if full.startswith("lisa."):  # the section of earlier versions
        close = [f"grass.{full[5:]}"]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {full!r}{hint} (run `grass-llm train -h` for the list)"
