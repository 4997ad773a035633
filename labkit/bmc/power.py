"""Power state, power actions and boot device of lab nodes, over IPMI (pyghmi sessions).

    client = PowerClient(settings)
    client.status(node)            -> "on" | "off"
    client.on(node, wait=True)     # idempotent; wait = False | True/"power"
    client.off(node) / soft / reset / cycle
    client.set_boot_device(node, "pxe", persistent=False)
    client.wait_for(node, "off", deadline)
    client.close()                 # or use as a context manager

Every BMC call goes through :meth:`PowerClient._call`: a session per BMC reused across calls
(re-created after any failure: a BMC that restarted leaves old sessions dead), one command at a
time per BMC, ``settings.min_interval`` between commands to one BMC, a hard per-attempt deadline
of ``settings.bmc_timeout``, and labkit's one retry policy (``settings.retry_window``) with the
BMC retry predicate from ``labkit.bmc.session``. A wrong password is not retried.

The password is read from the node's Secret at login and handed to pyghmi in-process as bytes;
it never appears in argv, environment, logs or error text.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Literal, TypeVar

from labkit.bmc.session import (
    BmcError,
    BmcRetryable,
    LabSession,
    is_retryable,
    open_session,
    translate,
)
from labkit.config import Settings
from labkit.errors import NodeError, UserError
from labkit.inventory import Node
from labkit.retry import MinInterval, RetryPolicy

log = logging.getLogger("labkit.power")

T = TypeVar("T")
PowerState = Literal["on", "off"]

# IPMI chassis control (netfn 0x00, cmd 0x02) operands
_CHASSIS_OFF, _CHASSIS_ON, _CHASSIS_RESET, _CHASSIS_SOFT = 0, 1, 3, 5
_CONTROL_NAMES = {0: "off", 1: "on", 3: "reset", 5: "soft-off"}
# Boot device selector values for Set System Boot Options parameter 5 (IPMI table 28-14)
BOOT_DEVICES = {"default": 0x00, "pxe": 0x04, "disk": 0x08, "bios": 0x18}
_BOOT_NAMES = {v >> 2: k for k, v in BOOT_DEVICES.items()}
POLL_INTERVAL = 0.5  # seconds between state polls while waiting
STALE_SESSION_AFTER = 3.0  # budget of one command on a reused session before re-login


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

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> PowerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        data = self._call(node, lambda s: s.command(0x00, 0x01), deadline)
        if not data:
            raise BmcError(f"{node.name}: empty chassis status reply")
        return "on" if data[0] & 0x01 else "off"

    def boot_device(self, node: Node) -> dict[str, object]:
        """The boot override the BMC holds: {"device": name, "persistent": bool}."""
        data = self._call(node, lambda s: s.command(0x00, 0x09, (5, 0, 0)))
        if len(data) < 4 or not data[2] & 0x80:
            return {"device": "default", "persistent": True}
        dev = (data[3] >> 2) & 0x0F
        return {"device": _BOOT_NAMES.get(dev, f"0x{dev:x}"), "persistent": bool(data[2] & 0x40)}

    # -- actions ---------------------------------------------------------------------------------

    def on(self, node: Node, wait: bool | str | None = False) -> dict[str, object]:
        """Power on (no command when already on). ``wait`` True/"power" waits for the BMC to
        report on within settings.power_wait. (Power -> console -> SSH: labkit.bringup.)"""
        confirm = _confirm(wait)
        changed = self._ensure(node, "on", _CHASSIS_ON)
        result: dict[str, object] = {"power": "on", "changed": changed, "confirmed": not changed}
        if confirm and changed:
            self.wait_for(node, "on", time.monotonic() + self.settings.power_wait)
            result["confirmed"] = True
        return result

    def off(self, node: Node, wait: bool = False) -> dict[str, object]:
        """Hard power off (no command when already off)."""
        changed = self._ensure(node, "off", _CHASSIS_OFF)
        result: dict[str, object] = {"power": "off", "changed": changed, "confirmed": not changed}
        if wait and changed:
            self.wait_for(node, "off", time.monotonic() + self.settings.power_wait)
            result["confirmed"] = True
        return result

    def soft(self, node: Node, wait: bool = False) -> dict[str, object]:
        """Ask the OS to shut down (ACPI soft-off); no command when already off."""
        changed = self._ensure(node, "off", _CHASSIS_SOFT)
        result: dict[str, object] = {"power": "off", "changed": changed, "confirmed": not changed}
        if wait and changed:
            self.wait_for(node, "off", time.monotonic() + self.settings.power_wait)
            result["confirmed"] = True
        return result

    def reset(self, node: Node) -> dict[str, object]:
        """Hard reset (warm reboot). The BMC decides what a reset of an off node means."""
        self._control(node, _CHASSIS_RESET)
        return {"power": "on", "changed": True, "confirmed": False}

    def cycle(self, node: Node, wait: bool = False) -> dict[str, object]:
        """Off, wait until the BMC reports off, settings.cycle_delay, on. pyghmi has no cycle
        and IPMI's own cycle is left to each BMC's taste; this one behaves the same everywhere."""
        if self._ensure(node, "off", _CHASSIS_OFF):
            self.wait_for(node, "off", time.monotonic() + self.settings.power_wait)
        time.sleep(self.settings.cycle_delay)
        self._control(node, _CHASSIS_ON)
        result: dict[str, object] = {"power": "on", "changed": True, "confirmed": False}
        if wait:
            self.wait_for(node, "on", time.monotonic() + self.settings.power_wait)
            result["confirmed"] = True
        return result

    def set_boot_device(self, node: Node, device: str, persistent: bool = False) -> dict[str, object]:
        """Boot override for the next boot (or every boot with persistent): pxe|disk|bios|default."""
        if device not in BOOT_DEVICES:
            raise UserError(f"boot device {device!r}: expected one of {', '.join(BOOT_DEVICES)}")
        code = BOOT_DEVICES[device]
        flags = 0 if code == 0 else 0x80 | (0x40 if persistent else 0)

        def set_it(s: LabSession) -> None:
            s.command(0x00, 0x08, (3, 8))  # boot info acknowledge: as pyghmi/ipmitool do
            s.command(0x00, 0x08, (5, flags, code, 0, 0, 0))

        self._call(node, set_it)
        return {"boot_device": device, "persistent": bool(persistent)}

    def wait_for(self, node: Node, state: PowerState, deadline: float) -> PowerState:
        """Poll until the BMC reports ``state``; NodeError at ``deadline`` (time.monotonic())."""
        last: str | None = None
        t0 = time.monotonic()
        while True:
            try:
                last = self.status(node, deadline=deadline)
            except BmcRetryable:  # the retry window ran out, the wait has not: keep polling
                if time.monotonic() >= deadline:
                    raise
            if last == state:
                return state
            left = deadline - time.monotonic()
            if left <= 0:
                raise NodeError(f"{node.name}: power still {last or 'unknown'} after "
                                f"{time.monotonic() - t0:.0f} s (waiting for {state})")
            time.sleep(min(POLL_INTERVAL, left))

    # -- plumbing --------------------------------------------------------------------------------

    def _ensure(self, node: Node, state: PowerState, operand: int) -> bool:
        """Send the chassis control only if the node is not already in ``state``."""
        if self.status(node) == state:
            log.info("%s: already %s", node.name, state)
            return False
        self._control(node, operand)
        return True

    def _control(self, node: Node, operand: int) -> None:
        log.info("%s: chassis control %s", node.name, _CONTROL_NAMES.get(operand, operand))
        self._call(node, lambda s: s.command(0x00, 0x02, (operand,)))

    def _key(self, node: Node) -> tuple[str, int, str]:
        if node.bmc is None:
            raise NodeError(f"{node.name}: no bmc: section in the inventory")
        return (node.bmc.host, node.bmc.port, node.bmc.user)

    def _lock(self, key: tuple[str, int, str]) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _call(self, node: Node, fn: Callable[[LabSession], T], deadline: float | None = None) -> T:
        """Run fn(session) against the node's BMC under the retry policy."""
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
            self._interval.wait(key[:2])
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
                    err = translate(e, node.name, bmc.host, bmc.port, bmc.user)
                    if not (isinstance(err, BmcError) and err.code is not None):
                        self._drop(key)  # anything but a clean error reply: new session next time
                    if isinstance(err, BmcError) and not str(err).startswith(f"{node.name}: "):
                        err = type(err)(f"{node.name}: BMC {bmc.host}:{bmc.port}: {err}",
                                        err.code)
                    if err is e:
                        raise
                    raise err from None

        def on_retry(n: int, e: BaseException, sleep: float) -> None:
            log.debug("%s: attempt %d failed (%s); retrying in %.2f s", node.name, n, e, sleep)

        return policy.call(attempt, retryable=is_retryable, on_retry=on_retry,
                           deadline=deadline)

    def _session(self, node: Node, key: tuple[str, int, str], deadline: float) -> LabSession:
        session = self._sessions.get(key)
        if session is not None and not session.broken and session.logged:
            return session
        if session is not None:
            self._drop(key)
        assert node.bmc is not None
        password = node.bmc.password().reveal()
        session = open_session(node.bmc.host, node.bmc.port, node.bmc.user.encode(),
                               password, deadline)
        with self._guard:
            self._sessions[key] = session
        return session

    def _drop(self, key: tuple[str, int, str]) -> None:
        with self._guard:
            session = self._sessions.pop(key, None)
        if session is not None:
            session.close(logout=False)


# Actions by task name, for tasks and tools that dispatch on a string.
ACTIONS: dict[str, Callable[..., dict[str, object]]] = {
    "on": PowerClient.on,
    "off": PowerClient.off,
    "soft": PowerClient.soft,
    "reset": PowerClient.reset,
    "cycle": PowerClient.cycle,
}
