"""``migrate-test --backend criu --tcp`` between two QEMU guests: a live TCP connection survives
the migration through CRIU (``--tcp-established``, its network lock, the service address moved
from src to dst), checked byte by byte by the client labkit runs off both nodes (in a lan port
on the lab LAN).

One module-scoped lab of two guests. Each test runs the program as a user types it:
- the move (with the stop-and-copy baseline first, which freezes the same connection and must
  give it back to the source intact): kept, no reset, every record in order, the workload's
  echo covering every message the client sent (data in flight both ways at each freeze), and
  the client's longest stall explained by a freeze: at most 3x that freeze plus one
  retransmission timeout;
- the negative: LABKIT_TCP_FAULT=keep-address (src keeps the address, dst holds it
  unannounced): the client's packets still reach src, which resets them once its copy is gone;
  the run says kept: false and exits 1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labkit.experiment.tcp import VM_SERVICE_ADDRESS
from labkit.fake import vmimage
from labkit.fake.harness import FakeLabHandle, start_fake_lab
from labkit.payloads import netlock

LABKIT = [sys.executable, "-m", "labkit.cli"]
BOOT = 150.0  # a loaded 2-core machine boots two TCG guests slowly
RUN = 400.0  # one migrate-test under TCG: ~45 s alone
RTO_S = 1.0  # TCP_TIMEOUT_INIT: the restored socket has no RTT estimate yet


def _skip() -> str | None:
    why = vmimage.have_qemu()
    if why:
        return f"guest nodes: {why}"
    if shutil.which("criu") is None:
        return "criu not installed (apt-get install criu): the guests run the host's"
    if shutil.which("iptables") is None:
        return "iptables not installed: CRIU's network lock (and the guests') needs it"
    if os.geteuid() != 0 and not Path("/proc/self/ns/user").exists():
        return "the lan port needs root or user namespaces"
    return None


WHY = _skip()
pytestmark = [pytest.mark.slow, pytest.mark.vm, pytest.mark.skipif(WHY is not None,
                                                                  reason=str(WHY))]


@pytest.fixture(scope="module")
def vmlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeLabHandle]:
    lab = start_fake_lab(tmp_path_factory.mktemp("tcpcriu"), count=2, kind="vm",
                         power_delay=(0.05, 0.1))
    try:
        r = subprocess.run([*LABKIT, "power-on", "--wait", "ssh"], env=lab.env,
                           capture_output=True, text=True, timeout=BOOT * 2)
        assert r.returncode == 0, r.stdout + r.stderr
        yield lab
    finally:
        lab.stop()


def migrate(lab: FakeLabHandle, tmp: Path, *args: str, fault: str = "",
            expect: int = 0) -> dict[str, Any]:
    env = {**lab.env, "INVOKE_LABKIT_RESULTS_DIR": str(tmp / "results")}
    env.pop("LABKIT_TCP_FAULT", None)
    if fault:
        env["LABKIT_TCP_FAULT"] = fault
    r = subprocess.run([*LABKIT, "migrate-test", "--src", "node1", "--dst", "node2",
                        "--backend", "criu", "--tcp", "--size", "16M", "--json", *args],
                       env=env, capture_output=True, text=True, timeout=RUN)
    assert r.returncode == expect, (f"exit {r.returncode} (want {expect})\n{r.stdout[-4000:]}\n"
                                    f"{r.stderr[-4000:]}")
    lines = r.stdout.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == "{")
    return json.JSONDecoder().raw_decode("".join(lines[start:]))[0]


def events(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]


def freezes(evs: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """Run-time windows in which the workload was frozen: each dump to the resume that
    ended it (the source's after the baseline, dst's after the move)."""
    out, start = [], None
    for e in evs:
        cmd = e.get("cmd") or ""
        if e.get("event") == "criu" and cmd.startswith("dump "):
            start = e["t"]
        elif e.get("event") == "criu" and cmd.startswith("resume ") and start is not None:
            out.append((start, e["t"]))
            start = None
    return out


def on_nodes(lab: FakeLabHandle, argv: list[str]) -> dict[str, dict[str, Any]]:
    """ARGV on both guests (labkit run) -> each node's row (exit_code, stdout, ...)."""
    r = subprocess.run([*LABKIT, "run", "-n", "node1,node2", "--json", "--", " ".join(argv)],
                       env=lab.env, capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith("["), r.stdout + r.stderr
    return {row["node"]: row for row in json.loads(r.stdout)}


def test_connection_survives_baseline_and_move(vmlab, tmp_path) -> None:
    """Both nodes first get the lock a criu or driver killed mid-move would leave (CRIU's two
    rules for a connection of the service, to a client port long gone): the run sweeps them,
    and no lock of the service is left after it."""
    stale = [f"{VM_SERVICE_ADDRESS}:7077", "10.77.0.250:40000"]
    for rule in netlock.lock_rules(*stale):
        rows = on_nodes(vmlab, ["iptables", "-w", "-I", *rule])
        assert all(row["exit_code"] == 0 for row in rows.values()), rows
    data = migrate(vmlab, tmp_path, "--max-rounds", "3")
    tcp = data["tcp"]
    assert data["ok"] and data["verified"], data.get("error")
    rows = on_nodes(vmlab, ["iptables", "-w", "-S"])
    assert all(row["exit_code"] == 0 and netlock.SOCCR_MARK not in row["stdout"]
               for row in rows.values()), rows
    assert tcp["kept"] is True and tcp["resets"] == 0 and tcp["errors"] == [], tcp
    # every record arrived, in order (the client checks the chain; none lost or doubled)
    assert tcp["records"] > 100 and tcp["bytes"] >= 64 * tcp["records"]
    # both ways: the echo covers every message the client sent, across both freezes
    assert tcp["msgs_sent"] > 100 and tcp["msgs_echoed"] == tcp["msgs_sent"], tcp
    folder = Path(data["folder"])
    run = json.loads((folder / "run.json").read_text())
    moves = run["criu"]["tcp"]
    assert [m["final"] for m in moves] == [False, True]
    base, final = moves
    assert base["restore_flags"] == "--tcp-close" and not base["gave"]
    conn = f"{final['connections'][0]['local']}-{final['connections'][0]['peer']}"
    assert final["connections"][0]["local"] == f"{tcp['address']}:{tcp['port']}"
    assert final["gave"] is True and final["took"]
    assert final["restored"][conn]["found"] and final["restored"][conn]["repair"] is False
    # the baseline gave the source its connection back: CRIU's rules gone, repair off
    assert any(u.startswith("repair off") for u in run["criu"]["stop_and_copy"]["tcp_unlocked"])
    # the client's longest stall is one of the freezes, and at most 3x it + one RTO
    windows = freezes(events(folder))
    assert len(windows) == 2, windows
    g0, g1 = tcp["gap_t"]
    owner = [(a, b) for a, b in windows if a - 0.5 <= g0 <= b + RTO_S]
    assert owner, f"the stall {tcp['gap_t']} is not in a freeze {windows}"
    a, b = owner[0]
    frozen_ms = data["downtime_ms"] if (a, b) == windows[-1] else 1000 * (b - a)
    assert tcp["max_gap_ms"] <= 3 * frozen_ms + 1000 * RTO_S, (tcp, windows, frozen_ms)
    # and the stall across the move itself, the one the timeline marks, is bounded by its own
    # downtime
    fg0, fg1 = tcp["freeze_gap_t"]
    assert fg0 <= windows[-1][1] and fg1 >= windows[-1][0], (tcp["freeze_gap_t"], windows)
    assert tcp["freeze_gap_ms"] <= 3 * data["downtime_ms"] + 1000 * RTO_S, tcp


def test_keep_address_fault_the_client_sees_it(vmlab, tmp_path) -> None:
    data = migrate(vmlab, tmp_path, "--no-stop-and-copy", "--max-rounds", "2",
                   fault="keep-address", expect=1)
    tcp = data["tcp"]
    assert data["ok"] is False and "not kept" in data["error"], data.get("error")
    assert data["verified"] is True  # the memory moved; the connection did not
    assert tcp["kept"] is False and tcp["fault"] == "keep-address"
    assert tcp["resets"] >= 1 or tcp["msgs_echoed"] < tcp["msgs_sent"], tcp
    folder = Path(data["folder"])
    run = json.loads((folder / "run.json").read_text())
    (final,) = run["criu"]["tcp"]
    assert final["gave"] is None and "--no-announce" in final["restore_flags"]
