"""Payload bundles on nodes: delta upload into a new release, build, atomic switch, manifest,
drift check, rollback.

On each node, under the workdir (``node.ssh.workdir``, default ``labkit`` in the home folder)::

    payloads/releases/<id>/          one folder per release: the files, MANIFEST, .labkit-stat
    payloads/releases/.incoming-<id> a release being assembled (never pointed at)
    payloads/current  -> releases/<id>   what runs; replaced with rename(2), never edited
    payloads/previous -> releases/<id>   the release before, for ``deploy --rollback``
    payloads/.lock                   flock: one deploy/rollback per node at a time

Why it is shaped like this:

* A node never runs a half-uploaded payload: files land in ``.incoming-<id>``, the build runs
  there, and only a complete, built folder is renamed to its final name and then pointed at by a
  new ``current`` symlink swapped in with rename(2). If the controller is SIGKILLed, the session
  dies, the node kills the agent, and the leftover ``.incoming-*`` is removed (and reported) by
  the next deploy.
* Few round trips: each node costs one read-only ``sh`` probe (``SH_PROBE``: symlinks, the
  current/previous MANIFESTs, leftovers, files touched since the release was built) and, if
  anything changed, one ``stage`` command that receives the changed files as one stream on its
  stdin, hard-links the unchanged ones from the current/previous release, builds, renames,
  switches and prunes. An unchanged redeploy is one connection and one shell per node.
* The stage side is a small stdlib-only Python program (``AGENT``) passed with ``python3 -c``:
  the nodes need python3 anyway (labkit's payloads are Python), and it gives exact JSON
  answers, flock and rename semantics that a portable ``sh`` script cannot.
* One stream over an exec channel rather than SFTP or ``tar``: no per-file request/response,
  and with our own small in-flight limit (see ``_exec_streaming``) the node side spends less
  CPU per byte than an SFTP server does for ``scp`` (bench/deploy.py measures both).
* Hard links are only taken from files not touched since their release was built (``find
  -newer`` the release's ``.labkit-stat`` marker, written last), so a file edited on the node
  is uploaded again rather than propagated into the new release. ``--check`` hashes every file.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import select
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import labkit
from labkit.config import Settings
from labkit.errors import LabkitError, NodeError, UserError
from labkit.fanout import Outcome, fan_out
from labkit.inventory import Node

DEFAULT_BUNDLE = Path(__file__).resolve().parent / "payloads"
DEFAULT_WORKDIR = "labkit"
MANIFEST = "MANIFEST"
STAT_INDEX = ".labkit-stat"
RESERVED = {MANIFEST, STAT_INDEX}
IGNORED_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".pytest_cache"}
IGNORED_SUFFIXES = (".pyc", ".pyo", ".swp")
PYTHON_CHECK = "python-check"  # the default build: compile every .py file, write nothing
CHUNK = 1 << 20
COLUMNS = ("release", "uploaded", "state")
CHECK_COLUMNS = ("release", "revision", "state", "detail")


# --- the bundle (controller side, pure) ----------------------------------------------------

@dataclass(frozen=True)
class BundleFile:
    path: str      # posix path inside the release
    source: Path   # where it is read from on the controller
    size: int
    mode: int      # 0o644 or 0o755, normalised like git so umasks do not count as changes
    sha256: str

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


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, source) for every regular file under root, sorted, skipping caches
    and VCS folders. Symlinks to files are followed (their content is shipped)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_DIRS)
        for name in sorted(filenames):
            if name.endswith(IGNORED_SUFFIXES):
                continue
            src = Path(dirpath) / name
            if src.is_file():
                yield src.relative_to(root).as_posix(), src


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
        elif root.is_file():
            entries = [(root.name, root)]
        else:
            raise UserError(f"payload {root}: no such file or directory")
        for rel, src in entries:
            if "\n" in rel or "\r" in rel:
                raise UserError(f"payload {src!r}: a newline in a file name is not supported")
            if rel in RESERVED:
                raise UserError(f"payload {src}: {rel!r} is reserved for labkit's own records")
            if rel in files:
                raise UserError(f"payload path {rel!r} comes from both {files[rel].source} "
                                f"and {src}")
            st = src.stat()
            digest = cache.sha256(src.resolve(), st) if cache else _sha256(src)
            files[rel] = BundleFile(rel, src, st.st_size, _norm_mode(st.st_mode), digest)
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


def remote_workdir(node: Node) -> str:
    return (node.ssh.workdir if node.ssh and node.ssh.workdir else DEFAULT_WORKDIR)


def new_release_id(bundle: Bundle, now: float | None = None) -> str:
    """Sortable by time, and naming the content: 20250101T120000Z-1a2b3c4d."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + bundle.digest[:8]


