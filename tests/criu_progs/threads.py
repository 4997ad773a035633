#!/usr/bin/env python3
"""A multi-threaded program for the CRIU tests: N threads (default 3), each advancing its own
counter and printing `thread I count C` every --period seconds, plus the main thread doing the
same as thread 0. Counters live in each thread's own frame, so a migration that lost or
restarted a thread shows as a gap, a repeat or a silent thread in the output (each thread's
counts must run 1, 2, 3... with nothing skipped across the migration).

stdlib only; runs on the node as ``python3 threads.py [--threads N] [--period S]``."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time


def count(index: int, period: float, lock: threading.Lock) -> None:
    c = 0
    while True:
        c += 1
        with lock:  # one whole line per write: threads never interleave inside a line
            os.write(1, f"thread {index} count {c}\n".encode())
        time.sleep(period)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=3, help="threads besides the main one")
    ap.add_argument("--period", type=float, default=0.2)
    a = ap.parse_args(argv)
    lock = threading.Lock()
    for i in range(1, a.threads + 1):
        threading.Thread(target=count, args=(i, a.period, lock), daemon=True).start()
    count(0, a.period, lock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
