"""Where and how to reach a node: the inventory's ``ssh:`` block merged over ``~/.ssh/config``.

``~/.ssh/config`` is honoured as OpenSSH reads it, so that a lab already set up for ``ssh``
works as is: Host aliases, HostName, User, Port, IdentityFile, IdentitiesOnly, IdentityAgent,
ProxyJump, ProxyCommand (+ ProxyUseFdpass), UserKnownHostsFile, HostKeyAlias and
StrictHostKeyChecking, and Include (see ``SshConfig``). The inventory's ``ssh:`` block wins
where it says something. A jump host is resolved from its OWN Host block (``resolve(hop)``),
never from the target's settings, as ``ssh -J`` does (OpenSSH passes no ``-o`` to the hop): the
node's known_hosts and trust_on_first_use in the inventory do not vouch for its jump host, and
the unknown-key error says where the hop's key goes.

Of ProxyJump and ProxyCommand the first one the config gives wins, as in OpenSSH
(``ProxyCommand none`` counts as given; ``ProxyJump none`` does not hide a later ProxyCommand).
"""

from __future__ import annotations

import getpass
import glob
import logging
import os
import re
import shlex
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
    jump_host: str | None = None  # as named in a ProxyJump, when this is a jump host

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


_KEYWORD = re.compile(r"\s*(\w+)(?:\s*=\s*|\s+)(.*?)\s*$")
MAX_INCLUDE_DEPTH = 16  # OpenSSH's READCONF_MAX_DEPTH: "Too many recursive configuration includes"

# A block's condition: ("host", patterns) or ("match", paramiko's parsed criteria). A block
# inside an included file holds under the conditions of every block that included it.
_Cond = tuple[str, list[Any]]


@dataclass
class SshConfig:
    """One ssh_config file and what it includes: paramiko's Host/Match logic over the blocks of
    all of them in OpenSSH's reading order, plus the raw lines so that a value can be traced
    back to file:line and taken verbatim (paramiko strips a pair of quotes that the shell, for
    a ProxyCommand, must see).

    ``Include`` is followed as OpenSSH 9 follows it (paramiko ignores it): each argument is a
    glob (sorted; ``~`` expanded; relative paths are under ``~/.ssh``, this being a user
    config; no match is no error); an included file is read where the Include line stands, so
    an Include inside a Host/Match block applies only when that block matches, and a
    Host/Match inside the included file ends at its end, the including block's state
    resuming after the Include line. A loop or more than 16 levels is refused (OpenSSH stops
    too), and so is a world-writable included file or one owned by someone else (OpenSSH's
    "Bad owner or permissions")."""

    path: Path
    parsed: paramiko.SSHConfig
    lines: list[tuple[Path, int, str, str]]  # (file, lineno, keyword lowercased, raw value)

    @classmethod
    def load(cls, path: Path) -> SshConfig:
        parsed = _Parsed()
        lines: list[tuple[Path, int, str, str]] = []
        _read_config(path, [], parsed, lines, (), None)
        return cls(path, parsed, lines)

    def lookup(self, host: str) -> dict[str, Any]:
        return self.parsed.lookup(host)

    def line_of(self, key: str, value: str | None) -> tuple[str, str | None]:
        """(file:line, raw value) of the first ``key`` line that gave ``value``."""
        for path, n, k, raw in self.lines:
            if k != key:
                continue
            unquoted = raw[1:-1] if len(raw) > 1 and raw[0] == raw[-1] == '"' else raw
            if value is None and raw.lower() == "none" or value in (raw, unquoted):
                return f"{path}:{n}", raw
        return str(self.path), value


def _block(conds: list[_Cond]) -> dict[str, Any]:
    """A paramiko block that applies when all ``conds`` hold: a plain Host or Match block when
    there is one (exactly what paramiko builds), else one Match of all their criteria, a Host
    becoming ``originalhost`` (the same patterns against the same name in paramiko)."""
    if not conds:
        return {"host": ["*"], "config": {}}
    if len(conds) == 1:
        kind, value = conds[0]
        return {"host": value, "config": {}} if kind == "host" else \
            {"matches": value, "config": {}}
    crits: list[dict[str, Any]] = []
    for kind, value in conds:
        if kind == "host":
            crits.append({"type": "originalhost", "param": value, "negate": False})
        else:  # "all" ends paramiko's check at once (true): drop it, the others decide
            crits += [c for c in value if c["type"] != "all"]
    return {"matches": crits or conds[-1][1], "config": {}}


