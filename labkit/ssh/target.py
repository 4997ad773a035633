"""Where and how to reach a node: the inventory's ``ssh:`` block merged over ``~/.ssh/config``.

``~/.ssh/config`` is honoured (Host aliases, HostName, User, Port, IdentityFile, ProxyJump,
UserKnownHostsFile) so that a lab already set up for ``ssh`` works as is; the inventory's ``ssh:``
block wins where it says something.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from labkit.config import Settings
from labkit.errors import LabkitError
from labkit.inventory import Node, SshSpec
from labkit.ssh.errors import SshError

DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")


@dataclass(frozen=True)
class Target:
    """Everything needed to reach one node, after merging ssh_config under the inventory."""

    node: str
    hostname: str
    port: int
    user: str
    key_files: tuple[Path, ...]
    known_hosts: Path
    trust_on_first_use: bool
    proxy_jump: str | None = None

    @property
    def known_hosts_name(self) -> str:
        """The host's name in known_hosts: ``host`` on port 22, else ``[host]:port``."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


def ssh_config_path() -> Path:
    """``$LABKIT_SSH_CONFIG`` (tests, odd setups) else ``~/.ssh/config``."""
    return Path(os.path.expanduser(os.environ.get("LABKIT_SSH_CONFIG") or "~/.ssh/config"))


def _ssh_config(path: Path | None) -> paramiko.SSHConfig | None:
    path = path or ssh_config_path()
    if not path.is_file():
        return None
    try:
        return paramiko.SSHConfig.from_path(str(path))
    except Exception as e:  # a broken ~/.ssh/config is the user's to fix, say where
        raise LabkitError(f"{path}: cannot parse ssh config: {e}") from None


def resolve(node: Node | str, settings: Settings, *, ssh_config: Path | None = None) -> Target:
    """Merge the inventory's ssh: block over ~/.ssh/config for this node.

    ``SshSpec.port`` defaults to 22, so an inventory port of 22 counts as "not given" and a Port
    from ssh_config applies; any other inventory value wins. A bare string is a host or
    ``user@host:port`` as in ProxyJump (used for jump hosts)."""
    if isinstance(node, str):
        user, host, port = split_jump(node)
        spec = SshSpec(host=host, port=port or 22, user=user)
        name = node
    else:
        if node.ssh is None:
            raise SshError(f"{node.name}: no ssh: block in the inventory")
        spec, name = node.ssh, node.name
    cfg = _ssh_config(ssh_config)
    c: dict[str, Any] = cfg.lookup(spec.host) if cfg else {}
    hostname = c.get("hostname") or spec.host
    port = spec.port if spec.port != 22 else int(c.get("port", 22))
    user = spec.user or c.get("user") or getpass.getuser()
    if spec.key_file:
        keys: tuple[Path, ...] = (spec.key_file,)
    elif c.get("identityfile"):
        keys = tuple(Path(os.path.expanduser(p)) for p in c["identityfile"])
    else:
        keys = tuple(p for p in (Path.home() / ".ssh" / n for n in DEFAULT_IDENTITIES)
                     if p.exists())
    if spec.known_hosts:
        known = spec.known_hosts
    elif c.get("userknownhostsfile"):
        known = Path(os.path.expanduser(c["userknownhostsfile"].split()[0]))
    else:
        known = Path.home() / ".ssh" / "known_hosts"
    tofu = spec.trust_on_first_use if spec.trust_on_first_use is not None \
        else settings.trust_on_first_use
    jump = spec.proxy_jump or c.get("proxyjump")
    if jump and jump.lower() == "none":
        jump = None
    return Target(node=name, hostname=hostname, port=port, user=user, key_files=keys,
                  known_hosts=known, trust_on_first_use=bool(tofu), proxy_jump=jump)


def split_jump(s: str) -> tuple[str | None, str, int | None]:
    user = None
    if "@" in s:
        user, s = s.rsplit("@", 1)
    port = None
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif s.count(":") == 1:
        host, p = s.split(":")
        port = int(p)
    else:
        host = s
    return user, host, port
