"""The controller's SSH layer: how labkit reaches a node, runs commands there, moves files and
streams, and ends what it started.

    shell.py     THE contract the rest of labkit uses: ``RemoteShell`` (a Protocol),
                 ``RunResult`` (the one result type of a remote command) and ``ShellPool`` (a
                 Protocol: one shell per node within a run)
    errors.py    SshError and kin, CommandFailed
    target.py    ``resolve``: the inventory's ssh: block merged over ~/.ssh/config -> ``Target``
    hostkeys.py  known_hosts checks: unknown refused (unless TOFU), changed always refused
    client.py    ``SshClient``: connect, auth, ProxyJump; run, check, open_exec (a RemoteShell)
    proxy.py     a ProxyCommand from ssh_config, run as OpenSSH runs it
    run.py       the run loop: output, stdin, timeout and cancel of one command
    output.py    ``labkit run``'s output: prefixed streaming, bounded tails, --out files
    process.py   ``RemoteProcess`` and the markers: LABKIT_RUN / LABKIT_CTL, controller_tag
    stream.py    a flow-controlled stream into a command's stdin (deploy's stage step)
    transfer.py  SFTP: atomic put, pipelined get
    pool.py      ``ConnectionPool``: one connection per node within a run
    wait.py      ``wait_ssh``: until a booting node accepts us

Names are re-exported here, loaded on first use, so that importing ``labkit.ssh`` (or
``labkit.ssh.shell`` for a type) does not pay for paramiko until a connection is made.

paramiko logs what its transport thread sees (``Socket exception: Connection reset by peer``
when a node is powered off under a live connection, ``Exception (client)`` tracebacks under
load) at ERROR, and with no logging configured Python prints those on stderr, between the
task's lines. Each one is a lost connection that the command running over it already reports in
the node's error text ("connection lost ... node powered off or rebooted?"), so paramiko's
logger gets a handler that drops them: noise for a user of the CLI; a program that sets up
logging itself (a root handler) still receives them.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

_WHERE = {
    "RemoteShell": "shell", "RunResult": "shell", "ShellPool": "shell",
    "SshError": "errors", "SshUnreachable": "errors", "HostKeyError": "errors",
    "SshAuthError": "errors", "CommandFailed": "errors", "exit_text": "errors",
    "last_error_line": "errors",
    "Target": "target", "resolve": "target", "ssh_config_path": "target",
    "DEFAULT_IDENTITIES": "target",
    "fingerprint": "hostkeys", "check_host_key": "hostkeys",
    "SshClient": "client", "WINDOW": "client", "MAX_PACKET": "client",
    "FAST_CIPHERS": "client",
    "CHUNK": "run",
    "RemoteProcess": "process", "RUN_VAR": "process", "CTL_VAR": "process",
    "controller_tag": "process", "proc_start_time": "process",
    "exec_streaming": "stream", "ACK_EVERY": "stream", "IN_FLIGHT": "stream",
    "SFTP_CHUNK": "transfer",
    "ConnectionPool": "pool",
    "wait_ssh": "wait",
}

__all__ = [
    "ACK_EVERY", "CHUNK", "CTL_VAR", "CommandFailed", "ConnectionPool", "DEFAULT_IDENTITIES",
    "FAST_CIPHERS", "HostKeyError", "IN_FLIGHT", "MAX_PACKET", "RUN_VAR", "RemoteProcess",
    "RemoteShell", "RunResult", "SFTP_CHUNK", "ShellPool", "SshAuthError", "SshClient", "SshError",
    "SshUnreachable", "Target", "WINDOW", "check_host_key", "controller_tag", "exec_streaming",
    "exit_text", "fingerprint", "last_error_line", "proc_start_time", "resolve", "ssh_config_path",
    "wait_ssh",
]

logging.getLogger("paramiko").addHandler(logging.NullHandler())

if TYPE_CHECKING:
    from labkit.ssh.client import FAST_CIPHERS, MAX_PACKET, WINDOW, SshClient
    from labkit.ssh.errors import (
        CommandFailed,
        HostKeyError,
        SshAuthError,
        SshError,
        SshUnreachable,
        exit_text,
        last_error_line,
    )
    from labkit.ssh.hostkeys import check_host_key, fingerprint
    from labkit.ssh.pool import ConnectionPool
    from labkit.ssh.process import CTL_VAR, RUN_VAR, RemoteProcess, controller_tag, proc_start_time
    from labkit.ssh.run import CHUNK
    from labkit.ssh.shell import RemoteShell, RunResult, ShellPool
    from labkit.ssh.stream import ACK_EVERY, IN_FLIGHT, exec_streaming
    from labkit.ssh.target import DEFAULT_IDENTITIES, Target, resolve, ssh_config_path
    from labkit.ssh.transfer import SFTP_CHUNK
    from labkit.ssh.wait import wait_ssh


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'labkit.ssh' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"labkit.ssh.{module}"), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
