"""The lan port: a controller process on the vm lab's LAN. Two lan ports on one fresh multicast
group are two hosts of one Ethernet (no guest needed: fast); one guest's sshd is reached from a
lan port over the QEMU LAN (slow, vm)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit import lanport
from labkit.fake import vmimage
from labkit.fake.ports import free_port

WHY = lanport.why_not()
needs_lanport = pytest.mark.skipif(WHY is not None, reason=f"lan port: {WHY}")
PY = sys.executable
SYSTEM_PY = "/usr/bin/python3"

# Reads one line from stdin (the number of bytes), serves one TCP client: echoes everything.
ECHO_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.77.0.250", 7077)); s.listen(1)
print("ready", flush=True)
c, peer = s.accept()
print(peer[0], flush=True)
while data := c.recv(65536):
    c.sendall(data)
"""

# Sends N pseudo-random bytes, reads the echo whole, prints a JSON verdict.
ECHO_CLIENT = r"""
import hashlib, json, socket, sys, threading
n = int(sys.argv[1])
data = b"".join(hashlib.sha256(i.to_bytes(8, "little")).digest() for i in range(n // 32))
c = socket.create_connection(("10.77.0.250", 7077), timeout=20)
threading.Thread(target=lambda: (c.sendall(data), c.shutdown(socket.SHUT_WR))).start()
got = bytearray()
while chunk := c.recv(65536):
    got += chunk
print(json.dumps({"sent": len(data), "got": len(got), "same": bytes(got) == data,
                  "local": c.getsockname()[0]}))
sys.exit(0 if bytes(got) == data else 3)
"""


def _as_nobody() -> list[str]:
    return ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return False


def _readline(proc: subprocess.Popen, timeout: float = 20.0) -> str:
    """A line of a child's stdout within ``timeout`` (a hung child fails the test, not CI)."""
    import selectors
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no line from {proc.args} within {timeout}s")
    return proc.stdout.readline()


def test_lan_command_is_a_plain_argv() -> None:
    argv = lanport.lan_command("230.0.77.1", 4000, "10.77.0.250/24", ["python3", "-c", "1"])
    assert argv[:3] == [PY, "-m", "labkit.lanport"]
    assert argv[argv.index("--mcast") + 1] == "230.0.77.1:4000"
    assert argv[argv.index("--") + 1:] == ["python3", "-c", "1"]
    assert lanport.LanPort(4000).command(["x"]) == lanport.lan_command(
        "230.0.77.1", 4000, "10.77.0.250/24", ["x"])


@pytest.mark.parametrize("args", [["--mcast", "10.0.0.1:4000", "--", "true"],
                                  ["--mcast", "230.0.77.1:0", "--", "true"],
                                  ["--mcast", "230.0.77.1:4000", "--address", "10.77.0/24",
                                   "--", "true"]])
