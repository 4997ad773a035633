"""A lan port: one process of the controller's, put on the vm lab's LAN (10.77.0.0/24).

Why: the guests' LAN is a QEMU multicast group on loopback (``-netdev socket,mcast=...``), an
Ethernet with no host side, so nothing on the controller can reach 10.77.0.N. A TCP client that
must sit *off* the two nodes of a migration (issue 12) needs an address on that Ethernet. A lan
port gives one, without root, a bridge or any change to the host's network:

    python -m labkit.lanport --mcast 230.0.77.1:PORT --address 10.77.0.250/24 -- CMD ARGS...

It opens the multicast socket in the host's network namespace (QEMU sends every frame as one
datagram to the group and reads the group), then moves itself into a new network namespace (a
user namespace too when not root, mapping the caller to root in it so CMD keeps CAP_NET_ADMIN),
makes a tap device there with the address, pumps frames between the tap and the group, and runs
CMD in that namespace with stdin/stdout/stderr passed through. It exits with CMD's status; when
CMD ends, the lan port is told to stop (SIGTERM/SIGINT/SIGHUP, forwarded to CMD) or its parent
goes away, CMD and anything else left in the namespace is killed, and the namespace, its tap and
its address go with the last process. It cannot outlive CMD either: CMD gets the lan port's
death as SIGKILL (PR_SET_PDEATHSIG).

A frame's only filter is the source MAC: the group loops our own datagrams back to us, and a
frame the tap sent must not come back into it. Everything else is delivered, like a hub.

Exit 2 with one line on stderr when it cannot: no /dev/net/tun, user namespaces disabled, a bad
argument. ``why_not()`` asks the same question up front (tests skip with it)."""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import functools
import ipaddress
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_GROUP = "230.0.77.1"  # labkit/fake/vm.py's lab LAN
DEFAULT_ADDRESS = "10.77.0.250/24"  # the controller's client host (docs: tcp-protocol)
TAP_NAME = "lan0"

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_UP = 0x1
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCSIFHWADDR = 0x8924
ARPHRD_ETHER = 1
FRAME_MAX = 65536
BURST = 64  # frames moved per wake-up per direction: neither side starves the other
KILL_GRACE = 5.0  # seconds CMD has after a forwarded signal before SIGKILL
PARENT_POLL = 1.0  # how often the pump notices a parent that went away

_libc = ctypes.CDLL(None, use_errno=True)


class LanPortError(Exception):
    """The lan port cannot be set up here: the message is the one line the CLI prints."""


def lan_command(mcast: str, port: int, address: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs ``argv`` on the LAN of group ``mcast``:``port`` at ``address``
    (``A.B.C.D/prefix``), for subprocess.Popen; CMD's stdio is the lan port's."""
    return [sys.executable, "-m", "labkit.lanport", "--mcast", f"{mcast}:{int(port)}",
            "--address", address, "--", *argv]


@dataclass(frozen=True)
class LanPort:
    """Where a lan port plugs in: the lab LAN's multicast ``port`` (inventory
    ``fake_lab.lan_port``), the group, and the address it takes."""

    port: int
    address: str = DEFAULT_ADDRESS
    group: str = DEFAULT_GROUP

    @classmethod
    def for_inventory(cls, inventory: Any, address: str = DEFAULT_ADDRESS) -> LanPort:
        """The lan port of a vm fake lab's inventory; a lab without a LAN has none."""
        spec = getattr(inventory, "fake_lab", None)
        port = getattr(spec, "lan_port", 0) if spec is not None else 0
        if not port:
            raise LanPortError("the inventory's lab has no LAN (fake_lab.lan_port)")
        return cls(port=port, address=address)

    def command(self, argv: Sequence[str]) -> list[str]:
        return lan_command(self.group, self.port, self.address, argv)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv), **kwargs)


