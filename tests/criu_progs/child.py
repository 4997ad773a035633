#!/usr/bin/env python3
"""A process with a child for the CRIU tests: it forks once; parent and child each print
`parent|child PID count C` every --period seconds to the shared stdout (the child checks that
its parent is still the one it was forked from, so a tree restored with the wrong shape says
so: `child ... orphaned`). Both counters must continue across a migration, the pids stay.

stdlib only; runs on the node as ``python3 child.py [--period S]``."""

from __future__ import annotations

import argparse
import os
import sys
import time


def loop(role: str, period: float, parent: int | None) -> None:
    c = 0
    while True:
        c += 1
        orphaned = parent is not None and os.getppid() != parent
        os.write(1, f"{role} {os.getpid()} count {c}{' orphaned' if orphaned else ''}\n"
                 .encode())
        time.sleep(period)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--period", type=float, default=0.2)
    a = ap.parse_args(argv)
    me = os.getpid()
    pid = os.fork()
    if pid == 0:
        loop("child", a.period, me)
    loop("parent", a.period, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
