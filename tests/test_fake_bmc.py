"""The fake BMC, driven by pyghmi's client over real UDP against a real lab subprocess.

Each test names the pyghmi-server defect (facts/ipmi.md) or behaviour it pins down."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from pyghmi import exceptions as pyghmi_exc
from pyghmi.ipmi import command, console

from labkit.fake.bmc import COLD_RESET_OUTAGE

FAST = {"power_delay": (0.05, 0.2), "boot_delay": 0.2}


def client(lab, node: str, user: bytes = b"admin", password: bytes | None = None):
    host, port = lab.bmc(node)
    return command.Command(bmc=host, userid=user, password=password or lab.password(),
                           port=port)


def auth_cap_probe(port: int, timeout: float = 0.3) -> bool:
    """Sessionless Get Channel Auth Capabilities: does the BMC answer at all?"""
    msg = bytes([0x20, 0x18, 0xC8, 0x81, 0x00, 0x38, 0x8E, 0x04])
    msg += bytes([(-sum(msg[3:])) & 0xFF])
    pkt = b"\x06\x00\xff\x07\x00" + b"\0" * 8 + bytes([len(msg)]) + msg
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(pkt, ("127.0.0.1", port))
        try:
            return len(s.recv(512)) > 20
        except TimeoutError:
            return False


def wait_boots(lab, node: str, count: int, timeout: float = 15.0) -> None:
    """Until the node finished its count-th boot (login prompt after the count-th kernel)."""
    deadline = time.monotonic() + timeout
    while True:
        text = lab.control.console(node)
        if (text.count("Linux version") >= count and text.count(f"{node} login: ") >= count
                and lab.status(node)["phase"] == "up"):
            assert text.count("Linux version") == count
            return
        assert time.monotonic() < deadline, f"{node}: no boot #{count}"
        time.sleep(0.05)


@pytest.mark.slow  # a 1 s power delay, a boot
def test_power_on_lands_after_delay_and_boots_node(make_fake_lab):
    lab = make_fake_lab(count=1, power_delay=(1.0, 1.2), boot_delay=0.2)
    c = client(lab, "node1")
    assert c.get_power()["powerstate"] == "off"
    t0 = time.monotonic()
    c.set_power("on")
    first = c.get_power()["powerstate"]
    # "on" at once would mean no delay; "on" read after the delay (a client starved that long
    # on a busy machine, as in one loaded suite run) proves nothing either way
    asked = time.monotonic() - t0
    assert first == "off" or asked >= 0.95, f"power landed within {asked:.2f}s: no delay"
    while c.get_power()["powerstate"] != "on":
        assert time.monotonic() - t0 < 5
        time.sleep(0.02)
    assert 0.95 <= time.monotonic() - t0 < 4.0
    st = lab.wait("node1", phase="up", ssh=True, timeout=10)
    assert st["power"] == "on"
    text = lab.control.console("node1")
    for needle in ("BIOS", "Linux version", "[  OK  ]", "node1 login: "):
        assert needle in text
    assert text.index("Linux version") < text.index("node1 login: ")
    assert (lab.state_dir / "console" / "node1.log").read_text() == text

    c.set_power("off")
    lab.wait("node1", power="off", ssh=False, timeout=5)
    assert c.get_power()["powerstate"] == "off"


def test_repeated_requests_are_idempotent(make_fake_lab):
    lab = make_fake_lab(count=1, **FAST)
    c = client(lab, "node1")
    for _ in range(5):  # a client retrying 'on' must not queue five boots
        c.raw_command(netfn=0, command=2, data=[1])
    wait_boots(lab, "node1", 1)  # an extra boot before the login prompt would restart it
    assert c.set_power("on") == {"powerstate": "on"}  # already on: nothing sent
    # an extra boot queued behind the first would land before the next transition we ask
    # for: a reset's boot must be exactly the second one (wait_boots checks the count)
    c.set_power("reset")
    wait_boots(lab, "node1", 2)


@pytest.mark.slow  # three boots
def test_reset_and_cycle_reboot_the_node(make_fake_lab):
    lab = make_fake_lab(count=1, power_on=True, **FAST)
    c = client(lab, "node1")
    c.set_power("reset")
    wait_boots(lab, "node1", 2)
    rsp = c.raw_command(netfn=0, command=2, data=[2])  # power cycle
    assert not rsp.get("code")
    # the off phase of a cycle lasts one power delay (50-200 ms): polling for it races under
    # load, so the proof is the third boot (each boot ends in exactly one login prompt)
    wait_boots(lab, "node1", 3)
    c.set_power("off", wait=True)
    rsp = c.raw_command(netfn=0, command=2, data=[2])  # cycle while off: not now
    assert rsp.get("code") == 0xD5


def test_soft_off_and_diag(make_fake_lab):
    lab = make_fake_lab(count=1, power_on=True, **FAST)
    c = client(lab, "node1")
    assert not c.raw_command(netfn=0, command=2, data=[4]).get("code")  # NMI
    c.set_power("shutdown", wait=True)
    text = lab.control.console("node1")
    assert "NMI received" in text and "reboot: Power down" in text


def test_boot_device_persistent_and_one_shot(make_fake_lab):
    lab = make_fake_lab(count=1, **FAST)
    c = client(lab, "node1")
    assert c.get_bootdev()["bootdev"] == "default"
    c.set_bootdev("network")
    assert c.get_bootdev() == {"bootdev": "network", "persistent": False, "uefimode": False}
    assert lab.status("node1")["bootdev"] == "pxe"
    c.set_power("on")
    wait_boots(lab, "node1", 1)
    assert "PXE" in lab.control.console("node1")
    assert c.get_bootdev()["bootdev"] == "default", "a one-shot override is used up by a boot"
    c.set_bootdev("setup", persist=True)
    assert c.get_bootdev() == {"bootdev": "setup", "persistent": True, "uefimode": False}
    c.set_power("reset")
    wait_boots(lab, "node1", 2)
    assert c.get_bootdev()["bootdev"] == "setup"
    c.set_bootdev("hd")
    assert lab.status("node1")["bootdev"] == "disk"
    c.set_bootdev("default")
    assert c.get_bootdev()["bootdev"] == "default"


class SolReader:
    """pyghmi SOL client: login is asynchronous, data arrives through the callback."""

    def __init__(self, lab, node: str, force: bool = False):
        self.data = bytearray()
        self.errors: list = []
        host, port = lab.bmc(node)
        self.con = console.Console(bmc=host, userid=b"admin", password=lab.password(),
                                   iohandler=self._got, port=port, force=force)

    def _got(self, data) -> None:
        if isinstance(data, dict):
            self.errors.append(data)
        else:
            self.data += data if isinstance(data, bytes) else data.encode()

    def pump_until(self, cond, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            console.Console.wait_for_rsp(0.05)
        return cond()


def test_sol_shows_boot_log_and_echoes_input(make_fake_lab):
    lab = make_fake_lab(count=1, power_delay=(0.05, 0.1), boot_delay=0.5)
    sol = SolReader(lab, "node1")
    assert sol.pump_until(lambda: sol.con.connected or sol.errors, 5)
    assert not sol.errors
    assert lab.status("node1")["sol"] is True
    client(lab, "node1").set_power("on")
    assert sol.pump_until(lambda: b"node1 login: " in sol.data, 10), bytes(sol.data[-200:])
    text = sol.data.decode(errors="replace")
    assert "BIOS" in text and "Linux version" in text and "\r\n" in text
    sol.con.send_data("root\r")
    assert sol.pump_until(lambda: b"Password: " in sol.data, 5)
    sol.con.send_data("x\r")
    assert sol.pump_until(lambda: b"Login incorrect" in sol.data, 5)
    assert sol.data.count(b"node1 login: ") == 2
    sol.con.close()


def test_sol_take_over(make_fake_lab):
    lab = make_fake_lab(count=1, **FAST)
    first = SolReader(lab, "node1")
    assert first.pump_until(lambda: first.con.connected, 5)
    # pyghmi shares the session for the same bmc/user/password: a second client process is
    # what a real take-over looks like, so talk from a fresh UDP socket via a new user key
    second = SolReader(lab, "node1", force=True)
    assert second.pump_until(lambda: second.con.connected or second.errors, 5)
    assert lab.status("node1")["sol"] is True


def test_answers_payload_queries(make_fake_lab):
    lab = make_fake_lab(count=1, **FAST)
    c = client(lab, "node1")
    # Get Channel Payload Support (ipmiconsole), Get Payload Activation Status,
    # Get Payload Instance Info (pyghmi's SOL keepalive): never 0xC1
    for cmd, data in ((0x4E, [1]), (0x4A, [1]), (0x4B, [1, 1])):
        rsp = c.raw_command(netfn=6, command=cmd, data=data)
        assert not rsp.get("code"), (hex(cmd), rsp)
    rsp = c.raw_command(netfn=6, command=0x4B, data=[1, 1])
    assert bytes(rsp["data"][:4]) == b"\0\0\0\0"  # no SOL active


def test_unknown_user_fails_fast(make_fake_lab):
    lab = make_fake_lab(count=1, ssh=False, **FAST)
    t0 = time.monotonic()
    with pytest.raises(pyghmi_exc.IpmiException, match="Unauthorized name"):
        client(lab, "node1", user=b"mallory")
    assert time.monotonic() - t0 < 2.0


def test_faults_refuse_password_and_busy(make_fake_lab):
    lab = make_fake_lab(count=1, ssh=False, **FAST)
    lab.control.fault("node1", refuse_password=True)
    with pytest.raises(pyghmi_exc.IpmiException, match="Incorrect password"):
        client(lab, "node1")
    lab.control.clear("node1")
    c = client(lab, "node1")
    lab.control.fault("node1", busy=2)
    for _ in range(2):
        rsp = c.raw_command(netfn=0, command=1)
        assert rsp["code"] == 0xC0
    assert c.get_power()["powerstate"] == "off"
    assert lab.status("node1")["faults"]["busy"] == 0


def test_fault_hang_then_clear(make_fake_lab):
    lab = make_fake_lab(count=1, ssh=False, **FAST)
    c = client(lab, "node1")
    lab.control.fault("node1", hang=True)
    c.set_power("on")
    time.sleep(0.5)
    st = lab.status("node1")
    assert st["power"] == "off" and st["pending"] == "on"
    lab.control.fault("node1", hang=False)
    lab.wait("node1", power="on", timeout=5)


def test_fault_down_and_cold_reset(make_fake_lab):
    lab = make_fake_lab(count=1, ssh=False, **FAST)
    _, port = lab.bmc("node1")
    assert auth_cap_probe(port)
    lab.control.fault("node1", down=True)
    assert not auth_cap_probe(port)
    lab.control.clear("node1")
    assert auth_cap_probe(port)
    c = client(lab, "node1")
    t_sent = time.monotonic()
    c.raw_command(netfn=6, command=2, retry=False)  # BMC cold reset over IPMI
    st = lab.wait("node1", reachable=False, timeout=5)  # the reset landed (after its reply)
    t_down = time.monotonic()
    assert st["sessions"] == 0
    deaf = 0
    while not auth_cap_probe(port, 0.1):
        deaf += 1
        assert time.monotonic() - t_down < 5
    t_up = time.monotonic()
    assert deaf >= 1  # it did ignore the network (a probe takes 0.1 s of its ~1 s outage)
    # the outage began after t_sent (the BMC replied first) and no later than t_down, and the
    # lab's clock is this machine's monotonic clock: its length is bracketed without a sleep
    assert t_up - t_sent >= COLD_RESET_OUTAGE
    assert t_up - t_down < COLD_RESET_OUTAGE + 1.0
    c.ipmi_session._mark_broken()  # a restarted BMC needs a new session (pyghmi caches them)
    assert client(lab, "node1").get_power()["powerstate"] == "off"


def test_packet_loss_is_survivable(make_fake_lab):
    lab = make_fake_lab(count=1, ssh=False, **FAST)
    lab.control.fault("node1", drop=0.15)
    c = client(lab, "node1")
    for _ in range(2):
        assert c.get_power()["powerstate"] == "off"
    assert lab.status("node1")["stats"]["dropped"] > 0


@pytest.mark.slow  # 64 BMCs
def test_many_bmcs_one_client_socket(make_fake_lab):
    """64 BMCs in one lab process, one pyghmi client process talking to all of them at once
    (pyghmi shares one UDP socket among up to 64 sessions)."""
    lab = make_fake_lab(count=64, ssh=False, **FAST)
    inv = lab.inventory()
    pw = lab.password()
    clients = {n.name: command.Command(bmc=n.bmc.host, userid=b"admin", password=pw,
                                       port=n.bmc.port) for n in inv.nodes.values()}
    errors: list = []
    done = [0]

    def work(names):
        try:
            for _ in range(3):
                for name in names:
                    assert clients[name].get_power()["powerstate"] == "off"
                    done[0] += 1
        except Exception as e:  # collected for the assert below
            errors.append(e)

    names = list(clients)
    t0 = time.monotonic()
    threads = [threading.Thread(target=work, args=(names[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    elapsed = time.monotonic() - t0
    assert not errors, errors[:3]
    assert done[0] == 64 * 3
    print(f"\n64 BMCs: {done[0]} get_power in {elapsed:.2f}s = {done[0] / elapsed:.0f} ops/s")
    clients["node1"].set_power("on")
    lab.wait("node1", power="on", timeout=20)
    assert struct.calcsize("B") == 1


def test_answers_rmcp_presence_ping(make_fake_lab):
    """ASF presence ping (RMCP class 6, IANA 4542, type 0x80) -> presence pong with the same
    tag, saying IPMI is supported, as a real BMC answers discovery tools. A malformed ASF
    message gets nothing and does not disturb the BMC."""
    lab = make_fake_lab(count=1, ssh=False, **FAST)
    host, port = lab.bmc("node1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(b"\x06\x00\xff\x06" + b"\x00\x00\x11\xbe" + b"\x80\x2a\x00\x00", (host, port))
        pong = s.recv(512)
        s.sendto(b"\x06\x00\xff\x06" + b"\x00\x00\x11\xbf" + b"\x80\x2b\x00\x00", (host, port))
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recv(512)
    assert pong[:4] == b"\x06\x00\xff\x06" and pong[4:8] == b"\x00\x00\x11\xbe"
    msg_type, tag, _, length = pong[8:12]
    assert (msg_type, tag, length) == (0x40, 0x2A, 16) and len(pong) == 12 + 16
    body = pong[12:]
    assert body[0:4] == b"\x00\x00\x11\xbe"  # IANA enterprise number of the ASF
    assert body[8] & 0x80  # supported entities: IPMI
    assert lab.status("node1")["stats"]["pongs"] == 1
    assert auth_cap_probe(port)  # still serving IPMI


def test_open_session_offers_suites_3_and_17_only(make_fake_lab):
    """An RMCP+ Open Session Request gets the algorithms of suite 17 when it proposes them or
    leaves the choice to the BMC, suite 3 when it proposes that, and status 0x11 (no cipher
    suite match) for anything else, such as suite 1 (no integrity, no encryption)."""
    lab = make_fake_lab(count=1, ssh=False, **FAST)
    _, port = lab.bmc("node1")

    def open_session(auth: int | None, integrity: int | None, conf: int | None) -> bytes:
        body = bytearray([7, 0, 0, 0]) + b"\x01\x02\x03\x04"
        for kind, alg in ((0, auth), (1, integrity), (2, conf)):
            body += bytes([kind, 0, 0, 0 if alg is None else 8, alg or 0, 0, 0, 0])
        pkt = b"\x06\x00\xff\x07\x06\x10" + b"\0" * 8 + struct.pack("<H", len(body)) + body
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.sendto(pkt, ("127.0.0.1", port))
            reply = s.recv(512)
        return reply[16:]

    for proposal, expect in (((3, 4, 1), (3, 4, 1)), ((None, None, None), (3, 4, 1)),
                             ((1, 1, 1), (1, 1, 1))):
        reply = open_session(*proposal)
        assert reply[0] == 7 and reply[1] == 0, (proposal, reply.hex())
        assert (reply[16], reply[24], reply[32]) == expect, (proposal, reply.hex())
    for proposal in ((1, 0, 0), (3, 4, 0), (2, 2, 1)):
        assert open_session(*proposal)[1] == 0x11, proposal
