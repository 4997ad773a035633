"""Power over the fake lab's BMCs (real UDP, the fake lab as a separate process): the library
(labkit.bmc.power.PowerClient) and the tasks (power-*, boot-device) with their --json shape, exit
codes, error messages, and the password's absence from every command line and output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from labkit.bmc.power import PowerClient
from labkit.bmc.session import BmcAuthError
from labkit.bringup import normalize_wait
from labkit.config import Settings
from labkit.errors import NodeError, UserError
from labkit.inventory import BmcSpec, Node

ROOT = Path(__file__).resolve().parent.parent
FAST = Settings(bmc_timeout=1.0, retry_window=3.0, retry_first_delay=0.1, retry_max_delay=0.5,
                power_wait=15.0, cycle_delay=0.1)
FAST_ENV = {"INVOKE_LABKIT_BMC_TIMEOUT": "1", "INVOKE_LABKIT_RETRY_WINDOW": "3",
            "INVOKE_LABKIT_RETRY_FIRST_DELAY": "0.1", "INVOKE_LABKIT_RETRY_MAX_DELAY": "0.5",
            "INVOKE_LABKIT_POWER_WAIT": "15", "INVOKE_LABKIT_CYCLE_DELAY": "0.1"}


def cli(lab: Any, *args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `invoke TASK --inventory LAB ...` the way a user does, in a new process."""
    cmd = [sys.executable, "-m", "invoke", "--search-root", str(ROOT), args[0],
           "--inventory", str(lab.inventory_path), *args[1:]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **FAST_ENV, **(env or {})})


def rows(proc: subprocess.CompletedProcess) -> dict[str, dict[str, Any]]:
    return {r["node"]: r for r in json.loads(proc.stdout)}


