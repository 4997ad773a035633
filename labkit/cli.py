"""The installed ``labkit`` program: an Invoke Program over the same namespace as tasks.py."""

from __future__ import annotations

from invoke import Program

from labkit import __version__
from labkit.tasks import namespace

program = Program(namespace=namespace, name="labkit", binary="labkit", version=__version__)


def main() -> None:
    program.run()


if __name__ == "__main__":
    main()
