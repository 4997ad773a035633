"""Invoke's own ``--help`` / ``--list`` / ``--version`` output, replayed without importing Invoke.

Importing Invoke alone costs ~5x a bare ``python -c pass``, and the help a user reads first
should not. So the first ``labkit --help`` runs Invoke as usual and records what it printed,
together with everything that output could depend on; later runs print the record, after
checking that nothing it depends on changed. The output is then Invoke's, byte for byte.

What the output depends on, and how each is checked (any difference: run Invoke again):

* the code: every module loaded while producing it (labkit's task modules, Invoke, the stdlib
  pieces they use) by path, mtime (ns), size and inode, so an edit, a ``pip install`` or a
  ``git checkout`` is seen; plus Invoke's config files (present or not) and the ``INVOKE_*``
  environment;
* the interpreter: executable, version, ``sys.path`` (a different module could be found);
* the command line (the file name holds it) and the terminal width Invoke wraps help text to.

A record is kept only if every file it depends on is older than RACY_NS when it is written:
a file changed within the filesystem's timestamp granularity of the recording could otherwise
change again later without its mtime moving (git's "racily clean" problem). A run right after
an edit therefore just runs Invoke.

Only a successful run (exit 0, nothing on stderr) of a plain help/list/version command line is
recorded (``eligible``). ``LABKIT_HELP_CACHE=0`` turns the cache off. Records live in
``$XDG_CACHE_HOME/labkit/cli`` (default ``~/.cache/labkit/cli``; no cache when neither gives an
absolute path), at most MAX_RECORDS of them, the oldest pruned on write; a cache that cannot be
read or written is ignored.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing is 10% of a bare start
if TYPE_CHECKING:
    from typing import Any

FORMAT = 1
RACY_NS = 2_000_000_000  # files changed this recently (ns) are not trusted to a record
ENV_SWITCH = "LABKIT_HELP_CACHE"
MAX_RECORDS = 64  # records kept (the most recently written); each is ~30 KB
TMP_STALE_NS = 600_000_000_000  # a .tmp this old belongs to a writer that died
_HELP = ("-h", "--help")
_LIST = ("-l", "--list")
_VERSION = ("-V", "--version")
_CONFIG_FILES = tuple(f"{base}.{ext}" for base in ("/etc/invoke", "~/.invoke")
                      for ext in ("yaml", "yml", "json", "py"))


def _is_name(word: str) -> bool:
    return bool(word) and word[0].isalpha() and all(c.isalnum() or c in "._-" for c in word)


def eligible(argv: list[str]) -> bool:
    """A command line whose whole output is help text: --help, --list, --version, --help TASK,
    TASK --help, --list COLLECTION."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "no", "off", "false"):
        return False
    if len(argv) == 1:
        return argv[0] in _HELP + _LIST + _VERSION
    if len(argv) == 2:
        a, b = argv
        return (a in _HELP + _LIST and _is_name(b)) or (_is_name(a) and b in _HELP)
    return False


def width() -> int:
    """The width Invoke wraps to: the terminal on stdout, else 80 (invoke.terminals.pty_size)."""
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns or 80
    except (AttributeError, OSError, ValueError):
        return 80


def _folder() -> str | None:
    """Where records live, or None for no cache. Only an absolute base is used: with HOME unset
    and no passwd entry ``expanduser("~")`` is "~" itself, and a relative HOME or
    XDG_CACHE_HOME is relative too; each would scatter records under whatever directory
    labkit runs in. A relative XDG_CACHE_HOME is ignored, as the XDG spec says."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):
        return None
    return os.path.join(base, "labkit", "cli")


def _context(argv: list[str]) -> tuple:
    """Everything outside the files that the output depends on."""
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("INVOKE_")))
    return (FORMAT, sys.executable, sys.version, tuple(sys.path), tuple(argv), width(), env,
            os.path.dirname(os.path.abspath(__file__)))


def _path(context: tuple) -> str | None:
    import zlib

    folder = _folder()
    if folder is None:
        return None
    key = zlib.crc32(repr(context).encode(errors="surrogateescape"))
    return os.path.join(folder, f"{key:08x}.bin")


def _stat(path: str) -> tuple[int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1, -1)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _deps() -> list[tuple[str, tuple[int, int, int]]]:
    """Every file the running process loaded code from, and Invoke's config files."""
    paths = set()
    for m in list(sys.modules.values()):
        f = getattr(m, "__file__", None)
        if isinstance(f, str):
            paths.add(f)
    paths.update(os.path.expanduser(p) for p in _CONFIG_FILES)
    return [(p, _stat(p)) for p in sorted(paths)]


def lookup(argv: list[str]) -> str | None:
    """The recorded output for ``argv`` if nothing it depends on changed, else None."""
    import marshal

    context = _context(argv)
    path = _path(context)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            record: Any = marshal.load(f)
    except (OSError, EOFError, ValueError, TypeError):
        return None
    if not isinstance(record, dict) or record.get("context") != context:
        return None
    for path, seen in record["deps"]:
        if _stat(path) != seen:
            return None
    out = record.get("out")
    return out if isinstance(out, str) else None


def store(argv: list[str], out: str, started_ns: int) -> bool:
    """Record ``out`` for ``argv`` (see the module docstring for when it is not)."""
    import marshal
    import time

    deps = _deps()
    limit = min(started_ns, time.time_ns()) - RACY_NS
    if any(seen[0] > limit for _, seen in deps):
        return False  # racily fresh: a later edit might not move its mtime
    context = _context(argv)
    path = _path(context)
    if path is None:
        return False
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            marshal.dump({"context": context, "deps": deps, "out": out}, f)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False
    _prune(os.path.dirname(path), keep=path)
    return True


def _prune(folder: str, keep: str) -> None:
    """Bound the folder to the MAX_RECORDS most recently written records (``keep``, the one
    just written, always stays), and drop temporary files a killed writer left behind: every
    terminal width, command line and INVOKE_* setting makes its own ~30 KB record. Other
    labkit processes may be writing and pruning at the same time, so a file that vanishes
    under us is simply skipped; at worst two pruners both remove a record that either would."""
    import time

    records = []
    stale_tmp = time.time_ns() - TMP_STALE_NS
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        path = os.path.join(folder, name)
        if path == keep:
            continue
        try:
            mtime = os.stat(path).st_mtime_ns
            if name.endswith(".tmp"):
                if mtime < stale_tmp:
                    os.unlink(path)
            elif name.endswith(".bin"):
                records.append((mtime, path))
        except OSError:
            continue
    records.sort(reverse=True)
    for _, path in records[MAX_RECORDS - 1:]:
        try:
            os.unlink(path)
        except OSError:
            pass


class Tee:
    """A stream that passes writes through and keeps a copy. ``fileno`` is the real one, so
    Invoke measures the real terminal."""

    def __init__(self, real: Any):
        self.real = real
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.real.write(text)

    def text(self) -> str:
        return "".join(self.parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)
