"""The janitor's node side (labkit/nodeside/sweep.py) run here, shipped as a node runs it,
against real process trees on this machine's /proc. Marker names are unique per test, so the
sweep can only ever see the processes the test started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from proctrees import TREE, wait_pid

from labkit import nodeside
from labkit.nodeside import killmarked

# says so when it gets SIGTERM (so a SIGSTOPped one must also have been sent SIGCONT)
POLITE = r"""
import os, signal, sys, time
def bye(*a):
    open(sys.argv[1], "w").write("term"); os._exit(0)
signal.signal(signal.SIGTERM, bye)
open(sys.argv[1] + ".top", "w").write(str(os.getpid()))
time.sleep(600)
"""
# a marked group leader with an unmarked member (its child's exec cleared the environment; the
# child writes its pid only after that exec, so it is never seen still carrying the marker)
MIXED = r"""
import os, sys, time
if os.fork() == 0:
    os.execve(sys.executable, [sys.executable, "-c", "import os, sys, time; "
              "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)",
              sys.argv[1] + ".child"], {})
open(sys.argv[1] + ".top", "w").write(str(os.getpid()))
time.sleep(600)
"""
DEAD, LIVE = "deadhost:11:1", "livehost:22:2"


class Scene:
    """Processes carrying this test's own marker variables, on two fake 'nodes' (roots)."""

    def __init__(self, tmp: Path):
        tag = uuid.uuid4().hex[:12]
        self.ctl, self.run, self.root = (f"LABKIT_TEST_CTL_{tag}", f"LABKIT_TEST_RUN_{tag}",
                                         f"LABKIT_TEST_ROOT_{tag}")
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.tags: set[str] = set()

    def start(self, name: str, code: str, ctl: str, root: str = "/lab/a") -> dict[str, int]:
        env = {**os.environ, self.ctl: ctl, self.run: f"run-{name}", self.root: root}
        self.tags.add(ctl)
        p = subprocess.Popen([sys.executable, "-c", code, str(self.tmp / name)], env=env,
                             start_new_session=True)
        self.procs.append(p)
        out = {"top": wait_pid(self.tmp / f"{name}.top")}
        for extra in ("gc", "child"):
            if f'".{extra}"' in code:
                out[extra] = wait_pid(self.tmp / f"{name}.{extra}")
        return out

    def sweep(self, home: Path, kinds: str = "processes,files") -> subprocess.Popen:
        cmd = nodeside.command("sweep", kinds, "~/labkit", "--ctl-var", self.ctl,
                               "--run-var", self.run, "--within-var", self.root, exec_=False)
        env = {"PATH": os.environ["PATH"], "HOME": str(home), self.root: "/lab/a"}
        return subprocess.Popen(["/bin/sh", "-c", cmd], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env, cwd=home)

    def close(self) -> None:
        killmarked.kill([f"{self.ctl}={t}".encode() for t in self.tags], groups="none")
        for p in self.procs:  # each leads its own group; unmarked members (MIXED) go with it
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            p.wait(10)


@pytest.fixture
def scene(tmp_path: Path) -> Any:
    s = Scene(tmp_path)
    yield s
    s.close()


def line(p: subprocess.Popen) -> dict[str, Any]:
    got = p.stdout.readline()
    assert got, "the sweep ended without answering"
    return json.loads(got)


