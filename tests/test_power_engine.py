"""The event-driven BMC fan-out (labkit.bmc.engine) over real UDP: the fake lab (a separate
process) with its faults, and OpenIPMI's ipmi_sim as an independent BMC. Every behaviour the
threaded PowerClient has must hold here too: retries inside the window, no retry of a refused
login, per-BMC minimum interval, re-login after a BMC restart, per-node outcomes in order."""

from __future__ import annotations

import logging
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

import pytest
from test_ipmi_sim import sim  # noqa: F401 - the ipmi_sim fixture (an independent BMC)

from labkit.bmc import engine, ops
from labkit.bmc.ops import Cmd, Sleep
from labkit.config import Settings
from labkit.errors import UserError
from labkit.inventory import BmcSpec, Node
from labkit.retry import MinInterval, RetryPolicy

NEEDS_SIM = pytest.mark.skipif(shutil.which("ipmi_sim") is None,
                               reason="OpenIPMI ipmi_sim not installed (apt install openipmi)")
FAST = Settings(bmc_timeout=1.0, retry_window=3.0, retry_first_delay=0.1, retry_max_delay=0.5,
                power_wait=15.0, cycle_delay=0.1, progress="never")


def nodes_of(lab: Any) -> list[Node]:
    return list(lab.inventory().nodes.values())


# -- pure logic: the policy without sleeping, and the ops as scripts -----------------------------

def test_retry_clock_is_the_policy_without_the_sleeping():
    policy = RetryPolicy(window=0.3, first_delay=0.05, max_delay=0.1, jitter=0.0)
    clock = policy.clock()
    assert [clock.next_delay() for _ in range(3)] == [0.05, 0.1, 0.1]
    time.sleep(0.31)
    assert clock.next_delay() is None  # the window is spent
    assert policy.clock(deadline=time.monotonic()).next_delay() is None
    late = policy.clock(deadline=time.monotonic() + 0.02).next_delay()
    assert late is not None and late <= 0.02  # never past the deadline


def test_min_interval_reserve_hands_out_slots_per_key():
    gap = MinInterval(0.5)
    assert gap.reserve("a") == 0.0
    assert 0.45 < gap.reserve("a") <= 0.5
    assert 0.95 < gap.reserve("a") <= 1.0  # slots queue up
    assert gap.reserve("b") == 0.0
    assert MinInterval(0.0).reserve("a") == 0.0


def drive(op: ops.Op, replies: list[bytes]) -> tuple[list[Any], Any]:
    """Run an op against scripted replies; returns the steps it yielded and its result."""
    steps: list[Any] = []
    value: Any = None
    try:
        while True:
            step = op.send(value)
            steps.append(step)
            value = replies.pop(0) if isinstance(step, Cmd) else None
    except StopIteration as stop:
        return steps, stop.value


def test_ops_send_what_the_state_needs():
    """A request goes out even when status already reads its target (a transition the other
    way may be landing: the BMC's last request must be ours), and reports changed=False."""
    node = Node("n1", bmc=BmcSpec(host="h"), ssh=None)
    settings = replace(FAST, cycle_delay=0.25)
    steps, result = drive(ops.on(node, settings), [b"\x01", b""])  # reads on already
    assert steps == [Cmd(0x00, 0x01), Cmd(0x00, 0x02, (1,))]
    assert result == {"power": "on", "changed": False, "confirmed": True}
    steps, result = drive(ops.off(node, settings), [b"\x01", b""])
    assert steps == [Cmd(0x00, 0x01), Cmd(0x00, 0x02, (0,))] and result["changed"] is True
    steps, result = drive(ops.cycle(node, settings, wait=True),
                          [b"\x00", b"", b"", b"\x00", b"\x01"])  # reads off: off, sleep, on
    assert steps[:4] == [Cmd(0x00, 0x01), Cmd(0x00, 0x02, (0,)), Sleep(0.25),
                         Cmd(0x00, 0x02, (1,))]
    assert steps[4].netfn == 0 and steps[4].cmd == 1 and steps[4].deadline is not None
    assert steps[5] == Sleep(ops.POLL_INTERVAL) and result["confirmed"] is True
    steps, result = drive(ops.boot_device(node), [b"\x01\x05\xc0\x04"])
    assert result == {"device": "pxe", "persistent": True}


def test_status_of_every_node_in_order(make_fake_lab):
    lab = make_fake_lab(count=12, ssh=False, power_delay=(0.01, 0.02), boot_delay=0.01)
    for n in ("node2", "node7", "node11"):
        lab.control.power(n, "on", now=True)
    for n in ("node2", "node7", "node11"):
        lab.wait(n, power="on", timeout=10)
    out = engine.power_status(nodes_of(lab), FAST)
    assert [o.node for o in out] == [f"node{i}" for i in range(1, 13)]
    assert all(o.ok and o.error is None and o.seconds > 0 for o in out), out
    on = {o.node for o in out if o.value["power"] == "on"}
    assert on == {"node2", "node7", "node11"}
    assert {o.value["power"] for o in out} == {"on", "off"}


