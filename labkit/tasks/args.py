"""Task arguments the user types: numbers, selectors, output folders. Checked here, before a
lease is looked at or a packet sent, so that a bad one is ``error: <one line>``, exit 2, with
nothing started — through ``labkit`` and ``invoke`` alike.

Why every numeric flag is a ``str`` parameter parsed here, not an ``int``/``float`` one:
Invoke converts typed parameters itself, before any labkit code runs, and under ``invoke`` a
``--pid abc`` is then a 20-line ``ValueError`` traceback (``labkit`` catches it, ``invoke``
cannot be taught to); ``float`` also happily reads ``nan``, ``inf`` and ``1e999``. The one
number parser is :func:`labkit.config.parse_number` (config values and matrix cells use it
too); these are its task-flag spellings."""

from __future__ import annotations

import os
from pathlib import Path

from labkit.config import parse_number
from labkit.errors import UserError

__all__ = ["count", "integer", "number", "seconds", "writable_folder"]


def integer(text: str | int, flag: str, *, minimum: int | None = None,
            maximum: int | None = None) -> int:
    """A whole number in range (``--pid``, ``--busy``, ``--max-rounds`` ...)."""
    return int(parse_number(text, flag, integer=True, minimum=minimum, maximum=maximum))


def count(text: str | int, flag: str) -> int:
    """A whole number >= 1 (``--count``)."""
    return integer(text, flag, minimum=1)


def number(text: str | float, flag: str, *, minimum: float | None = None,
           above: float | None = None, maximum: float | None = None,
           shown: str | None = None) -> float:
    """A finite decimal number in range (``--drop``, ``--rate`` ...). ``shown``: how an
    error names the value when it is one part of a flag (``--power-delay '1,x'``)."""
    return float(parse_number(text, flag, minimum=minimum, above=above, maximum=maximum,
                              shown=shown))


def seconds(text: str | float, flag: str, *, allow_zero: bool = False,
            shown: str | None = None) -> float:
    """A duration in seconds: finite, > 0 (or >= 0 with ``allow_zero``)."""
    if allow_zero:
        return number(text, flag, minimum=0.0, shown=shown)
    return number(text, flag, above=0.0, shown=shown)


def writable_folder(path: str | os.PathLike, what: str) -> Path:
    """A folder labkit will create files in (results, the fake lab's state): it exists as a
    folder we may write in, or the nearest existing parent is one (it is created on first
    use). Checked up front, so that a run is not set up, powered and measured only to fail
    when it writes its first result."""
    p = Path(os.path.expanduser(str(path)))
    probe = p
    while not os.path.lexists(probe):
        if probe.parent == probe:
            break
        probe = probe.parent
    where = f"{what} {p}"
    if probe != p:
        where += f" (missing; its parent {probe})"
    try:
        if not probe.is_dir():
            kind = "a dangling symlink" if probe.is_symlink() and not probe.exists() else \
                "not a folder"
            raise UserError(f"{where}: {'cannot be created, ' if probe != p else ''}{kind}")
    except OSError as e:  # a parent we may not search: stat itself fails
        raise UserError(f"{where}: {e.strerror}") from None
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{where}: not writable (permission denied)")
    # access() says yes to root everywhere, also where nothing can be created (/proc, a
    # read-only bind mount): try it, with an empty folder removed at once
    trial = probe / f".labkit-write-check-{os.getpid()}"
    try:
        os.mkdir(trial)
        os.rmdir(trial)
    except FileExistsError:
        pass
    except OSError as e:
        raise UserError(f"{where}: not writable ({e.strerror})") from None
    return p
