"""Hold the packets sent to one TCP service (address, port) and release them later, in order.

Node-side payload: python3 stdlib only, never imports labkit; runs as root on a node (or in a
network namespace where it is root).

Why: while a migrated service is frozen, or its socket is not yet rebuilt on the destination,
the kernel answers a client's segment with a RST (no socket for it) or the segment is lost.
The original work queued such packets in netfilter (NF_QUEUE) and reinjected them afterwards,
so the peer sees a delay and never a reset. This does the same with what every kernel ships:
an ``iptables -j NFQUEUE`` rule in INPUT for the service, and a pure-Python nfnetlink_queue
listener that takes each queued packet and gives it no verdict (held) until ``release()``,
which accepts them in arrival order, then removes the rule. Packets that arrive while the
release runs are accepted too, after the held ones, so the order the client sent is kept.

The listener binds the queue *before* the rule goes in (a rule without a listener drops), and
the rule comes out on release, on close, and on every error path: a hold left behind would cut
the service off for good. If the listener falls behind (its socket overflows), the kernel keeps
those packets queued with no id we know; closing the queue drops them, and TCP retransmits
them: counted as ``lost``, never delivered out of order.

    with Hold("10.77.0.200", 7077) as hold:
        ...                       # packets to 10.77.0.200:7077 are held
        hold.release()            # accepted in order, rule removed
    hold.stats()  # {"held": n, "released": n, "max_hold_ms": ..., ...}

CLI: ``python3 nfqueue.py hold --address A --port P [--seconds S]``: prints ``{"event":
"holding"}`` once the rule is in, releases after S seconds (without --seconds: at a line or EOF
on stdin), prints the stats as one JSON line."""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
COPY_MODES = {"meta": 1, "packet": 2}  # NFQNL_COPY_META, NFQNL_COPY_PACKET
NF_ACCEPT = 1
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NFGEN_HDR = struct.Struct("=BBH")  # family, version, res_id (big-endian queue number)
RCVBUF = 4 << 20
QUEUE_MAXLEN = 8192  # packets the kernel keeps queued for us before it drops new ones
COPY_RANGE = 128  # "packet" mode: headers are plenty for a look, never the payload
ACK_TIMEOUT = 5.0
DRAIN_QUIET = 0.05  # after the rule is gone: this long with no packet and the queue is done
IPTABLES_TIMEOUT = 60.0  # a TCG guest is slow; `-w` waits for the xtables lock inside this


class HoldError(RuntimeError):
    """The hold could not be set up or taken down (the message says which step)."""


def _attr(kind: int, payload: bytes) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind)
    return head + payload + b"\0" * (-len(payload) % 4)


def _attrs(data: bytes) -> dict[int, bytes]:
    out, i = {}, 0
    while i + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, i)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[i + 4:i + length]  # drop NLA_F_NESTED / NET_BYTEORDER
        i += (length + 3) & ~3
    return out


def iptables_argv(action: str, address: str, port: int, queue_num: int) -> list[str]:
    return ["iptables", "-w", str(int(IPTABLES_TIMEOUT)), action, "INPUT", "-d", address,
            "-p", "tcp", "--dport", str(port), "-j", "NFQUEUE", "--queue-num", str(queue_num)]


def rule_present(address: str, port: int, queue_num: int = 77) -> bool:
    """Whether the hold's rule is in INPUT (tests, and cleanup after a crash). Only iptables'
    "no such rule" (exit 1) means absent: a lock timeout or a refusal is an error, not a
    reason to believe the rule gone."""
    try:
        r = subprocess.run(iptables_argv("-C", address, port, queue_num), capture_output=True,
                           text=True, timeout=IPTABLES_TIMEOUT)
    except subprocess.SubprocessError as e:
        raise HoldError(f"iptables -C: {e}") from None
    if r.returncode in (0, 1):
        return r.returncode == 0
    raise HoldError(f"iptables -C INPUT ... NFQUEUE: exit {r.returncode}: "
                    f"{(r.stderr or r.stdout).strip()}")


CLEAR_MAX = 64  # copies of the rule clear() removes at most (one per killed agent is usual)