# --- planning (pure) -----------------------------------------------------------------------

@dataclass
class Plan:
    """What one node needs: files to send, files to hard-link from a release already there."""

    send: list[BundleFile] = field(default_factory=list)
    link: dict[str, tuple[str, str]] = field(default_factory=dict)  # path -> (release, path)

    @property
    def send_bytes(self) -> int:
        return sum(f.size for f in self.send)


def _trusted_sources(probe: dict[str, Any]) -> dict[tuple[str, str], tuple[str, str]]:
    """(sha256, mode) -> (release, path) for every node file that can be hard-linked safely:
    listed in its release's manifest and not suspected of local modification."""
    out: dict[tuple[str, str], tuple[str, str]] = {}
    for key in ("previous", "current"):  # current last: prefer linking from it
        rel = probe.get(key)
        if not rel or not rel.get("files"):
            continue
        suspect = set(rel.get("suspect", []))
        for path, f in rel["files"].items():
            if path not in suspect:
                out[(f["sha256"], f["mode"])] = (rel["id"], path)
    return out


def in_sync(bundle: Bundle, probe: dict[str, Any]) -> bool:
    """The node's current release holds exactly the bundle, untouched."""
    cur = probe.get("current")
    if not cur or cur.get("error") or cur.get("suspect") or cur.get("missing"):
        return False
    return files_digest(cur.get("files") or {}) == bundle.digest


def plan_upload(bundle: Bundle, probe: dict[str, Any]) -> Plan:
    sources = _trusted_sources(probe)
    plan = Plan()
    for path, f in sorted(bundle.files.items()):
        src = sources.get((f.sha256, f"{f.mode:o}"))
        if src is None:
            plan.send.append(f)
        else:
            plan.link[path] = src
    return plan


def check_state(bundle: Bundle, probe: dict[str, Any]) -> dict[str, Any]:
    """Drift of one node against the bundle, from a hash-mode probe. States, worst first:
    missing (nothing deployed / current broken), modified on node (files differ from the node's
    own MANIFEST), stale (the node's release is not this bundle), in sync."""
    cur = probe.get("current")
    value: dict[str, Any] = {"release": cur.get("id") if cur else None,
                             "leftovers": probe.get("leftovers", [])}
    if not cur:
        value.update(state="missing", detail="nothing deployed")
        return value
    if cur.get("error"):
        value.update(state="missing", detail=cur["error"])
        return value
    value["revision"] = _short_rev(cur.get("revision"), cur.get("dirty"))
    modified = sorted(set(cur.get("modified", [])) | set(cur.get("missing", [])))
    node_files = cur.get("files") or {}
    want = {p: f.entry() for p, f in bundle.files.items()}
    stale = sorted(p for p in set(want) | set(node_files)
                   if want.get(p) != node_files.get(p))
    value["modified"] = modified
    value["stale"] = stale
    if modified:
        value.update(state="modified on node", detail=_some(modified))
    elif stale:
        value.update(state="stale", detail=f"{len(stale)} file(s) differ: {_some(stale)}")
    else:
        value.update(state="in sync", detail="")
    if value["leftovers"]:
        extra = f"leftover {', '.join(value['leftovers'])}"
        value["detail"] = f"{value['detail']}; {extra}" if value["detail"] else extra
    return value


def _some(paths: list[str], n: int = 3) -> str:
    return ", ".join(paths[:n]) + (f" (+{len(paths) - n})" if len(paths) > n else "")


def _short_rev(rev: str | None, dirty: bool | None) -> str | None:
    if not rev:
        return None
    return "+".join(r[:10] for r in rev.split("+")) + ("-dirty" if dirty else "")


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# --- the node-side agent -------------------------------------------------------------------
# Runs with the node's python3 (3.6+, stdlib only) as `python3 -c AGENT OP WORKDIR [ARGS]`;
# prints one JSON object on stdout. Exit 0 ok, 3 a refusal/failure described in the JSON.

