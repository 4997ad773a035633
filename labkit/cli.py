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


def main() -> None:
    started = time.time_ns()
    argv = sys.argv[1:]
    if not helpcache.eligible(argv):
        make_program().run()
        return
    out = helpcache.lookup(argv)
    if out is not None:
        try:
            sys.stdout.write(out)
            sys.stdout.flush()
        except BrokenPipeError:  # `labkit --help | head`: stop quietly, as tasks do
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
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
