"""Remote processes and the markers by which labkit finds them again.

Every remote command runs as ``exec env LABKIT_RUN=<id> LABKIT_CTL=<host>:<pid>:<start> ...
/bin/sh -c CMD`` (``wrap``): env vars without needing the server to AcceptEnv, and a marker in
the environment of every descendant — which survives ``setsid`` and double forks, where a
process group or a parent pid does not. The run id is the handle to kill the command later: a
timeout or Ctrl-C sends a second exec, ``kill_command``, that ends every process carrying it
(``labkit/nodeside/killmarked.py``). LABKIT_CTL names the controller process that started it
(host, pid, and the pid's start time so a reused pid does not look alive): after a controller
SIGKILL a real sshd leaves such processes running, and ``labkit.janitor`` finds them by it.
"""

from __future__ import annotations

import os
import shlex
import socket
from typing import TYPE_CHECKING

from labkit import nodeside
from labkit.errors import LabkitError

if TYPE_CHECKING:
    import paramiko

    from labkit.ssh.client import SshClient

RUN_VAR = "LABKIT_RUN"
CTL_VAR = "LABKIT_CTL"

_ctl: tuple[int, str] | None = None


def proc_start_time(pid: int | str = "self") -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot), or None (no such
    process, or no /proc: then only the pid can be checked)."""
    from labkit.nodeside import killmarked

    st = killmarked.stat(os.getpid() if pid == "self" else int(pid))
    return str(st[3]) if st is not None else None


def controller_tag() -> str:
    """``host:pid:start`` of this controller process (LABKIT_CTL). Recomputed after a fork."""
    global _ctl
    pid = os.getpid()
    if _ctl is None or _ctl[0] != pid:
        host = socket.gethostname() or "localhost"
        _ctl = (pid, f"{host}:{pid}:{proc_start_time() or 0}")
    return _ctl[1]


def wrap(cmd: str, run_id: str, env: dict[str, str] | None) -> str:
    """``exec env LABKIT_RUN=ID LABKIT_CTL=HOST:PID:START K=V /bin/sh -c CMD``."""
    assigns = [f"{RUN_VAR}={run_id}", shlex.quote(f"{CTL_VAR}={controller_tag()}")]
    for k, v in (env or {}).items():
        if not k.replace("_", "a").isalnum() or k[0].isdigit():
            raise LabkitError(f"bad environment variable name {k!r}")
        assigns.append(shlex.quote(f"{k}={v}"))
    return f"exec env {' '.join(assigns)} /bin/sh -c {shlex.quote(cmd)}"


def kill_command(run_id: str) -> str:
    """The command that SIGKILLs every process of one run, and the process groups they lead,
    scanning again until none is left (a forking process can spawn between two scans). Not
    itself wrapped: it must not carry the marker it kills by."""
    return nodeside.command("killmarked", "--marker", f"{RUN_VAR}={run_id}", fast=True)


class RemoteProcess:
    """A command started with ``open_exec``: stream over ``.channel``; ``kill()`` ends every
    process of it on the node (process groups and setsid'd children included)."""

    def __init__(self, client: SshClient, channel: paramiko.Channel, run_id: str, cmd: str):
        self.client = client
        self.channel = channel
        self.run_id = run_id
        self.cmd = cmd
        self._killed = False

    def kill(self) -> None:
        if not self._killed:
            self._killed = True
            self.client._kill_run(self.run_id)

    def wait(self, timeout: float | None = None) -> int | None:
        """Exit status, or None if it did not come within ``timeout``."""
        if self.channel.status_event.wait(timeout):
            code = self.channel.recv_exit_status()
            return None if code == -1 else code
        return None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RemoteProcess:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.kill()
        self.close()