AGENT = r'''
import errno, fcntl, hashlib, json, os, select, shutil, stat, subprocess, sys, time
MANIFEST, STAT_INDEX = "MANIFEST", ".labkit-stat"

def out(obj, code=0):
    sys.stdout.write(json.dumps(obj))
    sys.stdout.flush()
    sys.exit(code)

op, top = sys.argv[1], os.path.expanduser(sys.argv[2])
base = os.path.join(top, "payloads")
rels = os.path.join(base, "releases")

def take_lock(wait, who=""):
    os.makedirs(rels, exist_ok=True)
    fd = os.open(os.path.join(base, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    end = time.time() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if time.time() > end:
                holder = os.read(fd, 400).decode("utf-8", "replace").strip()
                out({"error": "another deploy or rollback holds %s/.lock (%s)"
                              % (base, holder or "holder unknown")}, 3)
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.write(fd, ("pid %d on behalf of %s since %s" % (
        os.getpid(), who or "?", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))).encode())
    return fd

class Input:
    """stdin with a stall timeout: a controller that goes silent (hung, stopped, or a session
    the server failed to tear down) must not hold the node's lock forever."""
    def __init__(self, idle):
        self.fd, self.idle, self.buf = sys.stdin.fileno(), idle, b""
    def _wait(self):
        r = select.select([self.fd], [], [], self.idle)[0]
        if not r:
            raise Stalled()
    def line(self):
        while b"\n" not in self.buf:
            self._wait()
            b = os.read(self.fd, 1 << 16)
            if not b:
                return None
            self.buf += b
        line, _, self.buf = self.buf.partition(b"\n")
        return line
    def read(self, n):
        if self.buf:
            b, self.buf = self.buf[:n], self.buf[n:]
            return b
        self._wait()
        return os.read(self.fd, min(n, 1 << 20))

class Stalled(Exception):
    pass

def target(name):
    try:
        return os.path.basename(os.readlink(os.path.join(base, name)).rstrip("/"))
    except OSError:
        return None

def leftovers():
    try:
        names = os.listdir(rels)
    except OSError:
        names = []
    found = sorted(n for n in names if n.startswith(".incoming-"))
    try:
        found += sorted(n for n in os.listdir(base) if ".tmp-" in n)
    except OSError:
        pass
    return found

def clean(names):
    for n in names:
        p = os.path.join(rels if n.startswith(".incoming-") else base, n)
        if os.path.islink(p) or not os.path.isdir(p):
            os.unlink(p)
        else:
            shutil.rmtree(p)

def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

def syncfs(path):
    try:
        import ctypes
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (ImportError, OSError, AttributeError):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        return fn(fd) == 0
    finally:
        os.close(fd)

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)

def describe(rid, mode):
    d = os.path.join(rels, rid)
    if not os.path.isdir(d):
        return {"id": rid, "error": "release folder %s is gone" % rid}
    try:
        with open(os.path.join(d, MANIFEST)) as f:
            man = json.load(f)
        files = man["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {"id": rid, "error": "no readable MANIFEST in %s (%s)" % (rid, e)}
    info = dict((k, man.get(k)) for k in ("release", "digest", "revision", "dirty",
                                           "deployed_at", "deployed_by", "labkit_version"))
    info.update(id=rid, files=files)
    if mode == "hash":
        missing, modified = [], []
        for p, fe in files.items():
            fp = os.path.join(d, p)
            try:
                st = os.lstat(fp)
            except OSError:
                missing.append(p)
                continue
            if (not stat.S_ISREG(st.st_mode) or st.st_size != fe["size"]
                    or "%o" % stat.S_IMODE(st.st_mode) != fe["mode"] or sha256(fp) != fe["sha256"]):
                modified.append(p)
        info["missing"], info["modified"] = missing, modified
    return info

def probe(mode):
    """Read-only: the check's view of the node (hashes every file of current)."""
    res = {"leftovers": leftovers(), "cleaned": [],
           "releases": sorted(n for n in (os.listdir(rels) if os.path.isdir(rels) else [])
                              if not n.startswith("."))}
    for key in ("current", "previous"):
        rid = target(key)
        res[key] = describe(rid, mode if key == "current" else None) if rid else None
    out(res)

def clean_op():
    if not os.path.isdir(base):
        out({"cleaned": []})
    fd = take_lock(float(sys.argv[3]))
    found = leftovers()
    clean(found)
    os.close(fd)
    out({"cleaned": found})

def point(name, rid):
    tmp = os.path.join(base, ".%s.tmp-%d" % (name, os.getpid()))
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(os.path.join("releases", rid), tmp)
    os.rename(tmp, os.path.join(base, name))

def build(cmd, where, timeout, rid):
    if not cmd:
        return None
    if cmd == "python-check":
        for dirpath, dirs, names in os.walk(where):
            for n in sorted(names):
                if n.endswith(".py"):
                    p = os.path.join(dirpath, n)
                    with open(p, "rb") as f:
                        src = f.read()
                    try:
                        compile(src, os.path.relpath(p, where), "exec", dont_inherit=True)
                    except (SyntaxError, ValueError) as e:
                        return "python check: %s: %s" % (os.path.relpath(p, where), e)
        return None
    env = dict(os.environ, LABKIT_RELEASE=rid)
    try:
        r = subprocess.run(cmd, shell=True, cwd=where, env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "build %r timed out after %ss" % (cmd, timeout)
    if r.returncode != 0:
        tail = r.stdout.decode("utf-8", "replace").strip()[-1500:]
        return "build %r exited %d: %s" % (cmd, r.returncode, tail)
    return None

def stage():
    inp = Input(float(sys.argv[3]))
    head = inp.line()
    if not head:
        out({"error": "no plan received"}, 3)
    plan = json.loads(head.decode())
    fd = take_lock(plan["lock_wait"], plan["manifest"].get("deployed_by"))
    cleaned = leftovers()
    clean(cleaned)
    rid = plan["release"]
    final = os.path.join(rels, rid)
    n = 1
    while os.path.lexists(final):
        n += 1
        rid = "%s.%d" % (plan["release"], n)
        final = os.path.join(rels, rid)
    inc = os.path.join(rels, ".incoming-" + rid)
    INCOMING.append(inc)
    os.mkdir(inc)
    index, written = {}, []
    def place(p):
        dst = os.path.join(inc, p)
        parent = os.path.dirname(dst)
        if not os.path.isdir(parent):
            os.makedirs(parent)
        return dst
    for p, (src_rel, src_path) in plan["link"].items():
        src, dst = os.path.join(rels, src_rel, src_path), place(p)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    got = acked = 0
    ack_every = plan.get("ack_every") or 0
    for f in plan["send"]:
        dst, left = place(f["path"]), f["size"]
        fdw = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            while left:
                b = inp.read(min(left, 1 << 20))
                if not b:
                    shutil.rmtree(inc, ignore_errors=True)
                    out({"error": "transfer ended early in %s (%d bytes missing); "
                                  "nothing switched" % (f["path"], left), "cleaned": cleaned}, 3)
                _writeall(fdw, b)
                left -= len(b)
                got += len(b)
                if ack_every and got - acked >= ack_every:
                    acked = got
                    _writeall(1, ("@ack %d\n" % got).encode())
            os.fchmod(fdw, int(f["mode"], 8))
        finally:
            os.close(fdw)
        written.append(dst)
    if inp.read(1):
        shutil.rmtree(inc, ignore_errors=True)
        out({"error": "more data than planned; nothing switched", "cleaned": cleaned}, 3)
    manifest = plan["manifest"]
    manifest["release"] = rid
    err = build(plan.get("build"), inc, plan.get("build_timeout"), rid)
    if err:
        shutil.rmtree(inc, ignore_errors=True)
        out({"error": err, "build_failed": True, "cleaned": cleaned}, 3)
    for p, fe in manifest["files"].items():
        st = os.lstat(os.path.join(inc, p))
        mode = int(fe["mode"], 8)
        if stat.S_IMODE(st.st_mode) != mode and p not in plan["link"]:
            os.chmod(os.path.join(inc, p), mode)
            st = os.lstat(os.path.join(inc, p))
        index[p] = [st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode)]
    for name, obj in ((MANIFEST, manifest), (STAT_INDEX, index)):
        with open(os.path.join(inc, name), "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            if plan.get("fsync", True):
                os.fsync(f.fileno())
    if plan.get("fsync", True):
        # Durable before the switch, so a node that loses power right after cannot come back
        # pointing at files that never reached the disk. One pass at the end, not per file while
        # receiving (that stalls the pipe and with it the sender): syncfs(2) where libc has it
        # (one journal commit), else fsync of every new file and folder.
        if not syncfs(inc):
            for p in written:
                fdr = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fdr)
                finally:
                    os.close(fdr)
            for d in sorted(set(os.path.dirname(p) for p in written) | set([inc])):
                fsync_dir(d)
    os.rename(inc, final)
    old = target("current")
    if old and old != rid:
        point("previous", old)
    point("current", rid)
    if plan.get("fsync", True):
        fsync_dir(rels)
        fsync_dir(base)
    keep = set([rid, old, target("previous")])
    pruned = []
    for n in sorted(os.listdir(rels)):
        if not n.startswith(".") and n not in keep:
            shutil.rmtree(os.path.join(rels, n), ignore_errors=True)
            pruned.append(n)
    os.close(fd)
    out({"release": rid, "previous": target("previous"), "cleaned": cleaned, "pruned": pruned})

def _writeall(fdw, b):
    mv = memoryview(b)
    while mv:
        mv = mv[os.write(fdw, mv):]

def rollback():
    if not os.path.isdir(base):
        out({"error": "nothing deployed"}, 3)
    fd = take_lock(float(sys.argv[3]))
    cur, prev = target("current"), target("previous")
    if not prev or not os.path.isdir(os.path.join(rels, prev)):
        out({"error": "no previous release to roll back to", "release": cur}, 3)
    point("current", prev)
    if cur:
        point("previous", cur)
    fsync_dir(base)
    os.close(fd)
    out({"release": prev, "previous": cur})

INCOMING = []
try:
    if op == "probe":
        probe(sys.argv[4] if len(sys.argv) > 4 else "hash")
    elif op == "stage":
        stage()
    elif op == "rollback":
        rollback()
    elif op == "clean":
        clean_op()
    else:
        out({"error": "unknown op %r" % op}, 3)
except Stalled:
    for p in INCOMING:
        shutil.rmtree(p, ignore_errors=True)
    out({"error": "no data from the controller for %ss; gave up, nothing switched"
                  % sys.argv[3]}, 3)
except (OSError, ValueError, KeyError) as e:
    for p in INCOMING:
        shutil.rmtree(p, ignore_errors=True)
    out({"error": "%s on the node: %s" % (op, e)}, 3)
'''


