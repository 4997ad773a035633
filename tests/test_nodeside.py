"""Node-side programs (labkit/nodeside/): shipped as ``python3 -I -S -c SOURCE``, stdlib-only,
and kill-by-marker, run here for real against real process trees on this machine's /proc."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

import pytest
from proctrees import TREE, wait_pid

import labkit.nodeside as ns
from labkit.nodeside import killmarked

ROOT = Path(__file__).resolve().parents[1]
NODE_SIDE = [*sorted((ROOT / "labkit/nodeside").glob("*.py")),
             *sorted((ROOT / "labkit/payloads").glob("*.py"))]


def _alive(pid: int) -> bool:
    return killmarked.alive(pid)


def _spawn(env_extra: dict[str, str], code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, **env_extra}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env,
                            start_new_session=True)


@pytest.mark.parametrize("path", NODE_SIDE, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_node_side_code_imports_only_the_stdlib_and_its_siblings(path: Path) -> None:
    """Code that runs on a node has nothing but python3 there: no labkit, no third party."""
    stdlib = set(sys.stdlib_module_names)
    siblings = {p.stem for p in path.parent.glob("*.py")}
    tree = ast.parse(path.read_text(), str(path))
    optional = set()  # imports guarded by ``except ImportError`` (numpy when present)
    for t in ast.walk(tree):
        if isinstance(t, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in t.handlers):
            optional |= {id(n) for s in t.body for n in ast.walk(s)}
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            mods = [a.name.split(".")[0] for a in node.names]
            for m in mods:
                assert m in stdlib or m in siblings, f"{path.name} imports {m}"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            top = node.module.split(".")[0]
            if top == "labkit":
                assert node.module == f"labkit.{path.parent.name}", \
                    f"{path.name} imports {node.module}"
            else:
                assert top in stdlib or top in siblings, f"{path.name} imports {node.module}"


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "labkit/nodeside").glob("*.py")
                                        if p.stem != "__init__"))
def test_every_program_ships_and_compiles(name: str) -> None:
    text = ns.program(name)
    compile(text, f"<{name}>", "exec")
    assert len(text.encode()) <= ns.MAX_PROGRAM
    assert ns.command(name).startswith("exec python3 -I -S -c ")


def test_shipped_program_runs_isolated_from_labkit(tmp_path: Path) -> None:
    """The shipped form runs where labkit is not importable (-I -S, cwd elsewhere), and
    answers like the file run directly."""
    cmd = ns.command("killmarked", "--marker", f"LABKIT_RUN=nobody{uuid.uuid4().hex}",
                     exec_=False)
    r = subprocess.run(["/bin/sh", "-c", cmd], cwd=tmp_path, capture_output=True,
                       env={"PATH": os.environ["PATH"]}, timeout=30)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"killed": [], "survivors": []}


def test_kill_finds_setsid_and_double_forked_children(tmp_path: Path) -> None:
    """What a process group or a parent pid would miss, the marker finds; an unmarked process
    beside it lives on."""
    run = uuid.uuid4().hex
    marked = _spawn({"LABKIT_RUN": run}, TREE, str(tmp_path / "m"))
    other = _spawn({"LABKIT_RUN": "someone-else"}, TREE, str(tmp_path / "o"))
    try:
        top, gc = wait_pid(tmp_path / "m.top"), wait_pid(tmp_path / "m.gc")
        o_top, o_gc = wait_pid(tmp_path / "o.top"), wait_pid(tmp_path / "o.gc")
        assert os.getpgid(gc) != os.getpgid(top)  # the grandchild really left the group
        cmd = ns.command("killmarked", "--marker", f"LABKIT_RUN={run}", exec_=False)
        r = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        marked.wait(10)
        assert top in out["killed"] and gc in out["killed"] and out["survivors"] == []
        assert not _alive(top) and not _alive(gc)
        assert _alive(o_top) and _alive(o_gc)
    finally:
        for p in (marked, other):
            killmarked.kill([], [p.pid])
        killmarked.kill([b"LABKIT_RUN=someone-else", f"LABKIT_RUN={run}".encode()],
                        within=None, groups="none")
        other.wait(10)


def test_within_keeps_to_one_fake_node(tmp_path: Path) -> None:
    """Fake nodes share one /proc: a sweep for node1's root never touches node2's processes."""
    mark = uuid.uuid4().hex
    a = _spawn({"LABKIT_CTL": mark, "LABKIT_NODE_ROOT": "/lab/node1"}, TREE, str(tmp_path / "a"))
    b = _spawn({"LABKIT_CTL": mark, "LABKIT_NODE_ROOT": "/lab/node2"}, TREE, str(tmp_path / "b"))
    try:
        a_gc, b_gc = wait_pid(tmp_path / "a.gc"), wait_pid(tmp_path / "b.gc")
        killed, survivors = killmarked.kill([f"LABKIT_CTL={mark}".encode()],
                                            within=b"LABKIT_NODE_ROOT=/lab/node1")
        assert a_gc in killed and survivors == []
        assert not _alive(a_gc) and _alive(b_gc)
        assert b.pid not in killed
    finally:
        killmarked.kill([f"LABKIT_CTL={mark}".encode()])
        a.wait(10)
        b.wait(10)


def test_safe_groups_spare_a_group_with_an_unmarked_member(tmp_path: Path) -> None:
    """"safe" never signals a group holding an unmarked member."""
    run = uuid.uuid4().hex
    # a marked leader whose group also holds an unmarked child (env cleared by its exec; the
    # child writes its pid only after the exec, so it is never seen still carrying the marker)
    code = ("import os, sys, time\n"
            "if os.fork() == 0:\n"
            "    os.execve(sys.executable, [sys.executable, '-c', 'import os, sys, time; "
            "open(sys.argv[1], \"w\").write(str(os.getpid())); time.sleep(600)', "
            "sys.argv[1]], {})\n"
            "time.sleep(600)\n")
    leader = _spawn({f"LABKIT_TEST_{run}": "x"}, code, str(tmp_path / "child"))
    try:
        child = wait_pid(tmp_path / "child")
        assert os.getpgid(child) == leader.pid
        killed, survivors = killmarked.kill([f"LABKIT_TEST_{run}=x".encode()], groups="safe")
        assert killed == [leader.pid] and survivors == []
        assert _alive(child)  # unmarked, and its group was not all ours: left alone
    finally:
        killmarked.kill([], [child], groups="none")
        leader.wait(10)


# an unmarked group leader with a child in its group: what a recorded pid may have become
LEADER = ("import os, sys, time\n"
          "if os.fork() == 0:\n"
          "    open(sys.argv[1] + '.child', 'w').write(str(os.getpid())); time.sleep(600)\n"
          "time.sleep(600)\n")


def test_a_given_pid_without_the_marker_is_left_alone(tmp_path: Path) -> None:
    """A recorded pid may have died and been reused by someone else's process: with markers it
    is ended only if it still carries one, and an unmarked one's group is never signalled."""
    run = uuid.uuid4().hex
    mine = _spawn({"LABKIT_RUN": run}, "import time; time.sleep(600)")
    other = _spawn({"LABKIT_RUN": "someone-else"}, LEADER, str(tmp_path / "o"))
    try:
        child = wait_pid(tmp_path / "o.child")
        assert os.getpgid(child) == other.pid
        killed, survivors = killmarked.kill([f"LABKIT_RUN={run}".encode()],
                                            extra=[other.pid, mine.pid], groups="all")
        mine.wait(10)
        assert killed == [mine.pid] and survivors == []
        assert _alive(other.pid) and _alive(child)
        cmd = ns.command("killmarked", "--marker", f"LABKIT_RUN={run}", "--pid", str(other.pid),
                         exec_=False)
        r = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, timeout=30)
        assert r.returncode == 0 and json.loads(r.stdout)["killed"] == [], r.stderr
        assert _alive(other.pid) and _alive(child)
        # pids alone (no marker) are ended as given, but never their groups
        killed, survivors = killmarked.kill([], [other.pid], groups="all")
        other.wait(10)
        assert killed == [other.pid] and survivors == [] and _alive(child)
    finally:
        killmarked.kill([b"LABKIT_RUN=someone-else", f"LABKIT_RUN={run}".encode()])
        for p in (mine, other):
            p.kill()
            p.wait(10)


