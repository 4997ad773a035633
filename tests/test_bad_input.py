"""Bad task arguments through the real ``labkit`` AND ``invoke`` programs, table-driven.

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
ROOT = Path(__file__).resolve().parents[1]
INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]
PROGRAMS = {"labkit": LABKIT, "invoke": INVOKE}

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
    ("matrix-negative-rate", ["migrate-test", "--matrix", "rate=-1"],
     ["--matrix rate=-1"]),
    # migrate-test: backends
    ("unknown-backend", ["migrate-test", "--backend", "podman"], ["--backend", "podman"]),
    ("matrix-unknown-backend", ["migrate-test", "--matrix", "backend=labkit,dmtcp"],
     ["--matrix backend=dmtcp"]),
    ("command-needs-criu", ["migrate-test", "--command", "sleep 100"], ["--command", "criu"]),
    ("pid-needs-criu", ["migrate-test", "--pid", "4242"], ["--pid", "criu"]),
    ("criu-pid-fraction", ["migrate-test", "--backend", "criu", "--pid", "42.5"], ["--pid", "42.5"]),
    ("pid-one", ["migrate-test", "--backend", "criu", "--pid", "1"], ["--pid"]),
    ("command-and-pid", ["migrate-test", "--backend", "criu", "--pid", "42", "--command",
                         "x"], ["--command", "--pid"]),
    ("command-blank", ["migrate-test", "--backend", "criu", "--command", "  "], ["--command"]),
    ("criu-with-tracker", ["migrate-test", "--backend", "criu", "--tracker", "uffd"],
     ["--tracker", "criu"]),
    ("criu-stepped", ["migrate-test", "--backend", "criu", "--steps-per-round", "5"],
     ["--steps-per-round", "criu"]),
    # migrate-test --tcp
    ("tcp-of-command", ["migrate-test", "--backend", "criu", "--tcp", "--command", "sleep 9"],
     ["--tcp", "built-in workload"]),
    ("tcp-verify-resume", ["migrate-test", "--tcp", "--verify-resume", "5"],
     ["--tcp", "--verify-resume"]),
    ("tcp-freeze-bogus", ["migrate-test", "--tcp", "--tcp-freeze", "queue"],
     ["--tcp-freeze", "queue"]),
    ("tcp-hold-criu", ["migrate-test", "--backend", "criu", "--tcp", "--tcp-freeze", "hold"],
     ["--tcp-freeze hold", "CRIU"]),
    ("tcp-port-range", ["migrate-test", "--tcp", "--tcp-port", "70000"], ["--tcp-port", "70000"]),
    ("tcp-address-bad", ["migrate-test", "--tcp", "--tcp-address", "10.77.0"],
     ["--tcp-address", "10.77.0"]),
    ("tcp-address-multicast", ["migrate-test", "--tcp", "--tcp-address", "230.0.77.1"],
     ["--tcp-address", "230.0.77.1"]),
    ("tcp-process-nodes", ["migrate-test", "--tcp"], ["--tcp", "process-kind"]),
    ("tcp-stepped", ["migrate-test", "--tcp", "--steps-per-round", "5"],
     ["--tcp", "--steps-per-round"]),
    ("criu-verify-resume-of-pid", ["migrate-test", "--backend", "criu", "--pid", "42",
                                   "--verify-resume", "5"], ["--verify-resume"]),
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
    # issue 9: a selector that selects nothing by accident is not "all nodes"
    ("empty-selector", ["power-on", "-n", ""], ["empty node selector"]),
    ("blank-selector", ["power-off", "-n", "  "], ["empty node selector"]),
    ("comma-selector", ["power-cycle", "-n", ","], ["empty node selector"]),
    ("commas-blank-selector", ["power-on", "--nodes", ",  ,"], ["empty node selector"]),
    ("status-empty-selector", ["power-status", "-n", ""], ["empty node selector"]),
    ("boot-device-empty-selector", ["boot-device", "-n", "", "pxe"], ["empty node selector"]),
    ("run-empty-selector", ["run", "-n", "", "--", "touch", "STARTED"], ["empty node selector"]),
    ("deploy-empty-selector", ["deploy", "-n", " , "], ["empty node selector"]),
    ("reserve-empty-selector", ["reserve", "-n", "", "--for", "1h"], ["empty node selector"]),
    ("release-empty-selector", ["release", "-n", ","], ["empty node selector"]),
    ("dirty-rate-empty-selector", ["dirty-rate", "-n", "", "--pid", "1"],
     ["empty node selector"]),
    ("sync-empty-nodes", ["sync", "--dry-run", "--nodes", ""], ["empty node selector"]),
    ("fault-empty-selector", ["lab.fault", "-n", "", "--busy", "3"], ["empty node selector"]),
    ("migrate-empty-src", ["migrate-test", "--src", ""], ["--src"]),
    # issue 9: numbers in every numeric flag
    ("pid-not-a-number", ["dirty-rate", "-n", "node1", "--pid", "abc"], ["--pid", "abc"]),
    ("pid-fraction", ["dirty-rate", "-n", "node1", "--pid", "1.5"], ["--pid", "1.5"]),
    ("pid-hex", ["dirty-rate", "-n", "node1", "--pid", "0x10"], ["--pid", "0x10"]),
    ("pid-nan", ["dirty-rate", "-n", "node1", "--pid", "nan"], ["--pid", "nan"]),
    ("pid-negative", ["dirty-rate", "-n", "node1", "--pid", "-4"], ["--pid", "-4"]),
    ("seconds-nan", ["dirty-rate", "-n", "node1", "--pid", "1", "--seconds", "nan"],
     ["--seconds", "nan"]),
    ("seconds-inf", ["dirty-rate", "-n", "node1", "--pid", "1", "--seconds", "inf"],
     ["--seconds", "inf"]),
    ("count-not-a-number", ["lab.up", "--count", "abc"], ["--count", "abc"]),
    ("count-fraction", ["lab.up", "--count", "1.5"], ["--count", "1.5"]),
    ("count-zero", ["lab.up", "--count", "0"], ["--count", "0"]),
    ("count-nan", ["lab.up", "--count", "nan"], ["--count", "nan"]),
    ("busy-not-a-number", ["lab.fault", "--busy", "abc"], ["--busy", "abc"]),
    ("busy-fraction", ["lab.fault", "--busy", "2.5"], ["--busy", "2.5"]),
    ("busy-negative", ["lab.fault", "--busy", "-1"], ["--busy", "-1"]),
    ("busy-huge", ["lab.fault", "--busy", "1e999"], ["--busy", "1e999"]),
    ("drop-nan", ["lab.fault", "--drop", "nan"], ["--drop", "nan"]),
    ("drop-inf", ["lab.fault", "--drop", "inf"], ["--drop", "inf"]),
    ("power-delay-nan", ["lab.fault", "--power-delay", "nan,1"], ["--power-delay", "nan"]),
    ("power-delay-inf", ["lab.fault", "--power-delay", "1,inf"], ["--power-delay", "inf"]),
    ("rate-nan", ["migrate-test", "--rate", "nan"], ["--rate", "nan"]),
    ("rate-inf", ["migrate-test", "--rate", "inf"], ["--rate", "inf"]),
    ("rate-minus-inf", ["migrate-test", "--rate", "-inf"], ["--rate", "-inf"]),
    ("rate-1e999", ["migrate-test", "--rate", "1e999"], ["--rate", "1e999"]),
    ("rate-hex", ["migrate-test", "--rate", "0x10"], ["--rate", "0x10"]),
    ("growth-nan", ["migrate-test", "--max-growth", "nan"], ["--max-growth", "nan"]),
    ("growth-inf", ["migrate-test", "--max-growth", "inf"], ["--max-growth", "inf"]),
    ("hot-fraction-nan", ["migrate-test", "--hot-fraction", "nan"], ["--hot-fraction", "nan"]),
    ("max-rounds-fraction", ["migrate-test", "--max-rounds", "1.5"], ["--max-rounds", "1.5"]),
    ("max-rounds-hex", ["migrate-test", "--max-rounds", "0x10"], ["--max-rounds", "0x10"]),
    ("min-pages-1e999", ["migrate-test", "--min-pages", "1e999"], ["--min-pages", "1e999"]),
    ("min-pages-negative", ["migrate-test", "--min-pages", "-1"], ["--min-pages", "-1"]),
    ("seed-fraction", ["migrate-test", "--seed", "1.5"], ["--seed", "1.5"]),
    ("verify-resume-nan", ["migrate-test", "--verify-resume", "nan"],
     ["--verify-resume", "nan"]),
    ("steps-per-round-inf", ["migrate-test", "--steps-per-round", "inf"],
     ["--steps-per-round", "inf"]),
    ("matrix-rate-nan", ["migrate-test", "--matrix", "rate=nan"], ["--matrix rate=nan"]),
    ("matrix-pattern-bogus", ["migrate-test", "--matrix", "pattern=bogus"],
     ["--matrix pattern=bogus"]),
    ("matrix-seed-fraction", ["migrate-test", "--matrix", "seed=1.5"], ["--matrix seed=1.5"]),
    ("matrix-no-values", ["migrate-test", "--matrix", "rate=,"], ["rate=,", "no values"]),
    ("timeout-nan", ["run", "--timeout", "nan", "--", "touch", "STARTED"],
     ["--timeout", "nan"]),
    ("timeout-inf", ["run", "--timeout", "inf", "--", "touch", "STARTED"],
     ["--timeout", "inf"]),
    ("capture-nan", ["console", "node1", "--capture", "nan"], ["--capture", "nan"]),
    ("capture-inf", ["console", "node1", "--capture", "1e999"], ["--capture", "1e999"]),
    ("demo-rate-nan", ["demo", "--rate", "nan"], ["--rate", "nan"]),
    # issue 9: output folders that cannot be written
    ("results-under-a-file", ["migrate-test"], ["results folder", "not a folder"]),
    ("results-in-proc", ["migrate-test", "--matrix", "rate=1"], ["results folder", "/proc"]),
    ("capture-results-under-a-file", ["console", "node1", "--capture", "1"],
     ["results folder", "not a folder"]),
    ("lab-up-state-is-a-file", ["lab.up", "--count", "2"], ["state folder", "not a folder"]),
    # issue 9: --wait ssh on a node without ssh: refused before any BMC is touched
    ("wait-ssh-without-ssh", ["power-on", "--inventory", "{dir}/no-ssh.yaml", "--wait", "ssh"],
     ["--wait ssh", "node2", "no ssh: block"]),
    ("cycle-wait-ssh-without-ssh", ["power-cycle", "--inventory", "{dir}/no-ssh.yaml",
                                    "--wait=ssh"], ["--wait ssh", "node2", "no ssh: block"]),
    ("demo-without-ssh", ["demo", "--inventory", "{dir}/no-ssh.yaml"],
     ["demo", "node2", "no ssh: block"]),
]
IDS = [c[0] for c in CASES]
assert len(set(IDS)) == len(IDS) and len(CASES) >= 30

# What a case needs besides its argv: environment (``{dir}``: its working folder) and files.
CASE_ENV = {
    "results-under-a-file": {"INVOKE_LABKIT_RESULTS_DIR": "{dir}/a-file/results"},
    "results-in-proc": {"INVOKE_LABKIT_RESULTS_DIR": "/proc/labkit-results"},
    "capture-results-under-a-file": {"INVOKE_LABKIT_RESULTS_DIR": "{dir}/a-file"},
}
# Invoke's own parser answers these before any labkit code runs (unknown flag, missing
# positional): its wording and exit code are Invoke's; the labkit program's are tested.
LABKIT_ONLY = {"unknown-flag", "missing-boot-device"}
RUNS = [(prog, c) for c in CASES for prog in PROGRAMS
        if prog == "labkit" or c[0] not in LABKIT_ONLY]


def _setup(lab: FakeLabHandle, case_dir: Path) -> None:
    """Files some cases point at: a regular file where a folder is wanted, the lab's
    inventory with node2's ssh: block removed."""
    (case_dir / "a-file").write_text("not a folder\n")
    (case_dir / ".lab").write_text("not a folder\n")
    state = lab.state_dir
    text = Path(lab.inventory_path).read_text()
    text = text.replace("state_dir: .", f"state_dir: {state}")
    for name in ("bmc-password", "id_ed25519", "known_hosts"):
        text = text.replace(f": {name}", f": {state / name}")
    lines = text.splitlines(keepends=True)
    at = next(i for i, ln in enumerate(lines) if ln.strip() == "node2:")
    del lines[at + 2]  # node2's ssh: line (bmc: comes first)
    (case_dir / "no-ssh.yaml").write_text("".join(lines))


