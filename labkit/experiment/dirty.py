"""dirty-rate: the dirty rate (MiB/s of distinct pages written) of a process on a node over an
exact window, measured by the deployed tracker payload (``labkit/payloads/tracker.py
dirty-rate``; its ``DirtyRate`` says what the window and the count are, and ``method`` whether
the count is exact or a bound).

Here, not in the task, because the things a test wants to reach live here: the command line the
node runs, how the tracker's "the process exited" answer (exit code 3, its last stdout line a
JSON object with ``"gone": true``) becomes a node failure that still carries the partial
measurement, and how any other failure reaches the user as the tracker's own one line."""

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
# what the task's table shows; the window is `window_s` (the row's `seconds` is the fan-out's:
# how long the node took, attach and teardown included)
COLUMNS = ("backend", "method", "window_s", "pages", "mib_per_s")


def dirty_rate_command(node: Node, pid: int, seconds: float, tracker: str = "auto") -> str:
    """The shell line that measures ``pid`` on ``node`` for ``seconds`` with ``tracker``."""
    return (f"cd {shlex.quote(payload_dir(node))} && exec python3 tracker.py dirty-rate "
            f"--pid {int(pid)} --seconds {float(seconds)} --backend {shlex.quote(tracker)}")


def _last_json(stdout: str) -> dict[str, Any] | None:
    lines = (stdout or "").strip().splitlines()
    if not lines:
        return None
    try:
        report = json.loads(lines[-1])
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def failure_text(value: dict[str, Any]) -> str | None:
    """The tracker's own reason for a failed run, one line: the ``error`` of its last JSON
    line (exit 1: it cannot track this process, e.g. ptrace refused), else the last line of
    its stderr (a usage error, a crash's exception line). None when it said nothing."""
    report = _last_json(value.get("stdout") or "")
    if report and isinstance(report.get("error"), str) and report["error"].strip():
        return " ".join(report["error"].split())
    for line in reversed((value.get("stderr") or "").strip().splitlines()):
        if line.strip():
            return " ".join(line.split())
    return None


def gone_report(value: dict[str, Any]) -> dict[str, Any] | None:
    """The tracker's "target gone" report from a failed command's ``CommandFailed.value``, or
    None when the failure was something else (exit code other than 3, no JSON last line)."""
    if value.get("exit_code") != EXIT_GONE:
        return None
    report = _last_json(value.get("stdout") or "")
    return report if report and report.get("gone") else None


def dirty_rate(node: Node, shell: RemoteShell, pid: int, seconds: float,
               tracker: str = "auto") -> dict[str, Any]:
    """Measure ``pid``'s dirty rate on ``node`` over ``shell``; the tracker's JSON report.

    The command's timeout is the window plus ``command_timeout`` (attach and teardown). A
    process that exits during the window raises ``NodeError`` whose message is the tracker's
    one line and whose ``value`` is its report (rounds done, the partial rate): the node's row
    shows what was measured before the exit (a pid that never existed: "pid N: no such
    process"). Any other failure raises ``CommandFailed`` whose message is the tracker's own
    line ("pid N: no tracking backend works: uffd: ptrace ... denied (...)"), not an exit
    code."""
    from labkit.ssh import CommandFailed

    cmd = dirty_rate_command(node, pid, seconds, tracker)
    try:
        r = shell.check(cmd, timeout=seconds + shell.settings.command_timeout)
    except CommandFailed as e:
        gone = gone_report(e.value)
        if gone is not None:
            raise NodeError(str(gone.get("error") or f"pid {pid} exited"), value=gone) from None
        why = failure_text(e.value)
        if why is None or e.value.get("timed_out"):
            raise
        code = e.value.get("exit_code")
        raise CommandFailed(f"{why} (tracker exit code {code})", e.value) from None
    report: dict[str, Any] = json.loads(r.stdout.decode().strip().splitlines()[-1])
    return report
