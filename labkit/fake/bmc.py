"""A fake BMC: IPMI 2.0 lanplus on UDP, power with a realistic random delay, boot device,
Serial-over-LAN showing a boot log, and switchable faults.

It subclasses pyghmi's ``Bmc`` for its command vocabulary (get_power_state, power_on, ...,
set_boot_device) but owns its socket and session table: every BMC of the lab is served by ONE
``labkit.fake.loop.Loop`` thread (see that module for why not pyghmi's ``listen()``). Request
handlers never block and are idempotent; slow work (starting/stopping the fake node behind the
BMC) runs on a per-node worker thread.

Power model: a request is accepted at once (completion code 0) and *lands* after a delay drawn
uniformly from ``power_delay``; until then get_power_state reports the old state, as real
hardware does. Landing ON writes the boot log to the console over ``boot_delay`` seconds, calls
``node.start()``, then prints a login prompt. Landing OFF calls ``node.stop()``."""

from __future__ import annotations

import logging
import os
import random
import socket
import struct
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import pyghmi.ipmi.bmc as pyghmi_bmc

from labkit.fake import bootlog
from labkit.fake.loop import Loop, Timer
from labkit.fake.rmcp import (
    ADMIN,
    CALLBACK,
    OPERATOR,
    SUITES,
    USER,
    RmcpSession,
    SessionTable,
)
from labkit.fake.sol import SolLink

RMCP_HEADER = b"\x06\x00\xff\x07"
ASF_IANA = b"\x00\x00\x11\xbe"
ASF_PING, ASF_PONG = 0x80, 0x40
CC_OK = 0x00
CC_BUSY = 0xC0
CC_INVALID = 0xC1
CC_BAD_LENGTH = 0xC7
CC_BAD_FIELD = 0xCC
CC_NO_PRIVILEGE = 0xD4
CC_NOT_NOW = 0xD5
CC_UNSPECIFIED = 0xFF
MAX_SESSIONS = 64
SESSION_IDLE = 120.0     # seconds without a packet before a session is forgotten
SOL_STALE = 35.0         # SOL silent longer than any client's keepalive -> may be taken over
COLD_RESET_OUTAGE = 1.0  # seconds a cold-reset BMC ignores the network
MAX_PACKETS_PER_WAKE = 256
SOL_MAX_PAYLOAD = 256

# IPMI boot device selector (Set System Boot Options, param 5, data 2 bits 5:2) <-> our names
BOOTDEV_CODES = {"default": 0, "pxe": 1, "disk": 2, "safe": 3, "cdrom": 5, "bios": 6,
                 "floppy": 15}
BOOTDEV_NAMES = {v: k for k, v in BOOTDEV_CODES.items()}
PRIVILEGES = {"callback": CALLBACK, "user": USER, "operator": OPERATOR, "admin": ADMIN,
              "administrator": ADMIN}
# The privilege a command needs (IPMI 2.0 appendix G); commands not listed need USER. Session
# management commands work at any privilege.
REQUIRED_PRIVILEGE: dict[tuple[int, int], int] = {
    (6, 0x38): CALLBACK, (6, 0x3B): CALLBACK, (6, 0x3C): CALLBACK, (6, 0x54): CALLBACK,
    (6, 0x02): ADMIN,                       # cold reset
    (0, 0x02): OPERATOR,                    # chassis control
    (0, 0x08): OPERATOR, (0, 0x09): OPERATOR,  # set/get system boot options
    (0x0C, 0x21): ADMIN,                    # set SOL configuration
}
BOOTDEV_ALIASES = {"network": "pxe", "net": "pxe", "hd": "disk", "setup": "bios",
                   "optical": "cdrom", "cd": "cdrom", "usb": "floppy"}


