"""``migrate-test --tcp`` with the built-in backend, end to end on two guests, through the program
as a user types it: the workload's TCP connection to a client off both nodes (a lan port on the
controller) survives the move, in both freeze modes, and the test-only faults break it loudly.

What each run proves (run.json ``tcp``, the client's own verdict):
- kept: every record valid and in order (the chain depends on the migrated region), no reset,
  no reconnect, and the echo covers every message the client sent — the client sends all the
  time, so messages were in flight both ways at the freeze;
- the client's longest stall is bounded by the downtime: max_gap_ms <= 3 x downtime + one RTO.
  The RTO is the client's (Linux: 200 ms minimum, doubling per retransmission); after the first
  lost segment the client retries 200 ms later, then 400 ms after that, so a stall can run
  one RTO past the resume before a retransmission finds the moved socket. We allow 1 s: one
  RTO after up to two doublings, the worst a sub-second freeze sees.
- negatives: the address left on src (keep-address), or the source keeping it through the
  freeze (no-freeze): the client must see it (kept false, exit 1).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from labkit.experiment.tcp import VM_SERVICE_ADDRESS
from labkit.fake import vmimage
from labkit.fake.harness import FakeLabHandle, start_fake_lab

LABKIT = [sys.executable, "-m", "labkit.cli"]
BOOT = 150.0  # a loaded 2-core machine boots two TCG guests slowly (test_vm_nodes.py)
RUN = 300.0
RTO_S = 1.0  # see the module docstring
WHY = vmimage.have_qemu()


def on_guests(test: Callable[..., None]) -> Callable[..., None]:
    for mark in (pytest.mark.slow, pytest.mark.vm,
                 pytest.mark.skipif(WHY is not None, reason=f"guest nodes: {WHY}")):
        test = mark(test)
    return test


def labkit(lab: FakeLabHandle, *args: str, env: dict[str, str] | None = None,
           timeout: float = RUN) -> subprocess.CompletedProcess:
    return subprocess.run([*LABKIT, *args], env={**lab.env, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def first_json(stdout: str) -> Any:
    lines = stdout.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.strip() in ("{", "["):
            return json.JSONDecoder().raw_decode("".join(lines[i:]))[0]
    raise AssertionError(f"no JSON in the output:\n{stdout}")


@pytest.fixture(scope="module")
def vmlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeLabHandle]:
    if WHY:
        pytest.skip(f"guest nodes: {WHY}")
    lab = start_fake_lab(tmp_path_factory.mktemp("tcplab"), count=2, kind="vm",
                         power_delay=(0.05, 0.1))
    try:
        r = labkit(lab, "power-on", "--wait", "ssh", timeout=BOOT * 2)
        assert r.returncode == 0, r.stdout + r.stderr
        yield lab
    finally:
        lab.stop()


def migrate(lab: FakeLabHandle, results: Path, *args: str, fault: str = "",
            expect: int = 0, size: str = "16M") -> dict[str, Any]:
    """One ``migrate-test --tcp`` (16 MiB, no baseline: the connection is what is tested) ->
    its run.json."""
    env = {"INVOKE_LABKIT_RESULTS_DIR": str(results)}
    if fault:
        env["LABKIT_TCP_FAULT"] = fault
    r = labkit(lab, "migrate-test", "--src", "node1", "--dst", "node2", "--tcp", "--size",
               size, "--no-stop-and-copy", "--json", *args, env=env)
    assert r.returncode == expect, (f"migrate-test {' '.join(args)} fault={fault!r}: exit "
                                    f"{r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    (run_json,) = results.glob("*/run.json")
    return json.loads(run_json.read_text())


def hold_rule(lab: FakeLabHandle, action: str, nodes: str) -> dict[str, int]:
    """iptables ACTION of the hold's rule (labkit/payloads/nfqueue.py) on each of NODES (a
    node named twice: twice) -> each node's last exit code."""
    from labkit.payloads import nfqueue

    argv = " ".join(nfqueue.iptables_argv(action, VM_SERVICE_ADDRESS, 7077, 77))
    codes: dict[str, int] = {}
    for node in nodes.split(","):
        r = labkit(lab, "run", "-n", node, "--json", "--", argv)
        (row,) = json.loads(r.stdout)
        codes[node] = row["exit_code"]
        if action == "-I":
            assert row["ok"], row
    return codes