# The deploy-time probe is plain sh + find (POSIX): an unchanged redeploy is one of these per
# node, and a shell costs a few ms where even ``python3 -I -S`` with json costs tens — across
# 32 nodes on a small controller that is the difference between well under and over a second.
# It changes nothing (leftovers are removed under the lock by the python agent). Files written
# after the release's .labkit-stat marker ("@new") were edited on the node after it was built.
SH_PROBE = r"""
case $W in "~/"*) W="$HOME/${W#\~/}";; esac
cd "$W/payloads" 2>/dev/null || exit 0
for f in releases/.incoming-* .*.tmp-*; do
  if [ -e "$f" ] || [ -L "$f" ]; then echo "@leftover ${f#releases/}"; fi
done
for k in current previous; do
  t=$(readlink "$k" 2>/dev/null) || continue
  r=${t##*/}
  echo "@release $k $r"
  d="releases/$r"
  [ -d "$d" ] || continue
  if [ -f "$d/MANIFEST" ]; then echo "@manifest $k"; cat "$d/MANIFEST"; echo; echo "@end"; fi
  if [ -f "$d/.labkit-stat" ]; then
    echo "@new $k"; (cd "$d" && find . -type f -newer .labkit-stat)
  else
    echo "@nostat $k"
  fi
  echo "@files $k"; (cd "$d" && find . -type f)
done
echo "@done"
"""


