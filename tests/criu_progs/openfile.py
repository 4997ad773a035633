#!/usr/bin/env python3
"""A process with a regular file open for writing, for the CRIU tests: it opens PATH once
(created if missing, appended to, never reopened) and writes the line `N` every --period
seconds, N = 1, 2, 3... from a counter in memory. After a migration the file on dst holds
1..M with no gap or repeat only if the file travelled at the moment of the freeze and the fd
(its offset, O_APPEND) was restored onto it. It prints `opened PATH` once to stdout.

stdlib only; runs on the node as ``python3 openfile.py PATH [--period S]``."""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path")
    ap.add_argument("--period", type=float, default=0.1)
    a = ap.parse_args(argv)
    fd = os.open(a.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    print(f"opened {a.path}", flush=True)
    n = 0
    while True:
        n += 1
        os.write(fd, f"{n}\n".encode())
        time.sleep(a.period)


if __name__ == "__main__":
    sys.exit(main())
