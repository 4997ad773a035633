"""A migrate-test run whose peer dies (source agent, restore agent, workload) fails AT ONCE, not
when the wait's budget (tens of seconds) runs out, and says why: the peer's own last stderr
lines are in the message, in run.json's ``error`` object and in events.jsonl. Real processes on
the fake lab, made to die for real reasons: a tracker this kernel lacks, a SIGKILL, a node whose
address-space limit cannot hold the region."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from labkit.config import Settings
from labkit.experiment import MigrationFailed, build_config, run_migrate_test
from labkit.pytest_plugin import FakeLabHandle, start_fake_lab

pytestmark = pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                                reason="x86_64 Linux only")

# A dead peer must be reported within this many seconds (the budget of one wait is 34 s or
# more: 3 x ssh_timeout + size at 4 MiB/s). Generous for a loaded 2-core machine.
FAST = 5.0


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    handle = start_fake_lab(tmp_path_factory.mktemp("peerslab"), count=2, power_on=True)
    yield handle
    handle.stop()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(results_dir=str(tmp_path / "results"), power_wait=30, ssh_wait=30)


def cfg(**kw: Any):
    base = {"src": "node1", "dst": "node2", "size": "16M", "rate": 4000}
    return build_config(**{**base, **kw})


def node_processes(lab: FakeLabHandle, node: str, needle: str) -> list[int]:
    """Pids of the node's processes (by its env marker) whose command line holds ``needle``
    ("agent.py source") as arguments of their own: the payload itself, not the shell that is
    about to exec it (stopping that one would stop the payload from ever starting)."""
    root = f"LABKIT_NODE_ROOT={(lab.state_dir / 'nodes' / node).resolve()}".encode()
    want = needle.split()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if root in env and any(argv[i:i + len(want)] == want for i in range(len(argv))):
            found.append(int(pid))
    return found


def leftovers(lab: FakeLabHandle) -> list[str]:
    """The payload processes (or shells about to run one) still alive on the lab's nodes."""
    roots = [f"LABKIT_NODE_ROOT={(lab.state_dir / 'nodes' / n).resolve()}".encode()
             for n in lab.nodes]
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(r in env for r in roots) and ("workload.py" in cmd or "agent.py" in cmd):
            found.append(f"{pid}: {cmd}")
    return found


def events(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (folder / "events.jsonl").read_text().splitlines()]


