#!/usr/bin/env python3
"""Move a service address between lab nodes: ``take`` adds it here as a /32 and announces it,
``give`` removes it.

Node-side payload: python3 stdlib only, never imports labkit. Imported by the checkpoint agent
and the CRIU driver; the controller runs ``python3 netmove.py take|give --address A`` at setup
and cleanup (with ``--port P`` it first removes the packet holds and CRIU connection locks
that a killed agent, driver or ``criu`` left).

Why rtnetlink and not ``ip addr``: the move sits inside a migration's downtime, and on a slow
(TCG) guest exec'ing ``ip`` costs tens of milliseconds where one netlink message costs well
under one. The messages are exactly what ``ip addr add A/32 dev DEV`` / ``ip addr del`` send.

Why a gratuitous ARP at once: the peers' neighbour caches still map the address to the old
node's MAC, and would keep doing so until the entry goes stale (tens of seconds), sending every
retransmission to a node that no longer answers. An ARP request with sender IP = target IP is
what Linux treats as gratuitous (``arp_is_garp``): it overrides an existing entry even inside
its lock time. A reply of the same form is sent too, for stacks that only listen to replies.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import sys

if __package__:
    from . import netlock, nfqueue
else:  # run as a script: siblings live next to this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import netlock  # type: ignore[no-redef]
    import nfqueue  # type: ignore[no-redef]

# rtnetlink (linux/rtnetlink.h, linux/if_addr.h, linux/netlink.h)
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 1, 4, 0x200, 0x400, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
IFA_ADDRESS, IFA_LOCAL = 1, 2
RT_SCOPE_UNIVERSE = 0
NLMSG = struct.Struct("=IHHII")        # len, type, flags, seq, pid
IFADDRMSG = struct.Struct("=BBBBI")    # family, prefixlen, flags, scope, index
RTATTR = struct.Struct("=HH")
ETH_P_ARP = 0x0806
SIOCGIFHWADDR = 0x8927


class NetMoveError(Exception):
    pass


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, data: bytes) -> bytes:
    raw = RTATTR.pack(RTATTR.size + len(data), kind) + data
    return raw + b"\0" * (_align(len(raw)) - len(raw))


def _request(msg_type: int, flags: int, body: bytes) -> list[bytes]:
    """Send one rtnetlink request, return the reply messages' payloads (type, payload) until
    DONE or the ACK; a negative error in the ACK raises OSError with that errno."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.bind((0, 0))
        seq = 1
        s.sendall(NLMSG.pack(NLMSG.size + len(body), msg_type, flags | NLM_F_REQUEST, seq, 0)
                  + body)
        out: list[bytes] = []
        while True:
            data = s.recv(1 << 16)
            off = 0
            while off + NLMSG.size <= len(data):
                length, mtype, _flags, mseq, _pid = NLMSG.unpack_from(data, off)
                payload = data[off + NLMSG.size:off + length]
                off += _align(length)
                if mseq != seq:
                    continue
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    code = struct.unpack_from("=i", payload)[0]
                    if code:
                        raise OSError(-code, os.strerror(-code))
                    return out
                out.append(payload)


def _addresses() -> list[tuple[int, int, str]]:
    """Every IPv4 address here: (ifindex, prefixlen, address)."""
    body = IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)
    out = []
    for payload in _request(RTM_GETADDR, NLM_F_DUMP, body):
        family, plen, _fl, _scope, index = IFADDRMSG.unpack_from(payload)
        if family != socket.AF_INET:
            continue
        off = IFADDRMSG.size
        local = addr = None
        while off + RTATTR.size <= len(payload):
            alen, kind = RTATTR.unpack_from(payload, off)
            if alen < RTATTR.size:
                break
            value = payload[off + RTATTR.size:off + alen]
            if kind == IFA_LOCAL:
                local = socket.inet_ntoa(value)
            elif kind == IFA_ADDRESS:
                addr = socket.inet_ntoa(value)
            off += _align(alen)
        if local or addr:
            out.append((index, plen, local or addr))
    return out


def lan_device(addr: str) -> str:
    """The interface whose IPv4 subnet (not counting /32s) holds addr: where a service
    address on that LAN belongs."""
    ip = ipaddress.IPv4Address(addr)
    for index, plen, have in _addresses():
        if plen < 32 and ip in ipaddress.IPv4Network(f"{have}/{plen}", strict=False):
            return socket.if_indextoname(index)
    raise NetMoveError(f"no interface here has an IPv4 subnet holding {addr}")


