"""Secrets (BMC passwords, key passphrases) are held as bytes, never formatted into argv, logs,
results or exception text. Every secret labkit resolves is registered here so that text leaving
the process (error messages, outcome tables, JSON) can be scrubbed as a last line of defence."""

from __future__ import annotations

import threading

_lock = threading.Lock()
_known: set[bytes] = set()
MASK = "********"


class Secret:
    """A password that refuses to show itself in repr/str/format."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes):
        self._value = value
        register(value)

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret(********)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def register(value: bytes | str) -> None:
    if isinstance(value, str):
        value = value.encode()
    if len(value) >= 4:  # masking 1-3 byte strings would shred ordinary text
        with _lock:
            _known.add(value)


def scrub(text: str) -> str:
    """Replace every registered secret in text with a mask."""
    if not text:
        return text
    with _lock:
        known = list(_known)
    for value in known:
        s = value.decode(errors="replace")
        if s in text:
            text = text.replace(s, MASK)
    return text
