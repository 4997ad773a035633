"""What each power verb does to one BMC, written once, as generators that yield IPMI requests.

An op yields ``Cmd`` (one request; the driver sends it under the retry policy and sends back the
response data, or throws the final error into the op) or ``Sleep``, and returns its result.
Two drivers run them, so the logic exists once:

- ``PowerClient`` (``labkit.bmc.power``) runs one op on the calling thread, each ``Cmd`` through
  ``PowerClient._call`` (a cached blocking session per BMC);
- ``labkit.bmc.engine`` runs one op per node for many nodes at once from one selector loop.

Ops never do I/O and never sleep themselves; they read the clock only to honour deadlines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from labkit.bmc.session import CC_NOT_IN_PRESENT_STATE, BmcError, BmcRetryable
from labkit.config import Settings
from labkit.errors import NodeError, UserError
from labkit.inventory import Node

log = logging.getLogger("labkit.power")

PowerState = Literal["on", "off"]
T = TypeVar("T")

# IPMI chassis control (netfn 0x00, cmd 0x02) operands
CHASSIS_OFF, CHASSIS_ON, CHASSIS_RESET, CHASSIS_SOFT = 0, 1, 3, 5
CONTROL_NAMES = {0: "off", 1: "on", 3: "reset", 5: "soft-off"}
# Boot device selector values for Set System Boot Options parameter 5 (IPMI table 28-14)
BOOT_DEVICES = {"default": 0x00, "pxe": 0x04, "disk": 0x08, "bios": 0x18}
BOOT_NAMES = {v >> 2: k for k, v in BOOT_DEVICES.items()}
POLL_INTERVAL = 0.5  # seconds between state polls while waiting


@dataclass(frozen=True)
class Cmd:
    """One IPMI request. ``deadline`` (time.monotonic()) can shorten its retry window."""

    netfn: int
    cmd: int
    data: tuple[int, ...] = ()
    deadline: float | None = None


@dataclass(frozen=True)
class Sleep:
    seconds: float


Step = Cmd | Sleep
Gen = Generator[Step, Any, T]
Op = Generator[Step, Any, dict[str, Any]]


# -- building blocks (``yield from`` them) ---------------------------------------------------------

def status(node: Node, deadline: float | None = None) -> Gen[PowerState]:
    """Current chassis power state as the BMC reports it."""
    data = yield Cmd(0x00, 0x01, (), deadline)
    if not data:
        raise BmcError(f"{node.name}: empty chassis status reply")
    return "on" if data[0] & 0x01 else "off"


def control(node: Node, operand: int) -> Gen[None]:
    log.info("%s: chassis control %s", node.name, CONTROL_NAMES.get(operand, operand))
    yield Cmd(0x00, 0x02, (operand,))


def ensure(node: Node, state: PowerState, operand: int) -> Gen[bool]:
    """Bring the node to ``state``; True if the BMC reported another state before.

    The request is sent even when the BMC already reports ``state``: a BMC reports the old
    state until a transition lands, so a node that reads "on" may have a power-off landing.
    Sent anyway, the BMC's last request wins (a BMC does nothing to a node already in the
    asked state); skipped, the node would go off seconds after "on, unchanged". A BMC that
    refuses the request because the node is already there (0xD5, "not in the present state")
    is not an error."""
    before = yield from status(node)
    if before == state:
        log.info("%s: reads %s already; asking anyway (a transition may be landing)",
                 node.name, state)
        try:
            yield from control(node, operand)
        except BmcError as e:
            if e.code != CC_NOT_IN_PRESENT_STATE:
                raise
        return False
    yield from control(node, operand)
    return True


def wait_for(node: Node, state: PowerState, deadline: float) -> Gen[PowerState]:
    """Poll until the BMC reports ``state``; NodeError at ``deadline`` (time.monotonic())."""
    last: str | None = None
    t0 = time.monotonic()
    while True:
        try:
            last = yield from status(node, deadline)
        except BmcRetryable:  # the retry window ran out, the wait has not: keep polling
            if time.monotonic() >= deadline:
                raise
        if last == state:
            return state
        left = deadline - time.monotonic()
        if left <= 0:
            raise NodeError(f"{node.name}: power still {last or 'unknown'} after "
                            f"{time.monotonic() - t0:.0f} s (waiting for {state})")
        yield Sleep(min(POLL_INTERVAL, left))


# -- the verbs --------------------------------------------------------------------------------------

def status_op(node: Node) -> Op:
    return {"power": (yield from status(node))}


def on(node: Node, settings: Settings, wait: bool = False) -> Op:
    """Power on (sent even when the BMC reads on: see ``ensure``); ``wait`` for the BMC to report on. Waiting for
    SSH is not the BMC's business: that is ``labkit.bringup.power_on`` (power -> console ->
    SSH)."""
    changed = yield from ensure(node, "on", CHASSIS_ON)
    result: dict[str, Any] = {"power": "on", "changed": changed, "confirmed": not changed}
    if wait and changed:
        yield from wait_for(node, "on", time.monotonic() + settings.power_wait)
        result["confirmed"] = True
    return result


def _down(node: Node, settings: Settings, operand: int, wait: bool) -> Op:
    changed = yield from ensure(node, "off", operand)
    result: dict[str, Any] = {"power": "off", "changed": changed, "confirmed": not changed}
    if wait and changed:
        yield from wait_for(node, "off", time.monotonic() + settings.power_wait)
        result["confirmed"] = True
    return result


def off(node: Node, settings: Settings, wait: bool = False) -> Op:
    """Hard power off (sent even when the BMC reads off: see ``ensure``)."""
    return (yield from _down(node, settings, CHASSIS_OFF, wait))


def soft(node: Node, settings: Settings, wait: bool = False) -> Op:
    """Ask the OS to shut down (ACPI soft-off); an off node stays off, unchanged."""
    return (yield from _down(node, settings, CHASSIS_SOFT, wait))


def _reset_off(node: Node) -> NodeError:
    return NodeError(f"{node.name}: power is off: a reset does nothing to a node that is off "
                     "(power-on or power-cycle starts it)",
                     value={"power": "off", "changed": False, "confirmed": True})


def reset(node: Node, settings: Settings, wait: bool = False) -> Op:
    """Hard reset (warm reboot) of a node that is on. A node that is off fails plainly, the
    same against every BMC: IPMI leaves a reset of an off chassis to each BMC's taste (ipmi_sim
    accepts it and does nothing, others refuse with 0xD5), and a user who resets an off node
    expects a reboot that will not happen."""
    if (yield from status(node)) == "off":
        raise _reset_off(node)
    try:
        yield from control(node, CHASSIS_RESET)
    except BmcError as e:  # it went off between the two requests
        if e.code == CC_NOT_IN_PRESENT_STATE and (yield from status(node)) == "off":
            raise _reset_off(node) from None
        raise
    return {"power": "on", "changed": True, "confirmed": False}


def cycle(node: Node, settings: Settings, wait: bool = False) -> Op:
    """Off, wait until the BMC reports off, settings.cycle_delay, on. pyghmi has no cycle and
    IPMI's own cycle is left to each BMC's taste (the spec recommends refusing it when off);
    this one behaves the same everywhere and ends with the node on whatever its start state:
    a cycle of an off node powers it on."""
    if (yield from ensure(node, "off", CHASSIS_OFF)):
        yield from wait_for(node, "off", time.monotonic() + settings.power_wait)
    yield Sleep(settings.cycle_delay)
    yield from control(node, CHASSIS_ON)
    result: dict[str, Any] = {"power": "on", "changed": True, "confirmed": False}
    if wait:
        yield from wait_for(node, "on", time.monotonic() + settings.power_wait)
        result["confirmed"] = True
    return result


def check_boot_device(device: str) -> int:
    if device not in BOOT_DEVICES:
        raise UserError(f"boot device {device!r}: expected one of {', '.join(BOOT_DEVICES)}")
    return BOOT_DEVICES[device]


def set_boot_device(node: Node, device: str, persistent: bool = False) -> Op:
    """Boot override for the next boot (or every boot with persistent): pxe|disk|bios|default."""
    code = check_boot_device(device)
    flags = 0 if code == 0 else 0x80 | (0x40 if persistent else 0)
    yield Cmd(0x00, 0x08, (3, 8))  # boot info acknowledge: as pyghmi/ipmitool do
    yield Cmd(0x00, 0x08, (5, flags, code, 0, 0, 0))
    return {"boot_device": device, "persistent": bool(persistent)}


def boot_device(node: Node) -> Op:
    """The boot override the BMC holds: {"device": name, "persistent": bool}."""
    data = yield Cmd(0x00, 0x09, (5, 0, 0))
    if len(data) < 4 or not data[2] & 0x80:
        return {"device": "default", "persistent": True}
    dev = (data[3] >> 2) & 0x0F
    return {"device": BOOT_NAMES.get(dev, f"0x{dev:x}"), "persistent": bool(data[2] & 0x40)}


# Actions by task name: action(node, settings, wait) -> op.
ACTIONS: dict[str, Callable[[Node, Settings, bool], Op]] = {
    "on": on, "off": off, "soft": soft, "reset": reset, "cycle": cycle,
}
