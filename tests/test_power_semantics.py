"""What a power verb means when the node is not where the user assumes, through the real
programs (``labkit`` and ``invoke``) against the fake lab:

- a reset of a node that is off fails plainly (the same line as against ipmi_sim, see
  tests/test_ipmi_sim.py), and its siblings (off/soft of an off node, cycle and boot device of
  an off node) each say what happened;
- a request issued while the opposite transition is still landing wins: the BMC reports the
  old state until a transition lands, so "reads on" must not be taken for "stays on";
- Ctrl-C (and SIGTERM) while a BMC is dead acts within a second or two, on every power task;
- a read-only (USER privilege) BMC account reads power state, and a change it may not make is
  one readable line naming the node, the user and the missing privilege.
"""

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

from labkit.bmc import ops
from labkit.bmc.ops import Cmd
from labkit.bmc.session import BmcError
from labkit.config import Settings
from labkit.errors import NodeError
from labkit.inventory import BmcSpec, Node

ROOT = Path(__file__).resolve().parent.parent
_bin = Path(sys.executable).with_name("labkit")
LABKIT = [str(_bin)] if _bin.exists() else [sys.executable, "-m", "labkit.cli"]
INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]
FAST_ENV = {"INVOKE_LABKIT_BMC_TIMEOUT": "1", "INVOKE_LABKIT_RETRY_WINDOW": "3",
            "INVOKE_LABKIT_RETRY_FIRST_DELAY": "0.1", "INVOKE_LABKIT_RETRY_MAX_DELAY": "0.5",
            "INVOKE_LABKIT_POWER_WAIT": "15", "INVOKE_LABKIT_CYCLE_DELAY": "0.1"}
PROGRAMS = {"labkit": LABKIT, "invoke": INVOKE}


def run(program: str, inventory: Path, *argv: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [*PROGRAMS[program], argv[0], "--inventory", str(inventory), *argv[1:]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **FAST_ENV, **(env or {})})


def rows(r: subprocess.CompletedProcess) -> dict[str, dict[str, Any]]:
    assert "Traceback" not in r.stderr, r.stderr
    return {row["node"]: row for row in json.loads(r.stdout)}


# -- reset of an off node, and its siblings ---------------------------------------------------------

