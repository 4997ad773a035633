"""Tasks: power-status, power-on/off/soft/reset/cycle, boot-device, console.

Each task parses options, runs the library call over the selected nodes and prints the
outcomes; the logic lives in the library. The power verbs and boot-device go to every BMC at
once through ``labkit.bmc.engine`` (one selector loop, one thread); only ``--wait=ssh`` (power
-> console -> SSH, ``labkit.bringup``) fans ``PowerClient`` out over threads, since waiting for
SSH is above the BMC layer. Library modules are imported in the task bodies: building the
namespace (every ``labkit`` command) must not pay for pyghmi."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from invoke import Context

from labkit.errors import UserError
from labkit.tasks import args
from labkit.tasks.common import Lab, finish, lab, labtask

POWER_COLUMNS = ("power", "changed", "confirmed")


WAIT_HELP = ("wait until the BMC reports the new state (--wait or --wait=power, within "
             "labkit.power_wait); --wait=ssh also waits for SSH (labkit.ssh_wait)")
CYCLE_WAIT_HELP = ("wait until the BMC reports on again (--wait or --wait=power); --wait=ssh "
                   "also waits for SSH (labkit.ssh_wait)")


def _action(lab_: Lab, nodes: str | None, action: str, wait: bool, as_json: bool,
            force: bool) -> None:
    """A power action on every selected node at once (``labkit.bmc.engine``). The nodes are
    changed, so leased ones are refused unless ``force``."""
    selected = lab_.select(nodes, change=True, force=force)
    from labkit.bmc import engine

    finish(engine.power_action(selected, action, lab_.settings, wait=wait,
                               label=f"power-{action}"),
           as_json=as_json, columns=POWER_COLUMNS)


def _bringup(lab_: Lab, nodes: str | None, label: str,
             action: Callable[[Any, Any], dict[str, Any]], as_json: bool, force: bool) -> None:
    """``--wait=ssh``: ``action(client, node)`` (labkit.bringup) per node on the thread
    fan-out, the BMC part through one shared ``PowerClient``, cancelled on Ctrl-C/SIGTERM/SIGHUP
    (``labkit.signals.on_cancel``) so the workers return within a poll: the fan-out waits for
    them after an interrupt, and one blocked on a dead BMC would otherwise hold the exit for the
    whole retry window (~60 s)."""
    selected = lab_.select(nodes, change=True, force=force)
    lab_.need_ssh(selected, f"{label} --wait ssh")
    from labkit import signals
    from labkit.bmc.power import PowerClient

    with PowerClient(lab_.settings) as client, signals.on_cancel(client.cancel):
        outcomes = lab_.fan_out(selected, lambda n: action(client, n), label=label)
    finish(outcomes, as_json=as_json, columns=POWER_COLUMNS)


def _positional(task: str, value: str) -> None:
    """Invoke hands `TASK --help` to a positional parameter: point at the help that works."""
    if value.startswith("-"):
        raise UserError(f"{task}: expected a value, got {value!r} (for help: --help {task})")


@labtask(changes=False)
def power_status(c: Context, inventory: str | None = None, nodes: str | None = None,
                 json: bool = False) -> None:
    """Show each node's power state as its BMC reports it."""
    from labkit.bmc.engine import power_status as status_all  # every BMC at once, one thread

    lab_ = lab(c, inventory)
    finish(status_all(lab_.select(nodes, change=False), lab_.settings), as_json=json,
           columns=("power",))


@labtask(optional=["wait"], help={"wait": WAIT_HELP}, changes=True)
def power_on(c: Context, inventory: str | None = None, nodes: str | None = None,
             wait: Any = None, json: bool = False, force: bool = False) -> None:
    """Power nodes on (a node already on stays on: the request is sent anyway, so a power-off
    still landing is overridden)."""
    from labkit import bringup

    mode = bringup.normalize_wait(wait)  # a bad value is a usage error before any BMC is touched
    lab_ = lab(c, inventory)
    if mode == "ssh":
        _bringup(lab_, nodes, "power-on",
                 lambda client, n: bringup.power_on(client, n, lab_.settings, wait=mode), json,
                 force)
    else:
        _action(lab_, nodes, "on", mode == "power", json, force)


@labtask(help={"wait": "wait until the BMC reports off"}, changes=True)
def power_off(c: Context, inventory: str | None = None, nodes: str | None = None,
              wait: bool = False, json: bool = False, force: bool = False) -> None:
    """Hard power off (a node already off stays off, unchanged)."""
    _action(lab(c, inventory), nodes, "off", wait, json, force)


