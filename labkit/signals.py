"""SIGTERM and SIGHUP end a task exactly as Ctrl-C does.

A CI runner or systemd stops a job with SIGTERM, a closed terminal sends SIGHUP; Python's
default for both is to die on the spot, which drops the SSH connections and leaves the remote
commands running (OpenSSH's sshd does not kill a session's processes when its client goes).
Ctrl-C, by contrast, raises KeyboardInterrupt, and every cleanup path of labkit (the fan-out's,
the run loop's kill by marker, migrate-test's cleanup) is written against that. So while a task
runs, all three signals raise the same exception, ``Interrupted`` (a KeyboardInterrupt), and set
the task's cancel event, which run loops polled from worker threads (``labkit run``) watch.
The task ends with one line on stderr and exit 128 + the signal's number (130 for SIGINT, as
before; 143 SIGTERM; 129 SIGHUP), what a shell reports for a process the signal killed.

Installed around every task body by ``labtask`` (``labkit.tasks.common``) through ``call``;
only from the main thread (the only one Python delivers signals to), and never over a signal
the user had ignored (``nohup`` ignores SIGHUP; a shell's background job ignores SIGINT).

Stdlib only and cheap to import: every ``labkit`` command imports it.
"""

from __future__ import annotations

import signal
import sys
import threading

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs start-up time
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    T = TypeVar("T")

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """The task was told to stop by ``signo``. A KeyboardInterrupt, so that every ``except
    KeyboardInterrupt`` cleanup treats it as Ctrl-C."""

    def __init__(self, signo: int):
        super().__init__(signal.Signals(signo).name)
        self.signo = signo


class _Scope:
    """The signals received while one task runs, and its cancel event."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.signo: int | None = None  # the first signal received

    def handler(self, signo: int, frame: object) -> None:
        if self.signo is None:
            self.signo = signo
        self.cancel.set()
        raise Interrupted(signo)


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


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` with SIGINT/SIGTERM/SIGHUP raising ``Interrupted``; an interrupt
    that comes out of it is printed as one line and becomes Invoke's ``Exit(128 + signo)``."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    scope = _Scope()
    previous: dict[int, Any] = {}
    for sig in SIGNALS:
        old = signal.getsignal(sig)
        if old is signal.SIG_IGN:
            continue
        previous[sig] = old
        signal.signal(sig, scope.handler)
    _scopes.append(scope)
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt as e:
        # a cleanup may have re-raised a plain KeyboardInterrupt: the first signal decides
        signo = scope.signo or getattr(e, "signo", None) or signal.SIGINT
        try:
            print(message(signo), file=sys.stderr, flush=True)
        except (OSError, ValueError):  # SIGHUP: the terminal may be gone
            pass
        from invoke.exceptions import Exit

        raise Exit(code=128 + signo) from None
    finally:
        _scopes.remove(scope)
        for sig, old in previous.items():
            signal.signal(sig, old)