def check_reported(e: MigrationFailed, *, node: str, peer: str, needle: str,
                   step: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The failure names node, peer and the peer's reason in its one line, in run.json's
    ``error`` object and in events.jsonl's ``failed`` event; returns (error, events)."""
    msg = str(e)
    assert "\n" not in msg, msg
    assert f"{node}: {peer}" in msg and needle in msg and step in msg, msg
    folder = Path(e.value["folder"])
    run = json.loads((folder / "run.json").read_text())
    assert run["result"]["ok"] is False and run["result"]["error"] == msg
    err = run["error"]
    assert err["message"] == msg and err["node"] == node and err["peer"] == peer, err
    assert step in err["step"], err
    if needle:  # the peer's reason is its own: in its stderr
        assert any(needle in line for line in err["stderr"]), err
    assert run["result"]["failure"] == err
    evs = events(folder)
    (failed,) = [ev for ev in evs if ev["event"] == "failed"]
    assert failed["error"] == msg and failed["node"] == node and failed["peer"] == peer
    assert failed["stderr"] == err["stderr"]
    return err, evs


def started_at(evs: list[dict[str, Any]], what: str) -> float:
    return next(ev["t"] for ev in evs if ev["event"] == "start" and ev["what"] == what)


def failed_at(evs: list[dict[str, Any]]) -> float:
    return next(ev["t"] for ev in evs if ev["event"] == "failed")


def softdirty_missing() -> str:
    """Why soft-dirty cannot work on this kernel ('' if it can: the test is then skipped)."""
    from labkit.payloads import tracker

    ok, reason = tracker.softdirty_kernel_ok()
    return "" if ok else reason


# --- the source agent dies before it streams -----------------------------------------------------
def test_source_agent_without_its_tracker_fails_the_run_at_once(lab, settings):
    """The issue's example: --tracker softdirty on a kernel without soft-dirty. The source agent
    exits at start; the run used to wait out its whole budget for the restore agent's hello
    (which never comes: nothing was streamed) and report a bare timeout."""
    if not softdirty_missing():
        pytest.skip("this kernel has soft-dirty: the source agent would not die")
    with pytest.raises(MigrationFailed) as e:
        run_migrate_test(lab.inventory(), settings, cfg(tracker="softdirty"))
    err, evs = check_reported(e.value, node="node1", peer="source agent", needle="soft-dirty",
                              step="hello")
    assert failed_at(evs) - started_at(evs, "source agent") < FAST, evs
    assert err["exit_status"] == 1
    (gone,) = [ev for ev in evs if ev["event"] == "peer-exit"]
    assert gone["node"] == "node1" and gone["peer"] == "source agent"
    assert any("soft-dirty" in line for line in gone["stderr"])
    assert "cleanup" in {ev["event"] for ev in evs}
    assert leftovers(lab) == []


# --- a peer killed while the run waits on something else -----------------------------------------
def _run_in_thread(lab, settings, config) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def go() -> None:
        try:
            out["result"] = run_migrate_test(lab.inventory(), settings, config)
        except MigrationFailed as e:
            out["error"] = e
        finally:
            out["done"] = time.monotonic()

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out


def _first(lab, node: str, needle: str, timeout: float = 60) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        pids = node_processes(lab, node, needle)
        if pids:
            return pids[0]
        time.sleep(0.01)
    raise AssertionError(f"{needle} never started on {node}")


@pytest.mark.parametrize("victim, node, peer", [
    ("agent.py source", "node1", "source agent"),
    ("workload.py run", "node1", "workload"),
    ("agent.py restore", "node2", "restore agent"),
])
def test_a_killed_peer_fails_the_wait_at_once(lab, settings, victim, node, peer):
    """The source agent is stopped (SIGSTOP) as soon as it runs, so the run is held in a wait
    that only a live agent could end; then one peer is killed. Whatever the run was waiting
    for, and whichever peer died, the wait fails within seconds naming the dead peer and how it
    ended (SIGKILL: status 137). Before, a dead workload was not watched at all, and a dead
    source agent while the run waited for the destination counted as an orderly end."""
    thread, out = _run_in_thread(lab, settings, cfg(size="32M"))
    agent = _first(lab, "node1", "agent.py source")
    os.kill(agent, signal.SIGSTOP)
    target = agent if victim == "agent.py source" else _first(lab, node, victim)
    time.sleep(0.3)  # the run is now blocked in a wait the stopped agent cannot end
    assert "done" not in out, "the run ended although its source agent is stopped"
    t_kill = time.monotonic()
    os.kill(target, signal.SIGKILL)
    thread.join(60)
    assert "error" in out, out
    assert out["done"] - t_kill < FAST, f"the failure took {out['done'] - t_kill:.1f}s"
    err, evs = check_reported(out["error"], node=node, peer=peer, needle="", step="")
    assert err["exit_status"] == 128 + signal.SIGKILL, err
    assert "SIGKILL" in str(out["error"])
    assert leftovers(lab) == []


# --- the destination cannot map the region -------------------------------------------------------
def test_destination_that_cannot_map_the_region_fails_at_once(lab, settings):
    """node2 allows a process less address space (RLIMIT_AS, as ``ulimit -v`` would) than the
    region needs: the restore agent's mmap fails, and the run says so at once, with the
    agent's reason, though the source keeps streaming into the dead channel."""
    from labkit.ssh import SshClient

    node2 = lab.inventory().node("node2")
    with SshClient.connect(node2, settings) as c:
        site = c.check("python3 -c 'import site; print(site.getusersitepackages())'",
                       timeout=30).stdout.decode().strip()
    hook = Path(site) / "usercustomize.py"
    assert str(hook).startswith(str(lab.state_dir)), hook  # the node's own HOME
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(  # this node's python3 processes get 64 MiB above what they start with
        "import resource\n"
        "vm = [int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmSize')]\n"
        "lim = vm[0] * 1024 + (64 << 20)\n"
        "resource.setrlimit(resource.RLIMIT_AS, (lim, lim))\n")
    try:
        with pytest.raises(MigrationFailed) as e:
            run_migrate_test(lab.inventory(), settings, cfg(size="128M"))
    finally:
        hook.unlink()
    err, evs = check_reported(e.value, node="node2", peer="restore agent",
                              needle="Cannot allocate memory", step="hello")
    assert failed_at(evs) - started_at(evs, "restore agent") < FAST, evs
    assert leftovers(lab) == []


# --- the workload cannot start -------------------------------------------------------------------
def test_workload_that_cannot_start_fails_at_once(lab, settings):
    """A region larger than the node's memory and swap: the workload's mmap is refused; the
    wait for its ready line fails at once with its reason."""
    with pytest.raises(MigrationFailed) as e:
        run_migrate_test(lab.inventory(), settings, cfg(size="64T"))
    err, evs = check_reported(e.value, node="node1", peer="workload",
                              needle="Cannot allocate memory", step="ready")
    assert failed_at(evs) - started_at(evs, "workload") < FAST, evs
    assert leftovers(lab) == []


# --- through the program: --json still prints, exit 1; --matrix records the reason --------------
def _cli(lab, tmp_path: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "labkit.cli", "migrate-test", "--inventory",
         str(lab.inventory_path), "--src", "node1", "--dst", "node2", "--size", "16M",
         "--no-stop-and-copy", *args],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "INVOKE_LABKIT_RESULTS_DIR": str(tmp_path / "results")})


