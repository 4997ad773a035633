"""Guest nodes (``fake_lab: {kind: vm}``): the fake BMC powers a QEMU guest with its own Linux
kernel, and labkit's tasks reach it over a real sshd inside it. What this proves that the
process kind cannot: another kernel (soft-dirty works there), RAM that a power-off really
loses, a disk that survives, the kernel's own boot log on SOL, a LAN between the nodes.

Skipped with the reason where QEMU, a kernel with its modules or a static busybox is missing
(``.ci/run`` installs them). Slow: a TCG guest boots in ~10 s and starts python3 in ~1.5 s, so
one lab of two guests is shared by the module; each test leaves both nodes powered on."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time

import pytest

from labkit.fake import vmimage
from labkit.fake.harness import start_fake_lab

WHY = vmimage.have_qemu()
pytestmark = [pytest.mark.slow, pytest.mark.vm,
              pytest.mark.skipif(WHY is not None, reason=f"guest nodes: {WHY}")]
LABKIT = [sys.executable, "-m", "labkit.cli"]
BOOT = 150.0  # a TCG boot is ~10 s alone, ~15 s two at once; a loaded 2-core CI takes longer


def labkit(lab, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
    return subprocess.run([*LABKIT, *args], env=lab.env, capture_output=True, text=True,
                          timeout=timeout)


def ok(lab, *args: str, timeout: float = 300.0) -> str:
    r = labkit(lab, *args, timeout=timeout)
    assert r.returncode == 0, f"labkit {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def stdout_of(lab, node: str, command: str) -> str:
    (row,) = json.loads(ok(lab, "run", "-n", node, "--json", "--", command))
    assert row["ok"], row
    return row["stdout"]


def power_on(lab, node: str) -> None:
    ok(lab, "power-on", "-n", node, "--wait", "ssh", timeout=BOOT * 2)


@pytest.fixture(scope="module")
def vmlab(tmp_path_factory):
    lab = start_fake_lab(tmp_path_factory.mktemp("vmlab"), count=2, kind="vm",
                         power_delay=(0.05, 0.1))
    try:
        ok(lab, "power-on", "--wait", "ssh", timeout=BOOT * 2)
        yield lab
    finally:
        lab.stop()
    assert not lab.processes(), "a guest outlived lab.down"


def test_guest_runs_its_own_kernel_with_soft_dirty(vmlab) -> None:
    """`run` lands in the guest: its kernel (not the host's), its hostname, and soft-dirty,
    which this host's kernel may lack (the tracker's softdirty backend runs for real here)."""
    kernel, hostname, softdirty = stdout_of(
        vmlab, "node1", "uname -r; hostname; "
        "grep -q 'soft-dirty\\|CONFIG_MEM_SOFT_DIRTY=y' /boot/config-$(uname -r) "
        "&& echo yes || echo no").split()
    assert kernel == vmimage.find_kernel().version
    assert hostname == "node1"
    assert softdirty == "yes"
    if kernel == platform.release():
        pytest.skip("the guest kernel is the host's own: nothing to tell them apart by")


def test_status_shows_each_guest_and_its_pid(vmlab) -> None:
    rows = json.loads(ok(vmlab, "lab.status", "--json"))
    for row in rows:
        pid = row["pid"]
        assert row["power"] == "on" and isinstance(pid, int)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert b"qemu-system" in f.read()


def test_lan_between_guests(vmlab) -> None:
    out = stdout_of(vmlab, "node1", "busybox ping -c 1 -W 10 10.77.0.2 >/dev/null && echo ok")
    assert out.strip() == "ok"


def test_power_off_loses_processes_keeps_disk(vmlab) -> None:
    stdout_of(vmlab, "node2", "echo kept > ~/on-disk; "
              "setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo started")
    assert "sleep 1000" in stdout_of(vmlab, "node2", "ps -eo args")
    ok(vmlab, "power-off", "-n", "node2", "--wait")
    assert vmlab.status("node2")["power"] == "off"
    power_on(vmlab, "node2")
    assert stdout_of(vmlab, "node2", "cat ~/on-disk") == "kept\n"
    assert "sleep 1000" not in stdout_of(vmlab, "node2", "ps -eo args")


def test_deployed_release_survives_power_cycle_and_the_boot_log_is_on_sol(vmlab) -> None:
    """A power-cycle really reboots (a new boot_id, RAM gone) and keeps the disk; the console
    capture of that cycle holds the kernel's own boot messages."""
    ok(vmlab, "deploy", "-n", "node1")
    boot_id = stdout_of(vmlab, "node1", "echo x > /dev/shm/in-ram; "
                        "cat /proc/sys/kernel/random/boot_id").strip()
    log = vmlab.state_dir / "console" / "node1.log"
    offset = log.stat().st_size
    ok(vmlab, "power-cycle", "-n", "node1", "--wait", "ssh", timeout=BOOT * 2)
    after = stdout_of(vmlab, "node1", "cat /proc/sys/kernel/random/boot_id; "
                      "cat /dev/shm/in-ram 2>/dev/null || echo gone").split()
    assert after[0] != boot_id and after[1] == "gone"
    ok(vmlab, "deploy", "-n", "node1", "--check")
    with open(log, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    assert f"Linux version {vmimage.find_kernel().version}" in text
    assert "labkit-boot: node1 up" in text


def test_guest_cannot_read_the_labs_secrets_or_get_out(vmlab) -> None:
    out = stdout_of(vmlab, "node1", f"ls -A {vmlab.state_dir} | wc -l; "
                    f"cat {vmlab.password_file} 2>&1 | head -c 80; echo; "
                    "busybox wget -q -T 3 -O- http://10.0.2.2:1/ 2>&1 | head -c 80; echo")
    count, *rest = out.split("\n")
    assert count.strip() == "0", out  # an empty tmpfs over the lab's state folder
    assert vmlab.password().decode() not in out


def test_soft_off_is_honoured(vmlab) -> None:
    """The guest shuts itself down (its own "reboot: Power down"), not a hard off."""
    log = vmlab.state_dir / "console" / "node2.log"
    offset = log.stat().st_size
    ok(vmlab, "power-soft", "-n", "node2", "--wait")
    assert vmlab.status("node2")["power"] == "off"
    with open(log, "rb") as f:
        f.seek(offset)
        assert b"reboot: Power down" in f.read()
    power_on(vmlab, "node2")


def test_ssh_drops_when_powered_off_mid_run(vmlab) -> None:
    p = subprocess.Popen([*LABKIT, "run", "-n", "node2", "--", "echo go; sleep 600"],
                         env=vmlab.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "node2| go"  # connected and running
        ok(vmlab, "power-off", "-n", "node2", "--wait")
        out, err = p.communicate(timeout=60)
        assert p.returncode == 1, (out, err)
        assert "node2" in out and "FAILED" in out
    finally:
        if p.poll() is None:
            p.kill()
    power_on(vmlab, "node2")


def test_migrate_between_guests_with_soft_dirty(vmlab) -> None:
    out = ok(vmlab, "migrate-test", "--size", "16M", "--rate", "500", "--max-rounds", "3",
             "--no-stop-and-copy", "--json", timeout=600)
    result = json.loads(out[out.index("{"):])
    assert result["ok"], result
    run = json.loads((open(os.path.join(result["folder"], "run.json"))).read())
    kernels = json.dumps(run)
    assert vmimage.find_kernel().version in kernels
    assert "softdirty" in kernels


def test_guest_that_panics_at_boot_fails_bringup_with_console_tail(tmp_path) -> None:
    lab = start_fake_lab(tmp_path, count=1, kind="vm", power_delay=(0.05, 0.1),
                         vm={"kernel_args": "rdinit=/nonexistent"})
    try:
        t0 = time.monotonic()
        r = labkit(lab, "power-on", "--wait", "ssh", timeout=BOOT * 2)
        assert r.returncode == 1, r
        assert time.monotonic() - t0 < BOOT
        assert "panic" in (r.stdout + r.stderr).lower()
        assert lab.status("node1")["power"] == "off"  # panic=-1 with -no-reboot: it is off
    finally:
        lab.stop()


def test_killed_lab_leaves_no_guest(tmp_path) -> None:
    lab = start_fake_lab(tmp_path, count=1, kind="vm", power_delay=(0.05, 0.1))
    try:
        lab.control.power("*", "on", now=True)
        end = time.monotonic() + 30
        while lab.status("node1").get("pid") is None and time.monotonic() < end:
            time.sleep(0.1)
        qemu = lab.status("node1")["pid"]
        assert qemu
        os.kill(lab.pid, signal.SIGKILL)
        end = time.monotonic() + 15
        while os.path.exists(f"/proc/{qemu}") and time.monotonic() < end:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{qemu}"), "QEMU outlived its BMC"
    finally:
        lab.stop()


def test_console_tail_keeps_a_panics_cause() -> None:
    """What a panicked node's error shows: the panic line survives its stack dump."""
    from labkit.bringup import tail_text

    text = "boot\nKernel panic - not syncing: No working init found\n" + \
        "".join(f" frame {i}\n" for i in range(40)) + "Kernel Offset: 0x3a00000\n"
    tail = tail_text(text)
    assert tail.startswith("Kernel panic - not syncing: No working init found | ... |")
    assert tail.endswith("Kernel Offset: 0x3a00000") and len(tail) <= 400


def test_soft_dirty_tests_that_skip_on_the_host_pass_inside_a_guest(vmlab) -> None:
    """The tracker's soft-dirty tests (exact dirty sets against the workload's ground truth,
    every round) skip on a host kernel without soft-dirty; inside the guest they run for real.
    The guest sees this checkout and this interpreter at the same paths (its root is the
    host's), so it runs the very same test files."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # (not the guest half of make test: these tests are the rest's)
    cmd = (f"cd {repo} && PYTHONDONTWRITEBYTECODE=1 LABKIT_SUITE_HALF= {sys.executable} "
           "-m pytest -q -rs -p no:cacheprovider tests/test_tracker.py tests/test_workload.py "
           "-k softdirty")
    r = labkit(vmlab, "run", "-n", "node1", "--json", "--timeout", "900", "--", cmd,
               timeout=1000)
    (row,) = json.loads(r.stdout)
    out = row["stdout"]
    assert row["ok"], out[-3000:] + row.get("stderr", "")[-2000:]
    assert " passed" in out and "skipped" not in out, out[-3000:]


def test_console_is_the_guests_serial_port_both_ways(vmlab) -> None:
    """`console NODE` on a terminal: what we type reaches the guest's own shell on ttyS0 and its
    answer comes back over SOL."""
    from test_console_session import Pty

    term = Pty([*LABKIT, "console", "node1"], vmlab.env)
    try:
        assert term.read_until(b"SOL connected", 30), term.text()
        term.write(b"\recho sum=$((40+2)) on $(hostname)\r")
        assert term.read_until(b"sum=42 on node1", 60), term.text()  # the guest's shell
        term.write(b"\r~.")
        assert term.proc.wait(15) == 0
    finally:
        term.close()


def test_dirty_rate_and_leases_work_on_a_guest(vmlab) -> None:
    """dirty-rate with the soft-dirty tracker (real in the guest) and reserve/release, unchanged."""
    pid = stdout_of(vmlab, "node1", "setsid python3 -c 'import mmap, time\n"
                    "m = mmap.mmap(-1, 1 << 22, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
                    "while True:\n    m[0:1 << 22:4096] = b\"x\" * 1024; time.sleep(0.01)' "
                    "</dev/null >/dev/null 2>&1 & echo $!").strip()
    try:
        (row,) = json.loads(ok(vmlab, "dirty-rate", "-n", "node1", "--pid", pid, "--seconds",
                               "2", "--tracker", "softdirty", "--json", timeout=300))
        assert row["ok"], row
        assert row["backend"] == "softdirty" and row["pages"] >= 1024, row
    finally:
        stdout_of(vmlab, "node1", f"kill {pid}; echo done")
    ok(vmlab, "reserve", "-n", "node2", "--for", "5m")
    try:
        r = labkit(vmlab, "power-off", "-n", "node2")  # a lease held by us: ours to use
        assert r.returncode == 0, r
    finally:
        ok(vmlab, "release", "-n", "node2")
    power_on(vmlab, "node2")