def events(results: Path) -> list[dict[str, Any]]:
    (path,) = results.glob("*/events.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@on_guests
@pytest.mark.parametrize("freeze", ["drop", "hold"])
def test_connection_survives(vmlab: FakeLabHandle, tmp_path: Path, freeze: str) -> None:
    """Before each run, both nodes get the packet hold a restore agent killed mid-hold would
    leave (its NFQUEUE rule, twice on dst): the run's setup clears them (a rule left on src
    would drop the client's SYN; on dst, the moved connection's packets), and none is left
    after the run, hold mode's own included."""
    hold_rule(vmlab, "-I", "node1,node2,node2")
    run = migrate(vmlab, tmp_path, "--tcp-freeze", freeze)
    assert hold_rule(vmlab, "-C", "node1,node2") == {"node1": 1, "node2": 1}  # 1: no such rule
    tcp = run["tcp"]
    downtime_s = run["result"]["downtime_ms"] / 1000
    assert tcp["kept"] is True, tcp
    assert tcp["resets"] == 0 and not tcp.get("errors"), tcp
    assert tcp["records"] > 0 and tcp["bytes"] >= 64 * tcp["records"], tcp
    # both ways: the client sent throughout and the echo covers every message
    assert tcp["msgs_sent"] > 0 and tcp["msgs_echoed"] == tcp["msgs_sent"], tcp
    assert tcp["max_gap_ms"] <= 3 * downtime_s * 1000 + RTO_S * 1000, (tcp, downtime_s)
    # the stall the timeline marks is the one across the freeze, and the client did stall
    # there (a gap no longer than the records' own pace would mean no freeze was seen)
    assert 0.5 * downtime_s * 1000 <= tcp["freeze_gap_ms"] <= tcp["max_gap_ms"], tcp
    ev = events(tmp_path)
    moved = [e for e in ev if e.get("event") == "tcp-moved"]
    assert moved and moved[0]["freeze"] == freeze, moved
    if freeze == "hold":
        serving = [e for e in ev if e.get("event") == "dst-serving"]
        assert serving and "hold" in serving[0], serving
    print(f"\n{freeze}: downtime {downtime_s * 1000:.0f} ms, max_gap {tcp['max_gap_ms']:.0f} "
          f"ms, max_echo {tcp.get('max_echo_ms')} ms, records {tcp['records']}, "
          f"moved {moved[0]}")


@on_guests
@pytest.mark.parametrize("fault", ["keep-address", "no-freeze"])
def test_fault_is_seen_by_the_client(vmlab: FakeLabHandle, tmp_path: Path, fault: str) -> None:
    # small and one round: what is tested is the connection at the freeze, not the copy
    run = migrate(vmlab, tmp_path, "--max-rounds", "1", fault=fault, expect=1, size="8M")
    assert run["tcp"]["kept"] is False, run["tcp"]
    assert run["tcp"]["fault"] == fault
    assert "TCP connection was not kept" in run["error"]["message"], run["error"]


def test_the_freeze_gap_is_the_clients_own_length_of_the_stall_over_the_freeze() -> None:
    """Without guests: freeze_gap_ms is the length the client measured (monotonic, as its
    max_gap_ms), never one recomputed from the wall-clock ends, which differ from it by
    microseconds (a CI run failed on freeze_gap_ms exceeding max_gap_ms by 0.001 ms); of the
    stalls, the longest one that overlaps the freeze; the ends go to run seconds."""
    from labkit.experiment.tcp import place_gaps

    wall = 1_764_566_400.123457
    gaps = [[wall, wall + 2.0, 2000.004],          # the longest, before the freeze
            [wall + 5.0, wall + 5.1, 99.998],     # overlaps the freeze
            [wall + 5.2, wall + 5.26, 60.001]]    # overlaps it too, shorter
    out = {"max_gap_ms": 2000.004, "gap": gaps[0][:2], "gaps": gaps}
    place_gaps(out, wall - 1.0, freeze=5.95, resumed=6.21)
    assert out["freeze_gap_ms"] == 99.998 and out["freeze_gap_t"] == [6.0, 6.1]
    assert out["gap_t"] == [1.0, 3.0] and "gaps" not in out
    # no timeline (the run stopped before the freeze): only the longest stall is placed
    out = {"gap": gaps[0][:2], "gaps": gaps}
    place_gaps(out, wall, freeze=None, resumed=None)
    assert "freeze_gap_ms" not in out and out["gap_t"] == [0.0, 2.0]
