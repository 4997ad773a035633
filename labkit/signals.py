"""SIGTERM and SIGHUP end a task exactly as Ctrl-C does; a second signal never cuts short the
cleanup the first one started.

A CI runner or systemd stops a job with SIGTERM, a closed terminal sends SIGHUP; Python's
default for both is to die on the spot, which drops the SSH connections and leaves the remote
commands running (OpenSSH's sshd does not kill a session's processes when its client goes).
Ctrl-C, by contrast, raises KeyboardInterrupt, and every cleanup path of labkit (the fan-out's,
the run loop's kill by marker, migrate-test's cleanup) is written against that. So while a task
runs, the first of the three signals raises ``Interrupted`` (a KeyboardInterrupt), sets the
task's cancel event (which run loops polled from worker threads, ``labkit run``, watch) and
calls the callbacks registered with :func:`on_cancel` (the BMC client's cancel, so that
workers blocked on a dead BMC return within a poll). The task ends with one line on stderr and
exit 128 + the first signal's number (130 for SIGINT, as before; 143 SIGTERM; 129 SIGHUP), what
a shell reports for a process the signal killed.

Later signals do NOT raise: raised inside the first one's cleanup (the fan-out waiting for its
workers to kill by marker, MigrateRun.cleanup) they would cut it short and leave every remote
process running — and signals come in pairs: a closed terminal often delivers SIGHUP twice
(kernel and shell), Ctrl-C twice is a habit. They only set the cancel event and call the
callbacks again, and say on stderr (one line each) that the cleanup is still under way. Only a
SIGINT after two signals (Ctrl-C a third time: a person insisting) abandons the cleanup: one
line saying so and an immediate exit, 128 + the first signal. Machines that stop jobs escalate
with SIGKILL on their own, so their repeated SIGTERM/SIGHUP never abandon anything.

THE one place these signals are handled: ``labtask`` (``labkit.tasks.common``) runs every task
body through :func:`call`; library code that must react to them (the power tasks' BMC client,
the interactive console restoring the terminal) uses :func:`on_cancel` / :func:`handled`, which
join the running task's handling (or, outside a task, set it up for their own body). Only from
the main thread (the only one Python delivers signals to), and never over a signal the user
had ignored (``nohup`` ignores SIGHUP; a shell's background job ignores SIGINT).

Stdlib only and cheap to import: every ``labkit`` command imports it.
"""

from __future__ import annotations

import contextlib  # already imported by Python's start-up: free
import os
import signal
import sys
import threading

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs start-up time
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any, TypeVar

    T = TypeVar("T")

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# after the first signal, the repeat that says cleanup goes on, and the SIGINT that abandons it
STILL_CLEANING = "interrupted again: finishing the cleanup first (Ctrl-C again to abandon it)"
ABANDONED = "cleanup abandoned: commands the task started may still be running on the nodes"


class Interrupted(KeyboardInterrupt):
    """The task was told to stop by ``signo``. A KeyboardInterrupt, so that every ``except
    KeyboardInterrupt`` cleanup treats it as Ctrl-C."""

    def __init__(self, signo: int):
        super().__init__(signal.Signals(signo).name)
        self.signo = signo


def _say(line: str) -> None:
    """``line`` on stderr from a signal handler: os.write, since the handler may run in the
    middle of a write to sys.stderr (a reentrant buffered write raises); a hung-up terminal
    (SIGHUP) is no reason to fail."""
    try:
        os.write(2, f"{line}\n".encode())
    except OSError:
        pass


class _Scope:
    """The signals received while one task (or one :func:`handled` body outside a task) runs,
    its cancel event and its cancel callbacks."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.signo: int | None = None  # the first signal received
        self.received = 0
        self.callbacks: list[Callable[[], None]] = []
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in SIGNALS:
            old = signal.getsignal(sig)
            if old is signal.SIG_IGN or old is None:  # ignored on purpose / not set from Python
                continue
            self.previous[sig] = old
            signal.signal(sig, self.handler)
        _scopes.append(self)

    def uninstall(self) -> None:
        _scopes.remove(self)
        for sig, old in self.previous.items():
            signal.signal(sig, old)

    def handler(self, signo: int, frame: object) -> None:
        self.received += 1
        first = self.signo is None
        if first:
            self.signo = signo
        self.cancel.set()
        for callback in tuple(self.callbacks):
            callback()
        if first:
            raise Interrupted(signo)
        if signo == signal.SIGINT and self.received >= 3:
            _say(ABANDONED)
            os._exit(128 + (self.signo or signo))  # no atexit: it would wait for the workers
        _say(STILL_CLEANING)


_scopes: list[_Scope] = []


def cancel_event() -> threading.Event:
    """Set when the running task receives SIGINT, SIGTERM or SIGHUP: what a worker thread's
    run loop watches (the exception itself reaches the main thread only). Outside a task (or
    off the main thread) an event that no signal sets."""
    return _scopes[-1].cancel if _scopes else threading.Event()


def message(signo: int) -> str:
    """The one line a task interrupted by ``signo`` prints."""
    if signo == signal.SIGINT:
        return "interrupted"
    return f"interrupted ({signal.Signals(signo).name})"


@contextlib.contextmanager
def handled() -> Iterator[threading.Event]:
    """While the body runs, SIGINT/SIGTERM/SIGHUP are handled as described above: inside a
    task that is already so (nothing changes); outside one, on the main thread, for this body
    only, so library code (the interactive console) gets the same Interrupted, not a death on
    the spot that skips its ``finally``. Yields the cancel event."""
    if _scopes or threading.current_thread() is not threading.main_thread():
        yield cancel_event()
        return
    scope = _Scope()
    scope.install()
    try:
        yield scope.cancel
    finally:
        scope.uninstall()


@contextlib.contextmanager
def on_cancel(callback: Callable[[], None]) -> Iterator[None]:
    """While the body runs, every SIGINT/SIGTERM/SIGHUP calls ``callback()`` (in the main
    thread, from the signal handler, before the first one's Interrupted is raised): for a
    blocking wait a worker thread cannot see the exception in, such as the BMC client's cancel.
    At once if the task was already told to stop. ``callback`` must be quick and must not take
    a lock the main thread may hold (setting an Event is the intended use)."""
    with handled():
        scope = _scopes[-1] if _scopes else None
        if scope is None:  # off the main thread outside any task: no signal reaches us
            yield
            return
        scope.callbacks.append(callback)
        try:
            if scope.cancel.is_set():
                callback()
            yield
        finally:
            scope.callbacks.remove(callback)


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` with SIGINT/SIGTERM/SIGHUP handled as described above; an
    interrupt that comes out of it (from a signal, or a plain KeyboardInterrupt, whatever the
    thread) is printed as one line and becomes Invoke's ``Exit(128 + signo)``."""
    scope: _Scope | None = None
    if threading.current_thread() is threading.main_thread():
        scope = _Scope()
        scope.install()
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt as e:
        # a cleanup may have re-raised a plain KeyboardInterrupt: the first signal decides
        signo = (scope and scope.signo) or getattr(e, "signo", None) or signal.SIGINT
        try:
            print(message(signo), file=sys.stderr, flush=True)
        except (OSError, ValueError):  # SIGHUP: the terminal may be gone
            pass
        from invoke.exceptions import Exit

        raise Exit(code=128 + signo) from None
    finally:
        if scope is not None:
            scope.uninstall()
