"""Memory sizes as a user writes them: ``24GiB``, ``24GB``, ``24 GiB``, ``512MiB`` or a plain number of GiB.

One parser for ``grass-llm memory --budget`` and ``grass-llm train memory_budget=`` (which validates it with
the rest of ``TrainConfig``, so the module imports nothing of the package).
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["UNITS", "BudgetError", "format_size", "parse_budget"]

#: unit -> bytes (binary units are powers of 1024, decimal ones of 1000); case does not matter
UNITS = {
    "b": 1,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_ALLOWED = "a memory size such as 24GiB, 24GB, 24 GiB, 512MiB, or a plain number of GiB (24)"


class BudgetError(ValueError):
    """A memory size that cannot be read; the message names the option and what is allowed."""


def parse_budget(name: str, value: Any) -> int:
    """``value`` (a string with a unit, or a number of GiB) in bytes; :class:`BudgetError` naming ``name``
    (the option or key it came from) when it is not a positive, finite size."""
    if isinstance(value, bool) or value is None:
        raise BudgetError(f"{name}={value!r} is invalid; allowed: {_ALLOWED}")
    if isinstance(value, (int, float)):
        number, unit = float(value), "gib"
    else:
        found = _SIZE.match(str(value))
        if found is None or (found.group(2) and found.group(2).lower() not in UNITS):
            raise BudgetError(f"{name}={value!r} is invalid; allowed: {_ALLOWED}")
        number, unit = float(found.group(1)), (found.group(2).lower() or "gib")
    size = number * UNITS[unit]
    if not (math.isfinite(size) and size >= 1):
        raise BudgetError(f"{name}={value!r} is invalid; allowed: a size > 0 ({_ALLOWED})")
    return int(size)


def format_size(nbytes: float) -> str:
    """``nbytes`` in GiB with two decimals (``24.00 GiB``), below 0.1 GiB in MiB (``12.3 MiB``)."""
    if abs(nbytes) < 0.1 * 2**30:
        return f"{nbytes / 2**20:.1f} MiB"
    return f"{nbytes / 2**30:.2f} GiB"
