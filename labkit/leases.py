"""Node leases: ``reserve``, ``release``, ``who``, and ``check`` for tasks that change a node.

A lease is one JSON file per node in the lease folder (config ``labkit.lease_dir``; default the
per-user state folder ``$XDG_STATE_HOME/labkit/leases`` = ``~/.local/state/labkit/leases``;
point it at a shared folder so a group sees each other's leases). Only the filesystem's own
atomic operations are trusted, so it works on any shared folder (NFS included) without a
lock server:

* Creating a lease: the lease is written in full to a private temp file, then ``link(2)``-ed to
  ``NODE.lease``. link fails if the name exists, so of any number of racing processes exactly
  one wins, and nobody ever reads a half-written lease.
* Changing an existing lease (extend, release, force take-over, cleaning an expired one) first
  takes a *claim* on that lease's unique token: ``NODE.<token>.claim`` created with
  ``O_CREAT|O_EXCL``. With the claim held it re-reads the lease and proceeds only if the token
  is unchanged — so two cleaners of the same expired lease cannot both win, and a cleaner that
  read a lease a moment ago cannot delete the fresh one someone just created in its place.
  Removal renames the file aside first (``.NODE.<token>.gone.<pid>``), re-checks what it moved,
  and puts back anything that is not the lease it meant to remove.
* A claim left by a crashed process (older than CLAIM_STALE seconds) is itself renamed aside,
  re-checked and removed; a live claim is held for milliseconds.

Clocks: expiry is wall-clock time; machines sharing a folder must agree on the time (NTP) to
within the SAFETY margin, or an about-to-expire lease may be judged differently by two hosts.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from labkit.config import Settings
from labkit.errors import LabkitError, LeaseError, UserError

SUFFIX = ".lease"
CLAIM_STALE = 10.0     # seconds after which a claim is taken to be left by a crashed process
SAFETY = 5.0           # a lease this close to expiry is not extended in place (clock skew)
USER_ENV = "LABKIT_USER"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)([smhd]))+$")
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Lease:
    node: str
    holder: str          # user@host
    expires: float       # epoch seconds
    created: float
    note: str = ""
    token: str = ""      # unique per lease version; what claims are keyed on

    def left(self, now: float | None = None) -> float:
        return self.expires - (time.time() if now is None else now)

    def expired(self, now: float | None = None) -> bool:
        return self.left(now) <= 0

    def until(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.expires))

    def describe(self) -> str:
        """One line for refusals: node, holder, expiry, note."""
        note = f", note: {self.note}" if self.note else ""
        return (f"{self.node} is leased by {self.holder} until {self.until()} "
                f"({format_duration(self.left())} left{note})")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["seconds_left"] = round(max(0.0, self.left()), 1)
        d["until"] = self.until()
        return d


# --- small pieces --------------------------------------------------------------------------

def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``1d``, also ``1h30m``. A bare number is refused: minutes or
    hours? A lease of the wrong length is worse than a one-line error."""
    t = (text or "").strip().lower()
    if not _DURATION.match(t):
        raise UserError(f"bad duration {text!r}: use a number with a unit, e.g. 90s, 30m, 2h, 1d")
    seconds = sum(float(n) * _UNITS[u] for n, u in _PART.findall(t))
    if seconds <= 0:
        raise UserError(f"bad duration {text!r}: must be longer than zero")
    if seconds > 365 * 86400:
        raise UserError(f"bad duration {text!r}: longer than a year")
    return seconds


def format_duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def holder() -> str:
    """``user@host``; ``$LABKIT_USER`` overrides the user part (or the whole thing if it holds
    an ``@``, so one person can be one holder from several machines)."""
    override = os.environ.get(USER_ENV, "").strip()
    if "@" in override:
        return override
    return f"{override or getpass.getuser()}@{socket.gethostname()}"


def lease_dir(settings: Settings) -> Path:
    if settings.lease_dir:
        return Path(os.path.expanduser(settings.lease_dir))
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "labkit" / "leases"


def _name(node: Any) -> str:
    name = node if isinstance(node, str) else node.name
    if not _NODE_NAME.match(name):
        raise UserError(f"bad node name {name!r}")
    return name


# --- the store -----------------------------------------------------------------------------

