"""The installed ``labkit`` program: an Invoke Program over the same namespace as tasks.py.

Start-up: nothing heavy is imported at module level. ``--help``, ``--list``, ``--version`` (and
``--help TASK``) are first looked up in ``labkit.helpcache`` — Invoke's own output of an
earlier run, replayed only when nothing it depends on changed — so the help a user reads costs
a bare interpreter start, not Invoke's import. Everything else (and every cache miss) runs
Invoke as before."""

from __future__ import annotations

import sys
import time

from labkit import helpcache

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing is 10% of a bare start
if TYPE_CHECKING:
    from typing import Any


_CLASS: list[type] = []


def _program_class() -> type:
    """LabkitProgram, defined on first use (it subclasses Invoke's Program) and kept."""
    if _CLASS:
        return _CLASS[0]
    from invoke import Program
    from invoke.exceptions import Exit, ParseError

    class LabkitProgram(Program):
        """Invoke's Program, with labkit's error contract for the command line itself: an
        unknown task, an unknown flag, a missing value or a value of the wrong type is one
        ``error:`` line and exit 2 (usage), never a traceback or Invoke's exit 1."""

        def parse_tasks(self) -> None:
            try:
                super().parse_tasks()
            except ParseError as e:
                raise Exit(f"error: {e}", code=2) from None
            except ValueError as e:  # a typed flag (int/float) given a non-number
                raise Exit(f"error: bad option value: {e}", code=2) from None

        def parse_core(self, argv: list[str] | None) -> None:
            try:
                super().parse_core(argv)
            except ParseError as e:
                raise Exit(f"error: {e}", code=2) from None

    _CLASS.append(LabkitProgram)
    return LabkitProgram


def make_program() -> Any:
    """The Invoke Program (imports Invoke and every task module)."""
    from labkit import __version__
    from labkit.tasks import namespace

    return _program_class()(namespace=namespace, name="labkit", binary="labkit",
                            version=__version__)


def __getattr__(name: str) -> Any:
    # ``labkit.cli.program`` / ``LabkitProgram`` as before, built on first use
    if name == "program":
        return make_program()
    if name == "LabkitProgram":
        return _program_class()
    raise AttributeError(name)


def silence_stdout() -> None:
    """Point stdout at /dev/null. Called once its reader is gone (``labkit --list | head``):
    writing on, or the interpreter's flush at exit, would otherwise raise BrokenPipeError
    again, and Python prints that as a traceback. Stdlib only, so the cached help path and
    the tasks (labkit.tasks.common) can share it without importing Invoke."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no usable stdout at all: nothing left to flush into it
        pass


def main() -> None:
    """Run ``labkit``. A closed stdout ends it quietly with 141 (128 + SIGPIPE, what a shell
    reports for a tool killed by SIGPIPE) on every path: the cached help, Invoke's own help
    and listing (cache miss, cache off, or a command line the cache does not take), as the
    tasks themselves do."""
    try:
        try:
            _main()
        finally:  # short output may still sit in the buffer: fail here, not at exit
            sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()
        sys.exit(141)


def _main() -> None:
    started = time.time_ns()
    argv = sys.argv[1:]
    if not helpcache.eligible(argv):
        make_program().run()
        return
    out = helpcache.lookup(argv)
    if out is not None:
        sys.stdout.write(out)
        sys.stdout.flush()
        return
    stdout, stderr = helpcache.Tee(sys.stdout), helpcache.Tee(sys.stderr)
    sys.stdout, sys.stderr = stdout, stderr  # type: ignore[assignment]
    ok = False
    try:
        make_program().run()
        ok = True
    except SystemExit as e:
        ok = e.code in (0, None)
        raise
    finally:
        sys.stdout, sys.stderr = stdout.real, stderr.real
        if ok and not stderr.text():
            helpcache.store(argv, stdout.text(), started)


if __name__ == "__main__":
    main()
