"""SIGTERM (a CI runner, systemd) and SIGHUP (a closed terminal) end a task as Ctrl-C does: the
remote commands it started are killed, one line is printed, the exit code is 128 + the signal,
no traceback — through `labkit` and `invoke`, against real OpenSSH nodes, whose sshd (unlike
the fake paramiko one) leaves a dropped client's processes running: exactly where dying on the
spot used to leave them behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from labkit.fake.harness import FakeLabHandle, SshNodeSet, start_fake_lab
from labkit.fake.openssh import sshd_path
from labkit.nodeside import killmarked

REPO = Path(__file__).resolve().parent.parent
LABKIT = [sys.executable, "-m", "labkit.cli"]
INVOKE = [str(Path(sys.executable).with_name("invoke"))]
X86_LINUX = sys.platform == "linux" and os.uname().machine == "x86_64"
SIGS = [signal.SIGTERM, signal.SIGHUP]

pytestmark = pytest.mark.skipif(sshd_path() is None, reason="OpenSSH sshd not installed "
                                "(apt-get install openssh-server)")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with SshNodeSet(tmp_path_factory.mktemp("siglab"), ["node1", "node2"],
                    kind="openssh") as lab:
        yield lab


def running(lab: SshNodeSet) -> list[int]:
    return [p for n in lab.nodes.values() for p in killmarked.marked([n.marker])]


def wait_gone(pids_of: Any, timeout: float) -> list:
    end = time.monotonic() + timeout
    while (left := pids_of()) and time.monotonic() < end:
        time.sleep(0.05)
    return left


def check_interrupted(proc: subprocess.Popen, sig: int, err: str) -> None:
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, f"rc={proc.returncode}\n{err}"
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"interrupted ({name})", err


@pytest.mark.parametrize("prog", ["labkit", "invoke"])
@pytest.mark.parametrize("sig", SIGS, ids=lambda s: s.name)
def test_signal_during_run_kills_remote_commands(nodes: SshNodeSet, sig: int,
                                                 prog: str) -> None:
    env = dict(os.environ, LABKIT_INVENTORY=str(nodes.inventory_path))
    proc = subprocess.Popen([*(LABKIT if prog == "labkit" else INVOKE), "run", "--",
                             "sleep 1000 & setsid sleep 1001 & sleep 1002"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        end = time.monotonic() + 15
        while len(running(nodes)) < 8:  # per node: sh + three sleeps
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < end, "remote commands never started"
            time.sleep(0.05)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    check_interrupted(proc, sig, err)
    assert wait_gone(lambda: running(nodes), 1.0) == [], "remote commands survived the signal"


def test_ignored_sighup_stays_ignored(nodes: SshNodeSet) -> None:
    """Under ``nohup`` SIGHUP is ignored on purpose: labkit does not take it back."""
    env = dict(os.environ, LABKIT_INVENTORY=str(nodes.inventory_path))
    proc = subprocess.Popen(["nohup", *LABKIT, "run", "-n", "node1", "--",
                             "while [ ! -e stop ]; do sleep 0.05; done; echo done"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 15
        while not killmarked.marked([nodes.nodes["node1"].marker]):
            assert time.monotonic() < end, "the remote command never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGHUP)
        (nodes.nodes["node1"].root / "stop").touch()
        out, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
        (nodes.nodes["node1"].root / "stop").unlink(missing_ok=True)
    assert proc.returncode == 0, err
    assert "node1| done" in out


# --- deploy and migrate-test on a whole lab of OpenSSH nodes ---------------------------------

BIG = 32 << 20


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Any:
    handle = start_fake_lab(tmp_path_factory.mktemp("sigfull"), count=2, sshd="openssh",
                            power_delay=(0.05, 0.2), boot_delay=0.2, power_on=True)
    yield handle
    handle.stop()


def env_for(lab: FakeLabHandle, **extra: str) -> dict[str, str]:
    return {**lab.env, "LABKIT_SSH_CONFIG": "/nonexistent",
            "XDG_CACHE_HOME": str(lab.state_dir / "cache"),
            "INVOKE_LABKIT_RESULTS_DIR": str(lab.state_dir / "results"),
            "INVOKE_LABKIT_POWER_WAIT": "30", "INVOKE_LABKIT_SSH_WAIT": "30", **extra}


def payloads(lab: FakeLabHandle, node: str) -> Path:
    return (lab.state_dir / "nodes" / node).resolve() / "labkit" / "payloads"


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGS, ids=lambda s: s.name)
def test_signal_during_deploy(lab: FakeLabHandle, sig: int) -> None:
    tag = f"sig{int(sig)}"
    root = lab.state_dir / "bundles" / tag
    root.mkdir(parents=True)
    (root / "tool.py").write_text(f"print({tag!r})\n")
    with open(root / "huge.bin", "wb") as f:
        f.truncate(BIG)
    inv = lab.state_dir / f"inventory-{tag}.yaml"
    inv.write_text(f"payloads: [{root}]\n" + lab.inventory_path.read_text())
    proc = subprocess.Popen([*LABKIT, "deploy", "--json"],
                            env=env_for(lab, LABKIT_INVENTORY=str(inv)), cwd=lab.state_dir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < end:  # a node is receiving the big file
        if any(p.stat().st_size > 0 for n in lab.nodes
               for p in (payloads(lab, n) / "releases").glob(".incoming-*/huge.bin")):
            break
        time.sleep(0.002)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    if not (proc.returncode == 0 and all(o["ok"] for o in json.loads(out))):
        check_interrupted(proc, sig, err)
    assert wait_gone(lab.processes, 5.0) == [], "deploy's node side survived the signal"
    for n in lab.nodes:  # a whole release or none: the next deploy repairs the rest
        cur = payloads(lab, n) / "current"
        if cur.is_symlink():
            assert (cur / "tool.py").exists()


@pytest.mark.slow
@pytest.mark.skipif(not X86_LINUX, reason="migrate-test payloads are x86_64 Linux only")
@pytest.mark.parametrize("sig", SIGS, ids=lambda s: s.name)
def test_signal_during_migrate_test(lab: FakeLabHandle, sig: int, tmp_path: Path) -> None:
    proc = subprocess.Popen([*LABKIT, "migrate-test", "--size", "32M", "--rate", "3000",
                             "--steps-per-round", "0", "--max-rounds", "6", "--json"],
                            env=env_for(lab), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 60
    while not any("workload.py" in p for p in lab.processes()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the workload never started"
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    check_interrupted(proc, sig, err)
    assert wait_gone(lab.processes, 5.0) == [], "migrate-test's processes survived the signal"
    events = [json.loads(line) for f in (lab.state_dir / "results").glob("*/events.jsonl")
              for line in f.read_text().splitlines()]
    assert any(e.get("event") == "interrupted" for e in events), events[-5:]