def sh_probe_command(workdir: str) -> str:
    return f"W={shlex.quote(workdir)}\n{SH_PROBE}"


def parse_sh_probe(text: str) -> dict[str, Any]:
    """SH_PROBE's output -> the same shape as the python agent's stat probe."""
    res: dict[str, Any] = {"leftovers": [], "cleaned": [], "current": None, "previous": None}
    rels: dict[str, dict[str, Any]] = {}
    lines = text.split("\n")
    if text.strip() and "@done" not in lines:
        raise NodeError("probe output cut short")
    mode, key, buf = "", "", []
    sets: dict[tuple[str, str], set[str]] = {}
    for line in lines:
        if mode == "manifest":
            if line == "@end":
                try:
                    man = json.loads("\n".join(buf))
                    rels[key].update({k: man.get(k) for k in (
                        "release", "digest", "revision", "dirty", "deployed_at", "deployed_by",
                        "labkit_version")}, files=dict(man["files"]))
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    rels[key]["error"] = f"unreadable MANIFEST in {rels[key]['id']} ({e})"
                mode, buf = "", []
            else:
                buf.append(line)
            continue
        if line.startswith("./") and mode in ("new", "files"):
            sets[(key, mode)].add(line[2:])
        elif line.startswith("@leftover "):
            res["leftovers"].append(line.split(" ", 1)[1])
        elif line.startswith("@release "):
            _, key, rid = line.split(" ", 2)
            rels[key] = {"id": rid, "files": None}
        elif line.startswith(("@manifest ", "@new ", "@files ", "@nostat ")):
            word, key = line[1:].split(" ", 1)
            mode = word
            sets.setdefault((key, word), set())
    for key, rel in rels.items():
        files = rel.get("files")
        if files is None and not rel.get("error"):
            rel["error"] = f"release {rel['id']} has no MANIFEST (or is gone)"
        if files:
            present = sets.get((key, "files"), set())
            if (key, "nostat") in sets:
                suspect = set(files)
            else:
                suspect = sets.get((key, "new"), set()) | (set(files) - present)
            rel["suspect"] = sorted(p for p in suspect if p in files)
        res[key] = rel
    return res


