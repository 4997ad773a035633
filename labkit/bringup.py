"""Bringing a node up: power -> serial-console watch -> SSH wait.

This is the layer above ``labkit.bmc`` (IPMI: power, SOL console) and ``labkit.ssh`` (connect,
run). Neither of those knows the other: the power driver only talks to the BMC, the SSH layer
only connects. Sequencing them, and explaining a node that never answers SSH with the last
lines it printed on its serial console, is this module's job:

    with PowerClient(settings) as client:
        power_on(client, node, settings, wait="ssh")
        # -> {"power": "on", "changed": bool, "confirmed": True, "ssh": True}

``wait``: False/None returns once the BMC accepted the command; True or "power" waits until
the BMC reports on (``settings.power_wait``); "ssh" also waits until SSH accepts us
(``settings.ssh_wait``), recording the SOL console meanwhile so that a node that never comes up
fails with ``SshUnreachable(msg, value={"console_tail": ...})``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from labkit.config import Settings
from labkit.errors import LabkitError, NodeError, UserError
from labkit.inventory import Node

if TYPE_CHECKING:
    from labkit.bmc.console import SolConsole
    from labkit.bmc.power import PowerClient

WAIT_CHOICES = ("power", "ssh")


def normalize_wait(wait: bool | str | None) -> str | None:
    """``--wait`` is a flag or a value: False/None -> None, True/"power" -> "power", "ssh"."""
    if wait is None or wait is False:
        return None
    if wait is True:
        return "power"
    value = str(wait).strip().lower()
    if value in ("true", "yes", "1"):
        return "power"
    if value not in WAIT_CHOICES:
        raise UserError(f"--wait: expected one of {', '.join(WAIT_CHOICES)}, got {wait!r}")
    return value


def tail_text(text: str, lines: int = 5, max_chars: int = 400) -> str:
    """The last non-empty lines of console output as one ``|``-joined line (error messages and
    outcomes are one line)."""
    every = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    kept = every[-lines:]
    # A panic's cause is followed by its stack and register dump: keep the cause line first
    panic = next((ln for ln in reversed(every) if "Kernel panic" in ln), None)
    if panic is not None and panic not in kept:
        head = panic[:max_chars // 2] + " | ... | "
        return head + " | ".join(kept)[-(max_chars - len(head)):]
    return " | ".join(kept)[-max_chars:]


class BootWatch:
    """Records a node's serial console (SOL) while we wait for it to boot, so that a node that
    never answers SSH fails with the last lines it printed. Best effort and polite: it does not
    take over an SOL session someone else holds, and a BMC without SOL just records nothing."""

    KEEP = 16384

    def __init__(self, node: Node, settings: Settings):
        from labkit.bmc.console import SolConsole

        self._buf = bytearray()
        self._lock = threading.Lock()
        self._con: SolConsole | None = None
        try:
            self._con = SolConsole(node, settings, force=False, on_data=self._data).open()
        except LabkitError:
            self._con = None

    def _data(self, data: bytes) -> None:
        with self._lock:
            self._buf += data
            if len(self._buf) > self.KEEP:
                del self._buf[:-self.KEEP]

    def tail(self) -> str:
        with self._lock:
            return tail_text(self._buf.decode(errors="replace"))

    def close(self, timeout: float = 2.0) -> None:
        if self._con is not None:
            self._con.close(timeout=timeout)


def wait_ssh(node: Node, settings: Settings, watch: BootWatch | None = None,
             cancelled: Callable[[], bool] | None = None,
             powered: Callable[[], bool] | None = None) -> None:
    """Wait (``settings.ssh_wait``) until SSH accepts us; on giving up, the error carries the
    console tail ``watch`` recorded. ``cancelled()`` true (Ctrl-C) ends the wait at the next
    attempt instead of the end of ssh_wait; so does ``powered()`` false (asked of the BMC
    between attempts: a node that panicked, shut down or lost power will never answer)."""
    from labkit.ssh import SshUnreachable
    from labkit.ssh import wait_ssh as ssh_wait

    def on_retry(n: int, e: BaseException, sleep: float) -> None:
        if cancelled is not None and cancelled():
            raise NodeError(f"{node.name}: interrupted while waiting for SSH")
        if powered is not None and not powered():
            tail = watch.tail() if watch is not None else ""
            raise NodeError(
                f"{node.name}: the node went off while we waited for SSH (it crashed or shut "
                f"down)" + (f"; console: {tail}" if tail else ""),
                value={"console_tail": tail}) from None

    try:
        ssh_wait(node, settings, time.monotonic() + settings.ssh_wait, on_retry=on_retry)
    except SshUnreachable as e:
        tail = watch.tail() if watch is not None else ""
        if not tail:
            raise
        raise SshUnreachable(f"{e}; console: {tail}",
                             value={**e.value, "console_tail": tail}) from None


def _act_and_wait(client: PowerClient, act: Callable[[bool], dict[str, object]], node: Node,
                  settings: Settings, wait: bool | str | None) -> dict[str, object]:
    """Run a power action that ends with the node on (``act(wait_for_power)``), then wait as
    ``wait`` says. For "ssh" the console is watched from before the power command, so the
    boot log is in the tail when SSH never answers. ``client.cancel()`` (Ctrl-C) ends every
    part within a second or so."""
    mode = normalize_wait(wait)
    if mode != "ssh":
        return act(mode == "power")
    watch = BootWatch(node, settings)
    try:
        result = act(True)

        offs = [0]

        def powered() -> bool:
            """Off twice in a row (a real BMC may read off for a moment during POST)."""
            try:
                offs[0] = offs[0] + 1 if client.status(node) == "off" else 0
            except LabkitError:  # the BMC did not answer: no news, keep waiting
                return True
            return offs[0] < 2

        wait_ssh(node, settings, watch, cancelled=lambda: client.cancelled, powered=powered)
        result["ssh"] = True
        return result
    finally:
        # interrupted: do not wait for the console thread to log out of a BMC that may be dead
        watch.close(timeout=0.2 if client.cancelled else 2.0)


def power_on(client: PowerClient, node: Node, settings: Settings,
             wait: bool | str | None = False) -> dict[str, object]:
    """Power on (see PowerClient.on) and wait as ``wait`` says (module docstring).
    Returns {"power", "changed", "confirmed"} (+ "ssh": True with wait="ssh")."""
    return _act_and_wait(client, lambda w: client.on(node, wait=w), node, settings, wait)


def power_cycle(client: PowerClient, node: Node, settings: Settings,
                wait: bool | str | None = False) -> dict[str, object]:
    """Off, wait for off, ``settings.cycle_delay``, on (PowerClient.cycle), then wait as
    ``wait`` says, like :func:`power_on`."""
    return _act_and_wait(client, lambda w: client.cycle(node, wait=w), node, settings, wait)