def _read_config(path: Path, outer: list[_Cond], parsed: paramiko.SSHConfig,
                 lines: list[tuple[Path, int, str, str]], stack: tuple[Path, ...],
                 where: str | None) -> None:
    """Append ``path``'s blocks (and those of what it includes) to ``parsed``, each under
    ``outer`` (the blocks around the Include line that brought it in)."""
    at = where or str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        if where is None:
            raise LabkitError(f"{path}: cannot read ssh config: no such file") from None
        return  # a dangling link matched by a glob: OpenSSH skips it too
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else str(e)
        raise LabkitError(f"{at}: cannot read ssh config {path}: {why}") from None
    mine = outer
    block = _block(mine)
    for n, raw_line in enumerate(text.splitlines(), 1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        m = paramiko.SSHConfig.SETTINGS_REGEX.match(line)
        raw = _KEYWORD.match(line)
        if not m or not raw:
            raise LabkitError(f"{path}:{n}: cannot parse ssh config: {line!r}")
        key, value = m.group(1).lower(), m.group(2)
        lines.append((path, n, key, raw.group(2)))
        try:
            if key in ("host", "match"):
                parsed._config.append(block)
                own: _Cond = (("host", parsed._get_hosts(value)) if key == "host" else
                              ("match", parsed._get_matches(value)))
                mine = [*outer, own]
                block = _block(mine)
            elif key == "include":
                parsed._config.append(block)
                for included in _include_paths(value, f"{path}:{n}"):
                    _include(included, mine, parsed, lines, (*stack, path), f"{path}:{n}")
                block = _block(mine)  # the including block goes on after the Include
            elif key == "proxycommand" and value.lower() == "none":
                block["config"][key] = None
            else:
                if value.startswith('"') and value.endswith('"'):
                    value = value[1:-1]
                if key in ("identityfile", "localforward", "remoteforward"):
                    block["config"].setdefault(key, []).append(value)
                elif key not in block["config"]:
                    block["config"][key] = value
        except paramiko.ssh_exception.ConfigParseError as e:
            raise LabkitError(f"{path}:{n}: cannot parse ssh config: {e}") from None
    parsed._config.append(block)


def _include_paths(value: str, where: str) -> list[Path]:
    try:
        args = shlex.split(value)
    except ValueError as e:
        raise LabkitError(f"{where}: cannot parse Include: {e}") from None
    found: list[Path] = []
    for arg in args:
        if not arg.startswith(("/", "~")):
            arg = "~/.ssh/" + arg
        found += [Path(p) for p in sorted(glob.glob(os.path.expanduser(arg)))]
    return found


def _include(path: Path, outer: list[_Cond], parsed: paramiko.SSHConfig,
             lines: list[tuple[Path, int, str, str]], stack: tuple[Path, ...],
             where: str) -> None:
    if path.is_dir():
        return  # OpenSSH reads a directory as an empty file
    real = path.resolve()
    if real in {p.resolve() for p in stack}:
        raise LabkitError(f"{where}: Include loop: {path} includes itself "
                          f"(through {' -> '.join(map(str, stack))})")
    if len(stack) > MAX_INCLUDE_DEPTH:
        raise LabkitError(f"{where}: Include nested more than {MAX_INCLUDE_DEPTH} deep "
                          f"(OpenSSH's limit)")
    try:
        st = path.stat()
    except OSError:
        st = None
    if st is not None and (st.st_uid not in (0, os.getuid()) or st.st_mode & 0o002):
        raise LabkitError(f"{where}: {path} is writable by others or owned by another user; "
                          f"OpenSSH refuses it too (Bad owner or permissions)")
    _read_config(path, outer, parsed, lines, stack, where)


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
                  identity_agent=agent, jump_host=node if isinstance(node, str) else None)


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
