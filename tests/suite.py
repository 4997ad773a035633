"""The whole suite as ``make test`` runs it: the tests that boot QEMU guests (marker ``vm``) in one
pytest process and everything else in another, at the same time.

Why two processes rather than pytest-xdist: the guest tests are about half the suite's time
and mostly wait on TCG guests, the rest mostly wait on fake BMCs and sockets, so the two
halves overlap well on two cores; but the guest tests must keep their order (a module boots
one lab and its tests build on each other), and xdist's ``loadgroup`` no longer keeps a group
on one worker under pytest 9. Two plain pytest runs keep each half's order and fixtures as
they are when run alone (not its CPU: the other half shares the machine).

    python tests/suite.py [PYTEST ARGS...]

Each half is told which it is by ``LABKIT_SUITE_HALF`` (``vm`` or ``rest``) and deselects the
other's tests itself (``tests/conftest.py``), so ``-m``, ``-k``, paths and ``PYTEST_ADDOPTS``
narrow both halves as they narrow one pytest run; ``-x`` and ``--maxfail`` apply per half.
The rest's output streams; the guest half's goes to a file, printed whole at the end (and kept
when it failed). The exit status is the rest's, or the guest half's when the rest passed; a
half that selected no test counts as passed.

A signal (^C, or a CI job's SIGTERM) is passed to each half once, as SIGINT, which pytest
answers by tearing its fixtures down (labs stopped, guests ended); a second one kills them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

HALF_VAR = "LABKIT_SUITE_HALF"
NO_TESTS = 5  # pytest's exit status when nothing was selected
USAGE = 4  # pytest's exit status for a usage error
# options that name one output for the whole run: two halves would overwrite each other's
SHARED_OUTPUT = ("--junitxml", "--junit-xml", "--report-log", "--resultlog", "--basetemp",
                 "--cov", "--pdb", "--trace")


def shared_output(args: list[str]) -> str | None:
    """The first option among ``args`` that two concurrent halves cannot share."""
    for a in args:
        name = a.split("=", 1)[0]
        if name in SHARED_OUTPUT:
            return name
    return None


def status(rc: int) -> int:
    """A child's exit status as a shell shows it (killed by signal N: 128 + N)."""
    return rc if rc >= 0 else 128 - rc


def combined(rest_rc: int, guests_rc: int) -> int:
    """One exit status for the two halves."""
    rest_rc, guests_rc = status(rest_rc), status(guests_rc)
    if rest_rc == guests_rc == NO_TESTS:
        return NO_TESTS
    for rc in (rest_rc, guests_rc):
        if rc not in (0, NO_TESTS):
            return rc
    return 0


class Halves:
    """The two pytest processes, each in a process group of its own (a terminal's ^C reaches
    only this process, which passes it on once), and the signals they were sent."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.sent: dict[int, int] = {}  # pid -> how many of our signals it has had
        self.signalled = 0

    def start(self, argv: list[str], **popen: object) -> subprocess.Popen | None:
        if self.signalled:
            return None
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, process_group=0, **popen)
        self.procs.append(p)
        self.deliver()  # a signal that came while it started
        return p

    def on_signal(self, _signum: int, _frame: object) -> None:
        self.signalled += 1
        self.deliver()

    def deliver(self) -> None:
        """First signal: SIGINT (pytest tears its fixtures down); any later one: SIGKILL."""
        for p in list(self.procs):
            while self.sent.get(p.pid, 0) < self.signalled and p.poll() is None:
                self.sent[p.pid] = n = self.sent.get(p.pid, 0) + 1
                try:
                    os.killpg(p.pid, signal.SIGINT if n == 1 else signal.SIGKILL)
                except ProcessLookupError:
                    break


def main(argv: list[str]) -> int:
    if (opt := shared_output(argv)) is not None:
        print(f"suite: {opt} names one output for the whole run, and the two halves would "
              f"overwrite it: run `.venv/bin/python -m pytest {opt} ...` instead",
              file=sys.stderr)
        return USAGE
    halves = Halves()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, halves.on_signal)
    pytest = [sys.executable, "-m", "pytest", "-q"]
    # its own cache folder: the two halves would overwrite each other's lastfailed
    cache = [] if any("no:cacheprovider" in a for a in argv) else [
        "-o", "cache_dir=.pytest_cache/guests"]
    log = tempfile.NamedTemporaryFile("w+b", prefix="labkit-guest-tests-", suffix=".log",
                                      delete=False)
    with log:
        print(f"suite: the guest tests run alongside; their output follows the rest's "
              f"(live in {log.name})", flush=True)
        guests = halves.start([*pytest, *cache, *argv], env={**os.environ, HALF_VAR: "vm"},
                              stdout=log, stderr=subprocess.STDOUT)
        rest = halves.start([*pytest, *argv], env={**os.environ, HALF_VAR: "rest"})
        rest_rc = rest.wait() if rest is not None else -signal.SIGINT
        if guests is not None and guests.poll() is None:
            print(f"\nsuite: the rest is done; waiting for the guest tests (log: {log.name})",
                  flush=True)
        guests_rc = guests.wait() if guests is not None else -signal.SIGINT
        print("\n=== the guest tests (marker vm), run alongside ===", flush=True)
        log.seek(0)
        sys.stdout.buffer.write(log.read())
        sys.stdout.flush()
    keep_log = status(guests_rc) not in (0, NO_TESTS)
    if not keep_log:
        os.unlink(log.name)
    rc = combined(rest_rc, guests_rc)
    kept = f"; the guest tests' log is kept in {log.name}" if keep_log else ""
    print(f"suite: exit {rc} (the rest: {status(rest_rc)}, the guest tests: "
          f"{status(guests_rc)}){kept}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
