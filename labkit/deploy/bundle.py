"""The bundle: what one deploy ships, read and hashed once on the controller (pure, no SSH).

A bundle is the files of the declared payload paths, each with its normalised mode and sha256,
plus the git revision they came from. Its digest names the content, so equal digests mean
byte-identical releases and an unchanged redeploy can be recognised from a node's MANIFEST
alone. Hashes are cached by (path, size, mtime, ctime, inode), the quick check rsync makes.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import labkit
from labkit.errors import UserError
from labkit.nodeside.stage import MANIFEST, STAT_INDEX
from labkit.text import plural

DEFAULT_BUNDLE = Path(labkit.__file__).resolve().parent / "payloads"
RESERVED = {MANIFEST, STAT_INDEX}
IGNORED_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".pytest_cache"}
IGNORED_SUFFIXES = (".pyc", ".pyo", ".swp")
CHUNK = 1 << 20


@dataclass(frozen=True)
class BundleFile:
    path: str      # posix path inside the release
    source: Path   # where it is read from on the controller
    size: int
    mode: int      # 0o644 or 0o755, normalised like git so umasks do not count as changes
    sha256: str
    # (size, mtime_ns, ctime_ns) when it was read: a file changed since is not streamed (the
    # node seals what it receives by stat and would keep bytes the MANIFEST does not promise)
    stamp: tuple[int, int, int] | None = None

    def entry(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, "mode": f"{self.mode:o}"}


@dataclass
class Bundle:
    """What one deploy ships: the files and where they came from."""

    roots: list[Path]
    files: dict[str, BundleFile]
    revision: str | None = None
    dirty: bool | None = None

    @property
    def digest(self) -> str:
        """Content identity of the bundle: equal digests mean byte-identical releases."""
        return files_digest({p: f.entry() for p, f in self.files.items()})

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def manifest(self, release: str, *, now: float | None = None,
                 deployed_by: str | None = None) -> dict[str, Any]:
        return {
            "format": 1,
            "release": release,
            "digest": self.digest,
            "revision": self.revision,
            "dirty": self.dirty,
            "deployed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "deployed_by": deployed_by or who(),
            "labkit_version": labkit.__version__,
            "sources": [str(r) for r in self.roots],
            "files": {p: f.entry() for p, f in sorted(self.files.items())},
        }


def files_digest(files: dict[str, dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for p in sorted(files):
        f = files[p]
        h.update(f"{p}\0{f['sha256']}\0{f['mode']}\n".encode())
    return h.hexdigest()


def who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _norm_mode(st_mode: int) -> int:
    return 0o755 if st_mode & 0o111 else 0o644


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class HashCache:
    """sha256 by (path, size, mtime_ns, ctime_ns, inode): an unchanged redeploy should not read
    the whole bundle again (the same quick check rsync makes). ctime cannot be set back by a
    user, so any content change misses the cache. Kept in memory and in
    ``$XDG_CACHE_HOME/labkit/deploy-hashes.json`` so a fresh ``invoke deploy`` benefits too."""

    LIMIT = 50_000

    def __init__(self, path: Path | None = None):
        self._path = path
        self._lock = threading.Lock()
        self._data: dict[str, list[Any]] | None = None
        self._dirty = False

    @property
    def path(self) -> Path:
        if self._path is None:
            base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
            self._path = Path(base) / "labkit" / "deploy-hashes.json"
        return self._path

    def _load(self) -> dict[str, list[Any]]:
        if self._data is None:
            try:
                data = json.loads(self.path.read_text())
                self._data = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._data = {}
        return self._data

    def sha256(self, path: Path, st: os.stat_result) -> str:
        key = str(path)
        sig = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        with self._lock:
            hit = self._load().get(key)
        if hit and hit[:4] == sig:
            return hit[4]
        digest = _sha256(path)
        with self._lock:
            self._load()[key] = [*sig, digest]
            self._dirty = True
        return digest

    def save(self) -> None:
        """Best effort (a read-only home only costs re-hashing); atomic so that concurrent
        deploys never read half a file."""
        with self._lock:
            if not self._dirty or self._data is None:
                return
            data = dict(list(self._data.items())[-self.LIMIT:])
            self._dirty = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(data, separators=(",", ":")))
            os.replace(tmp, self.path)
        except OSError:
            pass


HASHES = HashCache()


def _kind(mode: int) -> str:
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")


def _unreadable(src: Path, e: OSError) -> UserError:
    return UserError(f"payload {src}: cannot read it ({e.strerror or e})")


def _check_entry(root: Path, src: Path) -> os.stat_result:
    """The stat of one payload file, after every check that it can be shipped as it is:
    readable, a regular file, and if a symlink, one to a file inside the payload folder.
    Anything else is the user's to fix, named, before anything is sent (a FIFO would hang the
    read, an unreadable file end in a traceback half-way, a dangling or outside link ship
    nothing or something nobody meant)."""
    try:
        lst = os.lstat(src)
        if stat.S_ISLNK(lst.st_mode):
            target = Path(os.path.realpath(src))
            if not target.exists():
                raise UserError(f"payload {src}: a dangling symlink (to {os.readlink(src)}); "
                                "remove it or make it point at a file")
            if target != root and root not in target.parents:
                raise UserError(f"payload {src}: a symlink to {target}, outside the payload "
                                f"folder {root}; copy the file in, or list it as a payload of "
                                "its own")
            if target.is_dir():
                raise UserError(f"payload {src}: a symlink to a folder ({target}) is not "
                                "followed; put the folder itself there or list it as a payload")
        st = os.stat(src)
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"payload {src}: {_kind(st.st_mode)} cannot be deployed; move it "
                            "out of the payload folder")
        # O_NONBLOCK: a FIFO swapped in since the stat must not hang us
        os.close(os.open(src, os.O_RDONLY | os.O_NONBLOCK))
    except OSError as e:
        raise _unreadable(src, e) from None
    return st


def _walk(root: Path) -> Iterator[tuple[str, Path, os.stat_result]]:
    """(relative posix path, source, stat) for every file under root, sorted, skipping caches
    and VCS folders, each checked by ``_check_entry``. A folder that cannot be listed is an
    error naming it (os.walk would skip it and leave it out of the release without a word)."""
    def unlistable(e: OSError) -> None:
        raise UserError(f"payload {e.filename}: cannot read the folder ({e.strerror})")

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=unlistable):
        # os.walk lists a symlink to a folder among the folders and does not enter it
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_DIRS and d not in links)
        for name in sorted(filenames + links):
            if name.endswith(IGNORED_SUFFIXES):
                continue
            src = Path(dirpath) / name
            yield src.relative_to(root).as_posix(), src, _check_entry(root, src)


def collect_bundle(paths: Sequence[str | os.PathLike],
                   cache: HashCache | None = HASHES) -> Bundle:
    """Read the declared payload paths: a directory contributes its tree at the release root,
    a file its basename. Two sources for one release path is a user error (silently letting one
    win would deploy something nobody asked for)."""
    if not paths:
        raise UserError("no payloads declared")
    roots = [Path(p).expanduser().resolve() for p in paths]
    files: dict[str, BundleFile] = {}
    for root in roots:
        if root.is_dir():
            entries = list(_walk(root))
        elif os.path.lexists(root):
            entries = [(root.name, root, _check_entry(root.parent, root))]
        else:
            raise UserError(f"payload {root}: no such file or directory")
        for rel, src, st in entries:
            if "\n" in rel or "\r" in rel:
                raise UserError(f"payload {src!r}: a newline in a file name is not supported")
            if rel in RESERVED:
                raise UserError(f"payload {src}: {rel!r} is reserved for labkit's own records")
            if rel in files:
                raise UserError(f"payload path {rel!r} comes from both {files[rel].source} "
                                f"and {src}")
            try:
                digest = cache.sha256(src.resolve(), st) if cache else _sha256(src)
            except OSError as e:
                raise _unreadable(src, e) from None
            files[rel] = BundleFile(rel, src, st.st_size, _norm_mode(st.st_mode), digest,
                                    (st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    if not files:
        raise UserError(f"payloads {', '.join(map(str, roots))}: no files to deploy")
    if cache:
        cache.save()
    revision, dirty = git_state(roots)
    return Bundle(roots, files, revision, dirty)


def git_state(roots: Sequence[Path]) -> tuple[str | None, bool | None]:
    """(revision, dirty) of the git tree holding the payloads. Dirty is judged on the payload
    paths only (tracked changes or untracked files there), because that is what decides whether
    the revision describes what was shipped; edits elsewhere in the tree do not."""
    revisions: list[str] = []
    dirty = False
    for root in roots:
        where = root if root.is_dir() else root.parent
        try:
            rev = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"],
                                 capture_output=True, text=True, timeout=10)
            if rev.returncode != 0:
                continue
            st = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--",
                                 str(root)], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if rev.stdout.strip() not in revisions:
            revisions.append(rev.stdout.strip())
        dirty = dirty or st.returncode != 0 or bool(st.stdout.strip())
    if not revisions:
        return None, None
    return "+".join(revisions), dirty


def bundle_paths(config_payloads: Any, inventory_payloads: Sequence[Path],
                 base: Path | None = None) -> list[Path]:
    """Which payloads to ship: Invoke config ``labkit.payloads`` (the most local layer: flags,
    env, invoke.yaml) wins over the inventory's ``payloads:``; neither -> labkit's own
    node-side payloads. Relative config paths are taken from ``base`` (the current folder)."""
    if config_payloads:
        items = [config_payloads] if isinstance(config_payloads, str) else list(config_payloads)
        base = base or Path.cwd()
        return [p if p.is_absolute() else base / p
                for p in (Path(os.path.expanduser(str(i))) for i in items)]
    if inventory_payloads:
        return list(inventory_payloads)
    return [DEFAULT_BUNDLE]


def new_release_id(bundle: Bundle, now: float | None = None) -> str:
    """Sortable by time, and naming the content: 20250101T120000Z-1a2b3c4d."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + bundle.digest[:8]


def short_rev(rev: str | None, dirty: bool | None) -> str | None:
    if not rev:
        return None
    return "+".join(r[:10] for r in rev.split("+")) + ("-dirty" if dirty else "")


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def describe_bundle(bundle: Bundle) -> str:
    rev = short_rev(bundle.revision, bundle.dirty) or "no git revision"
    return (f"bundle: {plural(len(bundle.files), 'file')}, {human_bytes(bundle.total_bytes)} from "
            f"{', '.join(str(r) for r in bundle.roots)} ({rev}, digest {bundle.digest[:12]})")
