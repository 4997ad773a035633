"""Host keys: checked against known_hosts, never Fabric's auto-add.

An unknown key is refused unless trust-on-first-use is on (then it is appended, under an flock);
a CHANGED key is always refused, naming the node and both SHA256 fingerprints, so the user can
compare with ``ssh-keygen -lf`` and decide.

known_hosts is read as OpenSSH reads it, not through paramiko's ``HostKeys`` (which crashed on
a marker line with a bare padding error, naming no file): host patterns with ``*``/``?``
wildcards and ``!`` negation, hashed names (``|1|salt|hmac``), ``[host]:port``, and the two
markers. A ``@revoked`` key is refused outright, naming file:line. ``@cert-authority`` lines
are kept but not used to accept a key: paramiko cannot verify host certificates, so a host
known only through a CA is "unknown" and the error says which CA line could not be used. Keys
are compared as blobs, so a line of a key type paramiko cannot load still counts (OpenSSH would
use it); a line that cannot be parsed is skipped like OpenSSH does, and named (file:line, why)
in the error when it could have been the line for this host.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import hmac
import logging
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import paramiko

from labkit.ssh.errors import HostKeyError, SshError
from labkit.ssh.target import Target

log = logging.getLogger("labkit.ssh")


def fingerprint(key: paramiko.PKey | bytes) -> str:
    """OpenSSH's ``SHA256:...`` form, so users can compare with ``ssh-keygen -lf``."""
    blob = key if isinstance(key, bytes) else key.asbytes()
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class KnownLine:
    """One usable known_hosts line: where it is, its marker, host patterns, key type and blob."""

    path: Path
    lineno: int
    marker: str  # "" | "@cert-authority" | "@revoked"
    hosts: str
    key_type: str
    blob: bytes

    @property
    def where(self) -> str:
        return f"{self.path}:{self.lineno}"

    def matches(self, name: str) -> bool:
        return host_matches(self.hosts, name)


@dataclass(frozen=True)
class BadLine:
    """A line OpenSSH would skip too; kept to explain an unknown key when it may be the cause."""

    path: Path
    lineno: int
    hosts: str | None  # the host field when it could be read
    reason: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.lineno}"


MARKERS = ("@cert-authority", "@revoked")


def parse_known_hosts(text: str, path: Path) -> tuple[list[KnownLine], list[BadLine]]:
    lines: list[KnownLine] = []
    bad: list[BadLine] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        marker = ""
        if fields[0].startswith("@"):
            marker = fields.pop(0)
            if marker not in MARKERS:
                bad.append(BadLine(path, lineno, fields[0] if fields else None,
                                   f"unknown marker {marker}"))
                continue
        if len(fields) < 3:
            bad.append(BadLine(path, lineno, fields[0] if fields else None,
                               "expected: hosts key-type base64-key"))
            continue
        hosts, key_type, b64 = fields[:3]
        try:
            blob = base64.b64decode(b64, validate=True)
            (n,) = struct.unpack(">I", blob[:4])
            inner = blob[4:4 + n].decode("ascii")
        except (binascii.Error, ValueError, struct.error):
            bad.append(BadLine(path, lineno, hosts, "the key is not valid base64"))
            continue
        if inner != key_type:
            bad.append(BadLine(path, lineno, hosts,
                               f"key type {key_type} but the key is {inner or 'garbage'}"))
            continue
        lines.append(KnownLine(path, lineno, marker, hosts, key_type, blob))
    return lines, bad


_HASHED = re.compile(r"^\|1\|([A-Za-z0-9+/=]+)\|([A-Za-z0-9+/=]+)$")


def host_matches(patterns: str, name: str) -> bool:
    """OpenSSH's known_hosts host field: a hashed name, or a comma list of patterns where any
    positive one must match and no negated (``!``) one may."""
    name = name.lower()
    m = _HASHED.match(patterns)
    if m:
        try:
            salt, want = base64.b64decode(m.group(1)), base64.b64decode(m.group(2))
        except binascii.Error:
            return False
        got = hmac.new(salt, name.encode(), hashlib.sha1).digest()
        return hmac.compare_digest(got, want)
    hit = False
    for pat in patterns.lower().split(","):
        negated = pat.startswith("!")
        if _glob(pat[1:] if negated else pat).fullmatch(name):
            if negated:
                return False
            hit = True
    return hit


