"""Words for people: the one place labkit turns a count into English.

Node-side programs (``labkit/nodeside``) cannot import this (they run on nodes with only the
stdlib) and keep a two-line copy each, marked as such."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 file``, ``2 files``; ``many`` for irregular forms (``plural(n, "file differs",
    "files differ")``): never "1 files" in what a person reads."""
    return f"{n} {word if n == 1 else (many or word + 's')}"