def boots(lab: Any, node: str, count: int, timeout: float = 10.0) -> bool:
    """Wait until the node's console shows ``count`` login prompts (one per completed boot)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = lab.control.console(node).count(f"{node} login:")
        if seen >= count or time.monotonic() > deadline:
            return seen == count
        time.sleep(0.05)


# -- pure logic -----------------------------------------------------------------------------------

def test_wait_option_values():
    assert normalize_wait(None) is None and normalize_wait(False) is None
    assert normalize_wait(True) == "power" and normalize_wait("power") == "power"
    assert normalize_wait("SSH") == "ssh"
    with pytest.raises(UserError, match="--wait"):
        normalize_wait("soon")


def test_power_driver_waits_for_power_only():
    """Power -> console -> SSH is labkit.bringup's job: the driver refuses wait="ssh" before it
    sends anything (no BMC here: a send would fail differently)."""
    node = Node(name="n1", bmc=BmcSpec(host="127.0.0.1", port=1, user="u",
                                       password_literal="x"), ssh=None)
    with PowerClient(FAST) as power, pytest.raises(ValueError, match="labkit.bringup"):
        power.on(node, wait="ssh")


def test_bmc_does_not_import_the_ssh_layer():
    """bmc/ knows the BMC only: importing it (and everything it imports) loads neither
    labkit.ssh nor paramiko, and no module under labkit/bmc/ names labkit.ssh, not even in a
    function-level import."""
    code = ("import sys, labkit.bmc.power, labkit.bmc.console, labkit.bmc.session; "
            "print(sorted(m for m in sys.modules if m.startswith(('labkit.ssh', 'paramiko'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip()
    assert out == "[]", out
    for path in (ROOT / "labkit" / "bmc").glob("*.py"):
        text = path.read_text()
        assert "labkit.ssh" not in text and "labkit import ssh" not in text, path


# -- library ------------------------------------------------------------------------------------------

def test_power_actions_over_fake_lab(make_fake_lab):
    lab = make_fake_lab(count=3, ssh=False, power_delay=(0.1, 0.4), boot_delay=0.2)
    n1, n2, n3 = lab.inventory().nodes.values()
    with PowerClient(FAST) as power:
        assert [power.status(n) for n in (n1, n2, n3)] == ["off", "off", "off"]
        assert power.on(n1, wait=True) == {"power": "on", "changed": True, "confirmed": True}
        assert lab.status("node1")["power"] == "on"
        assert power.on(n1) == {"power": "on", "changed": False, "confirmed": True}  # idempotent
        # without wait the call returns before the (delayed) change lands
        assert power.off(n1) == {"power": "off", "changed": True, "confirmed": False}
        assert power.wait_for(n1, "off", time.monotonic() + 10) == "off"
        assert power.off(n1)["changed"] is False

        power.on(n2, wait=True)
        assert boots(lab, "node2", 1)
        assert power.cycle(n2, wait=True)["confirmed"] is True
        assert boots(lab, "node2", 2)  # went off and booted again
        power.reset(n2)
        assert boots(lab, "node2", 3)
        assert power.soft(n2, wait=True)["power"] == "off"
        assert power.status(n2) == "off"

        assert power.set_boot_device(n3, "pxe", persistent=True) == {
            "boot_device": "pxe", "persistent": True}
        assert power.boot_device(n3) == {"device": "pxe", "persistent": True}
        assert lab.status("node3")["bootdev"] == "pxe"
        power.set_boot_device(n3, "disk")
        assert power.boot_device(n3) == {"device": "disk", "persistent": False}
        with pytest.raises(UserError):
            power.set_boot_device(n3, "floppy")


@pytest.mark.slow  # waits out a BMC outage
def test_session_survives_bmc_cold_reset(make_fake_lab):
    """A BMC restart forgets our session: the client must notice and log in again."""
    lab = make_fake_lab(count=1, ssh=False)
    node = lab.inventory().node("node1")
    with PowerClient(FAST) as power:
        assert power.status(node) == "off"  # session now cached
        lab.control.cold_reset("node1")
        t0 = time.monotonic()
        assert power.status(node) == "off"
        assert time.monotonic() - t0 < FAST.retry_window + 1


@pytest.mark.slow  # waits out its budget
def test_wait_gives_up_when_power_never_lands(make_fake_lab):
    lab = make_fake_lab(count=1, ssh=False)
    lab.control.fault("node1", hang=True)
    node = lab.inventory().node("node1")
    settings = Settings(**{**FAST.__dict__, "power_wait": 1.5})
    with PowerClient(settings) as power, pytest.raises(NodeError, match="node1: power still off"):
        power.on(node, wait=True)


def test_wrong_password_fails_at_once(make_fake_lab):
    lab = make_fake_lab(count=2, ssh=False)
    lab.control.fault("node2", refuse_password=True)
    node = lab.inventory().node("node2")
    t0 = time.monotonic()
    with PowerClient(FAST) as power, pytest.raises(BmcAuthError) as err:
        power.status(node)
    assert time.monotonic() - t0 < 1.0  # no retries
    assert str(err.value).startswith("node2: BMC 127.0.0.1:")
    assert "login refused for user 'admin'" in str(err.value)
    r = cli(lab, "power-status", "--json")
    assert r.returncode == 1
    out = rows(r)
    assert out["node1"]["ok"] and not out["node2"]["ok"]
    assert "node2" in out["node2"]["error"] and "login refused" in out["node2"]["error"]
    assert out["node2"]["seconds"] < 1.0


# -- tasks ------------------------------------------------------------------------------------------

@pytest.mark.slow  # every power task through the CLI
def test_tasks_json_shape_and_exit_codes(make_fake_lab):
    lab = make_fake_lab(count=4, ssh=False)
    r = cli(lab, "power-on", "--wait", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [o["node"] for o in out] == ["node1", "node2", "node3", "node4"]
    for o in out:
        assert set(o) == {"node", "ok", "error", "seconds", "power", "changed", "confirmed"}
        assert o["ok"] is True and o["error"] is None and o["power"] == "on"
        assert o["confirmed"] is True and isinstance(o["seconds"], float)
    assert all(lab.status(n)["power"] == "on" for n in lab.nodes)

    r = cli(lab, "boot-device", "-n", "node1,node2", "pxe", "--persistent", "--json")
    assert r.returncode == 0, r.stderr
    assert [(o["node"], o["boot_device"], o["persistent"]) for o in json.loads(r.stdout)] == [
        ("node1", "pxe", True), ("node2", "pxe", True)]

    # one BMC down: its error arrives inside the retry window, the others still report
    lab.control.fault("node3", down=True)
    t0 = time.monotonic()
    r = cli(lab, "power-status", "--json", env={"INVOKE_LABKIT_RETRY_WINDOW": "2"})
    elapsed = time.monotonic() - t0
    assert r.returncode == 1
    out = rows(r)
    assert not out["node3"]["ok"] and "timeout" in out["node3"]["error"]
    assert out["node3"]["error"].startswith("node3: BMC 127.0.0.1:")
    assert 1.5 < out["node3"]["seconds"] < 3.0
    assert all(out[n]["ok"] and out[n]["power"] == "on" for n in ("node1", "node2", "node4"))
    assert elapsed < 10

    r = cli(lab, "power-off", "-n", "node[124]", "--wait")  # table output
    assert r.returncode == 0, r.stderr
    assert "3 node(s), 3 ok, 0 failed" in r.stdout


def test_usage_errors_exit_2(make_fake_lab):
    lab = make_fake_lab(count=1, ssh=False)
    r = cli(lab, "power-on", "--wait=soon")
    assert r.returncode == 2 and "error: --wait: expected one of power, ssh" in r.stderr
    r = cli(lab, "power-status", "-n", "nosuch")
    assert r.returncode == 2 and "unknown node 'nosuch'" in r.stderr
    r = cli(lab, "boot-device", "floppy")
    assert r.returncode == 2 and "boot device 'floppy'" in r.stderr
    assert "Traceback" not in r.stderr


def test_password_never_on_a_command_line_or_in_output(make_fake_lab):
    """While a fan-out runs, no process's argv carries the BMC password, nor does any output."""
    lab = make_fake_lab(count=8, ssh=False, power_delay=(0.2, 0.6))
    secret = lab.password()
    assert len(secret) >= 8
    cmd = [sys.executable, "-m", "invoke", "--search-root", str(ROOT), "power-cycle",
           "--inventory", str(lab.inventory_path), "--wait", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **FAST_ENV})
    scans = 0
    leaks: list[str] = []
    while proc.poll() is None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if secret in argv:
                leaks.append(f"{entry.name}: {argv[:80]!r}")
        scans += 1
        time.sleep(0.01)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    assert scans >= 3  # the scan really overlapped the run
    assert not leaks
    assert secret not in stdout and secret not in stderr
    assert all(o["ok"] for o in json.loads(stdout))


