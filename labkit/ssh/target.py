"""Where and how to reach a node: the inventory's ``ssh:`` block merged over ``~/.ssh/config``.

``~/.ssh/config`` is honoured as OpenSSH reads it, so that a lab already set up for ``ssh``
works as is: Host aliases, HostName, User, Port, IdentityFile, IdentitiesOnly, IdentityAgent,
ProxyJump, ProxyCommand (+ ProxyUseFdpass), UserKnownHostsFile, HostKeyAlias and
StrictHostKeyChecking. The inventory's ``ssh:`` block wins where it says something. A jump host
is resolved from its OWN Host block (``resolve(hop)``), never from the target's settings.

Of ProxyJump and ProxyCommand the first one the config gives wins, as in OpenSSH
(``ProxyCommand none`` counts as given; ``ProxyJump none`` does not hide a later ProxyCommand).
"""

from __future__ import annotations

import getpass
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from labkit.config import Settings
from labkit.errors import LabkitError
from labkit.inventory import Node, SshSpec
from labkit.ssh.errors import SshError

log = logging.getLogger("labkit.ssh")

DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")
PROXY_TOKENS = "%hnpr"  # what OpenSSH expands in ProxyCommand; anything else is its fatal error


@dataclass(frozen=True)
class Target:
    """Everything needed to reach one node, after merging ssh_config under the inventory."""

    node: str
    hostname: str
    port: int
    user: str
    key_files: tuple[Path, ...]
    known_hosts: Path  # checked first; where trust-on-first-use records
    trust_on_first_use: bool
    proxy_jump: str | None = None
    proxy_command: str | None = None  # expanded; run by the user's shell as OpenSSH does
    proxy_fdpass: bool = False
    proxy_source: str = ""  # file:line of the ProxyCommand, for messages
    known_hosts_more: tuple[Path, ...] = ()  # further UserKnownHostsFile entries, read only
    host_key_alias: str | None = None
    identities_only: bool = False
    identity_agent: str | None = None  # socket path; None: $SSH_AUTH_SOCK; "": no agent

    @property
    def known_hosts_name(self) -> str:
        """The host's name in known_hosts: HostKeyAlias, else ``host`` on port 22, else
        ``[host]:port`` (as OpenSSH writes it)."""
        if self.host_key_alias:
            return self.host_key_alias
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    @property
    def known_hosts_files(self) -> tuple[Path, ...]:
        return (self.known_hosts, *self.known_hosts_more)


def ssh_config_path() -> Path:
    """``$LABKIT_SSH_CONFIG`` (tests, odd setups) else ``~/.ssh/config``."""
    return Path(os.path.expanduser(os.environ.get("LABKIT_SSH_CONFIG") or "~/.ssh/config"))


class _Parsed(paramiko.SSHConfig):
    """paramiko's parser without its ProxyCommand expansion (no ``%%``, ``~`` replaced
    anywhere, unknown tokens kept): ours follows OpenSSH, with the final port and user."""

    TOKENS_BY_CONFIG_KEY = {**paramiko.SSHConfig.TOKENS_BY_CONFIG_KEY, "proxycommand": []}


_warned: set[tuple[Path, int]] = set()
_KEYWORD = re.compile(r"\s*(\w+)(?:\s*=\s*|\s+)(.*?)\s*$")


@dataclass
class SshConfig:
    """One ssh_config file: paramiko's Host/Match logic, plus the raw lines so that a value can
    be traced back to file:line and taken verbatim (paramiko strips a pair of quotes that
    the shell, for a ProxyCommand, must see)."""

    path: Path
    parsed: paramiko.SSHConfig
    lines: list[tuple[int, str, str]]  # (lineno, keyword lowercased, raw value)

    @classmethod
    def load(cls, path: Path) -> SshConfig:
        try:
            text = path.read_text()
            parsed = _Parsed.from_text(text)
        except Exception as e:  # a broken ~/.ssh/config is the user's to fix, say where
            raise LabkitError(f"{path}: cannot parse ssh config: {e}") from None
        lines = []
        for n, line in enumerate(text.splitlines(), 1):
            m = _KEYWORD.match(line)
            if m and not line.lstrip().startswith("#"):
                lines.append((n, m.group(1).lower(), m.group(2)))
                if lines[-1][1] == "include" and (path, n) not in _warned:
                    _warned.add((path, n))  # said once per process, not per node
                    log.warning("%s:%d: Include is not supported: what the included files "
                                "say is not used", path, n)
        return cls(path, parsed, lines)

    def lookup(self, host: str) -> dict[str, Any]:
        return self.parsed.lookup(host)

    def line_of(self, key: str, value: str | None) -> tuple[str, str | None]:
        """(file:line, raw value) of the first ``key`` line that gave ``value``."""
        for n, k, raw in self.lines:
            if k != key:
                continue
            unquoted = raw[1:-1] if len(raw) > 1 and raw[0] == raw[-1] == '"' else raw
            if value is None and raw.lower() == "none" or value in (raw, unquoted):
                return f"{self.path}:{n}", raw
        return str(self.path), value


