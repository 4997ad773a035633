"""The whole suite as ``make test`` runs it: the tests that boot QEMU guests (marker ``vm``) in one
pytest process and everything else in another, at the same time.

Why two processes rather than pytest-xdist: the guest tests are about half the suite's time
and mostly wait on TCG guests, the rest mostly wait on fake BMCs and sockets, so the two
halves overlap well on two cores; but the guest tests must keep their order (a module boots
one lab and its tests build on each other), and xdist's ``loadgroup`` no longer keeps a group
on one worker under pytest 9. Two plain pytest runs keep each half exactly as it runs alone.

    python tests/suite.py [PYTEST ARGS...]

A ``-m EXPR`` among the arguments narrows both halves. The rest's output streams; the guest
half's is written to a file and printed whole at the end. The exit status is the rest's, or
the guest half's when the rest passed; a half that selected no test counts as passed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_TESTS = 5  # pytest's exit status when nothing was selected


def split_marker(args: list[str]) -> tuple[str | None, list[str]]:
    """The ``-m`` expression among pytest arguments (the last one wins, as in pytest), and the
    arguments without it."""
    expr, rest, i = None, [], 0
    while i < len(args):
        a = args[i]
        if a == "-m" and i + 1 < len(args):
            expr, i = args[i + 1], i + 2
            continue
        if a.startswith("-m") and not a.startswith("--") and len(a) > 2:
            expr = a[2:].removeprefix("=")
        else:
            rest.append(a)
        i += 1
    return expr, rest


def half(expr: str | None, mine: str) -> str:
    return mine if expr is None else f"({expr}) and {mine}"


def combined(rest_rc: int, guests_rc: int) -> int:
    """One exit status for the two halves (a half killed by signal N counts as 128 + N)."""
    rest_rc, guests_rc = (rc if rc >= 0 else 128 - rc for rc in (rest_rc, guests_rc))
    if rest_rc == guests_rc == NO_TESTS:
        return NO_TESTS
    for rc in (rest_rc, guests_rc):
        if rc not in (0, NO_TESTS):
            return rc
    return 0


def main(argv: list[str]) -> int:
    expr, args = split_marker(argv)
    pytest = [sys.executable, "-m", "pytest"]
    with tempfile.NamedTemporaryFile("w+b", prefix="labkit-guest-tests-", suffix=".log") as log:
        print(f"suite: the guest tests run alongside; their output follows the rest's "
              f"(live in {log.name})", flush=True)
        # its own cache folder: the two halves would overwrite each other's lastfailed
        cache = [] if "no:cacheprovider" in args else ["-o", "cache_dir=.pytest_cache/guests"]
        guests = subprocess.Popen([*pytest, "-q", "-m", half(expr, "vm"), *cache, *args],
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
        rest = subprocess.Popen([*pytest, "-q", "-m", half(expr, "not vm"), *args], cwd=ROOT)
        children = (rest, guests)

        def forward(signum: int, _frame: object) -> None:
            for p in children:  # a terminal's ^C reaches them itself; a kill of us does not
                if p.poll() is None:
                    os.kill(p.pid, signum)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, forward)
        rest_rc = rest.wait()
        guests_rc = guests.wait()
        sys.stdout.flush()
        print("\n=== the guest tests (marker vm), run alongside ===", flush=True)
        log.seek(0)
        sys.stdout.buffer.write(log.read())
        sys.stdout.flush()
    rc = combined(rest_rc, guests_rc)
    print(f"suite: rest exit {rest_rc}, guest tests exit {guests_rc}: exit {rc}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