class LeaseStore:
    """The lease folder and its race-safe operations (see the module docstring)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @classmethod
    def from_settings(cls, settings: Settings) -> LeaseStore:
        return cls(lease_dir(settings))

    def path(self, node: str) -> Path:
        return self.folder / f"{node}{SUFFIX}"

    def _ensure(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LabkitError(f"lease folder {self.folder}: {e.strerror}") from None

    # -- reading --

    def read(self, node: str) -> Lease | None:
        """The node's lease file as written (expired or not), None if there is none."""
        return self._read_path(self.path(node), node)

    def _read_path(self, path: Path, node: str) -> Lease | None:
        try:
            data = json.loads(path.read_text())
            return Lease(node=node, holder=str(data["holder"]), expires=float(data["expires"]),
                         created=float(data.get("created", 0)), note=str(data.get("note", "")),
                         token=str(data.get("token", "")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LabkitError(f"{path}: unreadable lease file ({e}); remove it if it is "
                              "garbage") from None

    def current(self, node: str) -> Lease | None:
        """The node's lease if it is still valid; an expired one is cleaned (best effort)."""
        lease = self.read(node)
        if lease is not None and lease.expired():
            try:
                self._remove(node, lease)
            except OSError:
                pass  # read-only share, say: expired is expired whether or not it is deleted
            return None
        return lease

    def all(self) -> list[Lease]:
        """Every valid lease, node order; expired ones are cleaned on the way."""
        if not self.folder.is_dir():
            return []
        out = []
        for p in sorted(self.folder.glob(f"*{SUFFIX}")):
            lease = self.current(p.name[: -len(SUFFIX)])
            if lease is not None:
                out.append(lease)
        return out

    # -- writing --

    def _write_temp(self, lease: Lease) -> Path:
        tmp = self.folder / f".{lease.node}.{lease.token}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, (json.dumps(asdict(lease), indent=1) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def _new(self, node: str, who: str, seconds: float, note: str) -> Lease:
        now = time.time()
        return Lease(node=node, holder=who, expires=now + seconds, created=now, note=note,
                     token=uuid.uuid4().hex)

    def create(self, lease: Lease) -> bool:
        """Atomically create the node's lease; False if one exists (someone else won)."""
        self._ensure()
        tmp = self._write_temp(lease)
        try:
            os.link(tmp, self.path(lease.node))
            return True
        except FileExistsError:
            return False
        finally:
            _unlink(tmp)

    def _claim(self, node: str, token: str) -> Path | None:
        """Exclusive right to change the lease with this token; None if someone holds it."""
        claim = self.folder / f"{node}.{token}.claim"
        mine = uuid.uuid4().hex
        for _ in range(2):
            try:
                fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not self._break_stale_claim(claim):
                    return None
                continue
            try:
                os.write(fd, mine.encode())
            finally:
                os.close(fd)
            return claim
        return None

    def _break_stale_claim(self, claim: Path) -> bool:
        """Remove a claim left by a crashed process: rename aside, re-check, delete."""
        try:
            st = claim.stat()
            seen = claim.read_bytes()
        except FileNotFoundError:
            return True  # gone meanwhile: try again
        if time.time() - st.st_mtime < CLAIM_STALE:
            return False
        aside = claim.with_name(f".{claim.name}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(claim, aside)
        except FileNotFoundError:
            return True
        try:
            if aside.read_bytes() != seen:  # a fresh claim replaced the stale one: put it back
                try:
                    os.link(aside, claim)
                except FileExistsError:
                    pass
                return False
        finally:
            _unlink(aside)
        return True

    def _replace(self, node: str, old: Lease, new: Lease | None) -> bool:
        """Under a claim on ``old``: if the file still holds ``old``, swap in ``new`` (or remove
        it when ``new`` is None). False when the lease changed meanwhile."""
        self._ensure()
        claim = self._claim(node, old.token)
        if claim is None:
            return False
        try:
            now = self.read(node)
            if now is None or now.token != old.token:
                return False
            path = self.path(node)
            if new is not None:
                tmp = self._write_temp(new)
                try:
                    os.replace(tmp, path)
                finally:
                    _unlink(tmp)
                return True
            aside = self.folder / f".{node}.{old.token}.gone.{os.getpid()}"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                return False
            moved = self._read_path(aside, node)
            if moved is not None and moved.token != old.token:  # not ours to delete
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                _unlink(aside)
                return False
            _unlink(aside)
            return True
        finally:
            _unlink(claim)

    def _remove(self, node: str, old: Lease) -> bool:
        return self._replace(node, old, None)

    # -- the operations --

    def reserve(self, node: str, seconds: float, *, note: str = "", force: bool = False,
                who: str | None = None) -> tuple[Lease, str]:
        """Lease ``node`` for ``seconds``. Returns (lease, what happened: reserved | extended |
        taken over from X). Raises LeaseError if someone else holds it and not ``force``."""
        who = who or holder()
        for attempt in range(50):
            if attempt:
                time.sleep(min(0.2, 0.005 * attempt))  # someone holds a claim: let them finish
            existing = self.read(node)
            if existing is None:
                lease = self._new(node, who, seconds, note)
                if self.create(lease):
                    return lease, "reserved"
                continue  # lost the race to create: look at the winner's lease
            if existing.expired():
                self._remove(node, existing)
                continue
            if existing.holder == who:
                if existing.left() < SAFETY:  # about to expire: let it, then create afresh
                    time.sleep(max(0.0, existing.left()) + 0.05)
                    continue
                lease = self._new(node, who, seconds, note or existing.note)
                lease = Lease(**{**asdict(lease), "created": existing.created})
                if self._replace(node, existing, lease):
                    return lease, "extended"
                continue
            if not force:
                raise LeaseError(f"{existing.describe()}; use --force to take it over")
            lease = self._new(node, who, seconds, note)
            if self._replace(node, existing, lease):
                return lease, f"taken over from {existing.holder}"
            continue
        raise LabkitError(f"{node}: could not reserve, the lease kept changing under us")

    def release(self, node: str, *, force: bool = False, who: str | None = None) -> str:
        """Give ``node`` back. Someone else's lease only with ``force``. Returns what happened."""
        who = who or holder()
        for attempt in range(50):
            if attempt:
                time.sleep(min(0.2, 0.005 * attempt))
            existing = self.read(node)
            if existing is None or existing.expired():
                if existing is not None:
                    self._remove(node, existing)
                return "was not leased"
            if existing.holder != who and not force:
                raise LeaseError(f"{existing.describe()}; only its holder can release it "
                                 "(or use --force)")
            if self._remove(node, existing):
                return "released" if existing.holder == who else \
                    f"released (was held by {existing.holder})"
        raise LabkitError(f"{node}: could not release, the lease kept changing under us")


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


# --- the library API other tasks call ------------------------------------------------------

def check(nodes: Iterable[Any], settings: Settings, force: bool = False, *,
          who: str | None = None) -> None:
    """Refuse to touch nodes leased by someone else: raise LeaseError (one line naming each such
    node, its holder and expiry) unless ``force``, in which case warn on stderr and go on.
    Nodes are ``Node`` objects or names. Called by every task that changes a node."""
    store = LeaseStore.from_settings(settings)
    if not store.folder.is_dir():
        return
    who = who or holder()
    blocked = []
    for node in nodes:
        lease = store.current(_name(node))
        if lease is not None and lease.holder != who:
            blocked.append(lease)
    if not blocked:
        return
    text = "; ".join(b.describe() for b in blocked)
    if force:
        print(f"warning: --force: {text}", file=sys.stderr)
        return
    raise LeaseError(f"{text} — use --force to act anyway")


def reserve(nodes: Iterable[Any], settings: Settings, seconds: float, *, note: str = "",
            force: bool = False) -> list[tuple[Lease, str]]:
    store = LeaseStore.from_settings(settings)
    return [store.reserve(_name(n), seconds, note=note, force=force) for n in nodes]


def who(settings: Settings) -> list[Lease]:
    return LeaseStore.from_settings(settings).all()


def format_who(leases: list[Lease], folder: Path) -> str:
    if not leases:
        return f"no active leases (in {folder})"
    rows = [("node", "holder", "left", "until", "note")]
    rows += [(x.node, x.holder, format_duration(x.left()), x.until(), x.note) for x in leases]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