def test_loss_and_busy_are_retried_inside_the_window(make_fake_lab):
    lab = make_fake_lab(count=16, ssh=False, seed=5)
    lab.control.fault("*", drop=0.15, busy=2)
    settings = replace(FAST, bmc_timeout=2.0, retry_window=15.0)
    out = engine.power_status(nodes_of(lab), settings)
    assert all(o.ok and o.value["power"] == "off" for o in out), [o.error for o in out]
    stats = lab.status()
    assert sum(s["stats"]["dropped"] for s in stats.values()) > 0  # the faults really bit


def test_refused_login_fails_at_once_and_hides_no_one(make_fake_lab, caplog):
    lab = make_fake_lab(count=3, ssh=False)
    lab.control.fault("node2", refuse_password=True)
    lab.control.fault("node3", down=True)
    settings = replace(FAST, retry_window=2.0)
    caplog.set_level(logging.DEBUG, logger="labkit")
    t0 = time.monotonic()
    out = {o.node: o for o in engine.power_status(nodes_of(lab), settings)}
    elapsed = time.monotonic() - t0
    assert out["node1"].ok and out["node1"].value == {"power": "off"}
    bad = out["node2"]
    assert not bad.ok and bad.error is not None
    assert bad.error.startswith("node2: BMC 127.0.0.1:")
    assert "login refused for user 'admin'" in bad.error
    assert bad.seconds < 1.0  # not retried
    down = out["node3"]
    assert not down.ok and down.error is not None and "timeout" in down.error
    assert down.error.startswith("node3: BMC 127.0.0.1:")
    assert 1.5 < down.seconds < 3.5  # retried until the window closed, not longer
    assert elapsed < 4.0
    secret = lab.password().decode()
    assert all(secret not in (o.error or "") for o in out.values())
    assert secret not in caplog.text


def test_busy_forever_ends_with_the_busy_code(make_fake_lab):
    lab = make_fake_lab(count=1, ssh=False)
    lab.control.fault("node1", busy=10_000)
    out = engine.power_status(nodes_of(lab), replace(FAST, retry_window=1.0))
    assert not out[0].ok and "0xC0" in (out[0].error or "")


def test_min_interval_spaces_commands_to_one_bmc_not_across_bmcs(make_fake_lab):
    lab = make_fake_lab(count=3, ssh=False)

    def four_polls(node: Node) -> ops.Op:
        for _ in range(4):
            yield Cmd(0x00, 0x01)
        return {}

    nodes = nodes_of(lab)
    t0 = time.monotonic()
    out = engine.Engine(replace(FAST, min_interval=0.3)).run(nodes, four_polls)
    spaced = time.monotonic() - t0
    assert all(o.ok for o in out), [o.error for o in out]
    assert all(o.seconds >= 0.85 for o in out)  # 3 gaps of 0.3 s on each BMC ...
    assert spaced < 2.0                         # ... but the BMCs did not wait for each other
    t0 = time.monotonic()
    engine.Engine(FAST).run(nodes, four_polls)
    assert time.monotonic() - t0 < 0.8


def test_bmc_restart_mid_op_means_a_fresh_login(make_fake_lab):
    lab = make_fake_lab(count=1, ssh=False)
    seen: list[str] = []

    def across_a_restart(node: Node) -> ops.Op:
        seen.append((yield from ops.status(node)))
        lab.control.cold_reset(node.name)  # the BMC forgets our session
        seen.append((yield from ops.status(node)))
        return {"polls": len(seen)}

    settings = replace(FAST, retry_window=8.0)
    out = engine.Engine(settings).run(nodes_of(lab), across_a_restart)
    assert out[0].ok, out[0].error
    assert seen == ["off", "off"] and out[0].value == {"polls": 2}


