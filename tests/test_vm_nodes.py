"""Guest nodes (``fake_lab: {kind: vm}``): the fake BMC powers a QEMU guest with its own Linux
kernel, and every labkit task reaches it over a real sshd inside it. What this proves that the
process kind cannot: another kernel (soft-dirty works there), RAM that a power-off really loses,
a disk that survives, the kernel's own boot log on SOL, a LAN between nodes.

Skipped with the reason where QEMU, a kernel with modules or a static busybox is missing
(``.ci/run`` installs them). Slow: a TCG guest boots in ~10 s and runs python3 in ~1.5 s, so
one lab of two guests is shared by the module and the tests leave it powered on."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit.fake import vmimage
from labkit.fake.harness import start_fake_lab

WHY = vmimage.have_qemu()
pytestmark = [pytest.mark.slow, pytest.mark.vm,
              pytest.mark.skipif(WHY is not None, reason=f"guest nodes: {WHY}")]
LABKIT = [sys.executable, "-m", "labkit.cli"]
BOOT = 120.0  # a TCG boot takes ~10 s alone, ~15 s two at once; on a loaded 2-core CI, more


def labkit(lab, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
    return subprocess.run([*LABKIT, *args], env=lab.env, capture_output=True, text=True,
                          timeout=timeout)


def ok(lab, *args: str, timeout: float = 300.0) -> str:
    r = labkit(lab, *args, timeout=timeout)
    assert r.returncode == 0, f"labkit {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def run_json(lab, node: str, command: str) -> dict:
    out = ok(lab, "run", "-n", node, "--json", command)
    return json.loads(out)[0]


@pytest.fixture(scope="module")
def vmlab(tmp_path_factory):
    lab = start_fake_lab(tmp_path_factory.mktemp("vmlab"), count=2, kind="vm",
                         power_delay=(0.05, 0.1))
    try:
        ok(lab, "power-on", "--wait", "ssh", timeout=BOOT * 2)
        yield lab
    finally:
        lab.stop()


def test_guest_runs_its_own_kernel_and_soft_dirty(vmlab) -> None:
    r = run_json(vmlab, "node1", "uname -r; cat /proc/sys/kernel/hostname")
    guest_kernel, hostname = r["value"]["stdout"].split() if isinstance(r["value"], dict) \
        else r["stdout"].split()
    assert guest_kernel == vmimage.find_kernel().version
    assert guest_kernel != platform.release()
    assert hostname == "node1"


def test_lan_between_guests(vmlab) -> None:
    r = run_json(vmlab, "node1", "busybox ping -c 1 -W 5 10.77.0.2 >/dev/null && echo reached")
    assert "reached" in json.dumps(r)


def test_power_off_loses_ram_keeps_disk(vmlab, tmp_path) -> None:
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "hello.txt").write_text("kept across power cycles\n")
    ok(vmlab, "run", "-n", "node2", "echo on-disk > ~/left-here; "
       "setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo started")
    ok(vmlab, "power-off", "-n", "node2", "--wait")
    assert vmlab.status("node2")["power"] == "off"
    ok(vmlab, "power-on", "-n", "node2", "--wait", "ssh", timeout=BOOT * 2)
    out = ok(vmlab, "run", "-n", "node2", "cat ~/left-here; pgrep -x sleep || echo no-sleep")
    assert "on-disk" in out and "no-sleep" in out


def test_console_capture_holds_kernel_boot_log(vmlab, tmp_path) -> None:
    log = tmp_path / "console.log"
    ok(vmlab, "power-cycle", "-n", "node1", "--wait", "ssh", timeout=BOOT * 2)
    text = (vmlab.state_dir / "console" / "node1.log").read_text(errors="replace")
    assert "Linux version" in text and vmimage.find_kernel().version in text
    assert log is not None


def test_soft_off_honoured(vmlab) -> None:
    ok(vmlab, "power-soft", "-n", "node2", "--wait")
    assert vmlab.status("node2")["power"] == "off"
    ok(vmlab, "power-on", "-n", "node2", "--wait", "ssh", timeout=BOOT * 2)


def test_ssh_drops_when_powered_off_mid_run(vmlab) -> None:
    p = subprocess.Popen([*LABKIT, "run", "-n", "node2", "echo go; sleep 600"], env=vmlab.env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0)  # the run is connected once the guest printed "go" (read below)
        end = time.monotonic() + 60
        while time.monotonic() < end and not vmlab.processes():
            time.sleep(0.2)
        ok(vmlab, "power-off", "-n", "node2", "--wait")
        out, err = p.communicate(timeout=60)
        assert p.returncode == 1, (out, err)
    finally:
        if p.poll() is None:
            p.kill()
    ok(vmlab, "power-on", "-n", "node2", "--wait", "ssh", timeout=BOOT * 2)
