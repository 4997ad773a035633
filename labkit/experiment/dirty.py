"""dirty-rate: the exact dirty rate (MiB/s of distinct pages written) of a process on a node,
measured by the deployed tracker payload (``labkit/payloads/tracker.py dirty-rate``).

Here, not in the task, because the two things a test wants to reach live here: the command line
the node runs, and how the tracker's "the process exited" answer (exit code 3, its last stdout
line a JSON object with ``"gone": true``) becomes a node failure that still carries the partial
measurement."""

from __future__ import annotations

import json
import shlex
from typing import TYPE_CHECKING, Any

from labkit.errors import NodeError
from labkit.experiment.remote import payload_dir
from labkit.inventory import Node

if TYPE_CHECKING:
    from labkit.ssh.shell import RemoteShell

EXIT_GONE = 3  # the tracker's exit code when its target exited (labkit/payloads/tracker.py)
COLUMNS = ("backend", "seconds", "pages", "mib_per_s")  # what the task's table shows


def dirty_rate_command(node: Node, pid: int, seconds: float, tracker: str = "auto") -> str:
    """The shell line that measures ``pid`` on ``node`` for ``seconds`` with ``tracker``."""
    return (f"cd {shlex.quote(payload_dir(node))} && exec python3 tracker.py dirty-rate "
            f"--pid {int(pid)} --seconds {float(seconds)} --backend {shlex.quote(tracker)}")


def gone_report(value: dict[str, Any]) -> dict[str, Any] | None:
    """The tracker's "target gone" report from a failed command's ``CommandFailed.value``, or
    None when the failure was something else (exit code other than 3, no JSON last line)."""
    if value.get("exit_code") != EXIT_GONE:
        return None
    lines = (value.get("stdout") or "").strip().splitlines()
    if not lines:
        return None
    try:
        report = json.loads(lines[-1])
    except ValueError:
        return None
    return report if isinstance(report, dict) and report.get("gone") else None


def dirty_rate(node: Node, shell: RemoteShell, pid: int, seconds: float,
               tracker: str = "auto") -> dict[str, Any]:
    """Measure ``pid``'s dirty rate on ``node`` over ``shell``; the tracker's JSON report.

    The command's timeout is the window plus ``command_timeout`` (attach and teardown). A
    process that exits during the window raises ``NodeError`` whose message is the tracker's
    one line and whose ``value`` is its report (rounds done, the partial rate): the node's row
    shows what was measured before the exit. Any other failure raises ``CommandFailed``."""
    from labkit.ssh import CommandFailed

    cmd = dirty_rate_command(node, pid, seconds, tracker)
    try:
        r = shell.check(cmd, timeout=seconds + shell.settings.command_timeout)
    except CommandFailed as e:
        gone = gone_report(e.value)
        if gone is not None:
            raise NodeError(str(gone.get("error") or f"pid {pid} exited"), value=gone) from None
        raise
    report: dict[str, Any] = json.loads(r.stdout.decode().strip().splitlines()[-1])
    return report