FAST_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")


def agent_command(op: str, workdir: str, *args: str, fast: bool = False) -> str:
    """The shell command running the agent. ``-I -S``: isolated, no site import — faster start
    and immune to the node user's PYTHON* variables. ``fast`` prefers a real interpreter binary
    over whatever ``python3`` is on PATH: version-manager shims (pyenv) cost ~100 ms per start,
    which is most of an unchanged redeploy. The stage step keeps PATH's python3 because its
    build check must judge the payloads with the interpreter they will run under."""
    run = " ".join(shlex.quote(a) for a in ("-I", "-S", "-c", AGENT, op, workdir, *args))
    if not fast:
        return f"exec python3 {run}"
    return ("P=python3; for p in " + " ".join(FAST_PYTHONS)
            + '; do if [ -x "$p" ]; then P=$p; break; fi; done; exec "$P" ' + run)


# --- talking to one node -------------------------------------------------------------------

class Transfer:
    """Counts the bytes written to a node; lets tests and the bench see progress."""

    def __init__(self) -> None:
        self.bytes = 0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.bytes += n


def _decode(node: Node, res: Any, what: str) -> dict[str, Any]:
    """The agent's JSON answer, or a NodeError that says what went wrong in one line."""
    text = res.stdout.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text) if text else None
    except ValueError:
        data = None
    if getattr(res, "timed_out", False):
        raise NodeError(f"{node.name}: {what} timed out after {res.seconds:.0f}s")
    if isinstance(data, dict) and data.get("error"):
        raise NodeError(f"{data['error']}",
                        value={k: v for k, v in data.items() if k != "error"})
    if res.exit_code != 0 or not isinstance(data, dict):
        tail = res.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [text[-200:]]
        if res.exit_code is None:
            raise NodeError(f"{what} interrupted: connection lost after {res.seconds:.1f}s "
                            "(node powered off or rebooted?); the node keeps its previous release")
        hint = " (is python3 installed on the node?)" if res.exit_code == 127 else ""
        raise NodeError(f"{what} failed (exit {res.exit_code}){hint}: {tail[0] if tail else ''}")
    return data


def _stream(plan: Plan, header: bytes, counter: Transfer | None) -> Iterator[bytes]:
    yield header
    for f in plan.send:
        with open(f.source, "rb") as fh:
            left = f.size
            while left:
                b = fh.read(min(CHUNK, left))
                if not b:
                    raise LabkitError(f"{f.source} shrank while being deployed")
                left -= len(b)
                if counter:
                    counter.add(len(b))
                yield b


ACK_EVERY = 256 * 1024       # the agent reports progress every this many bytes ...
IN_FLIGHT = 2 * 1024 * 1024  # ... and we keep at most this many unacknowledged bytes in flight


class _Replies:
    """The stage command's stdout: ``@ack N`` progress lines, then one JSON object."""

    def __init__(self) -> None:
        self.acked = 0
        self.buf = bytearray()
        self.err = bytearray()
        self.done = False
        self.cond = threading.Condition()

    def feed(self, data: bytes) -> None:
        with self.cond:
            self.buf.extend(data)
            while self.buf.startswith(b"@ack "):
                nl = self.buf.find(b"\n")
                if nl < 0:
                    break
                self.acked = int(self.buf[5:nl])
                del self.buf[:nl + 1]
            self.cond.notify_all()

    def finish(self) -> None:
        with self.cond:
            self.done = True
            self.cond.notify_all()


