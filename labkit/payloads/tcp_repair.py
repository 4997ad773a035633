#!/usr/bin/env python3
"""Carry an established TCP connection from one process (or node) to another with TCP_REPAIR.

Node-side payload: python3 stdlib + ctypes only, never imports labkit. Used by the checkpoint
agent: the source side takes the frozen workload's socket (``find_socket`` + ``pidfd_getfd``)
and ``save``s it to a JSON-able dict; the destination ``restore``s a connected socket from it
that the resumed workload adopts.

The kernel's contract (Documentation/networking/tcp.rst's TCP_REPAIR notes, include/uapi/
linux/tcp.h; CRIU's soccr is the reference user, and the order below is its order):

save, with the owner frozen so nothing reads or writes the queues meanwhile:
  TCP_REPAIR on -> for each queue: TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ (the sequence number after
  the queue's last byte), its bytes by recv(MSG_PEEK) (repair mode peeks the *send* queue too);
  the send queue is split by SIOCOUTQNSD into sent-but-unacked and never-sent bytes ->
  TCP_MAXSEG (in repair mode: the MSS clamp), TCP_INFO's option bits and window scales,
  TCP_TIMESTAMP (the connection's timestamp clock), TCP_REPAIR_WINDOW, the two addresses, and
  the buffer sizes (a fresh socket's send buffer may not hold the saved send queue: the
  never-sent bytes would then wait on the peer's window inside the downtime).
  The socket is left in repair mode: closed in repair mode it goes away silently (no FIN, no
  RST), which is what the source's copy must do once the connection lives elsewhere;
  ``repair_off`` gives it back to the frozen owner when the move is abandoned.
restore:
  socket -> TCP_REPAIR on, IP_FREEBIND + IP_TRANSPARENT (the address arrives only after the
  rebuild, so that no packet meets the address without the socket: FREEBIND lets bind take
  it, and TRANSPARENT lets the route lookup of connect use it as a source — without it the
  kernel answers ENETUNREACH for a source address that is not local), SO_REUSEADDR,
  the saved buffer sizes (SO_*BUFFORCE: we are root, and wmem_max must not cap them) -> each
  queue's starting sequence (its saved end minus its length) -> bind, TCP_MAXSEG (the saved
  clamp, capped at 32767: the segment size is set at connect, see restore) -> connect (in
  repair mode: no SYN, the socket is simply ESTABLISHED) -> TCP_REPAIR_OPTIONS (MSS, window
  scales, SACK, timestamps) and TCP_TIMESTAMP (so the peer's PAWS check sees a clock that went
  on, whatever this kernel's own clock says) -> the queues' bytes written in repair mode (they
  count as received / as sent, nothing goes out) -> TCP_REPAIR_WINDOW -> repair off (the kernel
  sends a window probe: the peer learns the connection is alive here) -> the never-sent bytes
  sent normally, as if the application had just written them.

Only ESTABLISHED IPv4 connections are carried; anything else is refused by name. Every kernel
refusal is reported as ``OPTION: strerror`` (e.g. "TCP_REPAIR_WINDOW: Operation not
permitted"), so the run's error says what the kernel would not do.

CLI (a probe for a node): ``python3 tcp_repair.py check`` -> whether this kernel lets us repair
(root / CAP_NET_ADMIN and a kernel with TCP_REPAIR).
"""

from __future__ import annotations

import array
import base64
import errno
import fcntl
import json
import os
import socket
import struct
import sys

if __package__:
    from . import ptrace_inject as pi
else:  # run as a script: siblings live next to this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import ptrace_inject as pi  # type: ignore[no-redef]

# include/uapi/linux/tcp.h
TCP_MAXSEG = 2
USER_MSS_RANGE = (88, 32767)  # what setsockopt(TCP_MAXSEG) accepts: TCP_MIN_MSS, MAX_TCP_WINDOW
TCP_INFO = 11
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
TCP_ESTABLISHED = 1
IP_FREEBIND = 15
IP_TRANSPARENT = 19
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
UNSENT_TIMEOUT = 10.0  # the never-sent bytes go out within this, or the rebuild fails
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = 0x541B, 0x5411, 0x894B

WINDOW = struct.Struct("=IIIII")  # snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup
REPAIR_OPT = struct.Struct("=II")  # opt_code, opt_val
QUEUE_NAMES = {TCP_RECV_QUEUE: "receive", TCP_SEND_QUEUE: "send"}
STATE_VERSION = 1


class RepairError(Exception):
    pass


