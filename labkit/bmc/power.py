"""Power state, power actions and boot device of lab nodes, over IPMI (pyghmi sessions).

    client = PowerClient(settings)
    client.status(node)            -> "on" | "off"
    client.on(node, wait=True)     # idempotent; wait = False | True/"power"
    client.cancel()                # from any thread (Ctrl-C): every call ends within ~0.1 s
    client.off(node) / soft / reset / cycle
    client.set_boot_device(node, "pxe", persistent=False)
    client.wait_for(node, "off", deadline)
    client.close()                 # or use as a context manager

Every BMC call goes through :meth:`PowerClient._call`: a session per BMC reused across calls
(re-created after any failure: a BMC that restarted leaves old sessions dead), one command at a
time per BMC, ``settings.min_interval`` between commands to one BMC, a hard per-attempt deadline
of ``settings.bmc_timeout``, and labkit's one retry policy (``settings.retry_window``) with the
BMC retry predicate from ``labkit.bmc.session``. A wrong password is not retried.
:meth:`PowerClient.cancel` ends every wait (a reply, a retry pause, a power poll) at once: the
thread fan-out runs these calls in workers that Ctrl-C does not interrupt, and a dead BMC would
hold each one for the whole retry window.

The password is read from the node's Secret at login and handed to pyghmi in-process as bytes;
it never appears in argv, environment, logs or error text.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from labkit.bmc import ops
from labkit.bmc.ops import PowerState, Sleep
from labkit.bmc.session import (
    STALE_SESSION_AFTER,
    BmcCancelled,
    LabSession,
    attempt_failed,
    is_retryable,
    open_session,
)
from labkit.config import Settings
from labkit.errors import NodeError
from labkit.inventory import Node
from labkit.retry import MinInterval, RetryPolicy

log = logging.getLogger("labkit.power")

T = TypeVar("T")


def _confirm(wait: bool | str | None) -> bool:
    """``PowerClient.on``'s ``wait``: False/None or True/"power". Waiting for the OS (SSH) is
    not the power driver's business: that is ``labkit.bringup.power_on``."""
    if wait is None or wait is False:
        return False
    if wait is True or wait == "power":
        return True
    raise ValueError(f"PowerClient.on(wait={wait!r}): the power driver waits for power only "
                     "(True or 'power'); to wait for SSH use labkit.bringup.power_on")