def _ssh_config(path: Path | None) -> SshConfig | None:
    path = path or ssh_config_path()
    if not path.is_file():
        return None
    return SshConfig.load(path)


def resolve(node: Node | str, settings: Settings, *, ssh_config: Path | None = None,
            jump_via: str | None = None) -> Target:
    """Merge the inventory's ssh: block over ~/.ssh/config for this node.

    ``SshSpec.port`` defaults to 22, so an inventory port of 22 counts as "not given" and a Port
    from ssh_config applies; any other inventory value wins. A bare string is a host or
    ``user@host:port`` as in ProxyJump (a jump host: its own Host block applies, as for
    ``ssh -J``). ``jump_via`` is the hops before it in a ProxyJump list: they replace the
    hop's own ProxyJump/ProxyCommand, as OpenSSH's ``-J`` does."""
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
    tokens = {"h": hostname, "n": spec.host, "p": str(port), "r": user,
              "u": getpass.getuser(), "d": str(Path.home()), "k": c.get("hostkeyalias") or
              hostname}
    if spec.key_file:
        keys: tuple[Path, ...] = (spec.key_file,)
    elif c.get("identityfile"):
        keys = tuple(Path(os.path.expanduser(p)) for p in c["identityfile"])
    else:
        keys = tuple(p for p in (Path.home() / ".ssh" / n for n in DEFAULT_IDENTITIES)
                     if p.exists())
    more: tuple[Path, ...] = ()
    if spec.known_hosts:
        known = spec.known_hosts
    elif c.get("userknownhostsfile"):
        where = cfg.line_of("userknownhostsfile", c["userknownhostsfile"])[0] if cfg else ""
        files = [Path(os.devnull) if f.lower() == "none" else
                 Path(os.path.expanduser(os.path.expandvars(_expand(f, tokens, "%dhknpru",
                                                                     where))))
                 for f in c["userknownhostsfile"].split()]
        known, more = files[0], tuple(files[1:])
    else:
        known = Path.home() / ".ssh" / "known_hosts"
    strict = str(c.get("stricthostkeychecking", "")).lower()
    cfg_tofu = {"yes": False, "no": True, "off": True, "accept-new": True}.get(strict)
    tofu = next(t for t in (spec.trust_on_first_use, cfg_tofu, settings.trust_on_first_use)
                if t is not None)
    jump, command, source = _proxy(spec, c, cfg, jump_via)
    if command is not None:
        command = _expand(command, tokens, PROXY_TOKENS, source)
    agent = c.get("identityagent")
    if agent is not None:
        if agent.lower() == "none":
            agent = ""
        elif agent == "SSH_AUTH_SOCK":
            agent = None
        elif agent.startswith("$"):
            agent = os.environ.get(agent[1:].strip("{}")) or ""
        else:
            agent = os.path.expanduser(os.path.expandvars(agent))
    return Target(node=name, hostname=hostname, port=port, user=user, key_files=keys,
                  known_hosts=known, trust_on_first_use=bool(tofu), proxy_jump=jump,
                  proxy_command=command, proxy_source=source,
                  proxy_fdpass=str(c.get("proxyusefdpass", "no")).lower() == "yes",
                  known_hosts_more=more, host_key_alias=c.get("hostkeyalias"),
                  identities_only=str(c.get("identitiesonly", "no")).lower() == "yes",
                  identity_agent=agent)


def _proxy(spec: SshSpec, c: dict[str, Any], cfg: SshConfig | None,
           jump_via: str | None) -> tuple[str | None, str | None, str]:
    """(ProxyJump, ProxyCommand, file:line of the command) as OpenSSH picks them: the inventory
    (or the hops before this one) first; in the config, whichever of the two comes first, where
    ``ProxyCommand none`` counts and ``ProxyJump none`` does not."""
    if spec.proxy_jump:
        jump = spec.proxy_jump
    elif jump_via:
        jump = jump_via
    else:
        order = [k for k in c if k in ("proxyjump", "proxycommand")]
        pj = c.get("proxyjump")
        jump_first = bool(pj) and pj.lower() != "none" and order[0] == "proxyjump"
        if "proxycommand" not in c or jump_first:
            jump = pj
        else:
            assert cfg is not None  # the value came from it
            where, raw = cfg.line_of("proxycommand", c["proxycommand"])
            if raw is None or raw.lower() == "none":
                return None, None, where
            return None, raw, where
    if jump and jump.lower() == "none":
        jump = None
    return jump, None, ""


def _expand(value: str, tokens: dict[str, str], allowed: str, where: str) -> str:
    """OpenSSH's percent_expand: ``%%`` and the allowed ``%x`` tokens; any other ``%x`` is an
    error naming the config line (OpenSSH refuses it too), never passed on as text."""
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        t = value[i + 1:i + 2]
        if t == "%":
            out.append("%")
        elif t and t in allowed and t in tokens:
            out.append(tokens[t])
        else:
            raise SshError(f"{where}: unknown token %{t} in {value!r} (this one line takes "
                           f"%% {' '.join('%' + a for a in allowed[1:])})")
        i += 2
    return "".join(out)


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
