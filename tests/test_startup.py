"""Start-up: what ``labkit`` imports for help and for power-status, and the help cache
(labkit.helpcache) — it prints exactly what Invoke prints, and never stale help.

These are behavioural guards (which modules a process loaded, what it printed), not timings:
bench/startup.py has the figures."""

from __future__ import annotations

import fcntl
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("paramiko", "matplotlib", "numpy")
HELP_LINES = [["--help"], ["--list"], ["--version"], ["--help", "power-on"],
              ["power-on", "--help"], ["-l", "lab"], ["-h", "migrate-test"]]


def loaded_modules(code: str, env: dict[str, str] | None = None) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\n"
                          "print('\\n'.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, timeout=60,
                         env={**os.environ, **(env or {})}).stdout
    return set(out.split())


def top_level(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_importing_the_cli_loads_no_invoke_and_nothing_heavy():
    mods = top_level(loaded_modules("import labkit.cli"))
    assert not mods & {"invoke", "yaml", *HEAVY}, mods & {"invoke", "yaml", *HEAVY}


def test_building_the_namespace_loads_no_library():
    """Every command builds the whole namespace: task modules import their libraries in their
    bodies, so building it loads Invoke and the task modules only."""
    mods = loaded_modules("import labkit.cli; labkit.cli.make_program()")
    assert not top_level(mods) & {"pyghmi", "cryptography", *HEAVY}, top_level(mods)
    assert not {"labkit.ssh", "labkit.deploy", "labkit.experiment", "labkit.sync",
                "labkit.bmc.power", "labkit.inventory"} & mods


def test_power_status_process_loads_pyghmi_but_nothing_heavy(make_fake_lab):
    lab = make_fake_lab(count=1, ssh=False)
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "labkit.cli", "power-status",
                        "-n", "node1", "-i", str(lab.inventory_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "node1" in r.stdout and "off" in r.stdout
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines()
                if line.startswith("import time:")}
    assert "pyghmi" in top_level(imported)
    assert not top_level(imported) & set(HEAVY), top_level(imported) & set(HEAVY)
    assert "labkit.ssh" not in imported


# --- the help cache ------------------------------------------------------------------------

def copy_labkit(dest: Path) -> Path:
    """A private copy of the labkit package, all files an hour old (older than RACY_NS), so a
    test can edit task code without touching the checkout."""
    shutil.copytree(ROOT / "labkit", dest / "labkit",
                    ignore=shutil.ignore_patterns("__pycache__"))
    old = time.time() - 3600
    for p in (dest / "labkit").rglob("*"):
        os.utime(p, (old, old))
    return dest


def labkit(src: Path, cache: Path, argv: list[str], *, cached: bool = True,
           importtime: bool = False, cols: int | None = None,
           env: dict[str, str | None] | None = None, cwd: Path | None = None,
           stdout_closed: bool = False) -> tuple[int, str, str]:
    """Run ``labkit ARGV`` from the copy at ``src`` (exit code, stdout, stderr); with ``cols``
    on a pseudo-terminal that wide, as a user at a terminal runs it; with ``stdout_closed``
    into a pipe nobody reads any more, as ``labkit --list | head -c 10`` once head is done.
    An ``env`` value of None unsets that variable."""
    code = f"import sys; sys.path.insert(0, {str(src)!r}); from labkit.cli import main; main()"
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", code, *argv]
    full = {**os.environ, "XDG_CACHE_HOME": str(cache), "LABKIT_HELP_CACHE": "1", **(env or {})}
    if not cached:
        full["LABKIT_HELP_CACHE"] = "0"
    run_env = {k: v for k, v in full.items() if v is not None}
    if stdout_closed:
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            r = subprocess.run(cmd, stdout=write_end, stderr=subprocess.PIPE, text=True,
                               timeout=60, env=run_env, cwd=cwd)
        finally:
            os.close(write_end)
        return r.returncode, "", r.stderr
    if cols is None:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=run_env, cwd=cwd)
        return r.returncode, r.stdout, r.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, cols, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        p = subprocess.run(cmd, stdout=slave, stderr=subprocess.PIPE, text=True, timeout=60,
                           env=run_env, cwd=cwd)
    finally:
        os.close(slave)
        reader.join(timeout=30)
        os.close(master)
    return p.returncode, b"".join(chunks).decode().replace("\r\n", "\n"), p.stderr


def served_by_invoke(src: Path, cache: Path, argv: list[str], **kw: object) -> tuple[bool, str]:
    """(whether the run imported Invoke, its stdout)."""
    rc, out, err = labkit(src, cache, argv, importtime=True, **kw)
    assert rc == 0, err
    return any(line.rstrip().endswith(" invoke") for line in err.splitlines()), out


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    return copy_labkit(tmp_path / "src")