pytestmark = pytest.mark.slow  # 35 labkit runs; test_power, test_leases and test_migrate
#                                 keep a usage-error check each in the inner loop


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
    bmcs = {n: {k: s.get(k) for k in ("power", "pending", "bootdev", "persistent", "sessions",
                                      "faults")}
            | {"rx": s["stats"]["rx"]} for n, s in st.items()}
    disks = sorted(str(p.relative_to(lab.state_dir / "nodes"))
                   for p in (lab.state_dir / "nodes").rglob("*"))
    return {"bmcs": bmcs, "disks": disks, "procs": node_processes(lab)}


def node_processes(lab: FakeLabHandle) -> list[str]:
    return lab.processes()


def run_case(lab: FakeLabHandle, case_dir: Path, argv: list[str], cid: str = "",
             prog: str = "labkit") -> dict[str, Any]:
    case_dir.mkdir(parents=True, exist_ok=True)
    _setup(lab, case_dir)
    env = {**lab.env, "INVOKE_LABKIT_LEASE_DIR": str(case_dir / "leases"),
           "INVOKE_LABKIT_RESULTS_DIR": str(case_dir / "results"),
           "LABKIT_SSH_CONFIG": str(case_dir / "no-ssh-config")}
    env.update({k: v.format(dir=case_dir) for k, v in CASE_ENV.get(cid, {}).items()})
    argv = [a.format(dir=case_dir) for a in argv]
    r = subprocess.run([*PROGRAMS[prog], *argv], cwd=case_dir, env=env, capture_output=True,
                       text=True, timeout=90)
    return {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr, "dir": case_dir}