def test_cli_json_prints_the_failure_and_exits_1(lab, tmp_path):
    if not softdirty_missing():
        pytest.skip("this kernel has soft-dirty: the source agent would not die")
    t0 = time.monotonic()
    r = _cli(lab, tmp_path, "--tracker", "softdirty", "--json")
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is False and "soft-dirty" in out["error"]
    assert out["failure"]["node"] == "node1" and out["failure"]["peer"] == "source agent"
    assert any("soft-dirty" in line for line in out["failure"]["stderr"])
    assert Path(out["folder"], "run.json").exists()
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: node1: source agent") and (
        "soft-dirty" in err[0]), r.stderr
    assert took < 60, f"{took:.0f}s"  # the budget of one wait is 34 s
    assert leftovers(lab) == []


@pytest.mark.slow  # a two-cell matrix, one cell a full migration
def test_matrix_cell_with_a_dead_peer_records_why_and_the_matrix_goes_on(lab, tmp_path):
    import csv

    if not softdirty_missing():
        pytest.skip("this kernel has soft-dirty: the source agent would not die")
    r = _cli(lab, tmp_path, "--matrix", "tracker=softdirty,auto", "--json", timeout=240)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert any("[1/2] tracker=softdirty: FAILED: node1: source agent" in ln and
               "soft-dirty" in ln for ln in lines), r.stdout
    assert any(ln.startswith("[2/2] tracker=auto: downtime") for ln in lines), r.stdout
    start = lines.index("[")
    end = next(i for i, ln in enumerate(lines) if ln.startswith("matrix results: "))
    rows = json.loads("\n".join(lines[start:end]))
    assert rows[0]["ok"] is False and "node1: source agent" in rows[0]["error"]
    assert "soft-dirty" in rows[0]["error"]
    assert rows[1]["ok"] is True
    folder = Path(lines[end].split(": ", 1)[1])
    with open(folder / "summary.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert "soft-dirty" in csv_rows[0]["error"] and csv_rows[1]["ok"] == "True"
    cell = json.loads((folder / csv_rows[0]["folder"] / "run.json").read_text())
    assert cell["error"]["peer"] == "source agent"
    assert any("soft-dirty" in line for line in cell["error"]["stderr"])
    assert leftovers(lab) == []


# --- the channel baseline: the same relay path, the same rule --------------------------------------
def test_channel_rate_fails_at_once_when_the_sink_dies(lab, settings):
    """measure_channel_rate relays src -> dst like a migration. A sink killed mid-stream fails
    it at once naming the node and how the sink ended (it used to surface as a bare OSError
    from paramiko, or, dying at the end, as a measurement of bytes that never arrived)."""
    from labkit.errors import LabkitError
    from labkit.experiment import measure_channel_rate

    inv = lab.inventory()
    assert measure_channel_rate(inv, settings, "node1", "node2", 8 << 20) > 0
    out: dict[str, Any] = {}

    def go() -> None:
        try:
            out["rate"] = measure_channel_rate(inv, settings, "node1", "node2", 64 << 30)
        except LabkitError as e:
            out["error"] = e
        out["done"] = time.monotonic()

    t = threading.Thread(target=go, daemon=True)
    t.start()
    sink = _first(lab, "node2", "cat")
    t_kill = time.monotonic()
    os.kill(sink, signal.SIGKILL)
    t.join(60)
    assert "error" in out, out
    assert out["done"] - t_kill < FAST
    msg = str(out["error"])
    assert msg.startswith("node2: channel sink ") and "while we waited for the channel" in msg
    assert [p for p in node_processes(lab, "node1", "head") + node_processes(lab, "node2", "cat")
            if Path(f"/proc/{p}").exists()] == []