class PowerClient:
    """Talks to the BMCs of many nodes; safe to share among threads (one lock per BMC)."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self._interval = MinInterval(self.settings.min_interval)
        self._sessions: dict[tuple[str, int, str], LabSession] = {}
        self._locks: dict[tuple[str, int, str], threading.Lock] = {}
        self._guard = threading.Lock()
        self._cancel = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> PowerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cancel(self) -> None:
        """Give up (Ctrl-C, SIGTERM): every call in flight, on any thread, raises BmcCancelled
        within CANCEL_POLL seconds, and later calls fail at once."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self, node: Node) -> None:
        if self._cancel.is_set():
            raise BmcCancelled(f"{node.name}: interrupted")

    def close(self) -> None:
        """Log out of every BMC session (one packet each, no waiting)."""
        with self._guard:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for s in sessions:
            s.close()

    # -- queries ---------------------------------------------------------------------------------

    def status(self, node: Node, deadline: float | None = None) -> PowerState:
        """Current chassis power state as the BMC reports it."""
        return self._run(node, ops.status(node, deadline))

    def boot_device(self, node: Node) -> dict[str, object]:
        """The boot override the BMC holds: {"device": name, "persistent": bool}."""
        return self._run(node, ops.boot_device(node))

    # -- actions ---------------------------------------------------------------------------------

    def on(self, node: Node, wait: bool | str | None = False) -> dict[str, object]:
        """Power on (sent even when the BMC reads on: see ops.ensure). ``wait`` True/"power" waits for the BMC to
        report on within settings.power_wait. (Power -> console -> SSH: labkit.bringup.)"""
        return self._run(node, ops.on(node, self.settings, _confirm(wait)))

    def off(self, node: Node, wait: bool = False) -> dict[str, object]:
        """Hard power off (sent even when the BMC reads off: see ops.ensure)."""
        return self._run(node, ops.off(node, self.settings, wait))

    def soft(self, node: Node, wait: bool = False) -> dict[str, object]:
        """Ask the OS to shut down (ACPI soft-off); an off node stays off, unchanged."""
        return self._run(node, ops.soft(node, self.settings, wait))

    def reset(self, node: Node) -> dict[str, object]:
        """Hard reset (warm reboot); a node that is off fails plainly (see ops.reset)."""
        return self._run(node, ops.reset(node, self.settings))

    def cycle(self, node: Node, wait: bool = False) -> dict[str, object]:
        """Off, wait until the BMC reports off, settings.cycle_delay, on (see ops.cycle)."""
        return self._run(node, ops.cycle(node, self.settings, wait))

    def set_boot_device(self, node: Node, device: str, persistent: bool = False) -> dict[str, object]:
        """Boot override for the next boot (or every boot with persistent): pxe|disk|bios|default."""
        ops.check_boot_device(device)
        return self._run(node, ops.set_boot_device(node, device, persistent))

    def wait_for(self, node: Node, state: PowerState, deadline: float) -> PowerState:
        """Poll until the BMC reports ``state``; NodeError at ``deadline`` (time.monotonic())."""
        return self._run(node, ops.wait_for(node, state, deadline))

    # -- plumbing --------------------------------------------------------------------------------

    def _run(self, node: Node, op: ops.Gen[T]) -> T:
        """Drive one op (labkit.bmc.ops) on this thread: each Cmd through :meth:`_call`, a
        command's final error thrown into the op, Sleep as time.sleep."""
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = op.throw(error) if error is not None else op.send(reply)
            except StopIteration as stop:
                return stop.value
            reply = error = None
            if isinstance(step, Sleep):
                if self._cancel.wait(step.seconds):
                    error = BmcCancelled(f"{node.name}: interrupted")
                continue
            try:
                reply = self._call(node, lambda s, c=step: s.command(c.netfn, c.cmd, c.data),
                                   step.deadline)
            except Exception as e:  # the op decides (wait_for polls on), else it re-raises
                error = e

    def _key(self, node: Node) -> tuple[str, int, str]:
        if node.bmc is None:
            raise NodeError(f"{node.name}: no bmc: section in the inventory")
        return (node.bmc.host, node.bmc.port, node.bmc.user)

    def _lock(self, key: tuple[str, int, str]) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _call(self, node: Node, fn: Callable[[LabSession], T], deadline: float | None = None) -> T:
        """Run fn(session) against the node's BMC under the retry policy (``RetryPolicy.call``'s
        rules, its clock; the pauses end early on :meth:`cancel`)."""
        key = self._key(node)
        bmc = node.bmc
        assert bmc is not None
        s = self.settings
        policy = RetryPolicy(window=s.retry_window, first_delay=s.retry_first_delay,
                             max_delay=s.retry_max_delay)
        window_end = time.monotonic() + s.retry_window
        if deadline is not None:
            window_end = min(window_end, deadline)

        def attempt() -> T:
            self.check_cancelled(node)
            pause = self._interval.reserve(key[:2])
            if pause > 0 and self._cancel.wait(pause):
                self.check_cancelled(node)
            with self._lock(key):
                # A reused session may be dead without knowing it (the BMC restarted and forgot
                # it: requests go unanswered). Give it a short budget, then log in afresh.
                budget = s.bmc_timeout
                if key in self._sessions:
                    budget = min(budget, STALE_SESSION_AFTER)
                end = min(time.monotonic() + budget, max(window_end, time.monotonic() + 0.2))
                try:
                    session = self._session(node, key, end)
                    session.deadline = end
                    return fn(session)
                except BaseException as e:
                    err = attempt_failed(e, node.name, bmc.host, bmc.port, bmc.user,
                                         lambda: self._drop(key))
                    if err is e:
                        raise
                    raise err from None

        def on_retry(n: int, e: BaseException, delay: float) -> None:
            log.debug("%s: attempt %d failed (%s); retrying in %.2f s", node.name, n, e, delay)

        def pause(delay: float) -> None:  # Ctrl-C (cancel) ends the pause at once
            if self._cancel.wait(delay):
                self.check_cancelled(node)

        return policy.call(attempt, retryable=is_retryable, on_retry=on_retry,
                           deadline=deadline, sleep=pause)

    def _session(self, node: Node, key: tuple[str, int, str], deadline: float) -> LabSession:
        session = self._sessions.get(key)
        if session is not None and not session.broken and session.logged:
            return session
        if session is not None:
            self._drop(key)
        assert node.bmc is not None
        password = node.bmc.password().reveal()
        session = open_session(node.bmc.host, node.bmc.port, node.bmc.user.encode(),
                               password, deadline, self._cancel)
        with self._guard:
            self._sessions[key] = session
        return session

    def _drop(self, key: tuple[str, int, str]) -> None:
        with self._guard:
            session = self._sessions.pop(key, None)
        if session is not None:
            session.close(logout=False)