def _exec_streaming(client: Any, command: str, chunks: Iterator[bytes],
                    timeout: float) -> tuple[int | None, bytes, bytes, bool]:
    """Run ``command`` with ``chunks`` streamed to its stdin without holding the whole payload
    in memory (``SshClient.open_exec``: one channel on the node's connection).

    Flow control of our own on top of SSH's window: at most IN_FLIGHT bytes beyond what the
    agent has acknowledged writing. SSH windows are 64 MiB here, and paramiko's receive buffer
    pays a memmove of everything still queued on every read — a deep queue made the node side
    burn more CPU per byte than SFTP (scp) does. A short queue keeps it linear, and also means
    a node that fails stops the sender within a couple of MiB. Replies are read by a thread so a
    node that fails early cannot deadlock our sends; on timeout the remote processes are killed."""
    proc = client.open_exec(command)
    ch = proc.channel
    rep = _Replies()

    def drain() -> None:
        try:
            while True:
                r, _, _ = select.select([ch], [], [], 0.5)
                while ch.recv_stderr_ready():
                    rep.err.extend(ch.recv_stderr(65536))
                if not r and not ch.recv_ready():
                    if ch.closed or (ch.eof_received and ch.exit_status_ready()):
                        break
                    continue
                b = ch.recv(65536)
                if not b:
                    break
                rep.feed(b)
        except (OSError, EOFError):  # paramiko raises EOFError when the connection is gone
            pass
        finally:
            rep.finish()

    reader = threading.Thread(target=drain, daemon=True, name="deploy-reply")
    reader.start()
    deadline = time.monotonic() + timeout
    sent = 0
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    with rep.cond:
                        while (not rep.done and sent - rep.acked > IN_FLIGHT
                               and time.monotonic() < deadline):
                            rep.cond.wait(0.5)
                    if rep.done or ch.closed or time.monotonic() >= deadline:
                        break
                    piece = view[:ACK_EVERY]
                    ch.sendall(piece)
                    sent += len(piece)
                    view = view[len(piece):]
                if view:
                    break  # the node stopped early (its answer says why), or the deadline
            else:
                ch.shutdown_write()
        except (OSError, EOFError):
            pass  # the channel went away: the node's answer (or its absence) says why
        reader.join(max(0.0, deadline - time.monotonic()))
        if reader.is_alive():
            proc.kill()
            return None, bytes(rep.buf), bytes(rep.err), True
        code = proc.wait(max(1.0, min(10.0, deadline - time.monotonic())))
        while ch.recv_stderr_ready():
            rep.err.extend(ch.recv_stderr(65536))
        return code, bytes(rep.buf), bytes(rep.err), False
    except BaseException:
        proc.kill()
        raise
    finally:
        proc.close()


@dataclass
class _Res:
    exit_code: int
    stdout: bytes
    stderr: bytes
    seconds: float
    timed_out: bool


Connect = Callable[[Node], Any]


