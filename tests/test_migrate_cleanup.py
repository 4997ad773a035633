"""A migrate-test run's cleanup on real fake-lab nodes: it ends everything the run started,
including what hid from process groups and parents, and says so when something survives."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import pytest

from labkit.config import Settings
from labkit.experiment import build_config
from labkit.experiment import run as run_mod
from labkit.experiment.run import MigrateRun
from labkit.nodeside import killmarked
from labkit.pytest_plugin import FakeLabHandle, start_fake_lab

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="/proc process trees: Linux only")

# What a payload might do: fork a child that leaves the session (setsid) and double-forks, so
# the grandchild is in no process group we know and its parent is gone. It writes its pid to
# argv[1] and sleeps; the process the run started sleeps too.
TREE = r"""
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        with open(sys.argv[1] + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(600)
    os._exit(0)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    handle = start_fake_lab(tmp_path_factory.mktemp("cleanuplab"), count=2, power_on=True)
    yield handle
    handle.stop()


@pytest.fixture
def run(lab: FakeLabHandle, tmp_path: Path):
    settings = Settings(results_dir=str(tmp_path / "results"), power_wait=30, ssh_wait=30)
    r = MigrateRun(lab.inventory(), settings, build_config(src="node1", dst="node2", size="8M"),
                   deploy=True)
    r.prepare()  # deployed payloads: run.start() runs in their folder
    yield r
    r.cleanup()
    r.events.close()


def _wait_pid(path: Path, timeout: float = 20) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            return int(path.read_text())
        time.sleep(0.02)
    raise AssertionError(f"the process tree never wrote {path}")


def _stat(pid: int) -> tuple[int, int]:
    """(pgrp, session) of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    return int(fields[2]), int(fields[3])


def _events(run: MigrateRun) -> list[dict]:
    return [json.loads(x) for x in (run.folder / "events.jsonl").read_text().splitlines()]


def test_cleanup_kills_a_setsid_double_forked_descendant(lab: FakeLabHandle, run: MigrateRun,
                                                          tmp_path: Path) -> None:
    """A grandchild that left its session and lost its parent is still the run's: cleanup
    must end it (found by the run id in its environment, not by group or parent)."""
    pidfile = tmp_path / "grandchild.pid"
    started = run.start(run.src_node, "-c", f"{shlex.quote(TREE)} {shlex.quote(str(pidfile))}",
                        "workload")
    gc = _wait_pid(pidfile)
    assert killmarked.alive(gc)
    env = Path(f"/proc/{gc}/environ").read_bytes().split(b"\0")
    assert f"LABKIT_RUN={started.proc.run_id}".encode() in env
    top = [p for p in killmarked.marked([f"LABKIT_RUN={started.proc.run_id}"]) if p != gc]
    assert top and all(_stat(gc)[1] != _stat(p)[1] for p in top), "not a session of its own"

    run.cleanup()
    assert not killmarked.alive(gc), "cleanup left the setsid'd grandchild running"
    assert killmarked.marked([f"LABKIT_RUN={started.proc.run_id}"]) == []
    assert "cleanup-failed" not in {e["event"] for e in _events(run)}


def test_cleanup_kills_recorded_pids_without_the_run_marker(lab: FakeLabHandle,
                                                            run: MigrateRun) -> None:
    """A pid the run learned (such as the restored workload's) dies even if its environment
    carries no marker of this run."""
    client = run.pool.get(run.src_node)
    out = client.check("setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!", timeout=20)
    pid = int(out.stdout.decode().strip())
    assert killmarked.alive(pid)
    run.pids[run.src_node.name].add(pid)

    run.cleanup()
    assert not killmarked.alive(pid)


def test_cleanup_says_what_survived(lab: FakeLabHandle, run: MigrateRun,
                                    monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """When the kill reports survivors (exit 1 and their pids), cleanup retries over a fresh
    connection, then records them in events.jsonl and says so on stderr. (The kill is swapped
    for one that reports a survivor: nothing here outlives a root SIGKILL; the real kill runs
    at teardown.)"""
    run.start(run.src_node, "-c", shlex.quote("import time; time.sleep(600)"), "workload")
    monkeypatch.setattr(run_mod, "kill_command", lambda ids, pids: (
        "echo '{\"killed\": [], \"survivors\": [4242]}'; exit 1"))

    run.cleanup()
    events = _events(run)
    retries = [e for e in events if e["event"] == "cleanup-retry"]
    assert [e["survivors"] for e in retries] == [[4242], [4242]]
    (failed,) = [e for e in events if e["event"] == "cleanup-failed"]
    assert failed["node"] == "node1" and "4242" in failed["error"]
    err = capsys.readouterr().err
    assert "node1: could not end every process of this run: processes 4242 survived" in err


def test_run_failure_keeps_the_cause_and_adds_the_folder(tmp_path: Path) -> None:
    """What a failed run raises: the cause's message, exit code and report data, plus the
    results folder, all given at construction."""
    from labkit.errors import LabkitError, UserError
    from labkit.experiment import MigrationFailed, RunFailed

    cause = UserError("--size: bad", value={"node": "node1"})
    e = RunFailed(cause, tmp_path)
    assert isinstance(e, MigrationFailed) and str(e) == "--size: bad"
    assert e.exit_code == 2 and e.value == {"node": "node1", "folder": str(tmp_path)}
    assert RunFailed(LabkitError("x"), tmp_path).exit_code == 1
    assert cause.value == {"node": "node1"}  # the cause is not changed