# --- finding and taking the workload's socket -------------------------------------------------
def _hex_addr(addr: str, port: int) -> str:
    """addr:port as /proc/net/tcp prints it (the address as a host-order u32)."""
    raw = struct.unpack("=I", socket.inet_aton(addr))[0]
    return f"{raw:08X}:{port:04X}"


def find_socket(pid: int, addr: str, port: int) -> int:
    """The fd number, in process pid, of its ESTABLISHED TCP socket whose local end is
    addr:port (/proc/PID/fd -> socket inode, matched in the process's /proc/PID/net/tcp)."""
    want = _hex_addr(addr, port)
    inodes: set[str] = set()
    try:
        with open(f"/proc/{pid}/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1] == want and int(fields[3], 16) == TCP_ESTABLISHED:
                    inodes.add(fields[9])
    except FileNotFoundError:
        raise RepairError(f"process {pid} is gone") from None
    if not inodes:
        raise RepairError(f"process {pid} has no established TCP connection on {addr}:{port}")
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            return int(name)
    raise RepairError(f"process {pid} holds no fd of its connection on {addr}:{port}")


def pidfd_getfd(pid: int, fd: int) -> int:
    """A duplicate, in this process, of fd in process pid (the same open socket, not a copy):
    ptrace_inject's pidfd_getfd (Linux 5.6; needs ptrace rights over pid), its failure named."""
    try:
        return pi.pidfd_getfd(pid, fd)
    except OSError as e:
        raise RepairError(f"pidfd_getfd(pid {pid}, fd {fd}): {e.strerror}") from None


def take_socket(pid: int, addr: str, port: int) -> socket.socket:
    """The process's connection on addr:port as a socket object of ours (shared with it)."""
    return socket.socket(fileno=pidfd_getfd(pid, find_socket(pid, addr, port)))


# --- socket options, with the kernel's refusal named ----------------------------------------
def _set(sock: socket.socket, name: str, level: int, opt: int, value: int | bytes) -> None:
    try:
        sock.setsockopt(level, opt, value)
    except OSError as e:
        raise RepairError(f"{name}: {e.strerror}") from None


def _get_int(sock: socket.socket, name: str, opt: int) -> int:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, opt)
    except OSError as e:
        raise RepairError(f"{name}: {e.strerror}") from None


def _get_u32(sock: socket.socket, name: str, opt: int) -> int:
    try:
        return struct.unpack("=I", sock.getsockopt(socket.IPPROTO_TCP, opt, 4))[0]
    except OSError as e:
        raise RepairError(f"{name}: {e.strerror}") from None


def _ioctl_int(sock: socket.socket, name: str, req: int) -> int:
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), req, buf)
    except OSError as e:
        raise RepairError(f"{name}: {e.strerror}") from None
    return buf[0]


