"""The installed ``labkit`` program: an Invoke Program over the same namespace as tasks.py."""

from __future__ import annotations

from invoke import Program
from invoke.exceptions import Exit, ParseError

from labkit import __version__
from labkit.tasks import namespace


class LabkitProgram(Program):
    """Invoke's Program, with labkit's error contract for the command line itself: an unknown
    task, an unknown flag, a missing value or a value of the wrong type is one ``error:`` line
    and exit 2 (usage), never a traceback or Invoke's exit 1."""

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


program = LabkitProgram(namespace=namespace, name="labkit", binary="labkit",
                        version=__version__)


def main() -> None:
    program.run()


if __name__ == "__main__":
    main()
