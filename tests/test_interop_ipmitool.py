"""The fake BMC against independent IPMI implementations: ipmitool (lanplus, suites 3 and
17, privilege levels) and freeipmi (ipmipower, ipmiconsole, rmcpping). Each test is skipped with the reason when its tool is
missing. The password goes by file (ipmitool -f, freeipmi --config-file), never argv."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop
FAST = {"power_delay": (0.05, 0.2), "boot_delay": 0.3}


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed (apt-get install "
                    f"{'ipmitool' if tool == 'ipmitool' else 'freeipmi-tools'})")
    return path


def ipmitool_argv(lab, node: str, *args: str) -> list[str]:
    host, port = lab.bmc(node)
    return [need("ipmitool"), "-I", "lanplus", "-C", "3", "-H", host, "-p", str(port),
            "-U", "admin", "-f", str(lab.password_file), *args]


def ipmitool(lab, node: str, *args: str) -> str:
    r = subprocess.run(ipmitool_argv(lab, node, *args), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


def freeipmi_config(lab, tmp_path: Path) -> Path:
    cfg = tmp_path / "freeipmi.conf"
    fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(b"username admin\npassword " + lab.password() + b"\n")
    return cfg


@pytest.mark.slow  # three boots
def test_ipmitool_power_cycle_of_states(make_fake_lab):
    lab = make_fake_lab(count=1, **FAST)
    assert ipmitool(lab, "node1", "chassis", "power", "status") == "Chassis Power is off\n"
    assert "Up/On" in ipmitool(lab, "node1", "chassis", "power", "on")
    lab.wait("node1", phase="up", ssh=True, timeout=10)
    assert ipmitool(lab, "node1", "chassis", "power", "status") == "Chassis Power is on\n"
    assert "Reset" in ipmitool(lab, "node1", "chassis", "power", "reset")
    deadline = time.monotonic() + 15  # let the reset land and boot before cycling
    while lab.control.console("node1").count("node1 login: ") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "Cycle" in ipmitool(lab, "node1", "chassis", "power", "cycle")
    lab.wait("node1", power="off", timeout=5)
    lab.wait("node1", phase="up", timeout=10)
    assert "Soft" in ipmitool(lab, "node1", "chassis", "power", "soft")
    lab.wait("node1", power="off", ssh=False, timeout=5)
    assert "Down/Off" in ipmitool(lab, "node1", "chassis", "power", "off")
    assert "System Power         : off" in ipmitool(lab, "node1", "chassis", "status")
    text = lab.control.console("node1")
    assert text.count("Linux version") == 3 and "reboot: Power down" in text


def test_ipmitool_bootdev(make_fake_lab):
    lab = make_fake_lab(count=1, ssh=False, **FAST)
    assert "Set Boot Device to pxe" in ipmitool(lab, "node1", "chassis", "bootdev", "pxe")
    assert lab.status("node1")["bootdev"] == "pxe"
    assert "Force PXE" in ipmitool(lab, "node1", "chassis", "bootparam", "get", "5")
    ipmitool(lab, "node1", "chassis", "bootdev", "disk", "options=persistent")
    st = lab.status("node1")
    assert st["bootdev"] == "disk" and st["persistent"] is True
    ipmitool(lab, "node1", "chassis", "bootdev", "bios")
    assert lab.status("node1")["bootdev"] == "bios"


def test_ipmitool_wrong_password_fails_cleanly(make_fake_lab, tmp_path):
    lab = make_fake_lab(count=1, ssh=False, **FAST)
    bad = tmp_path / "bad"
    bad.write_text("not-the-password\n")
    host, port = lab.bmc("node1")
    r = subprocess.run([need("ipmitool"), "-I", "lanplus", "-C", "3", "-H", host, "-p",
                        str(port), "-U", "admin", "-f", str(bad), "chassis", "power", "status"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "Chassis Power" not in r.stdout


def read_until(fd: int, needle: bytes, timeout: float, buf: bytearray) -> bool:
    deadline = time.monotonic() + timeout
    while needle not in buf and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return needle in buf


def test_ipmitool_sol_shows_boot_log(make_fake_lab):
    lab = make_fake_lab(count=1, power_delay=(0.05, 0.1), boot_delay=0.5)
    master, slave = pty.openpty()
    proc = subprocess.Popen(ipmitool_argv(lab, "node1", "sol", "activate"), stdin=slave,
                            stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    buf = bytearray()
    try:
        assert read_until(master, b"SOL Session operational", 10, buf), bytes(buf)
        lab.control.power("node1", "on")
        assert read_until(master, b"node1 login: ", 15, buf), bytes(buf[-500:])
        assert b"Linux version" in buf and b"BIOS" in buf
        os.write(master, b"root\r")
        assert read_until(master, b"Password: ", 5, buf), bytes(buf[-200:])
        os.write(master, b"\r~.")
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert proc.returncode == 0
    lab.wait("node1", sol=False, timeout=10)  # ~. deactivated the payload


def test_ipmipower_status_and_on(make_fake_lab, tmp_path):
    tool = need("ipmipower")
    lab = make_fake_lab(count=2, ssh=False, **FAST)
    cfg = freeipmi_config(lab, tmp_path)
    hosts = ",".join(f"{h}:{p}" for h, p in (lab.bmc(n) for n in lab.nodes))
    base = [tool, "--config-file", str(cfg), "-D", "LAN_2_0", "-h", hosts]
    r = subprocess.run(base + ["--stat"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(": off") == 2, r.stdout
    r = subprocess.run(base + ["--on"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.count(": ok") == 2, (r.stdout, r.stderr)
    for n in lab.nodes:
        lab.wait(n, power="on", timeout=5)
    r = subprocess.run(base + ["--stat"], capture_output=True, text=True, timeout=30)
    assert r.stdout.count(": on") == 2, r.stdout


def test_ipmiconsole_activates_sol(make_fake_lab, tmp_path):
    tool = need("ipmiconsole")
    lab = make_fake_lab(count=1, power_delay=(0.05, 0.1), boot_delay=0.5)
    cfg = freeipmi_config(lab, tmp_path)
    host, port = lab.bmc("node1")
    master, slave = pty.openpty()
    proc = subprocess.Popen([tool, "--config-file", str(cfg), "-h", f"{host}:{port}"],
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    buf = bytearray()
    try:
        ok = read_until(master, b"SOL established", 10, buf)
        if b"hostname invalid" in buf:
            pytest.skip("this ipmiconsole cannot address a BMC on a port other than 623")
        assert ok, bytes(buf)
        lab.control.power("node1", "on")
        assert read_until(master, b"node1 login: ", 15, buf), bytes(buf[-500:])
        os.write(master, b"&.")  # ipmiconsole's escape: &.
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


# -- what current BMCs offer: suite 17, privilege levels, presence ping ----------------------------

def _ipmitool(lab, node: str, *args: str, suite: str = "17",
              user: str = "admin") -> subprocess.CompletedProcess:
    host, port = lab.bmc(node)
    return subprocess.run([need("ipmitool"), "-I", "lanplus", *(["-C", suite] if suite else []),
                           "-H", host, "-p", str(port), "-U", user, "-f",
                           str(lab.password_file), *args],
                          capture_output=True, text=True, timeout=30)


def test_ipmitool_cipher_suite_17_and_the_real_cipher_list(make_fake_lab):
    """`ipmitool -C 17` (the default of many current BMCs and tools) works, ipmitool without
    -C finds a suite through Get Channel Cipher Suites, and that lists 3 and 17."""
    lab = make_fake_lab(count=1, ssh=False, **FAST)
    r = _ipmitool(lab, "node1", "chassis", "power", "on")
    assert r.returncode == 0 and "Up/On" in r.stdout, (r.stdout, r.stderr)
    lab.wait("node1", power="on", timeout=5)
    r = _ipmitool(lab, "node1", "chassis", "power", "status", suite="")
    assert r.returncode == 0 and r.stdout == "Chassis Power is on\n", (r.stdout, r.stderr)
    r = _ipmitool(lab, "node1", "channel", "getciphers", "ipmi", "1")
    assert r.returncode == 0, r.stderr
    suites = {line.split()[0]: line.split()[2:] for line in r.stdout.splitlines()[1:]}
    assert suites == {"3": ["hmac_sha1", "hmac_sha1_96", "aes_cbc_128"],
                      "17": ["hmac_sha256", "sha256_128", "aes_cbc_128"]}, r.stdout
    assert lab.status("node1")["stats"]["suites"].get("17", 0) >= 2


def test_ipmipower_cipher_suite_17(make_fake_lab, tmp_path):
    tool = need("ipmipower")
    lab = make_fake_lab(count=2, ssh=False, **FAST)
    cfg = freeipmi_config(lab, tmp_path)
    hosts = ",".join(f"{h}:{p}" for h, p in (lab.bmc(n) for n in lab.nodes))
    base = [tool, "--config-file", str(cfg), "-D", "LAN_2_0", "-I", "17", "-h", hosts]
    r = subprocess.run(base + ["--on"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.count(": ok") == 2, (r.stdout, r.stderr)
    for n in lab.nodes:
        lab.wait(n, power="on", timeout=5)
    r = subprocess.run(base + ["--stat"], capture_output=True, text=True, timeout=30)
    assert r.stdout.count(": on") == 2, (r.stdout, r.stderr)


def test_privilege_levels_are_enforced(make_fake_lab):
    """A session at USER privilege (an account limited to USER, or an admin asking for USER)
    reads status and gets "insufficient privilege" for a power change; an account limited to
    USER that asks for administrator is refused at login, as BMCs do."""
    lab = make_fake_lab(count=1, ssh=False, **FAST)
    lab.control.user("node1", "viewer", "user")
    for user in ("viewer", "admin"):
        r = _ipmitool(lab, "node1", "-L", "USER", "chassis", "power", "status", user=user)
        assert r.returncode == 0 and r.stdout == "Chassis Power is off\n", (r.stdout, r.stderr)
        r = _ipmitool(lab, "node1", "-L", "USER", "chassis", "power", "on", user=user)
        assert r.returncode != 0 and "Insufficient privilege level" in r.stderr, r.stderr
        r = _ipmitool(lab, "node1", "-L", "USER", "chassis", "bootdev", "pxe", user=user)
        # (ipmitool exits 0 here whatever the BMC said)
        assert "Insufficient privilege level" in r.stderr, r.stderr
        assert lab.status("node1")["bootdev"] == "default"
    r = _ipmitool(lab, "node1", "chassis", "power", "on", user="viewer")  # asks for ADMIN
    assert r.returncode != 0 and "Up/On" not in r.stdout
    st = lab.status("node1")
    assert (st["power"], st["pending"]) == ("off", None)


def test_rmcpping_finds_the_bmc(tmp_path):
    """freeipmi's rmcpping sends an RMCP presence ping, to port 623 only: the fake BMC is put
    on 623 of a loopback address of its own (needs root or CAP_NET_BIND_SERVICE)."""
    import random
    import socket

    from labkit.fake import lab as fake_lab

    tool = need("rmcpping")
    host = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, 623))
    except OSError as e:
        pytest.skip(f"cannot bind UDP {host}:623 here ({e.strerror})")
    fake_lab.generate(1, tmp_path, ssh=False, power_delay=(0.05, 0.1))
    inv = tmp_path / "inventory.yaml"
    text = inv.read_text()
    start = text.index("bmc: {host: 127.0.0.1, port: ")
    end = text.index("}", start)
    inv.write_text(text[:start] + f"bmc: {{host: {host}, port: 623" + text[end:])
    fake_lab.up(inv)
    try:
        r = subprocess.run([tool, "-c", "2", "-t", "2", host], capture_output=True, text=True,
                           timeout=30)
    finally:
        fake_lab.down(inv)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stdout.count("pong received from") == 2, r.stdout