def test_empty_or_malformed_markers_are_refused(tmp_path: Path) -> None:
    """``NAME=`` would have been a prefix for every run of every controller: refused, as is
    anything not ``NAME=value``, before anything is signalled."""
    run = uuid.uuid4().hex
    p = _spawn({f"LABKIT_TEST_{run}": "x"}, "import time; time.sleep(600)")
    try:
        for bad in (f"LABKIT_TEST_{run}=", "NOEQUALS", "=x"):
            with pytest.raises(ValueError):
                killmarked.kill([bad.encode()])
            r = subprocess.run([sys.executable, killmarked.__file__, "--marker", bad],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 2 and "NAME=value" in r.stderr, (bad, r.stderr)
        with pytest.raises(ValueError):
            killmarked.kill([f"LABKIT_TEST_{run}=x".encode()], within=b"LABKIT_NODE_ROOT=")
        r = subprocess.run([sys.executable, killmarked.__file__, "--marker",
                            f"LABKIT_TEST_{run}=x", "--within", "LABKIT_NODE_ROOT="],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "NAME=value" in r.stderr, r.stderr
        assert killmarked.marked([f"LABKIT_TEST_{run}=x"]) == [p.pid]  # exact still matches
        assert _alive(p.pid)
    finally:
        p.kill()
        p.wait(10)


def test_grace_sends_term_first_and_cont_to_a_stopped_process(tmp_path: Path) -> None:
    run = uuid.uuid4().hex
    code = ("import os, signal, sys, time\n"
            "def bye(*a):\n"
            "    open(sys.argv[1], 'w').write('term'); os._exit(0)\n"
            "signal.signal(signal.SIGTERM, bye)\n"
            "open(sys.argv[1] + '.ready', 'w').write(str(os.getpid()))\n"
            "time.sleep(600)\n")
    p = _spawn({"LABKIT_RUN": run}, code, str(tmp_path / "t"))
    try:
        wait_pid(tmp_path / "t.ready")
        os.kill(p.pid, signal.SIGSTOP)
        killed, survivors = killmarked.kill([f"LABKIT_RUN={run}".encode()], grace=5)
        assert killed == [p.pid] and survivors == []
        p.wait(10)
        assert (tmp_path / "t").read_text() == "term"
    finally:
        killmarked.kill([], [p.pid])


def test_bad_arguments_are_refused_without_killing() -> None:
    r = subprocess.run([sys.executable, killmarked.__file__, "--marker", "NOEQUALS"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "NAME=value" in r.stderr
    r = subprocess.run([sys.executable, killmarked.__file__], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "nothing to kill" in r.stderr


PROGRAMS = sorted(p.stem for p in (ROOT / "labkit/nodeside").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", PROGRAMS)
def test_programs_keep_to_python_3_6_syntax(name: str) -> None:
    """Nodes run whatever python3 their distribution has; 3.6 is the oldest we promise."""
    ast.parse(ns.source(name), f"{name}.py", feature_version=(3, 6))


def test_a_program_with_siblings_keeps_its_docstring() -> None:
    """Inlined siblings come first in the shipped text, so the docstring is no longer the first
    statement; argparse's help (which reads __doc__) must still work."""
    assert ns._siblings("sweep") == ["killmarked"]
    r = subprocess.run(["/bin/sh", "-c", ns.command("sweep", "--help", exec_=False)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "janitor's side on a node" in r.stdout, r.stderr


class _Finalised:
    """Cyclic garbage with a finalizer: a collection mid-parse runs Python code, which can
    switch threads (how a deploy's paramiko objects met CPython 3.11's ast.parse in CI)."""

    def __del__(self) -> None:
        sum(range(50))


def test_threads_shipping_programs_at_once_do_not_break_the_parser() -> None:
    """A deploy's threads ship the stage agent together, so the first ``program()`` calls
    come at once. CPython 3.11's ast.parse is not thread-safe (gh-106905): a CI deploy failed
    a node with "SystemError: AST constructor recursion depth mismatch". Four threads build
    the program afresh for a second under collections that run finalizers; unguarded, this
    failed some twenty times a second here. Two more threads format tracebacks, which parse
    too; one parse of ours at a time does not keep those out, so the spurious error is tried
    again."""
    errors: list[str] = []
    end = time.monotonic() + 1.0

    def ship() -> None:
        while time.monotonic() < end:
            junk = [_Finalised() for _ in range(20)]
            for j in junk:
                j.me = j  # type: ignore[attr-defined]
            del junk
            ns.program.cache_clear()
            try:
                ns.program("stage")
            except SystemError as e:
                errors.append(str(e))

    def explain() -> None:  # 3.11's traceback parses too, to place its carets
        while time.monotonic() < end:
            try:
                raise ValueError(sum(range(3)) + int("1"))
            except ValueError:
                traceback.format_exc()

    threads = [threading.Thread(target=ship) for _ in range(4)]
    threads += [threading.Thread(target=explain) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [], f"{len(errors)} failed parses, the first: {errors[0]}"


def test_shell_script_gets_its_arguments_quoted(tmp_path: Path) -> None:
    """``shell()`` runs the script in the receiving shell (no second sh) with ``set --``."""
    work = tmp_path / "it's a dir; echo pwned"
    (work / "payloads" / "releases" / ".incoming-x").mkdir(parents=True)
    r = subprocess.run(["/bin/sh", "-c", ns.shell("probe", str(work))], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and r.stdout == "@leftover .incoming-x\n@done\n", r.stdout
    with pytest.raises(ValueError):
        ns.script("../probe")
