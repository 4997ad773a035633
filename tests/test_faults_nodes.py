"""Node faults on the fake lab (real IPMI, real SSH, real processes): SSH refused while a node
boots, a node powered off in the middle of `run` and of `deploy` (its connection dropped
mid-transfer), a full disk during deploy, and a remote command that hangs past its timeout.

Every scenario that has a "when" draws it from a seed (the byte offset at which a transfer is
cut), so a failure can be replayed exactly.

Full disk: mounting a small tmpfs needs privileges CI may not have, so the disk is "filled"
with RLIMIT_FSIZE, lowered on the fake lab process with prlimit(2) (allowed for one's own
processes, no privileges). Every command the fake nodes start inherits it, so the node-side
deploy agent's writes fail past the limit (EFBIG instead of ENOSPC: the same OSError path in
the agent, the same "nothing switched" guarantee to check). The limit is lifted afterwards."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from labkit import ssh as labssh
from labkit.config import Settings
from labkit.pytest_plugin import FakeLabHandle, start_fake_lab

LABKIT = [sys.executable, "-m", "labkit.cli"]
_bin = Path(sys.executable).with_name("labkit")
if _bin.exists():
    LABKIT = [str(_bin)]
SEED = int(os.environ.get("LABKIT_FAULT_SEED", "20240605"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Any:
    handle = start_fake_lab(tmp_path_factory.mktemp("nodefaults"), count=3, seed=3,
                            power_delay=(0.05, 0.2), boot_delay=0.2)
    handle.power_on_all()
    yield handle
    handle.stop()


@pytest.fixture(autouse=True)
def _healthy(lab: FakeLabHandle) -> Any:
    """Each test starts (and leaves) every node on, up and fault-free."""
    lab.control.clear("*")
    lab.power_on_all()
    yield
    lab.control.clear("*")


def cli(lab: FakeLabHandle, *argv: str, inventory: Path | None = None,
        **kw: Any) -> subprocess.CompletedProcess:
    env = {**lab.env, "LABKIT_SSH_CONFIG": "/nonexistent", "INVOKE_LABKIT_SSH_TIMEOUT": "5",
           "XDG_CACHE_HOME": str(lab.state_dir / "cache")}
    if inventory:
        env["LABKIT_INVENTORY"] = str(inventory)
    return subprocess.run([*LABKIT, *argv], env=env, capture_output=True, text=True,
                          timeout=kw.pop("timeout", 120), cwd=lab.state_dir, **kw)


def popen(lab: FakeLabHandle, *argv: str, inventory: Path | None = None) -> subprocess.Popen:
    env = {**lab.env, "LABKIT_SSH_CONFIG": "/nonexistent", "INVOKE_LABKIT_SSH_TIMEOUT": "5",
           "XDG_CACHE_HOME": str(lab.state_dir / "cache")}
    if inventory:
        env["LABKIT_INVENTORY"] = str(inventory)
    return subprocess.Popen([*LABKIT, *argv], env=env, cwd=lab.state_dir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def node_root(lab: FakeLabHandle, node: str) -> Path:
    return (lab.state_dir / "nodes" / node).resolve()


def node_procs(lab: FakeLabHandle, node: str, needle: str = "") -> list[tuple[int, str]]:
    """Processes the fake node runs (by its LABKIT_NODE_ROOT marker) whose argv has needle."""
    marker = f"LABKIT_NODE_ROOT={node_root(lab, node)}".encode()
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if marker in env and needle in cmd:
            out.append((int(pid), cmd))
    return out


def payloads(lab: FakeLabHandle, node: str) -> Path:
    return node_root(lab, node) / "labkit" / "payloads"


def current(lab: FakeLabHandle, node: str) -> str | None:
    link = payloads(lab, node) / "current"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def incoming(lab: FakeLabHandle, node: str) -> list[Path]:
    return sorted((payloads(lab, node) / "releases").glob(".incoming-*"))


def bundle_inventory(lab: FakeLabHandle, name: str, files: dict[str, bytes | int]) -> Path:
    """A payload folder (int value = a sparse file of that size) and a copy of the lab's
    inventory shipping it; the copy lives in the state folder so its relative paths hold."""
    root = lab.state_dir / "bundles" / name
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        p = root / rel
        if isinstance(data, int):
            with open(p, "wb") as f:
                f.truncate(data)
        else:
            p.write_bytes(data)
    inv = lab.state_dir / f"inventory-{name}.yaml"
    inv.write_text(f"payloads: [{root}]\n" + lab.inventory_path.read_text())
    return inv


def by_node(stdout: str) -> dict[str, dict[str, Any]]:
    return {o["node"]: o for o in json.loads(stdout)}


# --- SSH refused while booting -------------------------------------------------------------

@pytest.mark.slow  # fault: waits out a slow boot
def test_wait_ssh_rides_out_a_booting_node_within_budget(lab: FakeLabHandle) -> None:
    node = lab.inventory().node("node3")
    settings = Settings(ssh_timeout=2, retry_max_delay=0.5)
    lab.control.power("node3", "off", now=True)
    lab.control.fault("node3", power_delay=[0.8, 1.2])
    lab.control.power("node3", "on")  # lands after 0.8-1.2 s, then boots: SSH refused till then
    assert lab.status("node3")["ssh"] is False
    retries: list[str] = []
    t0 = time.monotonic()
    labssh.wait_ssh(node, settings, t0 + 20,
                    on_retry=lambda n, e, d: retries.append(str(e)))
    took = time.monotonic() - t0
    assert retries and any("node3" in r for r in retries), retries
    assert 0.7 < took < 10, took
    with labssh.SshClient.connect(node, settings) as c:
        assert c.run("echo up").stdout == b"up\n"


@pytest.mark.slow  # fault: waits out its whole budget
def test_wait_ssh_gives_up_at_its_budget_naming_the_node(lab: FakeLabHandle) -> None:
    node = lab.inventory().node("node3")
    lab.control.power("node3", "off", now=True)
    lab.control.fault("node3", hang=True)
    lab.control.power("node3", "on")  # accepted, never lands
    t0 = time.monotonic()
    with pytest.raises(labssh.SshUnreachable) as e:
        labssh.wait_ssh(node, Settings(ssh_timeout=1), t0 + 2.0)
    took = time.monotonic() - t0
    assert 1.9 < took < 4.0, took
    msg = str(e.value)
    assert msg.startswith("node3: SSH did not come up within") and "\n" not in msg


def test_power_on_wait_ssh_through_the_cli_with_slow_boot(lab: FakeLabHandle) -> None:
    lab.control.power("node2", "off", now=True)
    lab.control.fault("node2", power_delay=[0.5, 1.0])
    r = cli(lab, "power-on", "-n", "node2", "--wait=ssh", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert by_node(r.stdout)["node2"]["power"] == "on"
    assert lab.status("node2")["ssh"] is True


# --- a node that powers off in the middle of `run` -----------------------------------------

@pytest.mark.slow  # fault: power-off mid run
def test_node_powered_off_mid_run_fails_alone(lab: FakeLabHandle) -> None:
    p = popen(lab, "run", "--json", "--",
              "touch started-$LABKIT_NODE; sleep 2; echo done on $LABKIT_NODE")
    flag = node_root(lab, "node2") / "started-node2"
    end = time.monotonic() + 30
    while not flag.exists():
        assert p.poll() is None and time.monotonic() < end, p.communicate()
        time.sleep(0.01)
    lab.control.power("node2", "off", now=True)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1, out + err
    res = by_node(out)
    for n in ("node1", "node3"):
        assert res[n]["ok"] and res[n]["stdout"] == f"done on {n}\n", res[n]
    bad = res["node2"]
    assert not bad["ok"] and "connection lost" in bad["error"], bad
    assert "\n" not in bad["error"] and "Traceback" not in err
    assert node_procs(lab, "node2") == []


# --- connection dropped mid-transfer during deploy ------------------------------------------

BASE = {"tool.py": b"print('v1')\n", "lib.py": b"X = 1\n"}


@pytest.mark.slow  # fault seed: the cut point
def test_connection_dropped_mid_deploy_keeps_previous_release(lab: FakeLabHandle) -> None:
    rng = random.Random(SEED)
    cut_at = rng.randint(1, 16) << 20  # bytes of the big file node2 holds when its link drops
    v1 = bundle_inventory(lab, "drop-v1", BASE)
    r = cli(lab, "deploy", "--json", inventory=v1)
    assert r.returncode == 0, r.stdout + r.stderr
    r1 = {n: current(lab, n) for n in lab.nodes}
    v2 = bundle_inventory(lab, "drop-v2", {**BASE, "tool.py": b"print('v2')\n",
                                           "huge.bin": 48 << 20})
    p = popen(lab, "deploy", "--json", inventory=v2)
    end = time.monotonic() + 60
    while True:
        inc = incoming(lab, "node2")
        big = inc[0] / "huge.bin" if inc else None
        if big is not None and big.exists() and big.stat().st_size >= cut_at:
            break
        assert p.poll() is None, f"deploy ended before the cut (seed {SEED}): {p.communicate()}"
        assert time.monotonic() < end, "node2 never received enough"
        time.sleep(0.002)
    for pid, _ in node_procs(lab, "node2", "stage"):  # freeze the receiver at the cut point
        os.kill(pid, signal.SIGSTOP)
    lab.control.power("node2", "off", now=True)     # the link drops, the node's processes die
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1, out + err
    res = by_node(out)
    for n in ("node1", "node3"):
        assert res[n]["ok"] and current(lab, n) != r1[n], res[n]
        assert (payloads(lab, n) / "current" / "tool.py").read_bytes() == b"print('v2')\n"
    bad = res["node2"]
    assert not bad["ok"] and bad["error"] and "\n" not in bad["error"], bad
    # node2 still runs the complete previous release; the half upload is set aside
    assert current(lab, "node2") == r1["node2"]
    assert (payloads(lab, "node2") / "current" / "tool.py").read_bytes() == b"print('v1')\n"
    assert not (payloads(lab, "node2") / "current" / "huge.bin").exists()
    left = [x.name for x in incoming(lab, "node2")]
    # back on: the next deploy removes the half release and says so
    lab.power_on_all()
    r = cli(lab, "deploy", "--json", inventory=v2)
    assert r.returncode == 0, r.stdout + r.stderr
    again = by_node(r.stdout)
    assert again["node2"]["state"].startswith("deployed")
    for name in left:
        assert name in again["node2"]["state"], again["node2"]
    assert incoming(lab, "node2") == []
    assert (payloads(lab, "node2") / "current" / "huge.bin").stat().st_size == 48 << 20
    # last, as it is wording: the first error said what happened (today: "stage failed (exit
    # None): " -- labkit/deploy.py _decode does not recognise a dropped connection)
    assert "connection" in bad["error"], bad


# --- a full disk during deploy --------------------------------------------------------------

@pytest.mark.slow  # fault: a node's disk fills mid-deploy
def test_full_disk_fails_deploy_clearly_and_switches_nothing(lab: FakeLabHandle) -> None:
    v1 = bundle_inventory(lab, "disk-v1", BASE)
    r = cli(lab, "deploy", "--json", inventory=v1)
    assert r.returncode == 0, r.stdout + r.stderr
    before = {n: current(lab, n) for n in lab.nodes}
    prev = {n: os.readlink(payloads(lab, n) / "previous")
            if (payloads(lab, n) / "previous").is_symlink() else None for n in lab.nodes}
    v2 = bundle_inventory(lab, "disk-v2", {**BASE, "tool.py": b"print('v2')\n",
                                           "data.bin": 24 << 20})
    old = resource.prlimit(lab.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(lab.pid, resource.RLIMIT_FSIZE, (16 << 20, old[1]))
    try:
        r = cli(lab, "deploy", "--json", inventory=v2)
    finally:
        resource.prlimit(lab.pid, resource.RLIMIT_FSIZE, old)
    assert r.returncode == 1, r.stdout + r.stderr
    res = by_node(r.stdout)
    for n in lab.nodes:
        assert not res[n]["ok"], res[n]
        err = res[n]["error"]
        assert "File too large" in err and "\n" not in err, err
        # nothing half-switched: same current, same previous, no half release left behind
        assert current(lab, n) == before[n]
        link = payloads(lab, n) / "previous"
        assert (os.readlink(link) if link.is_symlink() else None) == prev[n]
        assert (payloads(lab, n) / "current" / "tool.py").read_bytes() == b"print('v1')\n"
        assert incoming(lab, n) == []
    assert "Traceback" not in r.stderr
    r = cli(lab, "deploy", "--json", inventory=v2)  # space is back: the same deploy works
    assert r.returncode == 0, r.stdout + r.stderr


# --- a remote command that hangs past its timeout -------------------------------------------

def test_hung_command_is_killed_at_its_timeout(lab: FakeLabHandle) -> None:
    hang = ('if [ "$LABKIT_NODE" = node1 ]; then setsid sh -c "sleep 301" & '
            '(sleep 302 &); sleep 300; fi; echo ok')
    t0 = time.monotonic()
    r = cli(lab, "run", "--timeout", "1", "--json", "--", hang)
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    res = by_node(r.stdout)
    assert res["node1"]["timed_out"] and not res["node1"]["ok"]
    assert "timed out" in res["node1"]["error"]
    assert res["node2"]["ok"] and res["node3"]["ok"] and res["node2"]["stdout"] == "ok\n"
    assert took < 15
    # killed on the node: the shell, its child, the setsid'd and the double-forked one
    assert node_procs(lab, "node1", "sleep 30") == []