@pytest.fixture(scope="module")
def outcomes(lab: FakeLabHandle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("badinput-cases")
    before = lab_snapshot(lab)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {(prog, cid): pool.submit(run_case, lab, base / prog / cid, argv, cid, prog)
                   for prog, (cid, argv, _) in RUNS}
        results = {key: f.result() for key, f in futures.items()}
    return {"before": before, "after": lab_snapshot(lab), "cases": results, "base": base}


# --- the table ---------------------------------------------------------------------------

@pytest.mark.parametrize("prog, case", RUNS, ids=[f"{p}-{c[0]}" for p, c in RUNS])
def test_bad_argument_is_one_line_exit_2(outcomes: dict[str, Any], prog: str,
                                         case: tuple[str, list[str], list[str]]) -> None:
    cid, argv, words = case
    r = outcomes["cases"][(prog, cid)]
    where = f"{prog} {' '.join(argv)}\nrc={r['rc']}\nstdout={r['stdout']!r}\nstderr={r['stderr']!r}"
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
    for prog, (cid, argv, _) in RUNS:
        lab.control.fault("*", clear=True)
        lab.control.power("node2", "off", now=True)
        lab.control.power("node1", "on", now=True)
        lab.control.wait("node1", timeout=30, phase="up")
        pre = lab_snapshot(lab)
        run_case(lab, tmp_path / prog / cid, argv, cid, prog)
        post = lab_snapshot(lab)
        if pre != post:
            culprits.append(f"{cid}: {prog} {' '.join(argv)}: {_diff(pre, post)}")
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
