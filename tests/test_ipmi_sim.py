"""Interop: labkit's BMC client (pyghmi sessions) against OpenIPMI's ipmi_sim, an independent
BMC implementation. Power goes through tests/ipmi_sim/chassis_control; SOL is relayed by
ipmi_sim from a TCP "serial port" this test serves."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from labkit import inventory
from labkit.bmc.console import SolConsole
from labkit.bmc.power import PowerClient
from labkit.bmc.session import BmcAuthError
from labkit.config import Settings
from labkit.fake.ports import free_port

HERE = Path(__file__).parent / "ipmi_sim"
ROOT = Path(__file__).parent.parent
pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(shutil.which("ipmi_sim") is None,
                       reason="OpenIPMI ipmi_sim not installed (apt install openipmi)"),
]


class SerialPort:
    """The host side of the node's serial line: ipmi_sim connects here and relays to SOL.
    Prints a few boot lines and a login prompt, then echoes what it receives."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.settimeout(0.3)
            n = 0
            while not self._stop.is_set():
                try:
                    data = conn.recv(256)
                    if not data:
                        break
                    self.received += data
                    conn.sendall(b"echo:" + data)
                except TimeoutError:
                    pass
                except OSError:
                    break
                try:
                    conn.sendall(f"boot line {n}\r\n".encode() +
                                 (b"sim login: " if n % 3 == 2 else b""))
                except OSError:
                    break
                n += 1

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[tuple[inventory.Inventory, Path]]:
    password = secrets.token_hex(8)
    port = free_port(socket.SOCK_DGRAM)
    serial = SerialPort()
    for name in ("chassis_control", "sim.emu"):
        shutil.copy(HERE / name, tmp_path / name)
    conf = (HERE / "lan.conf").read_text()
    for k, v in {"@ADDR@": "127.0.0.1", "@PORT@": str(port), "@PASSWORD@": password,
                 "@CHASSIS@": str(tmp_path / "chassis_control"),
                 "@SOL@": f"127.0.0.1:{serial.port}"}.items():
        conf = conf.replace(k, v)
    (tmp_path / "lan.conf").write_text(conf)
    os.chmod(tmp_path / "lan.conf", 0o600)
    pw_file = tmp_path / "bmc-password"
    pw_file.write_text(password + "\n")
    os.chmod(pw_file, 0o600)
    (tmp_path / "state").mkdir()
    inv_path = tmp_path / "inventory.yaml"
    inv_path.write_text(
        "nodes:\n"
        "  sim1:\n"
        f"    bmc: {{host: 127.0.0.1, port: {port}, user: admin, password_file: bmc-password}}\n"
        "  gone:\n"  # nothing listens here
        f"    bmc: {{host: 127.0.0.1, port: {free_port(socket.SOCK_DGRAM)}, user: admin,"
        " password_file: bmc-password}\n")
    proc = subprocess.Popen(["ipmi_sim", "-c", "lan.conf", "-f", "sim.emu", "-s", "state", "-n"],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        inv = inventory.load(inv_path)
        client = PowerClient(Settings(bmc_timeout=2, retry_window=5))
        deadline = time.monotonic() + 10
        while True:  # ready when it answers a login
            try:
                client.status(inv.node("sim1"))
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        client.close()
        yield inv, tmp_path
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
        serial.close()


FAST = Settings(bmc_timeout=2.0, retry_window=4.0, retry_first_delay=0.2, power_wait=10.0,
                cycle_delay=0.1)


def test_status_on_off_against_ipmi_sim(sim):
    inv, tmp = sim
    node = inv.node("sim1")
    with PowerClient(FAST) as client:
        assert client.status(node) == "off"
        assert client.on(node, wait=True) == {"power": "on", "changed": True, "confirmed": True}
        assert client.status(node) == "on"
        # idempotent, and sent anyway: the BMC's last request must be ours
        assert client.on(node)["changed"] is False
        assert client.off(node, wait=True)["power"] == "off"
        assert client.status(node) == "off"
        client.cycle(node, wait=True)
        assert client.status(node) == "on"
        client.set_boot_device(node, "pxe")
    # cycle of an off node: off (nothing to do) then on; ipmi_sim relays the boot device too
    assert (tmp / "chassis.log").read_text().split("\n") == [
        "mc set power 1", "mc set power 1", "mc set power 0", "mc set power 0",
        "mc set power 1", "mc set boot pxe", ""]


def test_reset_of_an_off_node_is_refused_plainly(sim):
    """ipmi_sim accepts a reset of an off chassis and does nothing (labkit used to report it
    as "on, changed"); labkit fails it with the same line as against the fake BMC, which
    refuses it with 0xD5, and sends no reset."""
    from labkit.errors import NodeError

    inv, tmp = sim
    with PowerClient(FAST) as client:
        assert client.status(inv.node("sim1")) == "off"
        with pytest.raises(NodeError) as err:
            client.reset(inv.node("sim1"))
    assert str(err.value).startswith("sim1: power is off: a reset does nothing")
    assert err.value.value == {"power": "off", "changed": False, "confirmed": True}
    log = tmp / "chassis.log"
    assert "reset" not in (log.read_text() if log.exists() else "")


@pytest.mark.slow  # the labkit CLI against ipmi_sim
def test_cli_against_ipmi_sim(sim):
    inv, tmp = sim
    env = dict(os.environ, INVOKE_LABKIT_BMC_TIMEOUT="1", INVOKE_LABKIT_RETRY_WINDOW="2")
    cmd = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]
    r = subprocess.run([*cmd, "power-on", "-i", str(inv.path), "-n", "sim1", "--wait"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr + r.stdout
    r = subprocess.run([*cmd, "power-status", "-i", str(inv.path), "--json"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1  # "gone" has no BMC behind it
    import json

    rows = {row["node"]: row for row in json.loads(r.stdout)}
    assert rows["sim1"]["ok"] and rows["sim1"]["power"] == "on"
    assert not rows["gone"]["ok"] and "timeout" in rows["gone"]["error"]


def test_wrong_password_against_ipmi_sim(sim, monkeypatch):
    inv, tmp = sim
    (tmp / "bmc-password").write_text("not-the-password\n")
    t0 = time.monotonic()
    with PowerClient(FAST) as client, pytest.raises(BmcAuthError, match="sim1: .*login refused"):
        client.status(inv.node("sim1"))
    assert time.monotonic() - t0 < 1.0  # not retried


def test_console_against_ipmi_sim(sim):
    inv, _ = sim
    events: list[str] = []
    with SolConsole(inv.node("sim1"), FAST, on_event=events.append) as con:
        assert con.expect(r"login:", timeout=10)
        con.write(b"root\r")
        assert con.expect(r"echo:root", timeout=10)
    assert events[0] == "SOL connected"