@labtask(help={"wait": "wait until the BMC reports off"}, changes=True)
def power_soft(c: Context, inventory: str | None = None, nodes: str | None = None,
               wait: bool = False, json: bool = False, force: bool = False) -> None:
    """Ask the OS to shut down (ACPI soft-off)."""
    _action(lab(c, inventory), nodes, "soft", wait, json, force)


@labtask(changes=True)
def power_reset(c: Context, inventory: str | None = None, nodes: str | None = None,
                json: bool = False, force: bool = False) -> None:
    """Hard reset of nodes that are on (a node that is off fails: use power-on or
    power-cycle)."""
    _action(lab(c, inventory), nodes, "reset", False, json, force)


@labtask(optional=["wait"], help={"wait": CYCLE_WAIT_HELP}, changes=True)
def power_cycle(c: Context, inventory: str | None = None, nodes: str | None = None,
                wait: Any = None, json: bool = False, force: bool = False) -> None:
    """Off, wait for off, labkit.cycle_delay seconds, on."""
    from labkit import bringup

    mode = bringup.normalize_wait(wait)
    lab_ = lab(c, inventory)
    if mode == "ssh":
        _bringup(lab_, nodes, "power-cycle",
                 lambda client, n: bringup.power_cycle(client, n, lab_.settings, wait=mode),
                 json, force)
    else:
        _action(lab_, nodes, "cycle", mode == "power", json, force)


@labtask(help={"device": "pxe | disk | bios | default",
               "persistent": "keep the override for every boot, not just the next one"},
         changes=True)
def boot_device(c: Context, device: str, inventory: str | None = None, nodes: str | None = None,
                persistent: bool = False, json: bool = False, force: bool = False) -> None:
    """Set the boot device override: boot-device -n SEL pxe|disk|bios|default [--persistent]."""
    from labkit.bmc import engine, ops

    _positional("boot-device", device)
    ops.check_boot_device(device)  # a usage error before the lease check or any BMC
    lab_ = lab(c, inventory)
    selected = lab_.select(nodes, change=True, force=force)
    finish(engine.set_boot_device(selected, device, lab_.settings, persistent=persistent),
           as_json=json, columns=("boot_device", "persistent"))


@labtask(help={"node": "the node whose serial console to open",
               "capture": "record this many seconds non-interactively instead of attaching",
               "log": "with --capture: write the timestamped log here (default: a results/ "
                      "folder); refused up front if it cannot be written",
               "take_over": "take the node's SOL session from the client holding it (that "
                            "client is told and exits); default: refuse when it is in use",
               "force": "attach to a node leased by someone else"},
         changes=True)
def console(c: Context, node: str, inventory: str | None = None, capture: str | None = None,
            log: str | None = None, take_over: bool = False, force: bool = False) -> None:
    """Serial-over-LAN console. Interactive: type ~. at the start of a line to leave.
    With --capture N: record N seconds to a timestamped log and exit.

    One node has one SOL session: when another client holds it, the console is refused unless
    --take-over; the client that loses it says so and exits non-zero. Login refused, SOL in
    use, a BMC that does not answer (--capture) or a lost session end it with exit 1.

    Leases: attaching is changing the node (what you type goes to its console: a login, a
    reboot, a kernel's magic SysRq), so a node leased by someone else is refused unless
    --force. --capture only records what the node prints and sends nothing, so it works on
    any node (a lease protects the node, not a seat at its console)."""
    from labkit.bmc import console as sol

    _positional("console", node)
    seconds = args.seconds(capture, "--capture", allow_zero=True) if capture is not None else 0.0
    if log is not None and not seconds:
        raise UserError("--log: only with --capture SECONDS (an interactive console keeps no "
                        "log)")
    if log is not None and not log.strip():
        raise UserError("--log: empty path")
    lab_ = lab(c, inventory)
    if seconds and log is None:
        args.writable_folder(lab_.settings.results_dir, "results folder (labkit.results_dir)")
    (target,) = lab_.named([node], change=not seconds, force=force)
    if seconds:
        path = sol.capture(target, lab_.settings, seconds, log, force=take_over)
        print(path)
    else:
        sol.attach(target, lab_.settings, force=take_over)


TASKS = [power_status, power_on, power_off, power_soft, power_reset, power_cycle, boot_device,
         console]
COLLECTION = None
