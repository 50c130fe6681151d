"""Text shared by the error messages: an exception's message on one line (every failure the commands
report is one line)."""

from __future__ import annotations

__all__ = ["one_line"]


def one_line(e: BaseException, limit: int | None = 1000, empty: str | None = None) -> str:
    """``e``'s message on one line (its non-blank lines stripped and joined by a space), cut to ``limit``
    characters (``None``: not cut); a message without text gives ``empty``, by default the exception's type."""
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    if not text:
        return type(e).__name__ if empty is None else empty
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
