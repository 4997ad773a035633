"""Garbage at a fake BMC: >= 10,000 malformed RMCP / RMCP+ / IPMI packets (seeded), then a real
client must still get a correct answer. The serving loop may reject anything, but must never
die or wedge, and no packet may leak a traceback to stdout."""

from __future__ import annotations

import os
import random
import socket
import struct
import time

import pytest
from pyghmi.ipmi import command

RMCP = b"\x06\x00\xff\x07"
PACKETS = 12_000
SEED = 20240601


def checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def ipmi_msg(rng: random.Random, netfn: int, cmd: int, data: bytes) -> bytes:
    head = bytes([0x20, netfn << 2])
    body = bytes([0x81, rng.randrange(64) << 2, cmd]) + data
    return head + bytes([checksum(head)]) + body + bytes([checksum(body)])


def open_request(rng: random.Random, algos: tuple[int, int, int] = (1, 1, 1)) -> bytes:
    body = bytes([rng.randrange(256), 4, 0, 0]) + rng.randbytes(4)
    for kind, algo in enumerate(algos):
        body += bytes([kind, 0, 0, 8, algo, 0, 0, 0])
    return body


def v2(ptype: int, sid: bytes, seq: bytes, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return RMCP + bytes([6, ptype]) + sid + seq + struct.pack("<H", n & 0xFFFF) + payload


def v15(authtype: int, seq: bytes, sid: bytes, msg: bytes, length: int | None = None) -> bytes:
    n = len(msg) if length is None else length
    return RMCP + bytes([authtype]) + seq + sid + bytes([n & 0xFF]) + msg


class Fuzzer:
    """Packet generators, one per kind of malformation; msids harvested from real Open Session
    Responses let RAKP and in-session garbage reach deeper code paths."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.msids: list[bytes] = [b"\x01\x02\x03\x04"]

    def packet(self) -> bytes:
        kind = self.rng.randrange(12)
        return getattr(self, f"k{kind}")()

    def k0(self) -> bytes:  # pure noise
        return self.rng.randbytes(self.rng.randrange(0, 300))

    def k1(self) -> bytes:  # RMCP header + noise
        return RMCP + self.rng.randbytes(self.rng.randrange(0, 100))

    def k2(self) -> bytes:  # valid open session request, truncated anywhere
        pkt = v2(0x10, b"\0" * 4, b"\0" * 4, open_request(self.rng))
        return pkt[: self.rng.randrange(len(pkt) + 1)]

    def k3(self) -> bytes:  # open session with random algorithms / lying length
        algos = tuple(self.rng.randrange(256) for _ in range(3))
        body = open_request(self.rng, algos)  # type: ignore[arg-type]
        return v2(0x10, self.rng.randbytes(4), self.rng.randbytes(4), body,
                  self.rng.choice([None, 0, 1, 31, 65535]))

    def k4(self) -> bytes:  # valid open session request (harvest msids from replies)
        return v2(0x10, b"\0" * 4, b"\0" * 4, open_request(self.rng))

    def k5(self) -> bytes:  # RAKP1 for a known msid, wrong lengths / users
        msid = self.rng.choice(self.msids)
        user = self.rng.choice([b"admin", b"", b"x" * 16, self.rng.randbytes(20)])
        body = bytes([self.rng.randrange(256), 0, 0, 0]) + msid + self.rng.randbytes(16)
        body += bytes([0x14, 0, 0, self.rng.choice([len(user), 0, 255, 17])]) + user
        return v2(0x12, b"\0" * 4, b"\0" * 4, body[: self.rng.randrange(len(body) + 1)])

    def k6(self) -> bytes:  # RAKP3 with bad auth codes / statuses
        msid = self.rng.choice(self.msids)
        body = bytes([self.rng.randrange(256), self.rng.choice([0, 1, 0x0F]), 0, 0]) + msid
        body += self.rng.randbytes(self.rng.choice([0, 12, 20, 40]))
        return v2(0x14, b"\0" * 4, b"\0" * 4, body)

    def k7(self) -> bytes:  # authenticated+encrypted IPMI/SOL payload with bad auth code
        ptype = self.rng.choice([0, 1]) | self.rng.choice([0x40, 0xC0, 0x80, 0])
        sid = self.rng.choice(self.msids + [self.rng.randbytes(4)])
        payload = self.rng.randbytes(self.rng.choice([0, 1, 16, 17, 32, 48]))
        pkt = v2(ptype, sid, self.rng.randbytes(4), payload,
                 self.rng.choice([None, 0, 3000, len(payload) + 16]))
        return pkt + self.rng.randbytes(self.rng.choice([0, 2, 12, 16]))

    def k8(self) -> bytes:  # sessionless IPMI 2.0 request with broken msg / checksums
        msg = ipmi_msg(self.rng, 6, self.rng.choice([0x38, 0x54, 0x01, 0x3B]),
                       self.rng.randbytes(self.rng.randrange(0, 6)))
        if self.rng.random() < 0.5:
            msg = msg[: self.rng.randrange(len(msg) + 1)]
        return v2(0, b"\0" * 4, b"\0" * 4, msg, self.rng.choice([None, 0, 255, 2]))

    def k9(self) -> bytes:  # IPMI 1.5 sessionless with lying lengths
        msg = ipmi_msg(self.rng, self.rng.randrange(64), self.rng.randrange(256),
                       self.rng.randbytes(self.rng.randrange(0, 8)))
        return v15(0, b"\0" * 4, b"\0" * 4, msg, self.rng.choice([None, 0, 6, 255]))

    def k10(self) -> bytes:  # IPMI 1.5 with auth types / session ids we do not offer
        msg = ipmi_msg(self.rng, 6, 0x3B, b"\x04")
        return v15(self.rng.choice([1, 2, 4, 5, 7]), self.rng.randbytes(4),
                   self.rng.randbytes(4), self.rng.randbytes(16) + msg)

    def k11(self) -> bytes:  # unknown payload types, random everything after the header
        return v2(self.rng.randrange(2, 64), self.rng.randbytes(4), self.rng.randbytes(4),
                  self.rng.randbytes(self.rng.randrange(0, 64)))

    def harvest(self, reply: bytes) -> None:
        if len(reply) >= 28 and reply[4] == 6 and reply[5] & 0x3F == 0x11 and reply[17] == 0:
            self.msids.append(reply[24:28])


@pytest.mark.slow  # 12,000 packets
def test_fuzz_then_real_client(make_fake_lab, capfd):
    lab = make_fake_lab(count=1, ssh=False, power_delay=(0.05, 0.1), boot_delay=0.1)
    host, port = lab.bmc("node1")
    rx_before = lab.status("node1")["stats"]["rx"]
    fuzz = Fuzzer(random.Random(SEED))
    t0 = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        for i in range(PACKETS):
            s.sendto(fuzz.packet(), (host, port))
            if i % 100 == 99:  # let the BMC keep up (a full socket buffer would drop, not test)
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline:
                    try:
                        fuzz.harvest(s.recv(4096))
                    except BlockingIOError:
                        if lab.status("node1")["stats"]["rx"] - rx_before >= i + 1 - 5:
                            break
                        time.sleep(0.002)
    elapsed = time.monotonic() - t0
    st = lab.status("node1")
    processed = st["stats"]["rx"] - rx_before
    summary = (f"\nfuzz: {PACKETS} packets sent, {processed} processed in {elapsed:.1f}s, "
          f"{st['stats']['errors']} caught exceptions, {len(fuzz.msids) - 1} sessions opened, "
          f"{st['sessions']} kept")
    assert processed >= 10_000
    assert st["sessions"] <= 64  # half-open sessions are bounded

    # a real client still works, power included
    c = command.Command(bmc=host, userid=b"admin", password=lab.password(), port=port)
    assert c.get_power()["powerstate"] == "off"
    c.set_power("on", wait=5)
    assert c.get_power()["powerstate"] == "on"
    assert lab.control.ping()
    out, _ = capfd.readouterr()
    assert "Traceback" not in out
    with capfd.disabled():
        print(summary)
    log = (lab.state_dir / "lab.log").read_text()
    assert lab.password().decode() not in log
    assert os.path.getsize(lab.state_dir / "lab.log") < 5_000_000