def test_power_on_wait_ssh_hands_over_to_labkit_ssh(make_fake_lab):
    """--wait=ssh (labkit.bringup): power first (BMC), then labkit.ssh.wait_ssh until the node
    accepts us."""
    lab = make_fake_lab(count=2, ssh=True, power_delay=(0.1, 0.3), boot_delay=0.3)
    r = cli(lab, "power-on", "--wait=ssh", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = rows(r)
    assert all(out[n]["ok"] and out[n]["ssh"] is True for n in lab.nodes)
    assert all(lab.status(n)["ssh"] for n in lab.nodes)


def test_power_cycle_wait_ssh_through_bringup(make_fake_lab):
    """labkit.bringup.power_cycle: off, on, then SSH answers again (a second boot on the
    console); the power driver alone is never asked to wait for SSH."""
    from dataclasses import replace

    from labkit import bringup

    lab = make_fake_lab(count=1, ssh=True, power_delay=(0.1, 0.2), boot_delay=0.2)
    node = lab.inventory().node("node1")
    settings = replace(FAST, ssh_wait=20.0)
    with PowerClient(settings) as power:
        assert bringup.power_on(power, node, settings, wait="ssh")["ssh"] is True
        assert boots(lab, "node1", 1)
        out = bringup.power_cycle(power, node, settings, wait="ssh")
    assert out == {"power": "on", "changed": True, "confirmed": True, "ssh": True}
    assert boots(lab, "node1", 2) and lab.status("node1")["ssh"] is True


@pytest.mark.slow  # waits out the SSH budget
def test_node_that_never_answers_ssh_fails_with_its_console_tail(make_fake_lab):
    """--wait=ssh on a node whose SSH never comes up (here: an inventory that points node1 at a
    port nobody listens on) fails that node inside ssh_wait, and the error carries what the
    node printed on its serial console (recorded over SOL while it booted); node2 is fine."""
    from labkit.fake.ports import free_port

    lab = make_fake_lab(count=2, ssh=True, power_delay=(0.1, 0.2), boot_delay=0.3)
    text = lab.inventory_path.read_text()
    port = lab.ssh("node1")[1]
    assert text.count(f"port: {port}") == 1
    broken = lab.inventory_path.parent / "broken.yaml"  # beside it: relative paths stay valid
    broken.write_text(text.replace(f"port: {port}", f"port: {free_port()}"))
    r = subprocess.run(
        [sys.executable, "-m", "labkit.cli", "power-on", "--wait=ssh", "--json",
         "--inventory", str(broken)], capture_output=True, text=True, timeout=90,
        env={**os.environ, **FAST_ENV, "INVOKE_LABKIT_SSH_WAIT": "3"})
    assert r.returncode == 1, r.stdout + r.stderr
    out = rows(r)
    assert out["node2"]["ok"] and out["node2"]["ssh"] is True
    err = out["node1"]["error"]
    assert "node1: SSH did not come up" in err and "console:" in err, err
    assert "node1 login:" in out["node1"]["console_tail"], out["node1"]["console_tail"]


def test_power_tasks_run_on_the_engine_not_the_thread_fan_out(make_fake_lab, tmp_path, capsys):
    """power-on/off/soft/reset/cycle without --wait=ssh, and boot-device, drive every BMC from
    labkit.bmc.engine's one selector loop in the calling thread: the thread fan-out (workers
    named fanout_N) never starts, and the output keeps its columns and JSON shape."""
    import threading

    from invoke import Config, Context

    from labkit.tasks import power as tasks

    lab = make_fake_lab(count=3, ssh=False, power_delay=(0.05, 0.1))
    ctx = Context(Config(overrides={"labkit": {
        **{k[len("INVOKE_LABKIT_"):].lower(): v for k, v in FAST_ENV.items()},
        "lease_dir": str(tmp_path / "leases"), "progress": "never"}}))
    inv = str(lab.inventory_path)
    threads: set[str] = set()
    threading.setprofile(lambda *_: threads.add(threading.current_thread().name))
    try:
        def run(task: Any, *args: Any, **kw: Any) -> dict[str, dict[str, Any]]:
            capsys.readouterr()
            task(ctx, *args, inventory=inv, json=True, **kw)
            return {r["node"]: r for r in json.loads(capsys.readouterr().out)}

        out = run(tasks.power_on, wait=True)
        assert list(out) == ["node1", "node2", "node3"]
        assert all(set(o) == {"node", "ok", "error", "seconds", "power", "changed", "confirmed"}
                   and o["ok"] and o["power"] == "on" and o["confirmed"] for o in out.values())
        assert not any(o["changed"] for o in run(tasks.power_on).values())  # nothing sent
        out = run(tasks.boot_device, "pxe", nodes="node1", persistent=True)
        assert (out["node1"]["boot_device"], out["node1"]["persistent"]) == ("pxe", True)
        out = run(tasks.power_off, nodes="node1", wait=True)
        assert out["node1"]["power"] == "off" and out["node1"]["confirmed"] is True
        out = run(tasks.power_soft, nodes="node2", wait=True)
        assert out["node2"]["power"] == "off" and out["node2"]["confirmed"] is True
        assert run(tasks.power_reset, nodes="node3")["node3"]["changed"] is True
        out = run(tasks.power_cycle, nodes="node[12]", wait=True)
        assert all(o["power"] == "on" and o["confirmed"] for o in out.values())
    finally:
        threading.setprofile(None)
    assert all(lab.status(n)["power"] == "on" for n in lab.nodes)
    assert not [t for t in threads if t.startswith("fanout")], sorted(threads)
