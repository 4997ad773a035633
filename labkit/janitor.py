"""Leftovers of a dead controller on a node: find them, end them, say so.

Every remote command labkit starts carries ``LABKIT_CTL=<host>:<pid>:<start>`` in its
environment (``labkit.ssh.process.wrap``): the controller process that started it, with the
pid's start time (field 22 of /proc/PID/stat) so that a reused pid is not taken for the old
controller.
A Ctrl-C'd controller kills its own remote processes; a SIGKILLed one cannot, and a real sshd does
not kill a session's processes when the connection drops (a process that never reads its stdin,
or one that is SIGSTOPped — the frozen migrate-test workload — keeps running forever).

``sweep(client)`` is ONE remote command (``labkit/nodeside/sweep.py``, shipped inside the exec
request) that talks with the controller over its channel, one JSON line each way:

  1. the node lists every process whose environment carries LABKIT_CTL, and the per-controller
     scratch folders ``<workdir>/tmp/<host>:<pid>:<start>/`` (where node-side code puts temp
     files: images, fifos, pid files — see ``scratch_dir``);
  2. the controller decides which of those controllers are dead — they ran on THIS host, so
     liveness is a local /proc check — and answers with their tags. Tags of other hosts, and of
     live controllers (someone else's concurrent run, or this very process), are left alone;
  3. the node sends SIGTERM (+SIGCONT, so a stopped process gets it) to the processes of the dead
     controllers and to their process groups (a group only if every member carries a dead tag:
     nothing without our marker is ever signalled), SIGKILLs what is left after a short grace
     (``labkit/nodeside/killmarked.py``: the one kill-by-marker), removes the dead
     controllers' scratch folders, and reports.

Processes without our marker are never touched: the sweep signals nothing it did not find
carrying a dead controller's tag, checked again just before each signal. On fake-lab nodes
(which share the controller's /proc) it keeps to processes carrying its own node's
LABKIT_NODE_ROOT, so a sweep of node2 never reaps node1's leftovers.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from labkit import nodeside
from labkit.ssh.process import CTL_VAR, RUN_VAR, controller_tag, proc_start_time
from labkit.ssh.shell import READ_SIZE

if TYPE_CHECKING:
    from labkit.ssh.shell import RemoteShell

KINDS = ("processes", "files")
GRACE = 1.0
SCRATCH = "tmp"  # under the node's workdir: <workdir>/tmp/<controller tag>/
FAKE_NODE_ROOT = "LABKIT_NODE_ROOT"  # labkit.fake.base.ENV_ROOT: fake nodes share one /proc


def parse_tag(tag: str) -> tuple[str, int, str] | None:
    """``host:pid:start`` -> (host, pid, start); None if malformed."""
    parts = tag.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2]


def controller_alive(tag: str, host: str) -> bool | None:
    """Is the controller named by ``tag`` alive? None when it is not ours to judge (another
    host, or a malformed tag)."""
    parsed = parse_tag(tag)
    if parsed is None or parsed[0] != host:
        return None
    _, pid, start = parsed
    if os.path.exists("/proc/self/stat"):
        now = proc_start_time(pid)
        if now is None:
            return False
        return start in ("0", now)
    try:  # no /proc on this controller: the pid alone must do
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def scratch_dir(workdir: str) -> str:
    """This controller's scratch folder on a node (relative to the login folder unless
    ``workdir`` is absolute): node-side temp files go there, so that a SIGKILLed controller's
    are removed by the next run's sweep."""
    return f"{workdir.rstrip('/')}/{SCRATCH}/{controller_tag()}"


def label(cmd: str) -> str:
    """A short name for a leftover process: workload, source agent, restore agent, tracker..."""
    words = cmd.split()
    names = [os.path.basename(w) for w in words]
    for i, n in enumerate(names):
        if n == "workload.py":
            return "workload"
        if n == "agent.py":
            role = names[i + 1] if i + 1 < len(names) else ""
            return f"{role} agent" if role in ("source", "restore") else "agent"
        if n == "tracker.py":
            return "tracker"
    return names[0] if names else "process"


