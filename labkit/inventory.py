"""inventory.yaml: the lab's nodes, groups, BMC and SSH endpoints, and where secrets come from.

Validation is strict and every complaint names ``file:line``: a typo in a lab description should
stop a run before it touches a machine, not after it powered off the wrong one."""

from __future__ import annotations

import fnmatch
import ipaddress
import math
import os
import re
import socket
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from labkit.errors import InventoryError, UserError
from labkit.secrets import Secret

# libyaml's parser where present: the pure-Python one spent ~0.1 s on a 256-node inventory
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ENV_VAR = "LABKIT_INVENTORY"

BMC_KEYS = {"host", "port", "user", "password_env", "password_file", "password"}
SSH_KEYS = {"host", "port", "user", "key_file", "known_hosts", "trust_on_first_use",
            "proxy_jump", "workdir"}
TOP_KEYS = {"defaults", "groups", "nodes", "fake_lab", "payloads"}
NODE_KEYS = {"bmc", "ssh", "fake"}
FAKE_LAB_KEYS = {"state_dir", "power_delay", "boot_delay", "sshd", "seed", "kind", "memory",
                 "cpus", "kernel", "boot_timeout", "lan_port", "kernel_args"}

# The most a file the inventory names may hold: a password file, a private key or a
# known_hosts larger than this is the wrong file (a disk image, /dev/zero's copy), and reading
# it whole once ended in MemoryError. The inventory itself is capped the same way.
FILE_CAPS = {"password_file": 64 << 10, "key_file": 1 << 20, "known_hosts": 64 << 20,
             "inventory": 16 << 20}