def test_help_from_the_cache_is_invokes_output_byte_for_byte(copy: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    records = cache / "labkit" / "cli"
    for n, argv in enumerate(HELP_LINES):
        rc, truth, err = labkit(copy, cache, argv, cached=False)
        assert rc == 0 and truth and not err, (argv, err)
        # LABKIT_HELP_CACHE=0: not written either
        assert len(list(records.glob("*.bin")) if records.exists() else []) == n
        first_by_invoke, first = served_by_invoke(copy, cache, argv)
        second_by_invoke, second = served_by_invoke(copy, cache, argv)
        assert first_by_invoke and not second_by_invoke, argv
        assert first == second == truth, argv


def test_terminal_width_is_part_of_the_key(copy: Path, tmp_path: Path):
    """Invoke wraps help text to the terminal: a record made at one width is not replayed at
    another."""
    cache = tmp_path / "cache"
    outs = {}
    for cols in (60, 160, 60, 160):
        _, truth, _ = labkit(copy, cache, ["--list"], cached=False, cols=cols)
        by_invoke, out = served_by_invoke(copy, cache, ["--list"], cols=cols)
        assert out == truth
        outs.setdefault(cols, []).append(by_invoke)
    assert outs == {60: [True, False], 160: [True, False]}
    assert labkit(copy, cache, ["--list"], cols=60)[1] != labkit(copy, cache, ["--list"],
                                                                   cols=160)[1]


def test_an_edited_task_is_never_served_stale(copy: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    served_by_invoke(copy, cache, ["--list"])
    assert served_by_invoke(copy, cache, ["--list"])[0] is False  # cached now
    power = copy / "labkit" / "tasks" / "power.py"
    text = power.read_text()
    old = "Show each node's power state as its BMC reports it."
    new = "Show each node's power state as its BMC tells it..."  # same length: same size
    assert old in text and len(old) == len(new)
    power.write_text(text.replace(old, new))
    by_invoke, out = served_by_invoke(copy, cache, ["--list"])
    assert by_invoke and "as its BMC tells it" in out and "reports it" not in out
    # a file whose mtime is not safely in the past (here: ahead of the clock) is never
    # trusted to a record: a second edit within the filesystem's timestamp granularity could
    # leave its mtime where it is
    ahead = time.time() + 3600
    os.utime(power, (ahead, ahead))
    for _ in range(2):
        assert served_by_invoke(copy, cache, ["--list"]) == (True, out)
    # once it is old enough it is recorded, and an edit after that is seen again
    old_t = time.time() - 60
    os.utime(power, (old_t, old_t))
    served_by_invoke(copy, cache, ["--list"])
    assert served_by_invoke(copy, cache, ["--list"]) == (False, out)
    power.write_text(text)
    by_invoke, out = served_by_invoke(copy, cache, ["--list"])
    assert by_invoke and "reports it" in out


def test_a_new_version_or_invoke_setting_is_never_served_stale(copy: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    served_by_invoke(copy, cache, ["--version"])
    assert served_by_invoke(copy, cache, ["--version"])[0] is False
    init = copy / "labkit" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "9'))
    by_invoke, out = served_by_invoke(copy, cache, ["--version"])
    assert by_invoke and out.startswith("labkit 9"), out
    # an INVOKE_* variable may change what Invoke does: not the same record
    old_t = time.time() - 60
    os.utime(init, (old_t, old_t))
    served_by_invoke(copy, cache, ["--list"])
    assert served_by_invoke(copy, cache, ["--list"])[0] is False
    dedupe = {"INVOKE_TASKS_DEDUPE": "0"}
    assert served_by_invoke(copy, cache, ["--list"], env=dedupe)[0] is True
    assert served_by_invoke(copy, cache, ["--list"], env=dedupe)[0] is False


def test_errors_are_not_cached(copy: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    for _ in range(2):
        rc, out, err = labkit(copy, cache, ["--help", "nosuch"])
        assert rc != 0 and "nosuch" in err
    assert not (cache / "labkit" / "cli").exists() or not any(
        (cache / "labkit" / "cli").iterdir())


@pytest.mark.parametrize("unbuffered", ["1", None], ids=["unbuffered", "buffered"])
def test_a_closed_stdout_ends_quietly_on_every_path(copy: Path, tmp_path: Path,
                                                     unbuffered: str | None):
    """``labkit --list | head -c 10``: once the reader is gone, exit 141 with nothing on
    stderr, whether the output comes from the cache, from Invoke on a miss, with the cache
    off, or for a command line the cache does not take. Buffered (the default) and unbuffered
    stdout fail in different places: on write, or on the flush at exit."""
    cache = tmp_path / "cache"
    env = {"PYTHONUNBUFFERED": unbuffered}

    def closed(argv: list[str], cached: bool = True) -> bool:
        rc, _, err = labkit(copy, cache, argv, cached=cached, importtime=True, env=env,
                            stdout_closed=True)
        rest = [line for line in err.splitlines() if not line.startswith("import time:")]
        assert rc == 141 and not rest, (argv, rc, rest)
        return any(line.rstrip().endswith(" invoke") for line in err.splitlines())

    for argv in (["--list"], ["--version"], ["--help", "power-on"]):
        assert closed(argv, cached=False)  # LABKIT_HELP_CACHE=0
        assert closed(argv)  # a miss: Invoke, through the recording tee
        served_by_invoke(copy, cache, argv)  # recorded now
        assert closed(argv) is False  # a hit: the recorded output
    assert closed(["--list", "--list-format", "json"])  # not a help line the cache takes


def test_no_cache_without_an_absolute_base(copy: Path, tmp_path: Path):
    """HOME unset with no passwd entry makes ``~`` expand to itself; that, a relative HOME or a
    relative XDG_CACHE_HOME must not put records under the directory labkit runs in."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # HOME relative and no XDG_CACHE_HOME (the same path as "~" unexpanded): no cache at all
    rel_home = {"HOME": "rel-home", "XDG_CACHE_HOME": None}
    for _ in range(2):
        assert served_by_invoke(copy, tmp_path / "unused", ["--version"], env=rel_home,
                                cwd=cwd)[0] is True
    assert not any(cwd.iterdir()) and not (tmp_path / "unused").exists()
    # a relative XDG_CACHE_HOME is ignored (XDG spec): ~/.cache it is
    home = tmp_path / "home"
    rel_xdg = {"HOME": str(home), "XDG_CACHE_HOME": "rel-cache"}
    assert served_by_invoke(copy, tmp_path / "unused", ["--version"], env=rel_xdg,
                            cwd=cwd)[0] is True
    assert served_by_invoke(copy, tmp_path / "unused", ["--version"], env=rel_xdg,
                            cwd=cwd)[0] is False
    assert not any(cwd.iterdir())
    assert len(list((home / ".cache" / "labkit" / "cli").glob("*.bin"))) == 1


STORE_MANY = """
import sys, time
sys.path.insert(0, sys.argv[1])
from labkit import helpcache
tag, n = sys.argv[2], int(sys.argv[3])
for i in range(n):
    assert helpcache.store([tag, str(i)], f"{tag} {i}", time.time_ns())
if sys.argv[4] == "check":
    for i in range(n - 10, n):
        assert helpcache.lookup([tag, str(i)]) == f"{tag} {i}", i
"""


def test_the_cache_stays_bounded(copy: Path, tmp_path: Path):
    """Each width, command line and INVOKE_* setting makes a record: the folder keeps the
    newest MAX_RECORDS, also with several labkit processes writing and pruning at once, and
    drops temporary files a killed writer left (not those of a writer still at work)."""
    from labkit.helpcache import MAX_RECORDS

    cache = tmp_path / "cache"
    records = cache / "labkit" / "cli"
    records.mkdir(parents=True)
    dead, busy = records / "0.1.tmp", records / "0.2.tmp"
    dead.write_bytes(b"x")
    busy.write_bytes(b"x")
    os.utime(dead, (time.time() - 3600, time.time() - 3600))
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}

    def store_many(tag: str, check: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", STORE_MANY, str(copy), tag,
                                 str(MAX_RECORDS + 40), check], env=env,
                                stderr=subprocess.PIPE, text=True)

    p = store_many("a", "check")
    assert p.wait(timeout=60) == 0, p.stderr.read()  # type: ignore[union-attr]
    assert len(list(records.glob("*.bin"))) == MAX_RECORDS
    assert not dead.exists() and busy.exists()
    both = [store_many("b", "-"), store_many("c", "-")]
    for p in both:
        assert p.wait(timeout=60) == 0, p.stderr.read()  # type: ignore[union-attr]
    assert MAX_RECORDS // 2 <= len(list(records.glob("*.bin"))) <= MAX_RECORDS


def test_invoke_and_labkit_task_help_still_work():
    r = subprocess.run([str(Path(sys.executable).with_name("invoke")), "-r", str(ROOT), "--help",
                        "power-on"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--wait" in r.stdout and "--force" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "labkit.cli", "--help", "deploy"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--rollback" in r.stdout and "--force" in r.stdout, r.stderr
