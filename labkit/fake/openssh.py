"""The OpenSSH fake node: a real ``sshd -D`` per node, so the controller side is also tested
against an independent SSH implementation (``sshd: openssh`` in the inventory's fake_lab).

sshd runs under ``fake/sshd_watchdog.py``, a small program of its own that powers the node off
when the lab says so (``stop()``) and also when the lab dies without saying so: a real sshd and
its sessions would otherwise outlive a SIGKILLed lab."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from labkit.fake import sshd_watchdog
from labkit.fake.base import ENV_NODE, ENV_ROOT, SWEEP_INTERVAL, FakeNode, ensure_host_key

SSHD = "/usr/sbin/sshd"
SFTP_SERVER_CANDIDATES = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                          "/usr/libexec/sftp-server", "/usr/lib/ssh/sftp-server")
WATCHDOG = Path(sshd_watchdog.__file__).resolve()


def sshd_path() -> str | None:
    """The system sshd, or None (tests skip with a reason)."""
    return SSHD if os.access(SSHD, os.X_OK) else shutil.which("sshd")


class OpenSshNode(FakeNode):
    """A fake node served by a real OpenSSH ``sshd -D`` (one per node, own config in the state
    folder beside the host key). A ForceCommand wrapper puts every session — commands, shells and
    the sftp subsystem — in the node root with HOME and the LABKIT_* markers set, so the node
    behaves like PythonSshNode. ``stop()`` has the watchdog freeze sshd (no new forks), kill
    it, every connection it forked and everything carrying the node's marker, and report."""

    def __init__(self, name: str, root: Path, host: str, port: int, host_key: Path,
                 authorized_keys: Path, log: logging.Logger):
        super().__init__(name, root, host, port, host_key, authorized_keys, log)
        self.conf_dir = self.host_key_path.parent / f"{name}.sshd"
        self._proc: subprocess.Popen | None = None
        self._closed = False

    @property
    def up(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> Path:
        sshd = sshd_path()
        if sshd is None:
            raise RuntimeError("OpenSshNode needs sshd (install openssh-server)")
        sftp = next((p for p in SFTP_SERVER_CANDIDATES if os.access(p, os.X_OK)), None)
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        # sshd insists that the host key is private; the authorized keys are copied so that
        # their ownership/mode never trips sshd (StrictModes is off anyway).
        os.chmod(self.host_key_path, 0o600)
        wrapper = self.conf_dir / "session.sh"
        root = shlex.quote(str(self.root))
        wrapper.write_text(
            "#!/bin/sh\n"
            "# every session of this fake node starts here (sshd ForceCommand)\n"
            f"cd {root} || exit 1\n"
            f"HOME={root}; {ENV_NODE}={shlex.quote(self.name)}; {ENV_ROOT}={root}\n"
            f"export HOME {ENV_NODE} {ENV_ROOT}\n"
            'if [ -n "$SSH_ORIGINAL_COMMAND" ]; then exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"; fi\n'
            "exec /bin/sh\n")
        wrapper.chmod(0o755)
        conf = self.conf_dir / "sshd_config"
        lines = [
            f"ListenAddress {self.host}:{self.port}",
            f"HostKey {self.host_key_path}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "PidFile none",
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            "AllowTcpForwarding yes",
            "X11Forwarding no",
            "PrintMotd no",
            "PrintLastLog no",
            "UseDNS no",
            "MaxStartups 200:30:400",
            "MaxSessions 100",
            "LogLevel ERROR",
            f"ForceCommand {wrapper}",
        ]
        if sftp:
            lines.append(f"Subsystem sftp {sftp}")
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"fake node {self.name} is closed")
            if self.up:
                return
            self.root.mkdir(parents=True, exist_ok=True)
            ensure_host_key(self.host_key_path)
            conf = self._write_config()
            if os.geteuid() == 0:
                # privilege separation folder; a fresh container has none
                os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
            log_path = self.conf_dir / "sshd.log"
            # The watchdog's stdin is our lifeline to it: closed by stop(), or by the kernel
            # when this process dies however it dies; either way the node powers off.
            with open(log_path, "ab") as logf:
                self._proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", str(WATCHDOG), "--marker",
                     self.marker.decode(), "--interval", str(SWEEP_INTERVAL), "--",
                     sshd_path() or SSHD, "-D", "-e", "-f", str(conf), "-p", str(self.port)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf,
                    start_new_session=True, close_fds=True)
            # ready when the port answers (sshd binds quickly, but not instantly)
            end = time.monotonic() + 10
            while True:
                if self._proc.poll() is not None:
                    self._proc.communicate()  # its report; closes our ends of the pipes
                    self._proc = None
                    tail = log_path.read_text(errors="replace")[-500:]
                    raise RuntimeError(f"sshd for fake node {self.name} exited: {tail.strip()}")
                try:
                    socket.create_connection((self.host, self.port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > end:
                        self.stop()
                        raise RuntimeError(
                            f"sshd for fake node {self.name} did not listen on port {self.port}"
                        ) from None
                    time.sleep(0.02)
            self.log.info("node %s: sshd (watchdog pid %d) listening on %s:%d", self.name,
                          self._proc.pid, self.host, self.port)

    def stop(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        self._power_off(proc, "sshd")

    def close(self) -> None:
        self.stop()
        self._closed = True

