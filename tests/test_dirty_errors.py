"""dirty-rate says why it could not measure: the tracker's own line, not "exit code N".

A pid that never existed or has exited, a process the tracker may not trace (run as another
user; held by another tracer), a backend this kernel lacks: each reaches the node's error text
(table and --json) as the tracker's one line. And the table's columns each mean one thing: the
window is `window_s` (also in --json, with its instants), the fan-out's time is `seconds`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from test_tracker import LocalShell, local_node  # noqa: F401 - local_node is a fixture

from labkit.errors import NodeError
from labkit.experiment import dirty
from labkit.payloads import ptrace_inject as pti
from labkit.ssh import CommandFailed

pytestmark = pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                                reason="x86_64 Linux only")

NO_PID = 2**22 + 12345  # above pid_max's default: no such process


class NobodyShell(LocalShell):
    """The same local shell, but the tracker runs as uid/gid 65534: a process of root is one it
    may not trace (real EPERM from the kernel, not a mock)."""

    def run(self, cmd: str, **kw):  # type: ignore[override]
        assert "exec python3 " in cmd
        return super().run(cmd.replace("exec python3 ", "exec setpriv --reuid=65534 "
                                       "--regid=65534 --clear-groups python3 "), **kw)


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "300"])
    yield p
    p.kill()
    p.wait()


def test_no_such_process_names_the_pid(local_node):  # noqa: F811
    with pytest.raises(NodeError) as ei:
        dirty.dirty_rate(local_node, LocalShell(), NO_PID, 1, "uffd")
    assert str(ei.value) == f"pid {NO_PID}: no such process"


def test_exited_process_names_the_pid(local_node):  # noqa: F811
    p = subprocess.Popen(["true"])
    p.wait()  # exited and reaped: the pid names nothing now
    with pytest.raises(NodeError) as ei:
        dirty.dirty_rate(local_node, LocalShell(), p.pid, 1, "auto")
    assert str(ei.value) in (f"pid {p.pid}: no such process",
                             f"pid {p.pid} exited while the tracker attached: nothing measured")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to run the tracker as another user")
def test_process_that_may_not_be_traced_says_why(local_node, sleeper):  # noqa: F811
    """The tracker as uid 65534, the target root's: every backend is refused; the one line
    says so for each, with the likely cause, instead of "exit code 1"."""
    with pytest.raises(CommandFailed) as ei:
        dirty.dirty_rate(local_node, NobodyShell(), sleeper.pid, 1, "auto")
    text = str(ei.value)
    assert text.startswith(f"pid {sleeper.pid}: no tracking backend works: uffd: "), text
    assert "compare: " in text and "\n" not in text
    assert "target owned by uid 0, we are uid 65534" in text
    assert "exit code 1" in text  # as a detail after the reason, not instead of it


def test_target_held_by_another_tracer_says_so(local_node, sleeper):  # noqa: F811
    """A process under a debugger cannot be seized: uffd needs to inject a syscall into it."""
    pti.ptrace(pti.PTRACE_SEIZE, sleeper.pid)
    try:
        with pytest.raises(CommandFailed) as ei:
            dirty.dirty_rate(local_node, LocalShell(), sleeper.pid, 1, "uffd")
    finally:
        pti.ptrace(pti.PTRACE_INTERRUPT, sleeper.pid)
        os.waitpid(sleeper.pid, pti.WALL)
        pti.ptrace(pti.PTRACE_DETACH, sleeper.pid)
    text = str(ei.value)
    assert text.startswith(f"pid {sleeper.pid}: uffd backend: ptrace(PTRACE_SEIZE"), text
    assert f"already traced by pid {os.getpid()}" in text


def test_backend_this_kernel_lacks_says_which_and_why(local_node, sleeper):  # noqa: F811
    from labkit.payloads import tracker as tr

    ok, why = tr.softdirty_kernel_ok()
    if ok:
        pytest.skip("this kernel has soft-dirty")
    with pytest.raises(CommandFailed) as ei:
        dirty.dirty_rate(local_node, LocalShell(), sleeper.pid, 1, "softdirty")
    assert str(ei.value).startswith(f"pid {sleeper.pid}: softdirty backend: {why}")


def test_failure_text_reads_the_trackers_line():
    assert dirty.failure_text({"stdout": 'x\n{"error": "pid 1: nope"}\n', "stderr": ""}) == \
        "pid 1: nope"
    assert dirty.failure_text({"stdout": "", "stderr": "Traceback\n  ...\nValueError: bad\n"}) \
        == "ValueError: bad"
    assert dirty.failure_text({"stdout": "", "stderr": ""}) is None


@pytest.mark.slow  # a lab and a deploy
def test_dirty_rate_task_errors_and_columns(make_fake_lab, tmp_path, sleeper):
    """Through `labkit dirty-rate` on a fake node (the nodes share this machine): the error
    column and --json carry the tracker's line; one `window_s` column for the window, one
    `seconds` for the fan-out; the window and its instants in --json."""
    lab = make_fake_lab(count=1, power_on=True)
    lab.wait("node1", phase="up", ssh=True, timeout=30)
    env = {**lab.env, "LABKIT_SSH_CONFIG": str(tmp_path / "none"),
           "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "INVOKE_LABKIT_LEASE_DIR": str(tmp_path / "leases")}
    labkit = [sys.executable, "-m", "labkit.cli"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*labkit, "dirty-rate", "-n", "node1", *args], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)

    r = subprocess.run([*labkit, "deploy", "-n", "node1"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # a pid that does not exist
    for js in ([], ["--json"]):
        r = run("--pid", str(NO_PID), "--seconds", "0.5", *js)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert f"pid {NO_PID}: no such process" in r.stdout
    # a process under another tracer, with the backend that must seize it
    pti.ptrace(pti.PTRACE_SEIZE, sleeper.pid)
    try:
        table = run("--pid", str(sleeper.pid), "--seconds", "0.5", "--tracker", "uffd")
        js = run("--pid", str(sleeper.pid), "--seconds", "0.5", "--tracker", "uffd", "--json")
    finally:
        pti.ptrace(pti.PTRACE_INTERRUPT, sleeper.pid)
        os.waitpid(sleeper.pid, pti.WALL)
        pti.ptrace(pti.PTRACE_DETACH, sleeper.pid)
    assert table.returncode == 1 and "already traced by pid" in table.stdout
    assert f"pid {sleeper.pid}: uffd backend: ptrace(PTRACE_SEIZE" in table.stdout
    (row,) = json.loads(js.stdout)
    assert row["ok"] is False and "already traced by pid" in row["error"]
    # a live process: the table's columns, and the window in --json
    r = run("--pid", str(sleeper.pid), "--seconds", "0.3")
    assert r.returncode == 0, r.stdout + r.stderr
    head = r.stdout.splitlines()[0].split()
    assert head.count("seconds") == 1 and "window_s" in head and "method" in head
    t0 = time.monotonic_ns()
    r = run("--pid", str(sleeper.pid), "--seconds", "0.3", "--json")
    (row,) = json.loads(r.stdout)
    w = row["window"]
    assert row["ok"] and row["window_s"] == pytest.approx((w["end_ns"] - w["start_ns"]) / 1e9,
                                                          abs=1e-6)
    assert t0 < w["start_ns"] < w["end_ns"] < time.monotonic_ns()  # one clock, node and here
    assert row["window_s"] >= 0.3 and row["seconds"] >= row["window_s"]  # fan-out: the whole