def clear(address: str, port: int, queue_num: int = 77) -> int:
    """Remove every copy of the hold's rule left in INPUT (a restore agent killed while holding
    cannot remove its own; the rule would then queue the service's packets to no listener,
    and the kernel drops those). -> how many were removed; 0 where iptables is absent."""
    removed = 0
    try:
        while rule_present(address, port, queue_num):
            if removed >= CLEAR_MAX:
                raise HoldError(f"more than {CLEAR_MAX} NFQUEUE rules for {address}:{port}")
            try:
                r = subprocess.run(iptables_argv("-D", address, port, queue_num),
                                   capture_output=True, text=True, timeout=IPTABLES_TIMEOUT)
            except subprocess.SubprocessError as e:
                raise HoldError(f"iptables -D: {e}") from None
            if r.returncode != 0:
                raise HoldError(f"iptables -D INPUT ... NFQUEUE: "
                                f"{(r.stderr or r.stdout).strip() or r.returncode}")
            removed += 1
    except FileNotFoundError:  # no iptables here: no rule of ours either
        return removed
    return removed


class Hold:
    """Packets to ``address``:``port`` (TCP, INPUT) held from construction until ``release()``;
    ``close()`` (or leaving the ``with``) releases what is still held and takes everything
    down. One Hold per queue number at a time (the kernel allows one listener per queue)."""

    def __init__(self, address: str, port: int, queue_num: int = 77, *, copy: str = "meta"):
        self.address, self.port, self.queue_num = address, int(port), int(queue_num)
        socket.inet_aton(address)  # IPv4 only: a bad address fails here, before any rule
        self._lock = threading.Lock()
        self._held: list[tuple[int, float]] = []  # (packet id, monotonic arrival), in order
        self._released = False  # new packets are accepted as they come
        self._stop = threading.Event()
        self._stats = {"held": 0, "released": 0, "after_release": 0, "lost": 0,
                       "verdict_errors": 0, "max_hold_ms": 0.0}
        self._rule = False
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._sock: socket.socket | None = None
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            self._sock.bind((0, 0))
            self._config(_attr(NFQA_CFG_CMD, struct.pack("=BxH", NFQNL_CFG_CMD_BIND,
                                                         socket.htons(socket.AF_INET))),
                         "bind the queue")
            self._config(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", COPY_RANGE,
                                                            COPY_MODES[copy]))
                         + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN)),
                         "set the copy mode")
            self._sock.setblocking(False)
            self._thread = threading.Thread(target=self._read, name=f"nfqueue-{queue_num}",
                                            daemon=True)
            self._thread.start()
            self._run_iptables("-I")
            self._rule = True
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- netlink -------------------------------------------------------------------------------

    def _message(self, msg_type: int, flags: int, payload: bytes) -> bytes:
        self._seq += 1
        body = NFGEN_HDR.pack(socket.AF_UNSPEC, 0, socket.htons(self.queue_num)) + payload
        return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), NFNL_SUBSYS_QUEUE << 8 | msg_type,
                              NLM_F_REQUEST | flags, self._seq, 0) + body

    def _config(self, attrs: bytes, what: str) -> None:
        """A config request, acknowledged before the next step (the reader is not running
        yet: the answer is read here)."""
        self._sock.settimeout(ACK_TIMEOUT)
        msg = self._message(NFQNL_MSG_CONFIG, NLM_F_ACK, attrs)
        seq = self._seq
        try:
            self._sock.send(msg)
            while True:
                data = self._sock.recv(65536)
                for mtype, mseq, payload in _messages(data):
                    if mtype == NLMSG_ERROR and mseq == seq:
                        err = -struct.unpack_from("=i", payload)[0]
                        if err:
                            hint = " (queue taken by another listener?)" if err == errno.EBUSY else ""
                            raise HoldError(f"nfqueue {self.queue_num}: cannot {what}: "
                                            f"{os.strerror(err)}{hint}")
                        return
        except (TimeoutError, OSError) as e:
            raise HoldError(f"nfqueue {self.queue_num}: cannot {what}: {e}") from None

    def _verdict(self, packet_id: int) -> None:
        msg = self._message(NFQNL_MSG_VERDICT, 0,
                            _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id)))
        while True:
            try:
                self._sock.send(msg)
                return
            except BlockingIOError:
                select.select([], [self._sock], [], 1.0)

    def _read(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop.is_set():
                sel.select()
                self._drain()

    def _drain(self) -> int:
        """Whatever the socket holds now; returns how many packets."""
        count = 0
        while True:
            try:
                data = self._sock.recv(RCVBUF)
            except BlockingIOError:
                return count
            except OSError as e:  # ENOBUFS: messages (packets) lost to an overflow
                if e.errno == errno.ENOBUFS:
                    with self._lock:
                        self._stats["lost"] += 1
                    continue
                return count
            now = time.monotonic()
            for mtype, _seq, payload in _messages(data):
                if mtype == NLMSG_ERROR:
                    if struct.unpack_from("=i", payload)[0] != 0:
                        with self._lock:
                            self._stats["verdict_errors"] += 1
                    continue
                if mtype != (NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET):
                    continue
                hdr = _attrs(payload[NFGEN_HDR.size:]).get(NFQA_PACKET_HDR)
                if hdr is None or len(hdr) < 4:
                    continue
                (packet_id,) = struct.unpack_from("!I", hdr)
                count += 1
                with self._lock:
                    if not self._released:
                        self._held.append((packet_id, now))
                        self._stats["held"] += 1
                        continue
                    self._stats["after_release"] += 1
                self._verdict(packet_id)

    # -- public --------------------------------------------------------------------------------

    def held(self) -> int:
        """Packets held right now."""
        with self._lock:
            return len(self._held)

    def release(self) -> None:
        """Accept every held packet in arrival order (and any that come meanwhile, after
        them), then remove the rule. Idempotent."""
        try:
            while True:
                with self._lock:
                    if not self._held:
                        self._released = True  # from now on the reader accepts at once
                        break
                    packet_id, since = self._held.pop(0)
                    self._stats["released"] += 1
                    ms = (time.monotonic() - since) * 1000
                    self._stats["max_hold_ms"] = max(self._stats["max_hold_ms"], round(ms, 3))
                self._verdict(packet_id)
        finally:
            self._remove_rule()

    def stats(self) -> dict[str, float]:
        with self._lock:
            return dict(self._stats)

    def close(self) -> None:
        """Release, take the rule out, let the queue drain, unbind. Safe to call twice and
        from a half-built Hold; the rule is removed even when the release fails."""
        try:
            if self._rule and self._thread is not None and self._thread.is_alive():
                self.release()
        finally:
            try:
                self._remove_rule()
            finally:
                self._shutdown()

    def _remove_rule(self) -> None:
        if not self._rule:
            return
        self._rule = False
        try:
            self._run_iptables("-D")
        except HoldError:
            if rule_present(self.address, self.port, self.queue_num):
                raise
        # packets that passed the rule just before it went: accepted by the reader as they
        # come; wait for a quiet moment so none is left queued when the listener goes
        deadline = time.monotonic() + 1.0
        last = self._stats["after_release"]
        while time.monotonic() < deadline:
            time.sleep(DRAIN_QUIET)
            with self._lock:
                now = self._stats["after_release"]
            if now == last:
                break
            last = now

    def _shutdown(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._sock is None:
            return
        try:
            self._sock.setblocking(True)
            self._sock.settimeout(1.0)
            self._sock.send(self._message(NFQNL_MSG_CONFIG, 0, _attr(
                NFQA_CFG_CMD, struct.pack("=BxH", NFQNL_CFG_CMD_UNBIND,
                                          socket.htons(socket.AF_INET)))))
        except OSError:
            pass  # closing the socket unbinds as well
        self._sock.close()

    def _run_iptables(self, action: str) -> None:
        argv = iptables_argv(action, self.address, self.port, self.queue_num)
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=IPTABLES_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise HoldError(f"iptables {action}: {e}") from None
        if r.returncode != 0:
            raise HoldError(f"iptables {action} INPUT ... NFQUEUE: "
                            f"{(r.stderr or r.stdout).strip().splitlines()[-1:] or r.returncode}")


def _messages(data: bytes):
    """(type, seq, payload) of each netlink message in one datagram."""
    i = 0
    while i + NLMSG_HDR.size <= len(data):
        length, mtype, _flags, seq, _pid = NLMSG_HDR.unpack_from(data, i)
        if length < NLMSG_HDR.size:
            return
        yield mtype, seq, data[i + NLMSG_HDR.size:i + length]
        i += (length + 3) & ~3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nfqueue.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hold", help="hold packets to ADDRESS:PORT, then release them")
    h.add_argument("--address", required=True)
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--queue-num", type=int, default=77)
    h.add_argument("--seconds", type=float, help="release after this long (default: at a "
                                                 "line or EOF on stdin)")
    a = p.parse_args(argv)
    try:
        with Hold(a.address, a.port, a.queue_num) as hold:
            print(json.dumps({"event": "holding", "queue_num": a.queue_num}), flush=True)
            if a.seconds is not None:
                time.sleep(a.seconds)
            else:
                sys.stdin.readline()
            t0 = time.monotonic()
            hold.release()
            release_ms = round((time.monotonic() - t0) * 1000, 3)
        print(json.dumps({"event": "released", **hold.stats(), "release_ms": release_ms}),
              flush=True)
    except (HoldError, OSError) as e:
        print(f"nfqueue: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