@pytest.mark.parametrize("program", PROGRAMS)
def test_reset_of_an_off_node_fails_plainly(make_fake_lab, program):
    """Used to be "completion code 0xD5 (...) to netfn 0x00 cmd 0x02" against the fake BMC
    and "on, changed" against ipmi_sim: now the same plain line everywhere, exit 1, the node
    that is on still reset."""
    lab = make_fake_lab(count=2, ssh=False, power_delay=(0.05, 0.1), boot_delay=0.05)
    lab.control.power("node2", "on", now=True)
    lab.wait("node2", power="on", phase="up", timeout=10)
    r = run(program, lab.inventory_path, "power-reset", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    out = rows(r)
    off = out["node1"]
    assert not off["ok"] and off["power"] == "off" and off["changed"] is False
    assert off["error"] == ("node1: power is off: a reset does nothing to a node that is off "
                            "(power-on or power-cycle starts it)")
    assert out["node2"]["ok"] and out["node2"]["changed"] is True
    st = lab.status("node1")
    assert st["power"] == "off" and st["pending"] is None
    # the table says it on one row
    r = run(program, lab.inventory_path, "power-reset", "-n", "node1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("node1")]
    assert len(line) == 1 and "power is off: a reset does nothing" in line[0], r.stdout


def test_siblings_of_a_reset_on_an_off_node(make_fake_lab):
    """An off node: off and soft leave it off (ok, unchanged), boot-device is set for the next
    boot (normal practice: set pxe, then power on), cycle powers it on (labkit's cycle is off,
    wait, on, whatever the start state)."""
    lab = make_fake_lab(count=1, ssh=False, power_delay=(0.05, 0.1), boot_delay=0.05)
    inv = lab.inventory_path
    for verb in ("power-off", "power-soft"):
        out = rows(run("labkit", inv, verb, "--json", "--wait"))["node1"]
        assert out["ok"] and out["power"] == "off" and out["changed"] is False, out
        assert out["confirmed"] is True
    out = rows(run("labkit", inv, "boot-device", "pxe", "--json"))["node1"]
    assert out["ok"] and out["boot_device"] == "pxe" and lab.status("node1")["bootdev"] == "pxe"
    assert lab.status("node1")["power"] == "off"
    out = rows(run("labkit", inv, "power-cycle", "--wait", "--json"))["node1"]
    assert out["ok"] and out["power"] == "on" and out["changed"] and out["confirmed"], out


def _drive(op: ops.Op, replies: list[Any]) -> tuple[list[Any], Any]:
    """Run an op against scripted replies (an exception is thrown into the op)."""
    steps: list[Any] = []
    value: Any = None
    error: BaseException | None = None
    try:
        while True:
            step = op.throw(error) if error is not None else op.send(value)
            steps.append(step)
            value, error = None, None
            if isinstance(step, Cmd):
                reply = replies.pop(0)
                if isinstance(reply, BaseException):
                    error = reply
                else:
                    value = reply
    except StopIteration as stop:
        return steps, stop.value


def test_reset_racing_a_power_off_reads_the_same():
    """The node read on, went off before the reset arrived, and the BMC refused the reset with
    0xD5: the same plain line, not the completion code. Any other refusal stays as it is."""
    node = Node("n1", bmc=BmcSpec(host="h"), ssh=None)
    refused = BmcError("n1: BMC h:623: chassis control (reset) refused: not possible in the "
                       "present state (completion code 0xD5)", 0xD5)
    with pytest.raises(NodeError, match=r"^n1: power is off: a reset does nothing"):
        _drive(ops.reset(node, Settings()), [b"\x01", refused, b"\x00"])
    with pytest.raises(BmcError, match="0xD5"):  # still on: the BMC's own reason stands
        _drive(ops.reset(node, Settings()), [b"\x01", refused, b"\x01"])


def test_ensure_accepts_a_bmc_that_refuses_a_request_for_its_present_state():
    """Sent although the node reads off, a power-off that the BMC refuses as "not in the
    present state" (0xD5) is a node that is off: ok, unchanged."""
    node = Node("n1", bmc=BmcSpec(host="h"), ssh=None)
    refused = BmcError("refused (completion code 0xD5)", 0xD5)
    _, result = _drive(ops.off(node, Settings()), [b"\x00", refused])
    assert result == {"power": "off", "changed": False, "confirmed": True}


# -- a request while the opposite transition is landing -------------------------------------------

HOLD = {"power_delay": [30, 30]}  # a transition stays open for the whole test: no race, no sleep


@pytest.mark.parametrize("program", PROGRAMS)
def test_power_on_while_a_power_off_lands_keeps_the_node_on(make_fake_lab, program):
    """The BMC reads "on" until the power-off lands. power-on used to read that, send nothing,
    answer "on, unchanged" and let the node go off seconds later; now it is sent and wins."""
    lab = make_fake_lab(count=1, ssh=False, power_delay=(0.05, 0.1), boot_delay=0.05,
                        power_on=True)
    lab.wait("node1", power="on", phase="up", timeout=10)
    lab.control.fault("node1", **HOLD)
    out = rows(run(program, lab.inventory_path, "power-off", "--json"))["node1"]
    assert out["ok"] and out["changed"] is True and out["confirmed"] is False
    st = lab.status("node1")
    assert (st["power"], st["pending"]) == ("on", "off")  # the power-off is landing
    out = rows(run(program, lab.inventory_path, "power-on", "--json", "--wait"))["node1"]
    assert out["ok"] and out["power"] == "on" and out["changed"] is False and out["confirmed"]
    st = lab.status("node1")
    assert (st["power"], st["pending"], st["phase"]) == ("on", None, "up"), st


def test_power_off_while_a_power_on_lands_keeps_the_node_off(make_fake_lab):
    """The sibling: power-off of a node that reads off while its power-on lands."""
    lab = make_fake_lab(count=1, ssh=False, power_delay=(0.05, 0.1), boot_delay=0.05)
    lab.control.fault("node1", **HOLD)
    assert rows(run("labkit", lab.inventory_path, "power-on", "--json"))["node1"]["changed"]
    assert (lab.status("node1")["power"], lab.status("node1")["pending"]) == ("off", "on")
    out = rows(run("labkit", lab.inventory_path, "power-off", "--json"))["node1"]
    assert out["ok"] and out["power"] == "off" and out["changed"] is False
    st = lab.status("node1")
    assert (st["power"], st["pending"]) == ("off", None), st


# -- Ctrl-C / SIGTERM while a BMC is dead -----------------------------------------------------------

TASKS = [["power-status"], ["power-on"], ["power-off"], ["power-soft"], ["power-reset"],
         ["power-cycle"], ["boot-device", "pxe"], ["power-on", "--wait=ssh"],
         ["power-cycle", "--wait=ssh"]]


@pytest.fixture(scope="module")
def dead_lab(tmp_path_factory):
    from labkit.fake.harness import start_fake_lab

    lab = start_fake_lab(tmp_path_factory.mktemp("deadbmc"), count=1, ssh=True)
    lab.control.fault("node1", down=True)
    yield lab
    lab.stop()


def _interrupt_while_waiting(lab: Any, argv: list[str], sig: int) -> tuple[float, Any]:
    """Start the task with the real defaults (a 60 s retry window), wait until its packets
    reach the dead BMC, send ``sig``; the seconds until it exited and the process."""
    before = lab.status("node1")["stats"]["ignored"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVOKE_LABKIT_")}
    proc = subprocess.Popen([*LABKIT, *argv, "--inventory", str(lab.inventory_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 30
        while lab.status("node1")["stats"]["ignored"] == before:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the task never reached the BMC"
            time.sleep(0.02)
        t0 = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=30)
        return time.monotonic() - t0, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("argv", TASKS, ids=[" ".join(a) for a in TASKS])
def test_ctrl_c_while_the_bmc_is_dead_acts_at_once(dead_lab, argv):
    seconds, proc = _interrupt_while_waiting(dead_lab, argv, signal.SIGINT)
    stdout, stderr = proc.communicate()
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == 130, (proc.returncode, stdout, stderr)
    assert stderr.strip().splitlines()[-1:] == ["interrupted"], stderr
    assert seconds < 2.0, f"{' '.join(argv)}: {seconds:.1f} s after SIGINT"


@pytest.mark.parametrize("argv", [["power-on", "--wait=ssh"], ["power-status"]],
                         ids=["wait-ssh", "status"])
def test_sigterm_while_the_bmc_is_dead_acts_at_once(dead_lab, argv):
    """SIGTERM ends the task as fast, as the task layer ends any task on SIGTERM: one line,
    exit 128 + 15 (labkit/signals.py)."""
    seconds, proc = _interrupt_while_waiting(dead_lab, argv, signal.SIGTERM)
    _, stderr = proc.communicate()
    assert "Traceback" not in stderr, stderr
    assert "interrupted (SIGTERM)" in stderr, stderr
    assert proc.returncode == 143, proc.returncode
    assert seconds < 2.0, f"{' '.join(argv)}: {seconds:.1f} s after SIGTERM"


# -- privilege ------------------------------------------------------------------------------------

def _inventory_as(lab: Any, user: str) -> Path:
    text = lab.inventory_path.read_text()
    assert text.count("user: admin") == 1
    path = lab.inventory_path.with_name(f"inventory-{user}.yaml")  # beside it: same paths
    path.write_text(text.replace("user: admin", f"user: {user}"))
    return path


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_read_only_account_reads_but_cannot_change(make_fake_lab, program):
    """A BMC account with USER privilege (asking for more is refused in RAKP2, as BMCs do):
    labkit settles for USER, reads the power state, and a change is refused by the BMC (0xD4)
    and reported as one line naming the node, the account and what it lacks."""
    lab = make_fake_lab(count=1, ssh=False, power_delay=(0.05, 0.1), boot_delay=0.05,
                        power_on=True)
    lab.wait("node1", power="on", timeout=10)
    lab.control.user("node1", "viewer", "user")
    inv = _inventory_as(lab, "viewer")
    out = rows(run(program, inv, "power-status", "--json"))["node1"]
    assert out["ok"] and out["power"] == "on", out
    for argv in (["power-off"], ["boot-device", "pxe"]):
        r = run(program, inv, *argv, "--json")
        assert r.returncode == 1, r.stdout + r.stderr
        err = rows(r)["node1"]["error"]
        assert err.startswith("node1: BMC 127.0.0.1:"), err
        assert "refused: insufficient privilege (completion code 0xD4)" in err, err
        assert "BMC user 'viewer' may read but not change this node" in err, err
        assert "netfn" not in err and "\n" not in err
    st = lab.status("node1")
    assert (st["power"], st["pending"], st["bootdev"]) == ("on", None, "default")


def test_an_operator_account_may_change_power(make_fake_lab):
    lab = make_fake_lab(count=1, ssh=False, power_delay=(0.05, 0.1), boot_delay=0.05)
    lab.control.user("node1", "oper", "operator")
    out = rows(run("labkit", _inventory_as(lab, "oper"), "power-on", "--wait", "--json"))
    assert out["node1"]["ok"] and out["node1"]["confirmed"], out
    assert lab.status("node1")["power"] == "on"


def test_labkit_negotiates_cipher_suite_17(make_fake_lab):
    """pyghmi proposes suite 17 (SHA-256) first; the fake BMC now accepts it, so labkit's
    sessions are suite 17, not a fallback to 3."""
    lab = make_fake_lab(count=2, ssh=False)
    assert rows(run("labkit", lab.inventory_path, "power-status", "--json"))["node1"]["ok"]
    for n in lab.nodes:
        assert lab.status(n)["stats"]["suites"] == {"17": 1}, lab.status(n)["stats"]