class NodeHook(Protocol):
    """What the BMC needs from the machine behind it (FakeNode, fake/base.py, implements it)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...

    @property
    def up(self) -> bool: ...


@dataclass
class Faults:
    """Runtime-switchable misbehaviour (``lab.fault`` / control op ``fault``)."""

    drop: float = 0.0                 # fraction of incoming packets silently dropped
    busy: int = 0                     # next N chassis commands answer 0xC0 (node busy)
    hang: bool = False                # power requests accepted but never land
    refuse_password: bool = False     # every login fails as if the password were wrong
    down: bool = False                # BMC ignores every packet
    power_delay: tuple[float, float] | None = None  # overrides the lab's power_delay

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["power_delay"] = list(self.power_delay) if self.power_delay else None
        return d


def _checksum(data: bytes | list[int]) -> int:
    return (-sum(data)) & 0xFF


class FakeBmc(pyghmi_bmc.Bmc):
    """One fake BMC on ``host:port``. Construct and use only on the loop thread (or before the
    loop runs); other threads go through ``loop.run_in_loop``."""

    def __init__(self, name: str, *, loop: Loop, host: str = "127.0.0.1", port: int = 623,
                 user: str = "admin", password: bytes, node: NodeHook | None = None,
                 power_delay: tuple[float, float] = (1.0, 3.0), boot_delay: float = 1.5,
                 console_log: Path | None = None, seed: int | None = None,
                 log: logging.Logger | None = None):
        # Deliberately not IpmiServer.__init__: it would put our socket into pyghmi's global
        # I/O thread (see labkit.fake.loop). These are the attributes its methods use.
        self.revision = 0
        self.deviceid = 0x20
        self.firmwaremajor = 1
        self.firmwareminor = 0
        self.ipmiversion = 2
        self.additionaldevices = 0
        self.mfgid = 0
        self.prodid = 0
        self.kg: bytes | None = None
        self.authdata = None
        self.timeout = 60
        self.name = name
        self.host = host
        self.port = port
        self.loop = loop
        self.user = user.encode()
        self._password = password
        # name -> privilege limit; every user has the BMC's password (the lab keeps one secret)
        self.users: dict[bytes, int] = {self.user: ADMIN}
        self.node = node
        # A node that is a real machine (fake/vm.py: a QEMU guest) boots, prints and powers
        # itself off on its own: the BMC relays its serial port and follows its state instead
        # of playing a canned boot log.
        self.machine = node if getattr(node, "machine", False) else None
        if self.machine is not None:
            self.machine.console = lambda data: loop.call_soon_threadsafe(
                self._machine_output, data)
            self.machine.on_ready = lambda: loop.call_soon_threadsafe(self._machine_ready)
            self.machine.on_exit = lambda gen: loop.call_soon_threadsafe(
                self._machine_exited, gen)
        self.power_delay = (float(power_delay[0]), float(power_delay[1]))
        self.boot_delay = float(boot_delay)
        self.log = log or logging.getLogger(f"labkit.fake.bmc.{name}")
        self.rng = random.Random(f"{seed}:{name}" if seed is not None else None)
        self.uuid = uuid.UUID(bytes=random.Random(f"uuid:{name}").randbytes(16))
        self.faults = Faults()
        self.sessions = SessionTable()
        self.sol: SolLink | None = None
        self.unreachable_until = 0.0
        self.stats: dict[str, Any] = {"rx": 0, "dropped": 0, "ignored": 0, "errors": 0,
                                      "commands": 0, "pongs": 0, "suites": {}}
        # host state
        self.power = "off"
        self.pending: str | None = None
        self._power_timer: Timer | None = None
        self.phase = "off"         # off | booting | up (| hung: a guest past its boot_timeout)
        self.epoch = 0             # bumps on every power landing; stale boot steps check it
        self.bootdev = "default"
        self.bootdev_persistent = False
        self._getty = {"state": "none", "line": bytearray()}
        self._node_worker: ThreadPoolExecutor | None = None
        self._console_file = None
        if console_log is not None:
            console_log.parent.mkdir(parents=True, exist_ok=True)
            self._console_file = open(console_log, "ab", buffering=0)  # noqa: SIM115
        self.serversocket = self._bind(host, port)
        loop.add_reader(self.serversocket, self._readable)
        loop.add_ticker(self._tick)
        self._sweeper = loop.call_later(10.0, self._sweep)

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        except OSError:
            pass
        sock.bind((host, port))
        sock.setblocking(False)
        return sock

    # --- network input --------------------------------------------------------------------
    def _readable(self) -> None:
        for _ in range(MAX_PACKETS_PER_WAKE):
            try:
                # MSG_DONTWAIT: pyghmi's _io_sendto flips the socket to blocking on every send
                data, addr = self.serversocket.recvfrom(4096, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                self.datagram(bytearray(data), addr)
            except Exception:  # garbage must never stop the BMC
                self.stats["errors"] += 1
                if self.stats["errors"] <= 20:
                    self.log.exception("packet from %s raised", addr)

    def datagram(self, data: bytearray, addr: tuple) -> None:
        now = time.monotonic()
        if self.faults.down or now < self.unreachable_until:
            self.stats["ignored"] += 1
            return
        if self.faults.drop and self.rng.random() < self.faults.drop:
            self.stats["dropped"] += 1
            return
        self.stats["rx"] += 1
        if data[0:2] == b"\x06\x00" and data[3:4] == b"\x06":
            self._asf(data, addr)
            return
        if len(data) < 16 or data[0:4] != RMCP_HEADER:
            return
        authtype = data[4]
        if authtype == 0:  # IPMI 1.5 sessionless: Get Channel Authentication Capabilities
            if data[5:13] == b"\0" * 8:
                self._sessionless(data, addr, v2=False)
            return
        if authtype != 6:
            return  # IPMI 1.5 sessions are not offered
        ptype = data[5] & 0x3F
        if ptype == 0x10:
            self._open_session(data, addr)
            return
        if ptype in (0x12, 0x14):  # RAKP1/3 carry the managed session id in their body
            if len(data) < 24:
                return
            msid = bytes(data[20:24])
        elif ptype in (0, 1):
            msid = bytes(data[6:10])
            if msid == b"\0\0\0\0":
                if ptype == 0 and not data[5] & 0xC0:
                    self._sessionless(data, addr, v2=True)
                return
        else:
            return
        sess = self.sessions.get(msid)
        if sess is None or sess.sockaddr != addr or sess.closed:
            return
        sess.last_rx = now
        self.sessions.touch(sess)
        was = sess.established
        sess._handle_ipmi2_packet(data)
        if sess.established and not was:  # which cipher suites clients really negotiate
            suite = str(SUITES[sess.suite][0])
            self.stats["suites"][suite] = self.stats["suites"].get(suite, 0) + 1

    def _open_session(self, data: bytearray, addr: tuple) -> None:
        plen = data[14] | (data[15] << 8)
        request = data[16:16 + plen]
        if len(request) < 32:
            return
        self._make_room()
        sess = RmcpSession(self, addr, self.serversocket, self.sessions.new_id())
        if sess.open(request):
            self.sessions.add(sess)

    def _make_room(self) -> None:
        """Forget the least recently used session (half-open ones first) when full."""
        if len(self.sessions) < MAX_SESSIONS:
            return
        victim = self.sessions.victim()
        if victim is not None:
            self.drop_session(victim)

    def drop_session(self, sess: RmcpSession) -> None:
        sess.closed = True
        self.sessions.discard(sess)
        if self.sol is not None and self.sol.session is sess:
            self._end_sol()

    def add_user(self, name: str, privilege: str) -> None:
        """Another account on this BMC with the BMC's password and a privilege limit
        (callback | user | operator | admin); an existing name gets the new limit."""
        level = PRIVILEGES.get(str(privilege).lower())
        if level is None:
            raise ValueError(f"privilege {privilege!r}: expected one of "
                             f"{', '.join(sorted(set(PRIVILEGES) - {'administrator'}))}")
        if not name or len(name.encode()) > 16:
            raise ValueError(f"user name {name!r}: 1-16 bytes")
        self.users[name.encode()] = level
        self.log.info("user %s with privilege %s", name, privilege)

    def privilege_limit(self, username: bytes) -> int:
        return self.users.get(username, 0)

    def password_for(self, username: bytes) -> bytes | None:
        """Kuid for a user, None if unknown. With refuse_password, a random key: the client
        sees a RAKP2 HMAC mismatch, exactly like a wrong password."""
        if username not in self.users:
            return None
        if self.faults.refuse_password:
            return os.urandom(20)
        return self._password

    def _asf(self, data: bytearray, addr: tuple) -> None:
        """RMCP class 6 (ASF): answer a presence ping with a pong saying IPMI is supported, so
        discovery tools (rmcpping, nmap's asf-rmcp-version) find this BMC. Anything else of
        that class is ignored."""
        if len(data) < 12 or data[4:8] != ASF_IANA or data[8] != ASF_PING:
            return
        tag = data[9]
        body = (ASF_IANA + b"\x00\x00\x00\x00"  # IANA, OEM defined
                + bytes([0x81, 0x00])             # entities: IPMI supported, ASF 1.0; interactions
                + b"\x00" * 6)
        self.stats["pongs"] += 1
        self._sendto(b"\x06\x00\xff\x06" + ASF_IANA + bytes([ASF_PONG, tag, 0, len(body)])
                     + body, addr)

    # --- sessionless commands -------------------------------------------------------------
    def _sessionless(self, data: bytearray, addr: tuple, v2: bool) -> None:
        if v2:
            plen = data[14] | (data[15] << 8)
            msg = data[16:16 + plen]
        else:
            msg = data[14:14 + data[13]]
        if len(msg) < 7:
            return
        rsaddr, netfnlun, _, rqaddr, rqseqlun, cmd = msg[:6]
        body = msg[6:-1]
        if netfnlun >> 2 != 6:
            return
        if cmd == 0x38:  # Get Channel Authentication Capabilities
            # channel 1; IPMI 2.0 extended caps; non-null usernames; IPMI 2.0 supported
            reply = [CC_OK, 1, 0x80, 0x04, 0x02, 0, 0, 0, 0]
        elif cmd == 0x54:  # Get Channel Cipher Suites
            reply = [CC_OK, *self._h_cipher_suites(None, bytes(body))[1]]
        else:
            return
        head = [rqaddr, (7 << 2) | (rqseqlun & 3)]
        tail = [rsaddr, (rqseqlun & 0xFC) | (netfnlun & 3), cmd, *reply]
        out = bytes(head + [_checksum(head)] + tail + [_checksum(tail)])
        if v2:
            pkt = RMCP_HEADER + bytes([6, 0]) + b"\0" * 8 + struct.pack("<H", len(out)) + out
        else:
            pkt = RMCP_HEADER + bytes([0]) + b"\0" * 8 + bytes([len(out)]) + out
        self._sendto(pkt, addr)

    def _sendto(self, pkt: bytes, addr: tuple) -> None:
        try:
            self.serversocket.sendto(pkt, addr)
        except OSError:
            pass

    # --- in-session commands --------------------------------------------------------------
    def handle_raw_request(self, request: dict, session: RmcpSession) -> None:
        """Dispatch one authenticated request. Every handler returns (code, data)."""
        self.stats["commands"] += 1
        netfn, cmd = request["netfn"], request["command"]
        data = bytes(request.get("data", b""))
        handler = self.HANDLERS.get((netfn, cmd))
        if handler is None:
            self.log.debug("unhandled netfn 0x%02x cmd 0x%02x", netfn, cmd)
            session.send_ipmi_response(code=CC_INVALID)
            return
        if session.clientpriv < REQUIRED_PRIVILEGE.get((netfn, cmd), USER):
            self.log.info("netfn 0x%02x cmd 0x%02x refused: session of %r at privilege %d",
                          netfn, cmd, session.username.decode(errors="replace"),
                          session.clientpriv)
            session.send_ipmi_response(code=CC_NO_PRIVILEGE)
            return
        if netfn == 0 and self.faults.busy > 0:
            self.faults.busy -= 1
            session.send_ipmi_response(code=CC_BUSY)
            return
        try:
            code, reply = handler(self, session, data)
        except IndexError:
            code, reply = CC_BAD_LENGTH, b""
        except Exception:
            self.log.exception("handler for netfn 0x%02x cmd 0x%02x failed", netfn, cmd)
            code, reply = CC_UNSPECIFIED, b""
        session.send_ipmi_response(data=reply, code=code)

    def _h_device_id(self, session: RmcpSession, data: bytes) -> tuple[int, bytes]:
        return CC_OK, bytes([self.deviceid, self.revision, self.firmwaremajor,
                             self.firmwareminor, self.ipmiversion, self.additionaldevices,
                             0, 0, 0, 0, 0])

    def _h_cold_reset(self, session: RmcpSession, data: bytes) -> tuple[int, bytes]:
        self.cold_reset()
        return CC_OK, b""

    def _h_guid(self, session: RmcpSession, data: bytes) -> tuple[int, bytes]:
        return CC_OK, self.uuid.bytes_le

    def _h_set_priv(self, session: RmcpSession, data: bytes) -> tuple[int, bytes]:
        wanted = data[0] & 0x0F
        if wanted:
            if wanted > session.maxpriv or wanted > ADMIN:
                return 0x81, b""
            session.clientpriv = wanted
        return CC_OK, bytes([session.clientpriv])

    def _h_close_session(self, session: RmcpSession, data: bytes) -> tuple[int, bytes]:
        target = session
        if len(data) >= 4 and bytes(data[:4]) not in (b"\0\0\0\0", session.msid):
            other = self.sessions.get(bytes(data[:4]))
            if other is None:
                return 0x87, b""  # invalid session id
            target = other
        # the reply goes out with the session's keys first, then it is forgotten
        self.loop.call_later(0, self.drop_session, target)
        return CC_OK, b""

    def _h_activate_payload(self, session: RmcpSession, data: bytes) -> tuple[int, bytes]:
        if data[0] & 0x3F != 1:
            return CC_BAD_FIELD, b""
        now = time.monotonic()
        if self.sol is not None and not self.sol.stale(now, SOL_STALE):
            if self.sol.session is session or self.sol.session.sockaddr != session.sockaddr:
                return 0x80, b""  # already active
            # same client address but a new session: its old session died, take over
        if self.sol is not None:
            self.log.info("SOL taken over from a stale session")
            self.sol.notify_deactivated()
            self._end_sol()
        self.sol = SolLink(session, self._console_input)
        session.sol_handler = self.sol.received
        size = struct.pack("<H", SOL_MAX_PAYLOAD)
        return CC_OK, b"\0\0\0\0" + size + size + struct.pack("<H", self.port) + b"\xff\xff"

    def _h_deactivate_payload(self, session: RmcpSession, data: bytes) -> tuple[int, bytes]:
        if data[0] & 0x3F != 1:
            return CC_BAD_FIELD, b""
        if self.sol is None:
            return 0x80, b""  # payload already deactivated
        # any authenticated session may end SOL: that is how one is taken over (the holder
        # is told, as a real BMC tells it; a client that ends its own payload is not)
        if self.sol.session is not session:
            self.log.info("SOL deactivated by another session")
            self.sol.notify_deactivated()
        self._end_sol()
        return CC_OK, b""

    def _h_payload_status(self, session: RmcpSession, data: bytes) -> tuple[int, bytes]:
        if data[0] & 0x3F != 1:
            return CC_OK, b"\x00\x00\x00"
        return CC_OK, bytes([1, 1 if self.sol is not None else 0, 0])

    def _h_payload_instance(self, session: RmcpSession, data: bytes) -> tuple[int, bytes]:
        owner = self.sol.session.msid if (self.sol is not None and data[0] & 0x3F == 1) \
            else b"\0\0\0\0"
        return CC_OK, owner + b"\0" * 8

    def _h_channel_payloads(self, session: RmcpSession, data: bytes) -> tuple[int, bytes]:
        # standard payloads IPMI + SOL; session setup payloads 0x10-0x15
        return CC_OK, bytes([0x03, 0x00, 0x3F, 0x00, 0, 0, 0, 0])

    def _h_payload_version(self, session: RmcpSession, data: bytes) -> tuple[int, bytes]:
        return CC_OK, b"\x10"

    def _h_auth_cap(self, session: RmcpSession, data: bytes) -> tuple[int, bytes]:
        return CC_OK, bytes([1, 0x80, 0x04, 0x02, 0, 0, 0, 0])

    def _h_cipher_suites(self, session: RmcpSession | None, data: bytes) -> tuple[int, bytes]:
        """The suites Open Session accepts, as records (IPMI 2.0 table 22-19): C0h, suite id,
        then the authentication, integrity (40h|n) and confidentiality (80h|n) algorithms,
        16 bytes per list index."""
        index = data[2] & 0x3F if len(data) >= 3 else 0
        records = b"".join(bytes([0xC0, SUITES[key][0], key[0], 0x40 | key[1], 0x80 | key[2]])
                           for key in sorted(SUITES, key=lambda k: SUITES[k][0]))
        return CC_OK, bytes([1]) + records[index * 16:(index + 1) * 16]

    def _h_sol_config(self, session: RmcpSession, data: bytes) -> tuple[int, bytes]:
        param = data[1] & 0x7F
        values = {0: b"\x00", 1: b"\x01", 2: b"\x02", 3: b"\x0c\x60", 4: b"\x06\x14",
                  5: b"\x0a", 6: b"\x0a", 7: b"\x01", 8: struct.pack("<H", self.port)}
        if data[0] & 0x80:
            return CC_OK, b"\x11"
        if param not in values:
            return 0x80, b""
        return CC_OK, b"\x11" + values[param]

    def _h_set_sol_config(self, session: RmcpSession, data: bytes) -> tuple[int, bytes]:
        return CC_OK, b""

    def _h_chassis_status(self, session: RmcpSession, data: bytes) -> tuple[int, bytes]:
        on = 1 if self.get_power_state() == "on" else 0
        return CC_OK, bytes([on | 0x40, 0, 0, 0])

    def _h_chassis_control(self, session: RmcpSession, data: bytes) -> tuple[int, bytes]:
        action = {0: self.power_off, 1: self.power_on, 2: self.power_cycle,
                  3: self.power_reset, 4: self.pulse_diag, 5: self.power_shutdown}.get(
                      data[0] & 0x0F)
        if action is None:
            return CC_BAD_FIELD, b""
        return action() or CC_OK, b""

    def _h_get_boot(self, session: RmcpSession, data: bytes) -> tuple[int, bytes]:
        param = data[0] & 0x7F
        if param == 5:
            dev, persistent = self.get_boot_device()
            flags = 0
            if dev != "default":
                flags = 0x80 | (0x40 if persistent else 0)
            return CC_OK, bytes([1, 5, flags, BOOTDEV_CODES[dev] << 2, 0, 0, 0])
        fixed = {0: b"\x00", 3: b"\x1f", 4: b"\x00\x00"}
        if param in fixed:
            return CC_OK, bytes([1, param]) + fixed[param]
        return 0x80, b""  # parameter not supported

    def _h_set_boot(self, session: RmcpSession, data: bytes) -> tuple[int, bytes]:
        param = data[0] & 0x7F
        if param in (0, 3, 4):
            return CC_OK, b""
        if param != 5:
            return 0x80, b""
        flags = data[1]
        code = (data[2] >> 2) & 0x0F if len(data) > 2 else 0
        if not flags & 0x80:
            self.set_boot_device("default", persistent=False)
            return CC_OK, b""
        name = BOOTDEV_NAMES.get(code)
        if name is None:
            return CC_BAD_FIELD, b""
        self.set_boot_device(name, persistent=bool(flags & 0x40))
        return CC_OK, b""

    HANDLERS: dict[tuple[int, int], Callable[..., tuple[int, bytes]]] = {
        (6, 0x01): _h_device_id,
        (6, 0x02): _h_cold_reset,
        (6, 0x37): _h_guid,
        (6, 0x38): _h_auth_cap,
        (6, 0x3B): _h_set_priv,
        (6, 0x3C): _h_close_session,
        (6, 0x48): _h_activate_payload,
        (6, 0x49): _h_deactivate_payload,
        (6, 0x4A): _h_payload_status,
        (6, 0x4B): _h_payload_instance,
        (6, 0x4E): _h_channel_payloads,
        (6, 0x4F): _h_payload_version,
        (6, 0x54): _h_cipher_suites,
        (0, 0x01): _h_chassis_status,
        (0, 0x02): _h_chassis_control,
        (0, 0x08): _h_set_boot,
        (0, 0x09): _h_get_boot,
        (0x0C, 0x21): _h_set_sol_config,
        (0x0C, 0x22): _h_sol_config,
    }

    # --- pyghmi Bmc vocabulary: power -----------------------------------------------------
    def get_power_state(self) -> str:
        return self.power

    def is_active(self) -> bool:
        return self.power == "on"

    def power_on(self) -> int | None:
        return self._request("on")

    def power_off(self) -> int | None:
        return self._request("off")

    def power_shutdown(self) -> int | None:
        return self._request("soft")

    def power_reset(self) -> int | None:
        return self._request("reset")

    def power_cycle(self) -> int | None:
        return self._request("cycle")

    def pulse_diag(self) -> int | None:
        if self.power != "on":
            return CC_NOT_NOW
        self.console_write(f"[{self.rng.uniform(100, 5000):12.6f}] Uhhuh. NMI received for unknown reason 3d on CPU 0.\n")
        self.console_write(f"[{self.rng.uniform(5000, 5001):12.6f}] Dazed and confused, but trying to continue\n")
        return None

    def _request(self, action: str) -> int | None:
        """Accept a power request; it lands later. The last request wins, as on real BMCs: one
        that arrives while another is landing replaces it, and one for the state the node is
        in cancels a landing transition away from it (power-on while a power-off lands: the
        node stays on). Repeating the landing request (a client retry) changes nothing."""
        if self.pending == action or (self.pending in ("reset", "cycle") and action == "on"):
            return None  # a retry, or "on" while a reboot lands (it ends on anyway)
        if action == "on" and self.power == "on":
            self._cancel_pending("on")
            return None
        if action in ("off", "soft") and self.power == "off":
            self._cancel_pending(action)
            return None
        if action in ("reset", "cycle") and self.power == "off" and self.pending != "on":
            return CC_NOT_NOW  # IPMI: no action on an off chassis, 0xD5
        self.log.info("power %s requested (now %s%s)", action, self.power,
                      f", replacing a landing {self.pending}" if self.pending else "")
        self._schedule(action)
        return None

    def _cancel_pending(self, by: str) -> None:
        if self.pending is None:
            return
        self.log.info("power %s cancelled by %s: the node stays %s", self.pending, by,
                      self.power)
        if self._power_timer is not None:
            self._power_timer.cancel()
            self._power_timer = None
        self.pending = None

    def _power_delay(self) -> float:
        lo, hi = self.faults.power_delay or self.power_delay
        return self.rng.uniform(lo, hi)

    def _schedule(self, action: str, delay: float | None = None) -> None:
        if self._power_timer is not None:
            self._power_timer.cancel()
            self._power_timer = None
        self.pending = action
        if self.faults.hang:
            return  # accepted, never lands until the fault is cleared
        self._power_timer = self.loop.call_later(
            self._power_delay() if delay is None else delay, self._land)

    def _land(self) -> None:
        action, self.pending, self._power_timer = self.pending, None, None
        if action is None:
            return
        self.log.info("power %s landed", action)
        if action == "on":
            self.power = "on"
            self._boot()
        elif action == "soft" and self.machine is not None:
            # the ACPI power button: the guest decides; the BMC reads "off" once it is gone
            self._node_call(self.epoch, "acpi_shutdown", None)
        elif action in ("off", "soft"):
            if action == "soft" and self.phase == "up":
                for line in bootlog.shutdown_lines(self.name):
                    self.console_write(line + "\n")
            self.power = "off"
            self._halt()
        elif action == "reset":
            self._halt()
            self.power = "on"
            self._boot()
        elif action == "cycle":
            self.power = "off"
            self._halt()
            self._schedule("on")

    def _boot(self) -> None:
        self.epoch += 1
        epoch = self.epoch
        self.phase = "booting"
        self._getty = {"state": "none", "line": bytearray()}
        dev = self.bootdev
        if not self.bootdev_persistent:
            self.bootdev = "default"
        if self.machine is not None:
            self._node_call(epoch, "start", self._machine_started)
            return
        lines = bootlog.boot_lines(self.name, dev, self.rng)
        step = self.boot_delay / max(1, len(lines))
        for i, line in enumerate(lines):
            self.loop.call_later(i * step, self._boot_line, epoch, line)
        self.loop.call_later(len(lines) * step, self._node_call, epoch, "start",
                             self._booted)

    def _boot_line(self, epoch: int, line: str) -> None:
        if epoch == self.epoch:
            self.console_write(line + "\n")

    def _booted(self, epoch: int) -> None:
        if epoch != self.epoch:
            return
        self.phase = "up"
        self._getty = {"state": "login", "line": bytearray()}
        self.console_write(bootlog.login_prompt(self.name))

    def _machine_started(self, epoch: int) -> None:
        if epoch != self.epoch:
            return
        if not self.machine.running:
            self.log.warning("the guest did not start; power reads off")
            self.console_write("labkit: the guest did not start (its reason is above; the "
                               "lab log has the rest)\n")
            self.power = "off"
            self.phase = "off"
            return
        self.loop.call_later(self.machine.spec.boot_timeout, self._machine_late, epoch)

    def _machine_late(self, epoch: int) -> None:
        """Still booting after fake_lab.boot_timeout: say so in lab.status ("hung") and the
        log; the guest keeps running, as a machine stuck at boot does."""
        if epoch == self.epoch and self.phase == "booting":
            self.log.warning("the guest has not finished booting after %.0f s",
                             self.machine.spec.boot_timeout)
            self.phase = "hung"

    def _machine_ready(self) -> None:
        if self.phase in ("booting", "hung"):
            self.phase = "up"

    def _machine_exited(self, generation: int) -> None:
        """The guest is gone by itself (powered off, panicked, QEMU died): the power is off,
        as a machine that shut down reads on a real BMC. An exit reported after a newer boot
        started (a reset landed first) is old news."""
        if generation == self.machine.generation and self.power == "on":
            self.log.info("the guest powered itself off")
            self.power = "off"
            self._halt()  # reaps QEMU and its supervisor

    def _machine_output(self, data: bytes) -> None:
        if self._console_file is not None:
            try:
                self._console_file.write(data)
            except OSError:
                pass
        if self.sol is not None:
            self.sol.write(data)

    def _halt(self) -> None:
        self.epoch += 1
        self.phase = "off"
        self._getty = {"state": "none", "line": bytearray()}
        self._node_call(self.epoch, "stop", None)

    def _node_call(self, epoch: int, method: str,
                   then: Callable[[int], None] | None) -> None:
        """node.start()/stop() on the node's own worker thread (they may take a while), in
        order; ``then(epoch)`` runs back on the loop."""
        if epoch != self.epoch:
            return
        if self.node is None:
            if then is not None:
                then(epoch)
            return
        if self._node_worker is None:
            self._node_worker = ThreadPoolExecutor(max_workers=1,
                                                   thread_name_prefix=f"node-{self.name}")
        node = self.node

        def work() -> None:
            try:
                getattr(node, method)()
            except Exception as e:
                self.log.exception("node %s.%s() failed", self.name, method)
                if self.machine is not None:  # say why where the user looks: the console
                    self.loop.call_soon_threadsafe(
                        self.console_write, f"labkit: power {method} failed: {e}\n")
            if then is not None:
                self.loop.call_soon_threadsafe(then, epoch)

        self._node_worker.submit(work)

    # --- boot device ----------------------------------------------------------------------
    def get_boot_device(self) -> tuple[str, bool]:  # type: ignore[override]
        return self.bootdev, self.bootdev_persistent

    def set_boot_device(self, bootdevice: str, persistent: bool = False) -> None:  # type: ignore[override]
        name = BOOTDEV_ALIASES.get(bootdevice, bootdevice)
        if name not in BOOTDEV_CODES:
            raise ValueError(f"unknown boot device {bootdevice!r}")
        self.bootdev = name
        self.bootdev_persistent = persistent and name != "default"
        self.log.info("boot device %s%s", name, " (persistent)" if persistent else "")

    # --- BMC reset and faults -------------------------------------------------------------
    def cold_reset(self) -> None:  # type: ignore[override]
        """Reply first (the caller sends it), then drop every session and go deaf ~1 s."""
        self.loop.call_later(0, self._do_cold_reset)

    def _do_cold_reset(self) -> None:
        self.log.info("BMC cold reset")
        for sess in self.sessions:
            self.drop_session(sess)
        self._end_sol()
        self.unreachable_until = time.monotonic() + COLD_RESET_OUTAGE

    def set_faults(self, **kw: Any) -> None:
        """Apply a fault change; ``clear=True`` resets all first. Clearing ``hang`` lets a
        pending power request land (after a fresh delay)."""
        was_hung = self.faults.hang
        if kw.pop("clear", False):
            self.faults = Faults()
        for key, value in kw.items():
            if value is None:
                continue
            if key == "drop":
                value = min(1.0, max(0.0, float(value)))
            elif key == "busy":
                value = max(0, int(value))
            elif key == "power_delay":
                lo, hi = (float(value[0]), float(value[1])) if isinstance(
                    value, (list, tuple)) else (float(value), float(value))
                if lo > hi or lo < 0:
                    raise ValueError("power_delay: need 0 <= lo <= hi")
                value = (lo, hi)
            elif key in ("hang", "refuse_password", "down"):
                value = bool(value)
            else:
                raise ValueError(f"unknown fault {key!r}")
            setattr(self.faults, key, value)
        if was_hung and not self.faults.hang and self.pending and self._power_timer is None:
            self._schedule(self.pending)

    # --- console --------------------------------------------------------------------------
    def console_write(self, text: str) -> None:
        raw = text.encode("utf-8", "replace")
        if self._console_file is not None:
            try:
                self._console_file.write(raw)
            except OSError:
                pass
        if self.sol is not None:
            self.sol.write(raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))

    def _console_input(self, data: bytes) -> None:
        """Keys typed on SOL: echo them, and behave like a getty at the login prompt (a guest
        gets them on its serial port: its own getty answers)."""
        if self.machine is not None:
            self.machine.console_input(data)
            return
        getty = self._getty
        for byte in data:
            ch = bytes([byte])
            if ch in (b"\r", b"\n"):
                line = bytes(getty["line"])
                getty["line"] = bytearray()
                if getty["state"] == "login" and line:
                    getty["state"] = "password"
                    self.console_write("\nPassword: ")
                elif getty["state"] in ("login", "password"):
                    if getty["state"] == "password":
                        self.console_write("\n\nLogin incorrect\n")
                    else:
                        self.console_write("\n")
                    getty["state"] = "login"
                    self.console_write(bootlog.login_prompt(self.name))
                else:
                    self.console_write("\n")
            elif byte in (0x7F, 0x08):
                if getty["line"]:
                    del getty["line"][-1]
                    if getty["state"] != "password":
                        self.console_write("\b \b")
            elif byte >= 0x20 or byte == 0x09:
                getty["line"] += ch
                if getty["state"] != "password":
                    self.console_write(ch.decode("latin-1"))

    def _end_sol(self) -> None:
        if self.sol is not None:
            self.sol.close()
            self.sol = None

    def _tick(self, now: float) -> None:
        if self.sol is not None:
            self.sol.flush(now)

    def _sweep(self) -> None:
        now = time.monotonic()
        for sess in self.sessions:
            if now - sess.last_rx > SESSION_IDLE:
                self.drop_session(sess)
        if self.sol is not None and self.sol.dead:
            self._end_sol()
        self._sweeper = self.loop.call_later(10.0, self._sweep)

    # --- reporting / teardown -------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        node_up = None
        if self.node is not None:
            try:
                node_up = bool(self.node.up)
            except Exception:
                node_up = False
        return {
            "power": self.power, "pending": self.pending, "phase": self.phase,
            "ssh": node_up, "bootdev": self.bootdev, "persistent": self.bootdev_persistent,
            "sol": self.sol is not None, "sessions": len(self.sessions),
            "pid": getattr(self.machine, "pid", None),
            "bmc": f"{self.host}:{self.port}", "faults": self.faults.to_json(),
            "reachable": not self.faults.down and time.monotonic() >= self.unreachable_until,
            "stats": {**self.stats, "suites": dict(self.stats["suites"])},
        }

    def close(self) -> None:
        self.loop.remove_reader(self.serversocket)
        self.serversocket.close()
        self._sweeper.cancel()
        if self._console_file is not None:
            self._console_file.close()
        if self._node_worker is not None:
            self._node_worker.shutdown(wait=False, cancel_futures=True)
