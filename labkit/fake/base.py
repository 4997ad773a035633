"""What every fake node shares, whichever SSH server answers for it: the ``FakeNode`` base
(identity, root folder, the environment marker by which its processes are found), its host key,
and the environment its sessions get.

Two kinds of node implement the contract in docs/architecture.md: ``PythonSshNode`` (paramiko,
``fake/sshd.py``) and ``OpenSshNode`` (a real ``sshd -D``, ``fake/openssh.py``). Both run
commands as real processes with the node root as cwd and HOME, and ``LABKIT_NODE=NAME`` plus
``LABKIT_NODE_ROOT=ROOT`` in their environment. The root path, not the name, is the marker:
several labs with a ``node1`` may share one machine (parallel test runs), and a power-off kills
exactly what carries its own root (``labkit.nodeside.killmarked``)."""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import paramiko

ENV_NODE = "LABKIT_NODE"
ENV_ROOT = "LABKIT_NODE_ROOT"
# A power-off scans /proc again this often until nothing marked is left: a SIGKILLed process
# takes a few ms to exit, and every fake power-off (tests do hundreds) waits for that rescan.
SWEEP_INTERVAL = 0.005
# seconds a node's power supply (fake/sshd_watchdog.py) gets to power it off before we do it
SUPPLY_STOP_TIMEOUT = 10.0


class FakeNode:
    """Identity, paths and marker of one fake node; subclasses add the SSH server and the
    ``start``/``stop``/``close``/``up`` of the contract."""

    def __init__(self, name: str, root: Path, host: str, port: int, host_key: Path,
                 authorized_keys: Path, log: logging.Logger):
        self.name = name
        self.root = Path(root).resolve()
        self.host = host
        self.port = port
        self.host_key_path = Path(host_key)
        self.authorized_keys = Path(authorized_keys)
        self.log = log
        self.marker = f"{ENV_ROOT}={self.root}".encode()
        self._lock = threading.RLock()

    def _stopped(self, what: str, killed: list[int], survivors: list[int], *,
                 say: bool = True) -> None:
        """Log a power-off the same way for every kind of node: what was killed, and loudly
        what survived (a process that outlives its node's power is a fake-lab defect)."""
        if say:
            self.log.info("node %s: %s stopped, %d process(es) killed", self.name, what,
                          len(killed))
        if survivors:
            self.log.warning("node %s: %d process(es) survived power-off: %s", self.name,
                             len(survivors), survivors)


    def _power_off(self, proc: subprocess.Popen | None, what: str) -> None:
        """Power off a node whose processes run under its power supply (``proc``: the
        ``fake/sshd_watchdog.py`` process; None when none runs) and log it: OpenSSH nodes and
        QEMU guests both end this way."""
        from labkit.fake import sshd_watchdog

        killed, survivors = sshd_watchdog.shut(proc, self.marker, self.log, self.name,
                                               SUPPLY_STOP_TIMEOUT, SWEEP_INTERVAL)
        self._stopped(what, killed, survivors, say=proc is not None)


def ensure_host_key(path: Path) -> paramiko.Ed25519Key:
    """Load the node's ed25519 host key, generating it once (kept across restarts, like a real
    node's /etc/ssh). Written atomically so two racing starters cannot leave half a key."""
    import paramiko  # here, not at the top: the harness and the BMC side need no SSH

    path = Path(path)
    if not path.exists():
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                            serialization.PublicFormat.OpenSSH)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, pem)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if someone else won the race: keep theirs
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        pub_path = path.with_name(path.name + ".pub")
        if not pub_path.exists():
            pub_path.write_bytes(pub + b"\n")
    return paramiko.Ed25519Key.from_private_key_file(str(path))


def node_env(name: str, root: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a session gets: minimal like sshd's, plus the node markers."""
    user = os.environ.get("USER") or _username()
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(root),
        "USER": user,
        "LOGNAME": user,
        "SHELL": "/bin/sh",
        "LANG": os.environ.get("LANG", "C.UTF-8"),
    }
    env.update(extra or {})
    env[ENV_NODE] = name
    env[ENV_ROOT] = str(root)
    return env


def _username() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())