def sweep(client: RemoteShell, *, controller_host: str | None = None,
          kinds: Iterable[str] = KINDS, workdir: str = "labkit",
          grace: float = GRACE, timeout: float | None = None) -> list[dict[str, Any]]:
    """Clean what dead controllers of ``controller_host`` (default: this host) left on the
    node behind ``client``. Returns one dict per process ended
    (``kind="process"``, pid, ppid, what, cmd, run, controller, state, top — False for a
    process whose parent was ended too) and per folder removed (``kind="files"``, path)."""
    kinds = tuple(kinds)
    bad = set(kinds) - set(KINDS)
    if bad:
        raise ValueError(f"unknown sweep kind(s): {', '.join(sorted(bad))}")
    host = controller_host or controller_tag().rsplit(":", 2)[0] or socket.gethostname()
    timeout = timeout or (client.settings.ssh_timeout + grace + 10)
    cmd = nodeside.command("sweep", ",".join(kinds), workdir, "--scratch", SCRATCH,
                           "--ctl-var", CTL_VAR, "--run-var", RUN_VAR,
                           "--within-var", FAKE_NODE_ROOT, fast=True)
    proc = client.open_exec(cmd)
    ch = proc.channel
    ch.settimeout(timeout)
    buf = b""
    end = time.monotonic() + timeout

    def line() -> dict[str, Any]:
        nonlocal buf
        while b"\n" not in buf:
            if time.monotonic() > end:
                raise TimeoutError(f"{client.node}: leftover sweep did not answer")
            data = ch.recv(READ_SIZE)
            if not data:
                err = b""
                while ch.recv_stderr_ready():
                    err += ch.recv_stderr(READ_SIZE)
                raise OSError(f"{client.node}: leftover sweep ended early: "
                              f"{err.decode(errors='replace').strip()[-300:] or 'no output'}")
            buf += data
        first, buf = buf.split(b"\n", 1)
        return json.loads(first)

    try:
        census = line()
        verdicts: dict[str, bool | None] = {}
        for p in census.get("processes", []):
            if p["ctl"] not in verdicts:
                verdicts[p["ctl"]] = controller_alive(p["ctl"], host)
        for d in census.get("dirs", []):
            if d not in verdicts:
                verdicts[d] = controller_alive(d, host)
        dead = sorted(t for t, alive in verdicts.items() if alive is False)
        dirs = [d for d in census.get("dirs", []) if verdicts.get(d) is False]
        ch.sendall((json.dumps({"dead": dead, "dirs": dirs, "grace": grace}) + "\n").encode())
        report = line()
        proc.wait(min(5.0, timeout))
    except BaseException:
        proc.kill()
        raise
    finally:
        proc.close()
    killed = set(report.get("killed", []))
    gone = [p for p in census.get("processes", [])
            if p["ctl"] in dead and p["pid"] in killed]
    pids = {p["pid"] for p in gone}
    out: list[dict[str, Any]] = [
        {"kind": "process", "pid": p["pid"], "ppid": p["ppid"], "what": label(p["cmd"]),
         "cmd": p["cmd"][:120], "run": p["run"], "controller": p["ctl"], "state": p["state"],
         "top": p["ppid"] not in pids} for p in gone]
    out += [{"kind": "files", "path": path} for path in report.get("removed", [])]
    if report.get("survivors"):
        out.append({"kind": "survivors", "pids": report["survivors"]})
    return out


def describe(node: str, cleaned: list[dict[str, Any]]) -> str | None:
    """One line for the user, or None when there was nothing to clean:
    ``node1: cleaned leftovers of an interrupted run: workload pid 1234, source agent pid 1240``.
    """
    if not cleaned:
        return None
    top = [c for c in cleaned if c["kind"] == "process" and c["top"]]
    kids = sum(1 for c in cleaned if c["kind"] == "process" and not c["top"])
    parts = [f"{c['what']} pid {c['pid']}" for c in top]
    if kids:
        parts.append(f"{kids} child process{'es' if kids != 1 else ''}")
    parts += [f"temp folder {c['path']}" for c in cleaned if c["kind"] == "files"]
    runs = {c["controller"] for c in cleaned if c["kind"] == "process"}
    what = "an interrupted run" if len(runs) <= 1 else f"{len(runs)} interrupted runs"
    line = f"{node}: cleaned leftovers of {what}: {', '.join(parts)}"
    for c in cleaned:
        if c["kind"] == "survivors":
            line += f" (could NOT kill pid(s) {', '.join(map(str, c['pids']))})"
    return line