def tcp_info(sock: socket.socket) -> dict:
    """The few TCP_INFO fields repair needs: state, option bits, window scales."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 104)
    state, _ca, _retr, _probes, _backoff, options, wscales = struct.unpack_from("=7B", raw)
    return {"state": state, "options": options, "snd_wscale": wscales & 0x0F,
            "rcv_wscale": wscales >> 4}


def repair_on(sock: socket.socket) -> None:
    _set(sock, "TCP_REPAIR", socket.IPPROTO_TCP, TCP_REPAIR, 1)


def repair_off(sock: socket.socket) -> None:
    """Hand the socket back to normal operation (the move was abandoned: the frozen owner
    carries on). The kernel sends a window probe, so the peer hears from us at once."""
    _set(sock, "TCP_REPAIR", socket.IPPROTO_TCP, TCP_REPAIR, 0)


def _peek_queue(sock: socket.socket, queue: int, length: int) -> tuple[int, bytes]:
    _set(sock, "TCP_REPAIR_QUEUE", socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
    seq = _get_u32(sock, f"TCP_QUEUE_SEQ ({QUEUE_NAMES[queue]} queue)", TCP_QUEUE_SEQ)
    data = b""
    if length:
        try:
            data = sock.recv(length, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError as e:
            raise RepairError(f"reading the {QUEUE_NAMES[queue]} queue "
                              f"({length} bytes): {e.strerror}") from None
        if len(data) != length:
            raise RepairError(f"the {QUEUE_NAMES[queue]} queue holds {length} bytes but "
                              f"{len(data)} were read")
    return seq, data


# --- save / restore --------------------------------------------------------------------------
def save(sock: socket.socket) -> dict:
    """The connection's whole kernel state, JSON-able. The owner must be frozen (nothing may
    read or write the queues meanwhile). Leaves the socket in repair mode."""
    if sock.family != socket.AF_INET:
        raise RepairError("only IPv4 connections are carried")
    info = tcp_info(sock)
    if info["state"] != TCP_ESTABLISHED:
        raise RepairError(f"the connection is not established (TCP state {info['state']}: "
                          "the peer closed or reset it)")
    repair_on(sock)
    inq = _ioctl_int(sock, "SIOCINQ", SIOCINQ)
    outq = _ioctl_int(sock, "SIOCOUTQ", SIOCOUTQ)
    unsent = _ioctl_int(sock, "SIOCOUTQNSD", SIOCOUTQNSD)
    inq_seq, inq_data = _peek_queue(sock, TCP_RECV_QUEUE, inq)
    outq_seq, outq_data = _peek_queue(sock, TCP_SEND_QUEUE, outq)
    _set(sock, "TCP_REPAIR_QUEUE", socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    try:
        window = WINDOW.unpack(sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW,
                                               WINDOW.size))
    except OSError as e:
        raise RepairError(f"TCP_REPAIR_WINDOW: {e.strerror}") from None
    local, peer = sock.getsockname(), sock.getpeername()
    return {
        "version": STATE_VERSION,
        "local": [local[0], local[1]], "peer": [peer[0], peer[1]],
        "inq_seq": inq_seq, "inq": base64.b64encode(inq_data).decode(),
        "outq_seq": outq_seq, "outq": base64.b64encode(outq_data).decode(),
        "unsent": unsent,
        "mss": _get_int(sock, "TCP_MAXSEG", TCP_MAXSEG),
        "timestamp": _get_u32(sock, "TCP_TIMESTAMP", TCP_TIMESTAMP),
        "sack": bool(info["options"] & TCPI_OPT_SACK),
        "tstamp": bool(info["options"] & TCPI_OPT_TIMESTAMPS),
        "wscale": bool(info["options"] & TCPI_OPT_WSCALE),
        "snd_wscale": info["snd_wscale"], "rcv_wscale": info["rcv_wscale"],
        "sndbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
        "rcvbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        "window": dict(zip(("snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup"),
                           window)),
    }


def summary(state: dict) -> dict:
    """What a log line or a report says of a saved connection (no payload bytes)."""
    (la, lp), (pa, pp) = state["local"], state["peer"]
    return {"local": f"{la}:{lp}", "peer": f"{pa}:{pp}",
            "recv_queue": len(base64.b64decode(state["inq"])),
            "send_queue": len(base64.b64decode(state["outq"])), "unsent": state["unsent"],
            "mss": state["mss"], "sack": state["sack"], "tstamp": state["tstamp"],
            "wscale": [state["snd_wscale"], state["rcv_wscale"]] if state["wscale"] else None}


def _write_queue(sock: socket.socket, queue: int, data: bytes) -> None:
    """Write bytes into a queue in repair mode; a chunk the kernel cannot take at once
    (ENOMEM) is halved, as soccr does."""
    if not data:
        return
    _set(sock, "TCP_REPAIR_QUEUE", socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
    view = memoryview(data)
    chunk = len(view)
    while view:
        try:
            n = sock.send(view[:chunk])
        except OSError as e:
            if e.errno in (errno.ENOMEM, errno.EAGAIN) and chunk > 1:
                chunk //= 2
                continue
            raise RepairError(f"writing the {QUEUE_NAMES[queue]} queue ({len(view)} bytes "
                              f"left): {e.strerror}") from None
        view = view[n:]


def restore(state: dict) -> socket.socket:
    """A connected socket carrying the saved connection (blocking, repair mode off)."""
    if state.get("version") != STATE_VERSION:
        raise RepairError(f"saved connection format {state.get('version')} != {STATE_VERSION}")
    inq = base64.b64decode(state["inq"])
    outq = base64.b64decode(state["outq"])
    unsent = int(state["unsent"])
    if not 0 <= unsent <= len(outq):
        raise RepairError(f"saved connection: {unsent} unsent bytes of a {len(outq)}-byte "
                          "send queue")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        repair_on(sock)
        _set(sock, "IP_FREEBIND", socket.IPPROTO_IP, IP_FREEBIND, 1)
        _set(sock, "IP_TRANSPARENT", socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        _set(sock, "SO_REUSEADDR", socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # getsockopt reports the doubled size the kernel keeps; setsockopt doubles what it
        # gets. The send buffer must take the whole saved send queue at once (its accounting
        # counts overhead, and the peer's window may be shut): else the never-sent bytes would
        # wait on the peer inside the downtime.
        for name, opt, size in (("SO_SNDBUFFORCE", SO_SNDBUFFORCE,
                                 max(int(state["sndbuf"]) // 2, len(outq) + (64 << 10))),
                                ("SO_RCVBUFFORCE", SO_RCVBUFFORCE,
                                 max(int(state["rcvbuf"]) // 2, 1))):
            _set(sock, name, socket.SOL_SOCKET, opt, size)
        for queue, end_seq, length in ((TCP_SEND_QUEUE, state["outq_seq"], len(outq)),
                                       (TCP_RECV_QUEUE, state["inq_seq"], len(inq))):
            _set(sock, "TCP_REPAIR_QUEUE", socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
            _set(sock, f"TCP_QUEUE_SEQ ({QUEUE_NAMES[queue]} queue)", socket.IPPROTO_TCP,
                 TCP_QUEUE_SEQ, struct.pack("=I", (int(end_seq) - length) & 0xFFFFFFFF))
        local, peer = tuple(state["local"]), tuple(state["peer"])
        try:
            sock.bind(local)
        except OSError as e:
            raise RepairError(f"bind {local[0]}:{local[1]}: {e.strerror}") from None
        # The segment size the connection sends with is fixed at connect, from the MSS clamp
        # it has then: without this, the default 536 (the saved clamp arrives with the options,
        # after connect), and the rebuilt connection sends 524-byte segments until some later
        # path event makes the kernel look again. Bulk data after a move then crawls (a
        # loopback heir took over 20 s for 4 MB under load). The user MSS is that clamp; it
        # stays set, so a clamp over 32767 (loopback's 65495) runs at 32767 from now on.
        lo, hi = USER_MSS_RANGE
        if int(state["mss"]) >= lo:
            _set(sock, "TCP_MAXSEG", socket.IPPROTO_TCP, TCP_MAXSEG, min(int(state["mss"]), hi))
        try:
            sock.connect(peer)
        except OSError as e:
            raise RepairError(f"connect (repair mode) to {peer[0]}:{peer[1]}: "
                              f"{e.strerror}") from None
        opts = [REPAIR_OPT.pack(TCPOPT_MSS, int(state["mss"]))]
        if state["wscale"]:
            opts.append(REPAIR_OPT.pack(TCPOPT_WINDOW, int(state["snd_wscale"])
                                        | int(state["rcv_wscale"]) << 16))
        if state["sack"]:
            opts.append(REPAIR_OPT.pack(TCPOPT_SACK_PERM, 0))
        if state["tstamp"]:
            opts.append(REPAIR_OPT.pack(TCPOPT_TIMESTAMP, 0))
        _set(sock, "TCP_REPAIR_OPTIONS", socket.IPPROTO_TCP, TCP_REPAIR_OPTIONS, b"".join(opts))
        if state["tstamp"]:
            _set(sock, "TCP_TIMESTAMP", socket.IPPROTO_TCP, TCP_TIMESTAMP,
                 struct.pack("=I", int(state["timestamp"])))
        _write_queue(sock, TCP_RECV_QUEUE, inq)
        _write_queue(sock, TCP_SEND_QUEUE, outq[:len(outq) - unsent])
        _set(sock, "TCP_REPAIR_QUEUE", socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        w = state["window"]
        _set(sock, "TCP_REPAIR_WINDOW", socket.IPPROTO_TCP, TCP_REPAIR_WINDOW,
             WINDOW.pack(w["snd_wl1"], w["snd_wnd"], w["max_window"], w["rcv_wnd"],
                         w["rcv_wup"]))
        repair_off(sock)
        if unsent:
            sock.settimeout(UNSENT_TIMEOUT)  # the peer's window, not ours, could hold it up
            try:
                sock.sendall(outq[len(outq) - unsent:])
                sock.settimeout(None)
            except OSError as e:
                raise RepairError(f"sending the {unsent} never-sent bytes: {e.strerror or e}") \
                    from None
    except BaseException:
        close_silently(sock)
        raise
    return sock


def close_silently(sock: socket.socket) -> None:
    """Close without telling the peer (no FIN, no RST): repair mode first. For our own
    reference only while the connection lives elsewhere or never came to life here."""
    try:
        repair_on(sock)
    except RepairError:
        pass
    sock.close()


def check() -> dict:
    """Can this node repair sockets? (a fresh socket accepts TCP_REPAIR)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            repair_on(s)
        except RepairError as e:
            return {"ok": False, "error": str(e)}
    return {"ok": True}


if __name__ == "__main__":
    if sys.argv[1:] != ["check"]:
        print("usage: tcp_repair.py check", file=sys.stderr)
        sys.exit(2)
    res = check()
    print(json.dumps(res))
    sys.exit(0 if res["ok"] else 1)