@functools.cache
def why_not() -> str | None:
    """Why no lan port can run on this machine (None: it can). Runs the real set-up (namespace
    and tap) in a throwaway process, so the answer is the kernel's, not a guess."""
    try:
        r = subprocess.run([sys.executable, "-m", "labkit.lanport", "--check"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"lan port check did not run: {e}"
    if r.returncode == 0:
        return None
    return (r.stderr.strip().splitlines() or [f"lan port check exited {r.returncode}"])[-1]


def mac_for(address: ipaddress.IPv4Interface) -> bytes:
    """A fixed, locally administered MAC per address: a restarted lan port with the same
    address is the same host to the guests' ARP caches, not a stale entry to wait out."""
    return b"\x02\x6c\x6b" + address.ip.packed[1:]


def _unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def enter_namespace() -> None:
    """A network namespace of our own. Root: a net namespace alone (a user namespace without
    maps would drop CMD's capabilities at exec). Otherwise a user namespace too, with the
    caller mapped to root in it, so CMD (exec'd as that root) keeps CAP_NET_ADMIN there."""
    uid, gid = os.geteuid(), os.getegid()
    try:
        if uid == 0:
            _unshare(CLONE_NEWNET)
            return
        _unshare(CLONE_NEWUSER | CLONE_NEWNET)
    except OSError as e:
        hint = "" if uid == 0 else " (user namespaces disabled? see " \
            "/proc/sys/user/max_user_namespaces, kernel.unprivileged_userns_clone)"
        raise LanPortError(f"cannot make a network namespace: {e.strerror}{hint}") from None
    try:
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"0 {uid} 1"),
                           ("/proc/self/gid_map", f"0 {gid} 1")):
            with open(path, "w") as f:
                f.write(text)
    except OSError as e:
        raise LanPortError(f"cannot map the user namespace: {e}") from None


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    return struct.pack("16s", name.encode()) + payload.ljust(24, b"\0")


def _sockaddr_in(ip: ipaddress.IPv4Address) -> bytes:
    return struct.pack("=H2s4s8s", socket.AF_INET, b"\0\0", ip.packed, b"")


def _set_up(ctl: socket.socket, name: str) -> None:
    flags = struct.unpack_from("=H", fcntl.ioctl(ctl, SIOCGIFFLAGS, _ifreq(name)), 16)[0]
    fcntl.ioctl(ctl, SIOCSIFFLAGS, _ifreq(name, struct.pack("=H", flags | IFF_UP)))


