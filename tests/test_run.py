"""`labkit run` / `invoke run` end to end: real CLI processes against fake SSH nodes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit.fake.harness import SshNodeSet
from labkit.nodeside import killmarked

REPO = Path(__file__).resolve().parent.parent
LABKIT = [sys.executable, "-m", "labkit.cli"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with SshNodeSet(tmp_path_factory.mktemp("runlab"), ["node1", "node2", "node3"]) as lab:
        yield lab


def cli(lab: SshNodeSet, *args: str, timeout: float = 60, prog=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, LABKIT_INVENTORY=str(lab.inventory_path))
    return subprocess.run([*(prog or LABKIT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def gone(lab: SshNodeSet, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not any(killmarked.marked([n.marker]) for n in lab.nodes.values()):
            return True
        time.sleep(0.05)
    return False


def test_run_streams_prefixed_lines_and_exits_0(lab: SshNodeSet) -> None:
    p = cli(lab, "run", "-n", "node1,node2", "--", "echo", "hi from $LABKIT_NODE;",
            "echo oops >&2")
    assert p.returncode == 0, p.stderr
    assert "node1| hi from node1" in p.stdout.splitlines()
    assert "node2| hi from node2" in p.stdout.splitlines()
    assert "node1| oops" in p.stderr.splitlines()
    assert "2 node(s), 2 ok, 0 failed" in p.stdout


def test_one_failing_node_exits_1_with_table(lab: SshNodeSet) -> None:
    p = cli(lab, "run", "--", 'test "$LABKIT_NODE" != node2 || exit 3')
    assert p.returncode == 1
    rows = {line.split()[0]: line.split() for line in p.stdout.splitlines()
            if line.startswith("node")}
    assert rows["node1"][1] == "ok" and rows["node3"][1] == "ok"
    assert rows["node2"][1] == "FAILED" and rows["node2"][2] == "3"
    assert "exit code 3" in p.stdout
    assert "3 node(s), 2 ok, 1 failed" in p.stdout


def test_json_shape(lab: SshNodeSet) -> None:
    p = cli(lab, "run", "--json", "-n", "node*", "--", "echo out; echo err >&2; "
            '[ "$LABKIT_NODE" = node3 ] && exit 5; true')
    assert p.returncode == 1
    data = json.loads(p.stdout)
    assert [d["node"] for d in data] == ["node1", "node2", "node3"]
    for d in data:
        assert {"node", "ok", "error", "seconds", "exit_code", "stdout", "stderr"} <= set(d)
        assert d["stdout"] == "out\n" and d["stderr"] == "err\n"
    assert [d["exit_code"] for d in data] == [0, 0, 5]
    assert [d["ok"] for d in data] == [True, True, False]
    assert "|" not in p.stdout  # no streamed lines mixed into the JSON


def test_timeout_kills_remote_process_group(lab: SshNodeSet) -> None:
    t0 = time.monotonic()
    p = cli(lab, "run", "-n", "node1,node2", "--timeout", "1", "--",
            "sleep 1000 & setsid sleep 1001 & sleep 1002")
    assert p.returncode == 1
    assert time.monotonic() - t0 < 10
    assert "timed out" in p.stdout
    assert gone(lab), "remote processes survived --timeout"


def test_ctrl_c_kills_remote_processes_before_exiting(lab: SshNodeSet) -> None:
    env = dict(os.environ, LABKIT_INVENTORY=str(lab.inventory_path))
    proc = subprocess.Popen([*LABKIT, "run", "--", "sleep 1000 & sleep 1001"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 10
        while sum(len(killmarked.marked([n.marker])) for n in lab.nodes.values()) < 6:
            assert time.monotonic() < end, "remote commands never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert gone(lab, 1.0), "remote processes survived Ctrl-C"


def test_usage_errors_exit_2(lab: SshNodeSet) -> None:
    p = cli(lab, "run", "-n", "node1")
    assert p.returncode == 2 and "nothing to run" in p.stderr
    p = cli(lab, "run", "-n", "nosuch", "--", "true")
    assert p.returncode == 2 and "nosuch" in p.stderr
    p = cli(lab, "run", "--timeout", "soon", "--", "true")
    assert p.returncode == 2


def test_unreachable_node_fails_alone(lab: SshNodeSet) -> None:
    lab.nodes["node3"].stop()
    try:
        p = cli(lab, "run", "--", "echo up")
    finally:
        lab.nodes["node3"].start()
    assert p.returncode == 1
    assert "node1| up" in p.stdout and "node2| up" in p.stdout
    assert "node3: ssh" in p.stdout and "refused" in p.stdout


def test_invoke_run_works_too(lab: SshNodeSet) -> None:
    invoke = [str(Path(sys.executable).with_name("invoke"))]
    p = cli(lab, "run", "-n", "node1", "--", "echo hi", prog=invoke)
    assert p.returncode == 0, p.stderr
    assert "node1| hi" in p.stdout