def test_ends_dead_controllers_processes_and_folders_only(scene: Scene, tmp_path: Path) -> None:
    home = tmp_path / "home"
    scratch = home / "labkit" / "tmp"
    for t in (DEAD, LIVE):
        (scratch / t).mkdir(parents=True)
        (scratch / t / "image.bin").write_bytes(b"x" * 100)
    dead = scene.start("dead", TREE, DEAD)
    stopped = scene.start("stopped", POLITE, DEAD)
    mixed = scene.start("mixed", MIXED, DEAD)
    live = scene.start("live", TREE, LIVE)
    elsewhere = scene.start("elsewhere", TREE, DEAD, root="/lab/b")  # another fake node
    os.kill(stopped["top"], signal.SIGSTOP)

    p = scene.sweep(home)
    try:
        census = line(p)
        listed = {c["pid"]: c for c in census["processes"]}
        for pid in (dead["top"], dead["gc"], stopped["top"], mixed["top"], live["top"]):
            assert pid in listed, (pid, census)
        assert elsewhere["top"] not in listed and mixed["child"] not in listed
        assert listed[stopped["top"]]["state"] == "T"
        assert listed[dead["gc"]]["ctl"] == DEAD and listed[dead["gc"]]["run"] == "run-dead"
        assert census["dirs"] == sorted([DEAD, LIVE])
        p.stdin.write(json.dumps({"dead": [DEAD], "dirs": [DEAD], "grace": 5}).encode() + b"\n")
        p.stdin.close()
        report = line(p)
        assert p.wait(30) == 0
    finally:
        p.kill()
        p.wait()
    assert {dead["top"], dead["gc"], stopped["top"], mixed["top"]} <= set(report["killed"])
    assert report["survivors"] == []
    assert report["removed"] == [str(scratch / DEAD)]
    assert (tmp_path / "stopped").read_text() == "term"  # SIGTERM reached a stopped process
    for pid in (dead["top"], dead["gc"], mixed["top"]):
        assert not killmarked.alive(pid)
    # a live controller's, another node's, and an unmarked group member: all untouched
    for pid in (live["top"], live["gc"], elsewhere["top"], elsewhere["gc"], mixed["child"]):
        assert killmarked.alive(pid), pid
    assert (scratch / LIVE / "image.bin").exists() and not (scratch / DEAD).exists()


def test_a_controller_that_goes_away_changes_nothing(scene: Scene, tmp_path: Path) -> None:
    dead = scene.start("dead", TREE, DEAD)
    (tmp_path / "labkit" / "tmp" / DEAD).mkdir(parents=True)
    p = scene.sweep(tmp_path)
    try:
        assert dead["gc"] in {c["pid"] for c in line(p)["processes"]}
        p.stdin.close()  # EOF instead of a verdict
        assert p.wait(30) == 0 and p.stdout.read() == b""
    finally:
        p.kill()
        p.wait()
    assert killmarked.alive(dead["top"]) and killmarked.alive(dead["gc"])
    assert (tmp_path / "labkit" / "tmp" / DEAD).is_dir()


def test_kinds_limit_the_census(scene: Scene, tmp_path: Path) -> None:
    scene.start("dead", TREE, DEAD)
    (tmp_path / "labkit" / "tmp" / DEAD).mkdir(parents=True)
    for kinds, procs, dirs in (("files", False, True), ("processes", True, False)):
        p = scene.sweep(tmp_path, kinds)
        try:
            census = line(p)
            p.stdin.close()
            p.wait(30)
        finally:
            p.kill()
            p.wait()
        assert bool(census["processes"]) is procs and bool(census["dirs"]) is dirs


def test_folder_names_from_the_verdict_stay_inside_scratch(tmp_path: Path) -> None:
    from labkit.nodeside import sweep

    scratch = tmp_path / "tmp"
    (scratch / "x").mkdir(parents=True)
    outside = tmp_path / "keep"
    outside.mkdir()
    report = sweep.settle({"dirs": ["../keep", "..", ".", "", "x"]}, str(scratch), "NOPE")
    assert report == {"killed": [], "survivors": [], "removed": [str(scratch / "x")]}
    assert outside.is_dir() and scratch.is_dir()


def test_empty_or_malformed_dead_tags_end_nothing(scene: Scene, tmp_path: Path) -> None:
    """``"dead": [""]`` would be the marker ``CTL_VAR=``: every controller's processes. Such
    tags (and anything that is not a string) are ignored, never widened."""
    from labkit.nodeside import sweep

    live = scene.start("live", POLITE, LIVE)
    report = sweep.settle({"dead": ["", None, 5, [], "x\0y"], "grace": 0}, str(tmp_path / "s"),
                          scene.ctl)
    assert report == {"killed": [], "survivors": [], "removed": []}
    report = sweep.settle({"dead": "", "grace": 0}, str(tmp_path / "s"), scene.ctl)
    assert report["killed"] == []
    assert killmarked.alive(live["top"])
