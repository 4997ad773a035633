"""Bad task arguments through the real ``labkit`` program, table-driven.

Every case must: exit 2, print exactly one line on stderr (``error: ...``) that names the bad
thing, print no traceback, and start NOTHING — checked against a running fake lab (node1 on with
SSH up, node2 off): no IPMI packet reached any BMC, no power/boot-device change, no file appeared
on any node's disk, no node process, no results folder, no lease.

Inventory-file errors are covered by tests/test_inventory.py; this is about task arguments.
The cases run concurrently (each in its own working folder, results and lease folder) to keep
the module fast; the lab-wide "nothing started" check then runs once, and only if it fails are
the cases replayed one by one to name the culprit."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from labkit.pytest_plugin import FakeLabHandle, start_fake_lab

LABKIT = [sys.executable, "-m", "labkit.cli"]
_bin = Path(sys.executable).with_name("labkit")
if _bin.exists():
    LABKIT = [str(_bin)]

# (id, argv after `labkit`, words the one stderr line must contain)
CASES: list[tuple[str, list[str], list[str]]] = [
    # selectors
    ("unknown-node", ["power-on", "-n", "nosuch"], ["nosuch"]),
    ("unknown-group", ["power-on", "-n", "@nogroup"], ["@nogroup"]),
    ("bare-at", ["power-cycle", "-n", "@"], ["'@'"]),
    ("empty-item", ["power-on", "-n", "node1,,node2"], ["empty item"]),
    ("trailing-comma", ["power-off", "-n", "node1,"], ["empty item"]),
    ("glob-matches-nothing", ["power-on", "-n", "zz*"], ["zz*", "matches no node"]),
    ("run-unknown-node", ["run", "-n", "nosuch", "--", "touch", "STARTED"], ["nosuch"]),
    ("deploy-unknown-group", ["deploy", "-n", "@nogroup"], ["@nogroup"]),
    ("release-unknown-node", ["release", "-n", "nosuch"], ["nosuch"]),
    ("fault-unknown-node", ["lab.fault", "-n", "nosuch", "--drop", "0.1"], ["nosuch"]),
    ("console-unknown-node", ["console", "nosuch", "--capture", "1"], ["nosuch"]),
    # power / boot device
    ("bad-wait", ["power-on", "--wait=bogus"], ["--wait", "bogus"]),
    ("empty-wait", ["power-on", "--wait="], ["--wait"]),
    ("cycle-bad-wait", ["power-cycle", "--wait=bogus"], ["--wait", "bogus"]),
    ("unknown-boot-device", ["boot-device", "floppy"], ["floppy"]),
    ("missing-boot-device", ["boot-device"], ["device"]),
    ("unknown-flag", ["power-on", "--bogus-flag"], ["--bogus-flag"]),
    # leases
    ("bad-duration", ["reserve", "-n", "node1", "--for", "2x"], ["2x"]),
    ("negative-duration", ["reserve", "-n", "node1", "--for", "-1h"], ["-1h"]),
    ("zero-duration", ["reserve", "-n", "node1", "--for", "0s"], ["0s"]),
    ("missing-duration", ["reserve", "-n", "node1"], ["--for"]),
    # run
    ("timeout-not-a-number", ["run", "--timeout", "abc", "--", "touch", "STARTED"],
     ["--timeout", "abc"]),
    ("timeout-negative", ["run", "--timeout", "-5", "--", "touch", "STARTED"],
     ["--timeout", "-5"]),
    ("timeout-zero", ["run", "--timeout", "0", "--", "touch", "STARTED"], ["--timeout", "0"]),
    ("run-no-command", ["run", "-n", "node1"], ["nothing to run"]),
    # migrate-test
    ("size-12Q", ["migrate-test", "--size", "12Q"], ["--size", "12Q"]),
    ("size-zero", ["migrate-test", "--size", "0"], ["--size"]),
    ("rate-negative", ["migrate-test", "--rate", "-5"], ["--rate", "-5"]),
    ("rate-not-a-number", ["migrate-test", "--rate", "abc"], ["--rate", "abc"]),
    ("src-equals-dst", ["migrate-test", "--src", "node1", "--dst", "node1"],
     ["--src", "--dst", "node1"]),
    ("unknown-tracker", ["migrate-test", "--tracker", "nope"], ["--tracker", "nope"]),
    ("unknown-dst", ["migrate-test", "--dst", "node9"], ["node9"]),
    ("unknown-pattern", ["migrate-test", "--pattern", "zigzag"], ["--pattern", "zigzag"]),
    ("hot-fraction-above-1", ["migrate-test", "--hot-fraction", "2"], ["--hot-fraction"]),
    ("max-rounds-negative", ["migrate-test", "--max-rounds", "-1"], ["--max-rounds"]),
    ("verify-resume-negative", ["migrate-test", "--verify-resume", "-3"], ["--verify-resume"]),
    ("matrix-bad-size", ["migrate-test", "--matrix", "size=64M,12Q"], ["12Q"]),
    ("matrix-unknown-key", ["migrate-test", "--matrix", "color=red"], ["color"]),
    ("matrix-no-equals", ["migrate-test", "--matrix", "garbage"], ["garbage"]),
    ("matrix-negative-rate", ["migrate-test", "--matrix", "rate=-1"], ["--rate", "-1"]),
    # console
    ("capture-negative", ["console", "node1", "--capture", "-1"], ["--capture", "-1"]),
    ("capture-not-a-number", ["console", "node1", "--capture", "abc"], ["abc"]),
    # dirty-rate
    ("dirty-rate-no-pid", ["dirty-rate", "-n", "node1"], ["--pid"]),
    ("dirty-rate-negative-seconds", ["dirty-rate", "-n", "node1", "--pid", "1",
                                     "--seconds", "-2"], ["--seconds", "-2"]),
    ("dirty-rate-unknown-tracker", ["dirty-rate", "-n", "node1", "--pid", "1",
                                    "--tracker", "nope"], ["--tracker", "nope"]),
    # files and flags
    ("inventory-missing", ["power-on", "--inventory", "/nonexistent/inventory.yaml"],
     ["/nonexistent/inventory.yaml"]),
    ("inventory-is-a-folder", ["power-on", "--inventory", "/"], ["inventory"]),
    ("sync-repo-missing", ["sync", "--dry-run", "--repo", "/nonexistent/repo"],
     ["/nonexistent/repo"]),
    ("sync-rebase-and-merge", ["sync", "--rebase", "--merge"], ["--rebase", "--merge"]),
    ("sync-no-fetch-without-dry-run", ["sync", "--no-fetch"], ["--no-fetch"]),
    ("deploy-check-and-rollback", ["deploy", "--check", "--rollback"],
     ["--check", "--rollback"]),
    ("fault-drop-above-1", ["lab.fault", "--drop", "2"], ["--drop"]),
    ("fault-power-delay-reversed", ["lab.fault", "--power-delay", "3,1"], ["--power-delay"]),
    ("fault-nothing", ["lab.fault"], ["nothing to do"]),
]
IDS = [c[0] for c in CASES]
assert len(set(IDS)) == len(IDS) and len(CASES) >= 30


# --- the lab and what "nothing started" means --------------------------------------------

@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Any:
    handle = start_fake_lab(tmp_path_factory.mktemp("badinput"), count=2, seed=5)
    handle.control.power("node1", "on", now=True)
    handle.control.wait("node1", timeout=30, phase="up")
    yield handle
    handle.stop()


def lab_snapshot(lab: FakeLabHandle) -> dict[str, Any]:
    """Everything a started action would change: BMC traffic and state, node disks, node
    processes."""
    st = lab.control.status()
    bmcs = {n: {k: s.get(k) for k in ("power", "pending", "bootdev", "persistent", "sessions")}
            | {"rx": s["stats"]["rx"]} for n, s in st.items()}
    disks = sorted(str(p.relative_to(lab.state_dir / "nodes"))
                   for p in (lab.state_dir / "nodes").rglob("*"))
    return {"bmcs": bmcs, "disks": disks, "procs": node_processes(lab)}


def node_processes(lab: FakeLabHandle) -> list[str]:
    return lab.processes()


def run_case(lab: FakeLabHandle, case_dir: Path, argv: list[str]) -> dict[str, Any]:
    case_dir.mkdir(parents=True, exist_ok=True)
    env = {**lab.env, "INVOKE_LABKIT_LEASE_DIR": str(case_dir / "leases"),
           "INVOKE_LABKIT_RESULTS_DIR": str(case_dir / "results"),
           "LABKIT_SSH_CONFIG": str(case_dir / "no-ssh-config")}
    r = subprocess.run([*LABKIT, *argv], cwd=case_dir, env=env, capture_output=True,
                       text=True, timeout=90)
    return {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr, "dir": case_dir}


@pytest.fixture(scope="module")
def outcomes(lab: FakeLabHandle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("badinput-cases")
    before = lab_snapshot(lab)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {cid: pool.submit(run_case, lab, base / cid, argv) for cid, argv, _ in CASES}
        results = {cid: f.result() for cid, f in futures.items()}
    return {"before": before, "after": lab_snapshot(lab), "cases": results, "base": base}


# --- the table ---------------------------------------------------------------------------

@pytest.mark.parametrize("cid, argv, words", CASES, ids=IDS)
def test_bad_argument_is_one_line_exit_2(outcomes: dict[str, Any], cid: str, argv: list[str],
                                         words: list[str]) -> None:
    r = outcomes["cases"][cid]
    where = f"labkit {' '.join(argv)}\nrc={r['rc']}\nstdout={r['stdout']!r}\nstderr={r['stderr']!r}"
    assert "Traceback" not in r["stderr"] + r["stdout"], where
    assert r["rc"] == 2, where
    lines = r["stderr"].strip().splitlines()
    assert len(lines) == 1, where
    assert lines[0].startswith("error: "), where
    for w in words:
        assert w in lines[0], f"{w!r} not named in the error\n{where}"
    # nothing started on the controller side either
    assert not (r["dir"] / "results").exists(), where
    assert not (r["dir"] / "leases").exists() or not any((r["dir"] / "leases").iterdir()), where


def test_nothing_started_on_the_lab(lab: FakeLabHandle, outcomes: dict[str, Any],
                                    tmp_path: Path) -> None:
    before, after = outcomes["before"], outcomes["after"]
    if before == after:
        return
    # name the culprit(s): put the lab back, replay every case alone, diff around each
    culprits = []
    for cid, argv, _ in CASES:
        lab.control.power("node2", "off", now=True)
        lab.control.power("node1", "on", now=True)
        lab.control.wait("node1", timeout=30, phase="up")
        pre = lab_snapshot(lab)
        run_case(lab, tmp_path / cid, argv)
        post = lab_snapshot(lab)
        if pre != post:
            culprits.append(f"{cid}: labkit {' '.join(argv)}: {_diff(pre, post)}")
    pytest.fail("a bad-argument run touched the lab:\n" + "\n".join(culprits or [
        f"(not reproducible alone) {_diff(before, after)}"]))


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    out = []
    for n in a["bmcs"]:
        for k, v in a["bmcs"][n].items():
            if b["bmcs"][n][k] != v:
                out.append(f"{n}.{k} {v} -> {b['bmcs'][n][k]}")
    new = sorted(set(b["disks"]) - set(a["disks"]))
    if new:
        out.append(f"new files on nodes: {new[:5]}")
    if b["procs"] != a["procs"]:
        out.append(f"node processes: {b['procs'][:3]}")
    return "; ".join(out)