def test_actions_and_wait_through_the_engine(make_fake_lab):
    lab = make_fake_lab(count=6, ssh=False, power_delay=(0.1, 0.5), boot_delay=0.1, seed=3)
    lab.control.fault("*", drop=0.05, busy=1)
    nodes = nodes_of(lab)
    settings = replace(FAST, bmc_timeout=2.0, retry_window=10.0)
    out = engine.power_action(nodes, "on", settings, wait=True)
    assert all(o.ok for o in out), [o.error for o in out]
    assert [o.value for o in out] == [{"power": "on", "changed": True, "confirmed": True}] * 6
    assert all(lab.status(n)["power"] == "on" for n in lab.nodes)
    again = engine.power_action(nodes, "on", settings)
    assert [o.value["changed"] for o in again] == [False] * 6  # idempotent: nothing sent
    out = engine.power_action(nodes[:3], "off", settings, wait=True)
    assert all(o.ok and o.value["confirmed"] for o in out), [o.error for o in out]
    assert [lab.status(n)["power"] for n in lab.nodes] == ["off"] * 3 + ["on"] * 3
    out = engine.set_boot_device(nodes[:2], "pxe", settings, persistent=True)
    assert [o.value for o in out] == [{"boot_device": "pxe", "persistent": True}] * 2
    st = lab.status("node2")
    assert st["bootdev"] == "pxe" and st["persistent"] is True
    with pytest.raises(UserError, match="boot device 'floppy'"):
        engine.set_boot_device(nodes, "floppy", settings)
    with pytest.raises(UserError, match="power action 'explode'"):
        engine.power_action(nodes, "explode", settings)


def test_wait_gives_up_at_its_deadline(make_fake_lab):
    lab = make_fake_lab(count=2, ssh=False, power_delay=(0.05, 0.1))
    lab.control.fault("node1", hang=True)
    out = engine.power_action(nodes_of(lab), "on", replace(FAST, power_wait=1.5), wait=True)
    assert not out[0].ok and "node1: power still off" in (out[0].error or "")
    assert 1.4 < out[0].seconds < 3.0
    assert out[1].ok and out[1].value["confirmed"] is True


def test_node_without_bmc_and_ops_that_fail(make_fake_lab):
    lab = make_fake_lab(count=1, ssh=False)
    real = nodes_of(lab)[0]
    bare = Node("bare", bmc=None, ssh=None)

    def broken(node: Node) -> ops.Op:
        yield Sleep(0.01)
        raise ValueError("op bug")

    out = engine.power_status([bare, real], FAST)
    assert not out[0].ok and "no bmc: section" in (out[0].error or "")
    assert out[1].ok
    out = engine.Engine(FAST).run([real], broken)
    assert not out[0].ok and out[0].error == "ValueError: op bug"
    assert engine.power_status([], FAST) == []


def test_many_bmcs_at_once_and_capped(make_fake_lab):
    lab = make_fake_lab(count=64, ssh=False)
    nodes = nodes_of(lab)
    for parallel in (None, 7):
        out = engine.Engine(FAST).run(nodes, ops.status_op, parallel=parallel)
        assert len(out) == 64 and all(o.ok for o in out), [o.error for o in out if not o.ok]
    # one socket per session in flight: a low open-files limit queues nodes, it fails none
    code = ("import sys; from labkit import inventory; from labkit.bmc.engine import "
            "power_status, _socket_budget; out = power_status(inventory.load(sys.argv[1])"
            ".select(None)); print(_socket_budget(), sum(o.ok for o in out))")
    r = subprocess.run([sys.executable, "-c", code, str(lab.inventory_path)],
                       capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (60, 60)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["16", "64"]  # 64 sockets at once would not fit under 60


@NEEDS_SIM
def test_against_ipmi_sim(sim):  # noqa: F811 - the fixture imported above
    inv, tmp = sim
    node, gone = inv.node("sim1"), inv.node("gone")
    settings = replace(FAST, bmc_timeout=2.0, retry_window=2.0, power_wait=10.0)
    out = engine.power_status([node, gone], settings)
    assert out[0].ok and out[0].value == {"power": "off"}
    assert not out[1].ok and "timeout" in (out[1].error or "")
    out = engine.power_action([node], "on", settings, wait=True)
    assert out[0].ok and out[0].value == {"power": "on", "changed": True, "confirmed": True}
    out = engine.power_action([node], "cycle", settings, wait=True)
    assert out[0].ok and out[0].value["confirmed"] is True, out[0].error
    out = engine.set_boot_device([node], "pxe", settings)
    assert out[0].ok, out[0].error
    assert engine.power_status([node], settings)[0].value == {"power": "on"}
    assert (tmp / "chassis.log").read_text().split("\n") == [
        "mc set power 1", "mc set power 0", "mc set power 1", "mc set boot pxe", ""]


@NEEDS_SIM
def test_wrong_password_against_ipmi_sim(sim):  # noqa: F811
    inv, tmp = sim
    (tmp / "bmc-password").write_text("not-the-password\n")
    out = engine.power_status([inv.node("sim1")], FAST)
    assert not out[0].ok and "sim1: " in (out[0].error or "")
    assert "login refused" in (out[0].error or "") and out[0].seconds < 1.0