def open_tap(address: ipaddress.IPv4Interface, mac: bytes, name: str = TAP_NAME) -> int:
    """The tap in the current namespace, with ``mac`` and ``address``, up, and lo up. Done by
    ioctl, in process: no `ip` binary to find, nothing exec'd before CMD."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise LanPortError(f"cannot open /dev/net/tun: {e.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
            fcntl.ioctl(ctl, SIOCSIFHWADDR, _ifreq(name, struct.pack("=H6s", ARPHRD_ETHER, mac)))
            fcntl.ioctl(ctl, SIOCSIFADDR, _ifreq(name, _sockaddr_in(address.ip)))
            fcntl.ioctl(ctl, SIOCSIFNETMASK, _ifreq(name, _sockaddr_in(address.netmask)))
            _set_up(ctl, "lo")
            _set_up(ctl, name)
        try:  # no IPv6 chatter (router solicitations, MLD) on the lab LAN; optional
            with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
                f.write("1")
        except OSError:
            pass
    except OSError as e:
        os.close(fd)
        raise LanPortError(f"cannot set up the tap device {name}: {e.strerror}") from None
    os.set_blocking(fd, False)
    return fd


def open_group(group: str, port: int) -> socket.socket:
    """The lab LAN as QEMU's ``-netdev socket,mcast=GROUP:PORT,localaddr=127.0.0.1`` opens it:
    bound to the group (shared, SO_REUSEADDR), joined on loopback, our sends looped back (the
    guests' QEMUs are on this host)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((group, port))
        local = socket.inet_aton("127.0.0.1")
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                        socket.inet_aton(group) + local)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, local)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    except OSError as e:
        sock.close()
        raise LanPortError(f"cannot join the lab LAN {group}:{port}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


def _netns_inode(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def sweep_namespace(host_ns: int | None) -> int:
    """SIGKILL every other process still in our network namespace (what CMD left running): the
    namespace, tap and address go only with its last process. Returns how many. Never in the
    host's namespace (``host_ns``, read before unshare): that would be every process there."""
    ours, me, killed = _netns_inode("self"), os.getpid(), 0
    if ours is None or host_ns is None or ours == host_ns:
        return 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        if _netns_inode(entry) == ours:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def _child_setup() -> None:
    """In CMD, before exec: die with the lan port (the pump and the namespace's owner), and
    take the default dispositions back."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


class Pump:
    """Frames between the tap and the group until CMD exits. One thread, one selector: the
    set-up ran single-threaded (unshare(CLONE_NEWUSER) requires it) and the pump needs none."""

    def __init__(self, tap: int, lan: socket.socket, dest: tuple[str, int], mac: bytes):
        self.tap, self.lan, self.dest, self.mac = tap, lan, dest, mac
        self.stats = {"to_lan": 0, "to_tap": 0, "looped": 0, "dropped": 0}

    def tap_to_lan(self) -> None:
        for _ in range(BURST):
            try:
                frame = os.read(self.tap, FRAME_MAX)
            except BlockingIOError:
                return
            try:
                self.lan.sendto(frame, self.dest)
                self.stats["to_lan"] += 1
            except (BlockingIOError, OSError):  # a full queue drops the frame, as a wire would
                self.stats["dropped"] += 1

    def lan_to_tap(self) -> None:
        for _ in range(BURST):
            try:
                frame = self.lan.recv(FRAME_MAX)
            except BlockingIOError:
                return
            if frame[6:12] == self.mac:
                self.stats["looped"] += 1
                continue
            try:
                os.write(self.tap, frame)
                self.stats["to_tap"] += 1
            except OSError:
                self.stats["dropped"] += 1


def run(group: str, port: int, address: ipaddress.IPv4Interface, argv: Sequence[str],
        mac: bytes | None = None) -> int:
    """The lan port's whole life; returns CMD's exit status (128+N for a signal N)."""
    mac = mac or mac_for(address)
    parent = os.getppid()
    lan = open_group(group, port)  # in the host's namespace: before unshare
    host_ns = _netns_inode("self")
    enter_namespace()
    tap = open_tap(address, mac)
    # signals wake the selector through a pipe (a handler alone would not: select is retried)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    pending: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda n, _f: pending.append(n))
    try:
        child = subprocess.Popen(list(argv), preexec_fn=_child_setup, close_fds=True)
    except OSError as e:
        raise LanPortError(f"cannot run {argv[0]}: {e.strerror}") from None
    pidfd = os.pidfd_open(child.pid)
    pump = Pump(tap, lan, (group, port), mac)
    sel = selectors.DefaultSelector()
    sel.register(tap, selectors.EVENT_READ, pump.tap_to_lan)
    sel.register(lan, selectors.EVENT_READ, pump.lan_to_tap)
    sel.register(pidfd, selectors.EVENT_READ, None)
    sel.register(wake_r, selectors.EVENT_READ, lambda: os.read(wake_r, 512))
    kill_at: float | None = None
    try:
        while True:
            done = False
            for key, _ in sel.select(PARENT_POLL):
                if key.data is None:
                    done = True
                else:
                    key.data()
            if done:
                break
            if os.getppid() != parent and not pending and kill_at is None:
                pending.append(signal.SIGTERM)  # our parent is gone: so is the reason to run
            while pending:
                sig = pending.pop(0)
                child.send_signal(sig)
                kill_at = kill_at or time.monotonic() + KILL_GRACE
            if kill_at is not None and time.monotonic() > kill_at:
                child.kill()
    finally:
        if child.poll() is None:  # only on an error in the pump itself
            child.kill()
        code = child.wait()
        sweep_namespace(host_ns)
        sel.close()
        signal.set_wakeup_fd(-1)
        for fd in (pidfd, wake_r, wake_w):
            os.close(fd)
        os.close(tap)
        lan.close()
    return code if code >= 0 else 128 - code


def check() -> None:
    """The set-up without a LAN or a command: can this machine make a lan port?"""
    enter_namespace()
    os.close(open_tap(ipaddress.IPv4Interface(DEFAULT_ADDRESS), b"\x02\x6c\x6b\0\0\x01"))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labkit.lanport",
                                description="run CMD on the vm lab's LAN (its own network "
                                            "namespace, a tap bridged to the LAN's multicast group)")
    p.add_argument("--mcast", help="GROUP:PORT of the lab LAN (inventory fake_lab.lan_port)")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="A.B.C.D/PREFIX on the LAN")
    p.add_argument("--mac", help="the tap's MAC (default: derived from the address)")
    p.add_argument("--check", action="store_true", help="only check that a lan port can run")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    try:
        if a.check:
            check()
            return 0
        if not a.mcast or not cmd:
            p.error("--mcast GROUP:PORT and -- CMD are required")
        group, _, port_s = a.mcast.rpartition(":")
        try:
            port = int(port_s)
            if not ipaddress.IPv4Address(group).is_multicast or not 0 < port < 65536:
                raise ValueError
            address = ipaddress.IPv4Interface(a.address)
            mac = bytes.fromhex(a.mac.replace(":", "")) if a.mac else None
            if mac is not None and (len(mac) != 6 or mac[0] & 1):
                raise ValueError
        except ValueError:
            raise LanPortError(f"bad --mcast {a.mcast!r}, --address {a.address!r} or --mac "
                               f"{a.mac!r}") from None
        return run(group, port, address, cmd, mac)
    except LanPortError as e:
        print(f"lanport: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["DEFAULT_ADDRESS", "DEFAULT_GROUP", "LanPort", "LanPortError", "lan_command",
           "why_not"]
