"""Host keys: checked against known_hosts, never Fabric's auto-add.

An unknown key is refused unless trust-on-first-use is on (then it is appended, under an flock);
a CHANGED key is always refused, naming the node and both SHA256 fingerprints, so the user can
compare with ``ssh-keygen -lf`` and decide.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import logging
import threading
from pathlib import Path

import paramiko

from labkit.ssh.errors import HostKeyError, SshError
from labkit.ssh.target import Target

log = logging.getLogger("labkit.ssh")


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` form, so users can compare with ``ssh-keygen -lf``."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


_known_lock = threading.Lock()


def load_known(path: Path) -> paramiko.HostKeys:
    hk = paramiko.HostKeys()
    if path.is_file():
        try:
            hk.load(str(path))
        except (OSError, paramiko.SSHException) as e:
            raise SshError(f"{path}: cannot read known_hosts: {e}") from None
    return hk


def check_host_key(target: Target, key: paramiko.PKey) -> None:
    """Refuse unknown keys (unless TOFU, which records them) and, always, changed ones."""
    with _known_lock:
        known = load_known(target.known_hosts).lookup(target.known_hosts_name)
        if known:
            same_type = known.get(key.get_name())
            if same_type is not None and same_type.asbytes() == key.asbytes():
                return
            old = same_type or next(iter(known.values()))
            raise HostKeyError(
                f"{target.node}: host key for {target.known_hosts_name} has CHANGED — "
                f"{target.known_hosts} has {old.get_name()} {fingerprint(old)}, the server "
                f"offers {key.get_name()} {fingerprint(key)}; refusing to connect (if the node "
                f"was reinstalled: ssh-keygen -R '{target.known_hosts_name}' "
                f"-f {target.known_hosts})")
        if not target.trust_on_first_use:
            raise HostKeyError(
                f"{target.node}: unknown host key for {target.known_hosts_name} "
                f"({key.get_name()} {fingerprint(key)}), not in {target.known_hosts}; add it or "
                f"set trust_on_first_use")
        _record(target, key)
        log.info("%s: trusted on first use: %s %s recorded in %s", target.node,
                 key.get_name(), fingerprint(key), target.known_hosts)


def _record(target: Target, key: paramiko.PKey) -> None:
    """Append one known_hosts line under an flock, so parallel connects (threads or processes)
    neither lose lines nor rewrite the file."""
    path = target.known_hosts
    path.parent.mkdir(parents=True, exist_ok=True)
    line = f"{target.known_hosts_name} {key.get_name()} {key.get_base64()}\n"
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        existing = f.read()
        if line not in existing:
            if existing and not existing.endswith("\n"):
                f.write("\n")
            f.write(line)