def test_bad_arguments_are_one_line_and_exit_2(args: list[str]) -> None:
    r = subprocess.run([PY, "-m", "labkit.lanport", *args], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2
    assert r.stderr.startswith("lanport: bad --mcast") and r.stderr.count("\n") == 1


@needs_lanport
@pytest.mark.parametrize("client_user", ["caller", "nobody"])
def test_two_lan_ports_are_two_hosts_of_one_lan(client_user: str) -> None:
    """A TCP echo across the group, every byte checked both ways: frames reach the other lan
    port once each (our own looped-back datagrams are not fed back into the tap). As "nobody"
    the client's lan port runs in a user namespace of its own (the not-root path)."""
    port = free_port(socket.SOCK_DGRAM)
    client_argv = lanport.LanPort(port, address="10.77.0.251/24").command(
        [PY, "-c", ECHO_CLIENT, str(1 << 20)])
    env = None
    if client_user == "nobody":
        # the system python3 and this checkout by path: a venv's interpreter may sit under a
        # folder only its owner can enter (pyenv under /root)
        if os.geteuid() != 0 or not shutil.which("setpriv") or not os.access(SYSTEM_PY, os.X_OK):
            pytest.skip(f"needs root, setpriv and {SYSTEM_PY} to run a lan port as another user")
        client_argv = [*_as_nobody(), *[SYSTEM_PY if a == PY else a for a in client_argv]]
        env = {**os.environ, "PYTHONPATH": str(Path(lanport.__file__).resolve().parents[1])}
    lan = lanport.LanPort(port, address="10.77.0.250/24")
    server = lan.popen([PY, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert _readline(server) == "ready\n"
        client = subprocess.run(client_argv, capture_output=True, text=True, timeout=60, cwd="/",
                                env=env)
        assert client.returncode == 0, client.stderr
        verdict = json.loads(client.stdout)
        assert verdict == {"sent": 1 << 20, "got": 1 << 20, "same": True,
                           "local": "10.77.0.251"}
        assert _readline(server) == "10.77.0.251\n"
        assert server.wait(timeout=20) == 0
    finally:
        server.kill()
        server.wait()


@needs_lanport
def test_exit_status_and_stdio_pass_through(tmp_path: Path) -> None:
    lan = lanport.LanPort(free_port(socket.SOCK_DGRAM))
    r = subprocess.run(lan.command(["sh", "-c", "read x; echo got:$x; echo err >&2; exit 7"]),
                       input="hello\n", capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (7, "got:hello\n", "err\n")
    r = subprocess.run(lan.command(["sh", "-c", "kill -9 $$"]), capture_output=True,
                       timeout=30)
    assert r.returncode == 128 + signal.SIGKILL


@needs_lanport
def test_sigterm_ends_cmd_and_whatever_it_left_in_the_namespace(tmp_path: Path) -> None:
    """SIGTERM goes to CMD; a grandchild CMD left behind (its own session, ignoring SIGTERM)
    is swept with the namespace: nothing outlives the lan port."""
    pids = tmp_path / "pids"
    script = (f"setsid sh -c 'trap \"\" TERM; echo $$ >{pids}; exec sleep 1000' & "
              f"echo $$ >>{pids}.cmd; wait")
    lan = lanport.LanPort(free_port(socket.SOCK_DGRAM))
    proc = lan.popen(["sh", "-c", script])
    try:
        deadline = time.monotonic() + 20
        while not (pids.exists() and pids.read_text().strip()
                   and Path(f"{pids}.cmd").exists()):
            assert time.monotonic() < deadline, "CMD did not start"
            time.sleep(0.02)
        grandchild, cmd = int(pids.read_text()), int(Path(f"{pids}.cmd").read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM
        assert _wait_gone(cmd) and _wait_gone(grandchild)
    finally:
        proc.kill()
        proc.wait()


@needs_lanport
def test_cmd_dies_with_a_killed_lan_port(tmp_path: Path) -> None:
    lan = lanport.LanPort(free_port(socket.SOCK_DGRAM))
    proc = lan.popen(["sh", "-c", "echo $$; exec sleep 1000"], stdout=subprocess.PIPE,
                     text=True)
    try:
        cmd = int(_readline(proc))
        proc.kill()
        proc.wait()
        assert _wait_gone(cmd), "CMD outlived its lan port"
    finally:
        proc.kill()
        proc.wait()


# -- the real LAN: one guest ------------------------------------------------------------------

WHY_VM = vmimage.have_qemu()

BANNER = r"""
import json, os, socket, struct, time
def icmp_echo(host, timeout=30.0):
    # an ICMP echo by hand (root in the lan port's namespace may open raw sockets)
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(timeout)
    ident = os.getpid() & 0xffff
    body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"labkit"
    total = sum(struct.unpack("!%dH" % (len(body) // 2), body))
    total = (total >> 16) + (total & 0xffff)
    csum = ~(total + (total >> 16)) & 0xffff
    s.sendto(body[:2] + struct.pack("!H", csum) + body[4:], (host, 0))
    t0 = time.monotonic()
    while True:
        pkt, peer = s.recvfrom(2048)
        ihl = (pkt[0] & 15) * 4
        typ, _, _, rid, seq = struct.unpack("!BBHHH", pkt[ihl:ihl + 8])
        if typ == 0 and rid == ident and peer[0] == host:
            return round((time.monotonic() - t0) * 1000, 1)
rtt = icmp_echo("10.77.0.1")
c = socket.create_connection(("10.77.0.1", 22), timeout=30)
banner = c.makefile("rb").readline().decode(errors="replace").strip()
print(json.dumps({"rtt_ms": rtt, "banner": banner, "local": c.getsockname()[0]}))
"""


@pytest.mark.slow
@pytest.mark.vm
@needs_lanport
@pytest.mark.skipif(WHY_VM is not None, reason=f"guest nodes: {WHY_VM}")
def test_lan_port_reaches_a_guest_on_the_lab_lan(tmp_path: Path) -> None:
    from labkit.fake.harness import start_fake_lab

    lab = start_fake_lab(tmp_path / "lab", count=1, kind="vm", power_delay=(0.05, 0.1))
    try:
        r = subprocess.run([PY, "-m", "labkit.cli", "power-on", "--wait", "ssh"], env=lab.env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        lan = lanport.LanPort.for_inventory(lab.inventory())
        r = subprocess.run(lan.command([PY, "-c", BANNER]), capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got["banner"].startswith("SSH-2.0-OpenSSH"), got
        assert got["local"] == "10.77.0.250"
        assert got["rtt_ms"] >= 0
    finally:
        lab.stop()