# Plain decimal, as a number in an inventory is meant: YAML 1.1 would also read 0x26F, 0o17,
# 1_000 and 1:30 (sexagesimal: 90) as numbers, none of which a user writing a port means.
_DECIMAL_INT = re.compile(r"^[+-]?[0-9]+$")
_DECIMAL = re.compile(r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")
# ProxyJump hop, as OpenSSH writes it: [user@]host[:port], host may be [v6]
_HOP = re.compile(r"^(?:(?P<user>[^@\s,:\[\]]+)@)?"
                  r"(?P<host>\[[0-9A-Fa-f:.%\w]+\]|[A-Za-z0-9_.%-]+)(?::(?P<port>[0-9]+))?$")


@dataclass(frozen=True)
class BmcSpec:
    host: str
    port: int = 623
    user: str = "admin"
    password_env: str | None = None
    password_file: Path | None = None
    password_literal: str | None = field(default=None, repr=False)
    source: str = ""  # "file:line" of the node's bmc block, for error messages

    def password(self) -> Secret:
        """Resolve the password now (not at load time for lab.up's sake); errors name the line."""
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise UserError(f"{self.source}: password_env {self.password_env} is not set")
            return Secret(value.encode())
        if self.password_file:
            data = read_small(self.password_file, FILE_CAPS["password_file"],
                              f"{self.source}: password_file")
            return Secret(data.rstrip(b"\r\n"))
        if self.password_literal is not None:
            return Secret(self.password_literal.encode())
        raise UserError(f"{self.source}: no password_env, password_file or password for the BMC")


@dataclass(frozen=True)
class SshSpec:
    host: str
    port: int = 22
    user: str | None = None
    key_file: Path | None = None
    known_hosts: Path | None = None
    trust_on_first_use: bool | None = None
    proxy_jump: str | None = None
    workdir: str | None = None  # where labkit keeps payloads on the node (default ~/labkit)
    source: str = ""


@dataclass(frozen=True)
class Node:
    name: str
    bmc: BmcSpec | None
    ssh: SshSpec | None
    fake: dict[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True)
class FakeLabSpec:
    state_dir: Path
    power_delay: tuple[float, float] = (1.0, 3.0)
    boot_delay: float = 1.0
    sshd: str = "python"  # python | openssh
    seed: int = 0
    kind: str = "process"  # process | vm (QEMU guests, labkit/fake/vm.py)
    memory: int = 1024     # vm: MiB per guest
    cpus: int = 1          # vm: vCPUs per guest
    kernel: str | None = None  # vm: vmlinuz path or version (default: newest with modules)
    boot_timeout: float = 120.0  # vm: from power-on to the guest's sshd
    lan_port: int = 0      # vm: UDP port of the lab LAN (0: no LAN)
    kernel_args: str = ""  # vm: added to every guest's kernel command line


@dataclass
class Inventory:
    path: Path
    nodes: dict[str, Node]
    groups: dict[str, list[str]]
    fake_lab: FakeLabSpec | None = None
    payloads: list[Path] = field(default_factory=list)

    def select(self, selector: str | None) -> list[Node]:
        """Resolve ``-n SEL``: comma list of names, globs, ``@group`` or ``@all``; no ``-n`` at
        all (None) is every node. Order follows the inventory so tables are stable.

        A selector that selects nothing by accident (``-n ""``, blanks, only commas: an unset
        shell variable, a script's empty list) is refused: it must never widen to the whole
        lab, which is what it once did for ``power-on``."""
        if selector is None:
            return list(self.nodes.values())
        if not selector.replace(",", "").strip():
            raise UserError(f"empty node selector {selector!r}: name nodes, @group or @all "
                            "(leave out -n for every node)")
        if selector.strip() in ("@all", "all"):
            return list(self.nodes.values())
        wanted: set[str] = set()
        for item in (s.strip() for s in selector.split(",")):
            if not item:
                raise UserError(f"bad node selector {selector!r}: empty item")
            if item.startswith("@"):
                group = item[1:]
                if group == "all":
                    wanted.update(self.nodes)
                elif group in self.groups:
                    wanted.update(self.groups[group])
                else:
                    raise UserError(f"unknown group {item!r} (known: "
                                    f"{', '.join('@' + g for g in self.groups) or 'none'})")
            elif any(c in item for c in "*?["):
                matched = fnmatch.filter(self.nodes, item)
                if not matched:
                    raise UserError(f"node pattern {item!r} matches no node in {self.path}")
                wanted.update(matched)
            elif item in self.nodes:
                wanted.add(item)
            else:
                raise UserError(f"unknown node {item!r} in {self.path}")
        return [n for name, n in self.nodes.items() if name in wanted]

    def node(self, name: str) -> Node:
        if name not in self.nodes:
            raise UserError(f"unknown node {name!r} in {self.path}")
        return self.nodes[name]


def find_inventory(explicit: str | os.PathLike | None = None) -> Path:
    """``--inventory PATH``, else $LABKIT_INVENTORY, else ./inventory.yaml."""
    if explicit:
        path = Path(explicit)
    elif os.environ.get(ENV_VAR):
        path = Path(os.environ[ENV_VAR])
    else:
        path = Path("inventory.yaml")
    if not os.path.lexists(path):
        raise UserError(f"{path}: inventory not found (use --inventory PATH or ${ENV_VAR})")
    problem = file_problem(path, FILE_CAPS["inventory"], may_be_empty=True)
    if problem:
        src = "" if explicit or not os.environ.get(ENV_VAR) else f" (from ${ENV_VAR})"
        raise UserError(f"{path}{src}: inventory {problem}")
    return path


# --- files the inventory names ---------------------------------------------------------------

def file_problem(path: Path, cap: int, *, may_be_missing: bool = False,
                 may_be_empty: bool = False) -> str | None:
    """What is wrong with ``path`` as a small regular file we are about to read, or None.
    Only ``stat`` is used: opening a FIFO to look at it would block until a writer comes (one
    such inventory once hung forever), and a device or a huge file is never what was meant."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"is a dangling symlink (to {os.readlink(path)})"
        return None if may_be_missing else "is not readable: no such file"
    except OSError as e:
        return f"is not readable: {e.strerror}"
    mode = st.st_mode
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else None)
    if kind is not None:
        return f"is {kind}, not a regular file"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    if st.st_size == 0 and not may_be_empty:
        return "is empty"
    if st.st_size > cap:
        return f"is {st.st_size} bytes, more than the {cap} such a file can be (wrong file?)"
    if not os.access(path, os.R_OK):
        return "is not readable: permission denied"
    return None


def read_small(path: Path, cap: int, what: str) -> bytes:
    """Read a file the user named, at most ``cap`` bytes, without ever blocking on a FIFO or
    a device (O_NONBLOCK, then fstat on what was actually opened): the checks at load time
    cannot see what the path became since. Errors are one ``UserError`` line ``what path:
    problem``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        raise UserError(f"{what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{what} {path}: is not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= cap:
            chunk = os.read(fd, min(1 << 16, cap + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > cap:
            raise UserError(f"{what} {path}: more than {cap} bytes (wrong file?)")
        return b"".join(chunks)
    except OSError as e:
        raise UserError(f"{what} {path}: {e.strerror}") from None
    finally:
        os.close(fd)


# --- loading with line numbers -------------------------------------------------------------

class _Loader:
    """Turns a composed YAML node tree into plain values while remembering where each came from."""

    def __init__(self, path: Path):
        self.path = path

    def err(self, node: yaml.Node | None, message: str) -> InventoryError:
        line = node.start_mark.line + 1 if node is not None else None
        return InventoryError(self.path, line, message)

    def where(self, node: yaml.Node) -> str:
        return f"{self.path}:{node.start_mark.line + 1}"

    def mapping(self, node: yaml.Node, what: str, allowed: set[str] | None) -> dict[str, tuple]:
        if not isinstance(node, yaml.MappingNode):
            raise self.err(node, f"{what} must be a mapping")
        out: dict[str, tuple] = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                raise self.err(k, f"{what}: keys must be plain names")
            key = k.value
            if key in out:
                raise self.err(k, f"{what}: duplicate key {key!r}")
            if allowed is not None and key not in allowed:
                raise self.err(k, f"{what}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")
            out[key] = (k, v)
        return out

    def scalar(self, node: yaml.Node, what: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.err(node, f"{what} must be a single value")
        if node.value == "":
            return None
        # the composed node already carries its resolved tag: construct it directly (a
        # serialize + safe_load round trip per scalar cost ~0.1 ms, 0.14 s for 256 nodes)
        return yaml.constructor.SafeConstructor().construct_object(node, deep=True)

    def string(self, node: yaml.Node, what: str) -> str:
        """A text value. An unquoted one that YAML types as something else (``user: yes`` is
        True, ``password_file: 0123`` is 83, ``host: 10.0`` is 10.0, ``workdir: ~`` is None,
        ``2024-01-01`` a date) is refused with a hint to quote it, never converted back to a
        string that is not what was written."""
        value = self.scalar(node, what)
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(node, yaml.ScalarNode) and not node.style and node.value != "" \
                and not isinstance(value, str):  # plain (unquoted): libyaml says "", PyYAML None
            raise self.err(node, f"{what}: {node.value} reads as {_yaml_kind(value)} in YAML, "
                                 f"not text; quote it: '{node.value}'")
        raise self.err(node, f"{what} must be a non-empty string")

    def port(self, node: yaml.Node, what: str) -> int:
        value = self.scalar(node, what)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535 \
                or not _DECIMAL_INT.match(node.value):
            raise self.err(node, f"{what} must be a port number 1-65535, got {node.value!r}")
        return value

    def number(self, node: yaml.Node, what: str, minimum: float = 0.0,
               integer: bool = False) -> float:
        """A plain decimal number >= ``minimum``: finite (no ``.inf``/``.nan``), no hex,
        octal or sexagesimal, and a whole one where ``integer``."""
        value = self.scalar(node, what)
        kind = "a whole number" if integer else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not (_DECIMAL_INT if integer else _DECIMAL).match(node.value) \
                or not math.isfinite(value) or value < minimum:
            raise self.err(node, f"{what} must be {kind} >= {minimum:g}, got {node.value!r}")
        return float(value)

    def file(self, node: yaml.Node, what: str, key: str, *, may_be_missing: bool = False,
             may_be_empty: bool = False) -> Path:
        """A path to a small regular file (:func:`file_problem`), checked now, at load, so a
        directory, FIFO, device, empty, huge or unreadable file is one line naming this
        line instead of a failure per node (or a hang, or MemoryError) later."""
        p = self.path_value(node, what)
        problem = file_problem(p, FILE_CAPS[key], may_be_missing=may_be_missing,
                               may_be_empty=may_be_empty)
        if problem:
            raise self.err(node, f"{what} {p} {problem}")
        return p

    def boolean(self, node: yaml.Node, what: str) -> bool:
        value = self.scalar(node, what)
        if not isinstance(value, bool):
            raise self.err(node, f"{what} must be true or false, got {node.value!r}")
        return value

    def path_value(self, node: yaml.Node, what: str) -> Path:
        p = Path(os.path.expanduser(self.string(node, what)))
        return p if p.is_absolute() else (self.path.parent / p)


def _yaml_kind(value: Any) -> str:
    if value is None:
        return "null (nothing)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    return f"a {type(value).__name__} ({value})"


def _merge(defaults: dict[str, tuple], own: dict[str, tuple]) -> dict[str, tuple]:
    merged = dict(defaults)
    merged.update(own)
    return merged


def _bmc(ld: _Loader, fields_: dict[str, tuple], block: yaml.Node, node_name: str,
         check_secrets: bool) -> BmcSpec:
    where = f"nodes.{node_name}.bmc"
    if "host" not in fields_:
        raise ld.err(block, f"{where}: missing host")
    kw: dict[str, Any] = {"host": ld.string(fields_["host"][1], f"{where}.host")}
    if "port" in fields_:
        kw["port"] = ld.port(fields_["port"][1], f"{where}.port")
    if "user" in fields_:
        kw["user"] = ld.string(fields_["user"][1], f"{where}.user")
    sources = [k for k in ("password_env", "password_file", "password") if k in fields_]
    if len(sources) > 1:
        raise ld.err(fields_[sources[1]][0], f"{where}: give only one of {', '.join(sources)}")
    if not sources:
        raise ld.err(block, f"{where}: no password_env or password_file for the BMC")
    src = sources[0]
    k_node, v_node = fields_[src]
    source = ld.where(k_node)
    if src == "password_env":
        var = ld.string(v_node, f"{where}.password_env")
        if check_secrets and var not in os.environ:
            raise ld.err(v_node, f"{where}: password_env {var} is not set")
        kw["password_env"] = var
    elif src == "password_file":
        # lab.up (check_secrets=False) writes the file: it may be missing, never wrong
        kw["password_file"] = ld.file(v_node, f"{where}: password_file", "password_file",
                                      may_be_missing=not check_secrets)
    else:
        if isinstance(v_node, yaml.ScalarNode) and v_node.value == "":
            raise ld.err(v_node, f"{where}.password is empty")
        kw["password_literal"] = ld.string(v_node, f"{where}.password")
        _warn_literal(source)
    return BmcSpec(source=source, **kw)


_warned: set[str] = set()


def _warn_literal(source: str) -> None:
    if source not in _warned:
        _warned.add(source)
        print(f"warning: {source}: literal BMC password in the inventory; use password_env or "
              "password_file for anything but a throwaway lab", file=sys.stderr)


def _ssh(ld: _Loader, fields_: dict[str, tuple], block: yaml.Node, node_name: str,
         check_secrets: bool) -> SshSpec:
    where = f"nodes.{node_name}.ssh"
    if "host" not in fields_:
        raise ld.err(block, f"{where}: missing host")
    kw: dict[str, Any] = {"host": ld.string(fields_["host"][1], f"{where}.host")}
    if "port" in fields_:
        kw["port"] = ld.port(fields_["port"][1], f"{where}.port")
    for key in ("user", "proxy_jump", "workdir"):
        if key in fields_:
            kw[key] = ld.string(fields_[key][1], f"{where}.{key}")
    if "key_file" in fields_:
        # lab.up's generated inventory names the key it is about to create
        kw["key_file"] = ld.file(fields_["key_file"][1], f"{where}.key_file", "key_file",
                                 may_be_missing=not check_secrets)
    if "known_hosts" in fields_:
        # missing or empty is a fresh known_hosts (trust_on_first_use fills it)
        kw["known_hosts"] = ld.file(fields_["known_hosts"][1], f"{where}.known_hosts",
                                    "known_hosts", may_be_missing=True, may_be_empty=True)
    if "proxy_jump" in fields_:
        _check_jump(ld, fields_["proxy_jump"][1], kw["proxy_jump"], f"{where}.proxy_jump")
    if "trust_on_first_use" in fields_:
        kw["trust_on_first_use"] = ld.boolean(fields_["trust_on_first_use"][1],
                                              f"{where}.trust_on_first_use")
    return SshSpec(source=ld.where(block), **kw)


def load(path: str | os.PathLike | None = None, *, check_secrets: bool = True) -> Inventory:
    """Load and validate an inventory. ``check_secrets=False`` lets ``lab.up`` read an inventory
    whose password file it is about to create."""
    path = find_inventory(path)
    ld = _Loader(path)
    try:
        text = read_small(path, FILE_CAPS["inventory"], "inventory").decode()
    except UserError as e:
        raise InventoryError(path, None, str(e)) from None
    except UnicodeDecodeError:
        raise InventoryError(path, None, "not a UTF-8 text file") from None
    try:
        root = yaml.compose(text, Loader=_YAML_LOADER)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise InventoryError(path, line, f"YAML syntax error: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise InventoryError(path, None, f"YAML error: {e}") from None
    if root is None:
        raise InventoryError(path, 1, "empty inventory: no nodes")
    top = ld.mapping(root, "inventory", TOP_KEYS)
    defaults_bmc: dict[str, tuple] = {}
    defaults_ssh: dict[str, tuple] = {}
    if "defaults" in top:
        d = ld.mapping(top["defaults"][1], "defaults", {"bmc", "ssh"})
        if "bmc" in d:
            defaults_bmc = ld.mapping(d["bmc"][1], "defaults.bmc", BMC_KEYS)
        if "ssh" in d:
            defaults_ssh = ld.mapping(d["ssh"][1], "defaults.ssh", SSH_KEYS)
    if "nodes" not in top:
        raise ld.err(root, "no nodes: section")
    nodes_node = top["nodes"][1]
    node_map = ld.mapping(nodes_node, "nodes", None)
    if not node_map:
        raise ld.err(nodes_node, "nodes: is empty")
    nodes: dict[str, Node] = {}
    for name, (k_node, v_node) in node_map.items():
        if not NAME_RE.match(name):
            raise ld.err(k_node, f"bad node name {name!r} (letters, digits, . _ -)")
        body = ld.mapping(v_node, f"nodes.{name}", NODE_KEYS) if not (
            isinstance(v_node, yaml.ScalarNode) and v_node.value == "") else {}
        bmc = ssh = None
        if "bmc" in body:
            own = ld.mapping(body["bmc"][1], f"nodes.{name}.bmc", BMC_KEYS)
            bmc = _bmc(ld, _merge(defaults_bmc, own), body["bmc"][1], name, check_secrets)
        if "ssh" in body:
            own = ld.mapping(body["ssh"][1], f"nodes.{name}.ssh", SSH_KEYS)
            ssh = _ssh(ld, _merge(defaults_ssh, own), body["ssh"][1], name, check_secrets)
        if bmc is None and ssh is None:
            raise ld.err(k_node, f"node {name!r} has neither bmc: nor ssh:")
        fake: dict[str, Any] = {}
        if "fake" in body:
            fake = yaml.safe_load(yaml.serialize(body["fake"][1])) or {}
            if not isinstance(fake, dict):
                raise ld.err(body["fake"][1], f"nodes.{name}.fake must be a mapping")
        nodes[name] = Node(name=name, bmc=bmc, ssh=ssh, fake=fake, source=ld.where(k_node))
    groups: dict[str, list[str]] = {}
    if "groups" in top:
        for gname, (gk, gv) in ld.mapping(top["groups"][1], "groups", None).items():
            if not NAME_RE.match(gname) or gname == "all":
                raise ld.err(gk, f"bad group name {gname!r}")
            if not isinstance(gv, yaml.SequenceNode):
                raise ld.err(gv, f"groups.{gname} must be a list of node names")
            members: list[str] = []
            for item in gv.value:
                member = ld.string(item, f"groups.{gname} member")
                if member not in nodes:
                    raise ld.err(item, f"groups.{gname}: unknown node {member!r}")
                if member in members:
                    raise ld.err(item, f"groups.{gname}: node {member!r} listed twice")
                members.append(member)
            groups[gname] = members
    fake_lab = None
    if "fake_lab" in top:
        f = ld.mapping(top["fake_lab"][1], "fake_lab", FAKE_LAB_KEYS)
        kw: dict[str, Any] = {"state_dir": ld.path_value(f["state_dir"][1], "fake_lab.state_dir")
                              if "state_dir" in f else path.parent / ".lab"}
        if "state_dir" in f and os.path.lexists(kw["state_dir"]) and \
                not os.path.isdir(kw["state_dir"]):
            raise ld.err(f["state_dir"][1], f"fake_lab.state_dir {kw['state_dir']} exists and "
                                            "is not a folder")
        if "power_delay" in f:
            pd = f["power_delay"][1]
            if isinstance(pd, yaml.SequenceNode) and len(pd.value) == 2:
                lo, hi = (ld.number(x, "fake_lab.power_delay") for x in pd.value)
                if lo > hi:
                    raise ld.err(pd, "fake_lab.power_delay: [min, max] with min <= max")
                kw["power_delay"] = (lo, hi)
            else:
                v = ld.number(pd, "fake_lab.power_delay")
                kw["power_delay"] = (v, v)
        if "boot_delay" in f:
            kw["boot_delay"] = ld.number(f["boot_delay"][1], "fake_lab.boot_delay")
        if "sshd" in f:
            v = ld.string(f["sshd"][1], "fake_lab.sshd")
            if v not in ("python", "openssh"):
                raise ld.err(f["sshd"][1], "fake_lab.sshd must be python or openssh")
            kw["sshd"] = v
        if "seed" in f:
            kw["seed"] = int(ld.number(f["seed"][1], "fake_lab.seed", integer=True))
        if "kind" in f:
            v = ld.string(f["kind"][1], "fake_lab.kind")
            if v not in ("process", "vm"):
                raise ld.err(f["kind"][1], "fake_lab.kind must be process or vm")
            kw["kind"] = v
        for key, lo, hi in (("memory", 128, 1 << 20), ("cpus", 1, 64), ("lan_port", 1, 65535)):
            if key in f:
                v = int(ld.number(f[key][1], f"fake_lab.{key}", integer=True))
                if not lo <= v <= hi:
                    raise ld.err(f[key][1], f"fake_lab.{key} must be {lo}..{hi}")
                kw[key] = v
        if "boot_timeout" in f:
            v = ld.number(f["boot_timeout"][1], "fake_lab.boot_timeout")
            if v <= 0:
                raise ld.err(f["boot_timeout"][1], "fake_lab.boot_timeout must be > 0")
            kw["boot_timeout"] = v
        for key in ("kernel", "kernel_args"):
            if key in f:
                kw[key] = ld.string(f[key][1], f"fake_lab.{key}")
        fake_lab = FakeLabSpec(**kw)
    payloads: list[Path] = []
    if "payloads" in top:
        pn = top["payloads"][1]
        if not isinstance(pn, yaml.SequenceNode):
            raise ld.err(pn, "payloads must be a list of paths")
        payloads = [ld.path_value(x, "payloads entry") for x in pn.value]
    _check_endpoints(ld, nodes)
    return Inventory(path=path, nodes=nodes, groups=groups, fake_lab=fake_lab, payloads=payloads)


def _check_jump(ld: _Loader, node: yaml.Node, value: str, what: str) -> None:
    """ProxyJump as OpenSSH takes it: ``[user@]host[:port]`` hops, comma-separated, no blanks,
    no empty hop, ports 1-65535 (or ``none``). Checked here: a typo found at connect time
    would fail every node behind it, one by one."""
    if value.strip().lower() == "none":
        return
    for hop in value.split(","):
        m = _HOP.match(hop)
        bad = None
        if not hop:
            bad = "an empty hop"
        elif not m:
            bad = f"hop {hop!r} is not [user@]host[:port]"
        elif m.group("port") is not None and not 1 <= int(m.group("port")) <= 65535:
            bad = f"hop {hop!r}: port must be 1-65535"
        if bad:
            raise ld.err(node, f"{what} {value!r}: {bad} (hops are [user@]host[:port], "
                               "comma-separated, no spaces)")


_LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


def _addresses(host: str) -> frozenset[str]:
    """The addresses ``host`` stands for, to tell that two spellings are one BMC: a numeric
    address in any form getaddrinfo takes (``127.1``, ``::ffff:127.0.0.1``, ``0x7f.1``) is
    normalized without any lookup (AI_NUMERICHOST); ``localhost`` and names in /etc/hosts
    are resolved from that file. Any other name is compared as a name, case-insensitively:
    asking DNS at load time would make every command wait on a resolver for a check."""
    name = host.strip().strip("[]").rstrip(".").lower()
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_UDP,
                                   flags=socket.AI_NUMERICHOST)
        return frozenset(_canonical(i[4][0]) for i in infos)
    except (socket.gaierror, UnicodeError, ValueError):
        pass
    found = set(_etc_hosts().get(name, ()))
    if name in _LOCAL_NAMES or name.endswith(".localhost"):
        found |= {"127.0.0.1", "::1"}
    return frozenset(found) if found else frozenset({f"name:{name}"})


def _canonical(addr: str) -> str:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


_HOSTS: dict[str, list[str]] | None = None


def _etc_hosts() -> dict[str, list[str]]:
    """/etc/hosts as name -> canonical addresses (read once, bounded, never blocking)."""
    global _HOSTS
    if _HOSTS is None:
        table: dict[str, list[str]] = {}
        try:
            text = read_small(Path("/etc/hosts"), 1 << 20, "/etc/hosts").decode(errors="replace")
        except UserError:
            text = ""
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) < 2:
                continue
            try:
                addr = _canonical(words[0])
            except ValueError:
                continue
            for w in words[1:]:
                table.setdefault(w.lower().rstrip("."), []).append(addr)
        _HOSTS = table
    return _HOSTS


def _check_endpoints(ld: _Loader, nodes: dict[str, Node]) -> None:
    """Two nodes on one BMC endpoint is almost always a copy-paste error that would power off
    the wrong machine, also when the two spell the address differently (``localhost`` and
    ``127.0.0.1``, ``127.1``, ``::ffff:127.0.0.1``). SSH endpoints are not checked: one
    host:port behind different proxy_jump hops is different machines."""
    seen: dict[tuple[str, int], Node] = {}
    for n in nodes.values():
        if n.bmc is None:
            continue
        for addr in _addresses(n.bmc.host):
            first = seen.get((addr, n.bmc.port))
            if first is not None and first.name != n.name:
                assert first.bmc is not None
                same = (f"{n.bmc.host}:{n.bmc.port}" if first.bmc.host == n.bmc.host else
                        f"{n.bmc.host}:{n.bmc.port} (= {first.bmc.host}:{first.bmc.port})")
                raise InventoryError(ld.path, int(n.source.rsplit(":", 1)[1]),
                                     f"node {n.name!r} uses the same BMC {same} as "
                                     f"{first.name!r} ({first.source})")
            seen[(addr, n.bmc.port)] = n
