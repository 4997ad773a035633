"""A ProxyCommand from the user's ssh_config, run as OpenSSH runs it.

OpenSSH runs ``exec COMMAND`` through the user's shell and speaks SSH over the command's stdin
and stdout. Here the command's stdin/stdout is one end of a socketpair and paramiko's Transport
gets the other end: a real socket, so every timeout and select works as on TCP, and a command
that exits is a clean EOF (paramiko's own ``ProxyCommand`` splits the line with shlex instead of
using a shell, spins on a dead command, and never reaps it). With ``ProxyUseFdpass yes`` the
command hands back a connected socket over that pair (SCM_RIGHTS) and exits.

The command's stderr is kept (the last few KiB) so that a failure says why in the node's error
line; it runs in a session of its own and its whole group is ended with the connection.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading

from labkit.ssh.errors import SshError, SshUnreachable

log = logging.getLogger("labkit.ssh")

STDERR_TAIL = 4096
END_GRACE = 1.0  # seconds a proxy gets after SIGHUP (what OpenSSH sends it) before SIGKILL


class ProxyProcess:
    """One running ProxyCommand; ``sock`` is what the SSH transport reads and writes."""

    def __init__(self, command: str, source: str, where: str, *, timeout: float,
                 fdpass: bool = False):
        self.command = command
        self.source = source
        self.where = where
        self._tail = bytearray()
        self._tail_lock = threading.Lock()
        ours, theirs = socket.socketpair()
        shell = os.environ.get("SHELL") or "/bin/sh"
        try:
            self.proc = subprocess.Popen(
                [shell, "-c", f"exec {command}"], stdin=theirs, stdout=theirs,
                stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
        except OSError as e:
            ours.close()
            raise SshError(f"{where}: ProxyCommand ({source}) could not start {shell}: "
                           f"{e.strerror or e}") from None
        finally:
            theirs.close()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True,
                                        name=f"proxy-stderr-{self.proc.pid}")
        self._reader.start()
        if not fdpass:
            self.sock = ours
            return
        try:
            ours.settimeout(timeout)
            try:
                _, fds, _, _ = socket.recv_fds(ours, 1, 1)
            except OSError as e:
                fds = []
                log.debug("%s: ProxyUseFdpass: %s", where, e)
            if not fds:
                self.close()
                raise SshUnreachable(f"{where}: ProxyCommand ({source}) passed no connection"
                                     f"{self.reason()}")
            self.sock = socket.socket(fileno=fds[0])
            for extra in fds[1:]:
                os.close(extra)
        finally:
            ours.close()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        try:
            while chunk := self.proc.stderr.read1(4096):  # type: ignore[attr-defined]
                log.debug("%s: ProxyCommand stderr: %r", self.where, chunk)
                with self._tail_lock:
                    self._tail += chunk
                    del self._tail[:-STDERR_TAIL]
        except (OSError, ValueError):
            pass  # closed under us by close(): nothing more to keep

    def reason(self, wait: float = 1.0) -> str:
        """``; ProxyCommand (file:line) exited N: its last stderr line`` — after giving a
        dying command ``wait`` seconds to finish saying why."""
        try:
            status = self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            status = None
        self._reader.join(wait if status is not None else 0)
        with self._tail_lock:
            lines = [ln for ln in bytes(self._tail).decode(errors="replace").splitlines()
                     if ln.strip()]
        said = f": {lines[-1].strip()}" if lines else ""
        state = "is still running" if status is None else f"exited {status}"
        return f"; ProxyCommand ({self.source}) {state}{said}"

    def close(self) -> None:
        """End the command and its group (SIGHUP, as OpenSSH does, then SIGKILL) and reap it;
        the pid is ours until reaped, so the signal cannot hit a stranger."""
        if self.proc.poll() is None:
            for sig, grace in ((signal.SIGHUP, END_GRACE), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    self.proc.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.proc.stderr is not None:
            self._reader.join(END_GRACE)
            if not self._reader.is_alive():
                self.proc.stderr.close()