def has_address(addr: str) -> bool:
    return any(have == addr and plen == 32 for _i, plen, have in _addresses())


def _addr_msg(addr: str, dev: str) -> bytes:
    packed = socket.inet_aton(addr)
    return (IFADDRMSG.pack(socket.AF_INET, 32, 0, RT_SCOPE_UNIVERSE, socket.if_nametoindex(dev))
            + _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed))


def take(addr: str, announce: bool = True, dev: str | None = None) -> str:
    """Add addr/32 to the LAN device (no error if it is already there), then announce it.
    Returns the device."""
    dev = dev or lan_device(addr)
    try:
        _request(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, _addr_msg(addr, dev))
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise NetMoveError(f"adding {addr}/32 to {dev}: {e.strerror}") from None
    if announce:
        _announce(addr, dev)
    return dev


def give(addr: str, dev: str | None = None) -> bool:
    """Remove addr/32 from the LAN device; no error if it is not there. -> whether it was."""
    try:
        dev = dev or lan_device(addr)
    except NetMoveError:
        return False  # no LAN here that could hold it, so it is not here either
    try:
        _request(RTM_DELADDR, NLM_F_ACK, _addr_msg(addr, dev))
    except OSError as e:
        if e.errno in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
            return False
        raise NetMoveError(f"removing {addr}/32 from {dev}: {e.strerror}") from None
    return True


def garp_frames(addr: str, mac: bytes) -> list[bytes]:
    """The two gratuitous ARP frames (request and reply form) for addr at mac."""
    ip = socket.inet_aton(addr)
    bcast = b"\xff" * 6
    frames = []
    for op, tha in ((1, b"\0" * 6), (2, mac)):
        arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, mac, ip, tha, ip)
        frame = bcast + mac + struct.pack("!H", ETH_P_ARP) + arp
        frames.append(frame + b"\0" * (60 - len(frame)))
    return frames


def device_mac(dev: str) -> bytes:
    """SIOCGIFHWADDR, not /sys/class/net: sysfs shows the namespace it was mounted in."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16s18s", dev.encode(), b"")
        got = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, req)
    return got[18:24]


def announce(addr: str, dev: str | None = None) -> None:
    """Broadcast gratuitous ARP for addr from dev, so peers re-point their caches now."""
    dev = dev or lan_device(addr)
    mac = device_mac(dev)
    try:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
            s.bind((dev, ETH_P_ARP))
            for frame in garp_frames(addr, mac):
                s.send(frame)
    except OSError as e:
        raise NetMoveError(f"gratuitous ARP for {addr} on {dev}: {e.strerror}") from None


_announce = announce  # take()'s flag of the same name hides it there


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="netmove.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("take", "give", "announce", "device"))
    ap.add_argument("--address", required=True)
    ap.add_argument("--no-announce", action="store_true", help="take without gratuitous ARP")
    ap.add_argument("--port", type=int, help="take, give: first remove the packet holds "
                                              "(nfqueue.py) and CRIU connection locks "
                                              "(netlock.py) on ADDRESS:PORT that a killed "
                                              "agent, driver or criu left")
    a = ap.parse_args(argv)
    failed = False
    if a.port is not None and a.action in ("take", "give"):
        failed = not _clear_stale(a.address, a.port)  # and still move the address
    try:
        if a.action == "take":
            print(take(a.address, announce=not a.no_announce))
        elif a.action == "give":
            print("removed" if give(a.address) else "absent")
        elif a.action == "announce":
            announce(a.address)
        else:
            print(lan_device(a.address))
    except (NetMoveError, OSError, ValueError) as e:
        print(f"netmove: {a.action} {a.address}: {e}", file=sys.stderr)
        return 1
    return 1 if failed else 0


def _clear_stale(address: str, port: int) -> bool:
    """Remove what a killed restore agent, driver or ``criu`` left on address:port: packet
    holds (nfqueue: they would queue the service's packets to nobody) and CRIU's connection
    locks (netlock: they would drop a later connection that reuses the client's port). Say
    what was done. -> False if that failed."""
    failed = False
    for what, mod, error in (("packet hold", nfqueue, nfqueue.HoldError),
                             ("CRIU lock", netlock, netlock.LockError)):
        try:
            cleared = mod.clear(address, port)
        except (error, OSError) as e:
            print(f"netmove: clearing {what} rules on {address}:{port}: {e}", file=sys.stderr)
            failed = True
            continue
        if cleared:
            print(f"removed {cleared} {what} rule(s) on {address}:{port}")
    return not failed


if __name__ == "__main__":
    sys.exit(main())