def _glob(pattern: str) -> re.Pattern[str]:
    """``*`` and ``?`` only: brackets are literal (``[host]:port``), unlike fnmatch."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c)
                              for c in pattern))


_known_lock = threading.Lock()


def read_known(paths: tuple[Path, ...] | list[Path]) -> tuple[list[KnownLine], list[BadLine]]:
    """Every line of every file (missing files are empty, as for OpenSSH). Call with
    ``_known_lock`` held: it guards the cache."""
    lines: list[KnownLine] = []
    bad: list[BadLine] = []
    for path in paths:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise SshError(f"{path}: cannot read known_hosts: {e.strerror or e}") from None
        digest = hashlib.blake2b(data, digest_size=16).digest()
        hit = _parsed.get(path)
        if hit is None or hit[0] != digest:
            text = data.decode(errors="replace")
            hit = _parsed[path] = (digest, *parse_known_hosts(text, path))
        lines += hit[1]
        bad += hit[2]
    return lines, bad


# Parsed files by path, reused while the content is the same: a fan-out reads the same
# known_hosts twice per node, and hashed names cost an HMAC per line. Keyed by a hash of the
# bytes, not by stat: ``ssh-keygen -R`` then re-adding a key of the same type rewrites the file
# at the same size within one timestamp tick (mtime and ctime are as coarse as a jiffy, and
# mtime can be set back), which a stat key would serve stale for the life of the process.
# Reading a file is cheap next to parsing it.
_parsed: dict[Path, tuple[bytes, list[KnownLine], list[BadLine]]] = {}


def known_key_types(target: Target) -> list[str]:
    """The key types known_hosts holds for this host, so the client can ask for one of them."""
    with _known_lock:
        lines, _ = read_known(target.known_hosts_files)
    return [ln.key_type for ln in lines if not ln.marker and ln.matches(target.known_hosts_name)]


def check_host_key(target: Target, key: paramiko.PKey) -> None:
    """Refuse revoked keys and changed ones always, unknown ones unless TOFU (which records)."""
    name = target.known_hosts_name
    blob = key.asbytes()
    with _known_lock:
        lines, bad = read_known(target.known_hosts_files)
        for ln in lines:
            if ln.marker == "@revoked" and ln.blob == blob and ln.matches(name):
                raise HostKeyError(
                    f"{target.node}: host key for {name} ({key.get_name()} {fingerprint(key)}) "
                    f"is REVOKED at {ln.where}; refusing to connect")
        mine = [ln for ln in lines if not ln.marker and ln.matches(name)]
        if any(ln.blob == blob for ln in mine):
            return
        if mine:
            old = next((ln for ln in mine if ln.key_type == key.get_name()), mine[0])
            raise HostKeyError(
                f"{target.node}: host key for {name} has CHANGED — {old.where} has "
                f"{old.key_type} {fingerprint(old.blob)}, the server offers {key.get_name()} "
                f"{fingerprint(key)}; refusing to connect (if the node was reinstalled: "
                f"ssh-keygen -R '{name}' -f {old.path})")
        if not target.trust_on_first_use:
            why = _why_unknown(lines, bad, name)
            files = ", ".join(map(str, target.known_hosts_files))
            if target.jump_host is None:
                todo = "add it or set trust_on_first_use"
            else:  # a hop is checked as `ssh HOP` checks it, not by the node's inventory entry
                todo = (f"jump host {target.jump_host} is checked as `ssh {target.jump_host}` "
                        f"checks it, by its own Host block in the ssh config, not by the node's "
                        f"known_hosts/trust_on_first_use in the inventory: add the key to "
                        f"{target.known_hosts}, or name a file that has it in that Host block's "
                        f"UserKnownHostsFile")
            raise HostKeyError(
                f"{target.node}: unknown host key for {name} ({key.get_name()} "
                f"{fingerprint(key)}), not in {files}; {todo}{why}")
        _record(target, key)
        log.info("%s: trusted on first use: %s %s recorded in %s", target.node,
                 key.get_name(), fingerprint(key), target.known_hosts)


def _why_unknown(lines: list[KnownLine], bad: list[BadLine], name: str) -> str:
    """What in known_hosts may have been meant for this host but could not be used."""
    notes = [f"{ln.where} is a @cert-authority line (host certificates are not supported; "
             f"add the host's own key)"
             for ln in lines if ln.marker == "@cert-authority" and ln.matches(name)]
    notes += [f"{b.where} cannot be parsed ({b.reason})" for b in bad
              if b.hosts is None or host_matches(b.hosts, name)]
    return "; " + "; ".join(notes) if notes else ""


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