@dataclass
class Deployer:
    """One deploy/check/rollback run over many nodes: the bundle is read and hashed once, the
    per-node work goes through THE fan-out."""

    settings: Settings
    bundle: Bundle | None = None
    build: str | None = PYTHON_CHECK
    connect: Connect | None = None
    lock_wait: float = 30.0
    # the node gives up on a controller silent this long (and frees its lock for the next deploy)
    stall_timeout: float = 20.0
    fsync: bool = True
    counter: Transfer = field(default_factory=Transfer)
    _release: str | None = None
    _pool: Any = None

    # -- connections --

    def _client(self, node: Node) -> tuple[Any, bool]:
        """(client, close_after): a supplied connector or pool wins; else one connection."""
        if self.connect is not None:
            return self.connect(node), False
        if node.ssh is None:
            raise NodeError("no ssh: section in the inventory for this node")
        from labkit.ssh import SshClient

        return SshClient.connect(node, self.settings), True

    def _with_client(self, node: Node, fn: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        client, close = self._client(node)
        try:
            return fn(client)
        finally:
            if close:
                client.close()

    def _run(self, client: Any, node: Node, cmd: str, what: str,
             timeout: float) -> dict[str, Any]:
        return _decode(node, client.run(cmd, timeout=timeout), what)

    # -- deploy --

    @property
    def release(self) -> str:
        if self._release is None:
            assert self.bundle is not None
            self._release = new_release_id(self.bundle)
        return self._release

    def deploy_node(self, node: Node) -> dict[str, Any]:
        assert self.bundle is not None
        bundle = self.bundle
        workdir = remote_workdir(node)

        def act(client: Any) -> dict[str, Any]:
            r = client.run(sh_probe_command(workdir), timeout=self.settings.command_timeout)
            if not r.ok:
                raise NodeError(f"probe failed (exit {r.exit_code}): "
                                f"{r.stderr.decode(errors='replace').strip()[-300:]}")
            probe = parse_sh_probe(r.stdout.decode("utf-8", "replace"))
            cur = probe.get("current") or {}
            if in_sync(bundle, probe):
                cleaned: list[str] = []
                if probe["leftovers"]:  # removed under the node's lock, never racing a deploy
                    cleaned = self._run(client, node, agent_command(
                        "clean", workdir, str(self.lock_wait), fast=True), "clean",
                        self.settings.command_timeout).get("cleaned", [])
                note = f"; cleaned {', '.join(cleaned)}" if cleaned else ""
                return {"release": cur.get("id"), "uploaded": "0 files", "uploaded_files": 0,
                        "uploaded_bytes": 0, "linked": 0, "state": "in sync" + note,
                        "cleaned": cleaned, "revision": cur.get("revision")}
            plan = plan_upload(bundle, probe)
            header = {
                "release": self.release, "lock_wait": self.lock_wait, "fsync": self.fsync,
                "ack_every": ACK_EVERY,
                "build": self.build, "build_timeout": self.settings.command_timeout,
                "link": plan.link,
                "send": [{"path": f.path, "size": f.size, "mode": f"{f.mode:o}"}
                         for f in plan.send],
                "manifest": bundle.manifest(self.release),
            }
            head = (json.dumps(header, separators=(",", ":")) + "\n").encode()
            t0 = time.monotonic()
            code, out, err, timed_out = _exec_streaming(
                # the python check must judge the payloads with PATH's python3, the one they
                # will run under; any other build leaves the agent free to start fast
                client, agent_command("stage", workdir, str(self.stall_timeout),
                                      fast=self.build != PYTHON_CHECK),
                _stream(plan, head, self.counter),
                self.settings.command_timeout)
            res = _decode(node, _Res(code, out, err, time.monotonic() - t0, timed_out), "stage")
            cleaned = res.get("cleaned", [])
            note = f"; cleaned {', '.join(cleaned)}" if cleaned else ""
            return {"release": res["release"], "previous": res.get("previous"),
                    "uploaded": f"{len(plan.send)} files, {human_bytes(plan.send_bytes)}",
                    "uploaded_files": len(plan.send), "uploaded_bytes": plan.send_bytes,
                    "linked": len(plan.link), "state": "deployed" + note, "cleaned": cleaned,
                    "pruned": res.get("pruned", []), "revision": bundle.revision}

        return self._with_client(node, act)

    def check_node(self, node: Node) -> dict[str, Any]:
        assert self.bundle is not None
        workdir = remote_workdir(node)

        def act(client: Any) -> dict[str, Any]:
            probe = self._run(client, node, agent_command("probe", workdir, "0", "hash"),
                              "check", self.settings.command_timeout)
            value = check_state(self.bundle, probe)
            if value["state"] != "in sync":
                raise NodeError(f"{value['state']}"
                                + (f": {value['detail']}" if value.get("detail") else ""),
                                value=value)
            return value

        return self._with_client(node, act)

    def rollback_node(self, node: Node) -> dict[str, Any]:
        workdir = remote_workdir(node)

        def act(client: Any) -> dict[str, Any]:
            res = self._run(client, node, agent_command("rollback", workdir,
                                                        str(self.lock_wait), fast=True),
                            "rollback", self.settings.command_timeout)
            return {"release": res["release"], "previous": res.get("previous"),
                    "state": "rolled back"}

        return self._with_client(node, act)

    # -- over many nodes --

    def run(self, nodes: Sequence[Node], action: str, *, label: str | None = None,
            progress: str | None = None) -> list[Outcome]:
        fn = {"deploy": self.deploy_node, "check": self.check_node,
              "rollback": self.rollback_node}[action]
        if action != "rollback" and self.bundle is None:
            raise UserError("no bundle to deploy")
        return fan_out(nodes, fn, parallel=self.settings.parallel, label=label or action,
                       progress=progress or self.settings.progress)


def build_setting(value: Any) -> str | None:
    """Invoke config ``labkit.deploy_build``: unset -> the python compile check; "" / none /
    false -> no build; anything else -> a shell command run in the new release folder."""
    if value is None:
        return PYTHON_CHECK
    if value is False or str(value).strip().lower() in ("", "none", "false", "off", "no"):
        return None
    return str(value)


def columns_for(action: str) -> tuple[str, ...]:
    return CHECK_COLUMNS if action == "check" else COLUMNS


def deployer_for(settings: Settings, config: Any, inventory: Any, action: str) -> Deployer:
    """A Deployer from Invoke config (``labkit.payloads``, ``labkit.deploy_build``) and the
    inventory; a rollback needs no bundle (it only moves symlinks on the node)."""
    config = config or {}
    build = build_setting(config.get("deploy_build"))
    if action == "rollback":
        return Deployer(settings, None, build=build)
    paths = bundle_paths(config.get("payloads"), getattr(inventory, "payloads", []) or [])
    return Deployer(settings, collect_bundle(paths), build=build)


def describe_bundle(bundle: Bundle) -> str:
    rev = _short_rev(bundle.revision, bundle.dirty) or "no git revision"
    return (f"bundle: {len(bundle.files)} files, {human_bytes(bundle.total_bytes)} from "
            f"{', '.join(str(r) for r in bundle.roots)} ({rev}, digest {bundle.digest[:12]})")
