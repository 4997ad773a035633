#!/usr/bin/env python3
"""The record protocol of ``migrate-test --tcp`` and the workload's side of it (``TcpService``).

Node-side payload: python3 stdlib only, never imports labkit. Imported by the workload, the
restore agent, the client (``tcp_client.py``) and the tests.

Why it looks like this (design: /work/wt/tcp-protocol.md, issue 12):
- server -> client records, 64 bytes ``<4sQQQ16s16sI``: magic b"LKR1", rec_no (1, 2, ...),
  step, rx_msgs, rx_digest, chain, crc32 of the first 60 bytes. The chain
  c_n = sha256(c_{n-1} + n)[:16] is kept in the workload's region, so a record depends on
  migrated memory: a region that was not carried whole shows up as a chain mismatch.
- client -> server messages, 32 bytes ``<4sQ16sI``: magic b"LKM1", msg_no, a payload derived
  from msg_no, crc32. The server folds every whole message into rx_digest
  (d_n = sha256(d_{n-1} + message_n)[:16]) and echoes (rx_msgs, rx_digest) in each record, so the
  client can tell that nothing it sent was lost, even across the move.
- Everything the application knows about the stream lives in the region (page 0, offset 2048,
  magic b"LKTS"): copying the region and rebuilding the kernel socket is the whole connection.

Two windows where a freeze (SIGSTOP at any instruction) could split "the kernel did it" from
"the region says so", and how each is closed:
- receive: messages are read with MSG_PEEK, folded into the region, and only then discarded
  from the kernel queue. A freeze between the two leaves messages in the (migrated) queue that
  the region already counts; every message names its msg_no, so the next pump drops those
  (msg_no <= rx_msgs) instead of counting them twice. Partial messages stay in the kernel
  queue, which TCP_REPAIR carries, so the region's rx_pend is always empty (kept in the layout
  for the design's shape and for a future non-peeking reader).
- send, and any multi-field region write: the kernel gives no way to tell after the fact how
  much of a send it took, and a freeze can land between two stores. The region carries a
  ``busy`` word, set just before such a write (or send()) and cleared right after; a freezer
  that finds ``quiescent(region) == False`` lets the process run a moment and freezes again.
  The windows are a few bytecodes per step (records are computed outside them).
"""

from __future__ import annotations

import errno
import hashlib
import socket
import struct
import zlib

RECORD = struct.Struct("<4sQQQ16s16sI")
MESSAGE = struct.Struct("<4sQ16sI")
REC_MAGIC = b"LKR1"
MSG_MAGIC = b"LKM1"
REC_SIZE = RECORD.size  # 64
MSG_SIZE = MESSAGE.size  # 32
ZERO16 = bytes(16)

# The workload's state in its region: page 0 at STATE_OFF (the workload HEAD ends far before).
STATE_OFF = 2048
STATE_MAGIC = b"LKTS"
STATE_VERSION = 1
# magic, version, status, busy, err, seed, rec_no, chain, rx_msgs, rx_digest, tx_bytes,
# rx_bytes, rx_len, rx_pend, tx_len, tx_pend
STATE = struct.Struct("<4sHHII QQ16sQ16s QQ I32s I64s")
BUSY_OFF = STATE_OFF + 8  # the busy word: a freezer reads it (see quiescent())
_REC_OFF = STATE_OFF + struct.calcsize("<4sHHIIQ")  # rec_no, chain
_RX_OFF = _REC_OFF + struct.calcsize("<Q16s")  # rx_msgs, rx_digest, tx_bytes, rx_bytes
_TXB_OFF = _RX_OFF + struct.calcsize("<Q16s")  # tx_bytes
_TX_OFF = STATE_OFF + struct.calcsize("<4sHHIIQQ16sQ16sQQI32s")  # tx_len, tx_pend
IDLE, LISTENING, CONNECTED, STOPPED = 0, 1, 2, 3
STATUS_NAMES = ("idle", "listening", "connected", "stopped")
# Where the workload header keeps its seed (workload.HEAD: magic, version, page_size, addr,
# size, npages, step, seed ...): the default chain seed, so the client's --seed is the
# workload's --seed.
WORKLOAD_SEED_OFF = struct.calcsize("<8sIIQQQQ")

RX_PEEK = 256 * MSG_SIZE  # at most this much read per pump: the per-step cost stays bounded
RESET_ERRNOS = (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED)


class TcpStreamError(Exception):
    """A protocol violation or a region without TCP state; the message says which and where."""


# --- the protocol --------------------------------------------------------------------------
def chain0(seed: int) -> bytes:
    return hashlib.sha256(b"labkit-tcp" + seed.to_bytes(8, "little")).digest()[:16]


def chain_next(prev: bytes, n: int) -> bytes:
    return hashlib.sha256(prev + n.to_bytes(8, "little")).digest()[:16]


def chain_at(seed: int, n: int) -> bytes:
    c = chain0(seed)
    for i in range(1, n + 1):
        c = chain_next(c, i)
    return c


def digest_next(prev: bytes, message: bytes) -> bytes:
    return hashlib.sha256(prev + message).digest()[:16]


def msg_payload(msg_no: int) -> bytes:
    return hashlib.sha256(b"msg" + msg_no.to_bytes(8, "little")).digest()[:16]


def encode_record(rec_no: int, step: int, rx_msgs: int, rx_digest: bytes, chain: bytes) -> bytes:
    body = RECORD.pack(REC_MAGIC, rec_no, step, rx_msgs, rx_digest, chain, 0)[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def _bad_record(data: bytes) -> str | None:
    """Why 64 bytes are not a record (magic, CRC), or None; no number: the field is untrusted."""
    if len(data) != REC_SIZE:
        return f"record is {len(data)} bytes, not {REC_SIZE}"
    if data[:4] != REC_MAGIC:
        return f"bad record magic {bytes(data[:4])!r}"
    if zlib.crc32(data[:-4]) != struct.unpack_from("<I", data, REC_SIZE - 4)[0]:
        return "crc mismatch"
    return None


def _refuse(data: bytes, size: int, what: str, why: str | None) -> None:
    """Raise ``why`` about a record or message, quoting its number field as untrusted."""
    if why is not None:
        raise TcpStreamError(why if len(data) != size else
                             f"{what} field {struct.unpack_from('<Q', data, 4)[0]}): {why}")


def decode_record(data: bytes) -> dict:
    """Parse one 64-byte record, checking magic and CRC (not its place in the stream)."""
    _refuse(data, REC_SIZE, "record (rec_no", _bad_record(data))
    _, rec_no, step, rx_msgs, rx_digest, chain, _ = RECORD.unpack(data)
    return {"rec_no": rec_no, "step": step, "rx_msgs": rx_msgs, "rx_digest": rx_digest,
            "chain": chain}


def encode_message(msg_no: int) -> bytes:
    body = MESSAGE.pack(MSG_MAGIC, msg_no, msg_payload(msg_no), 0)[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def _bad_message(data: bytes) -> str | None:
    if len(data) != MSG_SIZE:
        return f"message is {len(data)} bytes, not {MSG_SIZE}"
    magic, msg_no, payload, crc = MESSAGE.unpack(data)
    if magic != MSG_MAGIC:
        return f"bad message magic {magic!r}"
    if zlib.crc32(data[:-4]) != crc:
        return "crc mismatch"
    if payload != msg_payload(msg_no):
        return "payload mismatch"
    return None


def decode_message(data: bytes) -> int:
    """Check one 32-byte client message whole (magic, CRC, payload); return its msg_no."""
    _refuse(data, MSG_SIZE, "message (msg_no", _bad_message(data))
    return struct.unpack_from("<Q", data, 4)[0]


class RecordChecker:
    """The client's view of the record stream: every record in order, its chain recomputed, its
    echo consistent with what the client has sent. ``check`` raises with the record named."""

    def __init__(self, seed: int):
        self.rec_no = 0
        self.chain = chain0(seed)
        self.rx_msgs = 0
        self.digests = [ZERO16]  # digests[k] = digest after the client's first k messages

    def sent(self, message: bytes) -> None:
        self.digests.append(digest_next(self.digests[-1], message))

    def check(self, data: bytes) -> dict:
        want = self.rec_no + 1
        why = _bad_record(data)
        if why is not None:
            raise TcpStreamError(f"record {want}: {why}")
        rec = decode_record(data)
        if rec["rec_no"] != want:
            raise TcpStreamError(f"record {want}: expected rec_no {want}, got {rec['rec_no']}")
        chain = chain_next(self.chain, want)
        if rec["chain"] != chain:
            raise TcpStreamError(f"record {want}: chain mismatch")
        rx = rec["rx_msgs"]
        if rx < self.rx_msgs:
            raise TcpStreamError(f"record {want}: rx_msgs went back from {self.rx_msgs} to {rx}")
        if rx >= len(self.digests):
            raise TcpStreamError(f"record {want}: rx_msgs {rx} but only "
                                 f"{len(self.digests) - 1} messages sent")
        if rec["rx_digest"] != self.digests[rx]:
            raise TcpStreamError(f"record {want}: rx_digest mismatch after {rx} messages")
        self.rec_no, self.chain, self.rx_msgs = want, chain, rx
        return rec


# --- the region state --------------------------------------------------------------------------
def read_state(mem) -> dict:
    (magic, version, status, busy, err, seed, rec_no, chain, rx_msgs, rx_digest, tx_bytes,
     rx_bytes, rx_len, rx_pend, tx_len, tx_pend) = STATE.unpack_from(mem, STATE_OFF)
    if magic != STATE_MAGIC or version != STATE_VERSION:
        raise TcpStreamError("region holds no TCP stream state (no LKTS at page 0 + 2048)")
    return {"status": status, "busy": busy, "err": err, "seed": seed, "rec_no": rec_no,
            "chain": chain, "rx_msgs": rx_msgs, "rx_digest": rx_digest, "tx_bytes": tx_bytes,
            "rx_bytes": rx_bytes, "rx_pend": bytes(rx_pend[:rx_len]),
            "tx_pend": bytes(tx_pend[:tx_len])}


def has_state(mem) -> bool:
    return bytes(mem[STATE_OFF:STATE_OFF + 4]) == STATE_MAGIC


def quiescent(page0) -> bool:
    """True unless the region (or just its page 0) says a send() is in progress: a freezer that
    gets False lets the process run briefly and freezes again, so the region and the kernel's
    send queue agree about which bytes were handed over."""
    if bytes(page0[STATE_OFF:STATE_OFF + 4]) != STATE_MAGIC:
        return True
    return struct.unpack_from("<I", page0, BUSY_OFF)[0] == 0


class TcpService:
    """The workload's side of the stream. Its state is the region's; the object holds only the
    socket(s) and the last error's text (the region keeps its errno)."""

    def __init__(self, mem, sock: socket.socket | None, listener: socket.socket | None):
        self.mem = mem
        self.sock = sock
        self.listener = listener
        self.error: str | None = None
        self.peer: tuple | None = None
        self.local: tuple | None = listener.getsockname() if listener is not None else None
        st = read_state(mem)
        if st["rx_pend"]:  # see the module docstring: never written by this implementation
            raise TcpStreamError("region holds a partial message this reader cannot resume")
        self._chain, self._rec_no = st["chain"], st["rec_no"]
        self._rx_msgs, self._rx_digest = st["rx_msgs"], st["rx_digest"]
        self._tx = st["tx_pend"]
        self._tx_bytes, self._rx_bytes = st["tx_bytes"], st["rx_bytes"]
        # a region copied inside a busy window (a freezer that ignored quiescent()) may
        # disagree with the kernel by part of a record: say so where info shows it
        self.copied_busy = bool(st["busy"])

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def listen(cls, addr: str, port: int, mem, *, seed: int | None = None,
               backlog: int = 1) -> TcpService:
        """Fresh stream state in the region, and a non-blocking listener; pump() accepts."""
        if seed is None:
            seed = struct.unpack_from("<Q", mem, WORKLOAD_SEED_OFF)[0]
        STATE.pack_into(mem, STATE_OFF, STATE_MAGIC, STATE_VERSION, LISTENING, 0, 0, seed, 0,
                        chain0(seed), 0, ZERO16, 0, 0, 0, b"", 0, b"")
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind((addr, port))
            ls.listen(backlog)
            ls.setblocking(False)
        except OSError:
            ls.close()
            raise
        return cls(mem, None, ls)

    @classmethod
    def adopt(cls, sock: socket.socket, mem) -> TcpService:
        """A connected socket rebuilt elsewhere (TCP_REPAIR) and a region that already holds the
        stream's state: carry on from there (an unsent tail goes out first)."""
        svc = cls(mem, None, None)
        svc._connected(sock)
        return svc

    def _connected(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # readable (for a select on fileno()) only when a whole message is there
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, MSG_SIZE)
        self.sock = sock
        try:
            self.peer, self.local = sock.getpeername(), sock.getsockname()
        except OSError:
            self.peer = None
        self._set_status(CONNECTED, 0)

    # -- state in the region --------------------------------------------------------------
    def _set_status(self, status: int, err: int) -> None:
        struct.pack_into("<HHII", self.mem, STATE_OFF + 4, STATE_VERSION, status, 0, err)

    @property
    def status(self) -> int:
        return struct.unpack_from("<H", self.mem, STATE_OFF + 6)[0]

    def _stop(self, what: str, e: OSError | None) -> None:
        code = (e.errno or 0) if e is not None else 0
        self.error = f"{what}: {e.strerror or e}" if e is not None else what
        self._set_status(STOPPED, code)
        for s in (self.sock, self.listener):
            if s is not None:
                s.close()
        self.sock = self.listener = None

    def fileno(self) -> int | None:
        """The fd to select on for readability (the listener until accepted, then the
        connection); None once stopped."""
        s = self.sock if self.sock is not None else self.listener
        return s.fileno() if s is not None else None

    # -- the per-step work ----------------------------------------------------------------
    def pump(self, step: int = 0) -> None:
        """After a step: accept if still waiting, take in the client's messages, send one
        record. Never raises for the network's sake: a failure stops the service only."""
        if self.listener is not None:
            self._accept()
        if self.sock is not None:
            self.receive()
        if self.sock is not None:
            self.send_record(step)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        except OSError as e:
            self._stop("accept", e)
            return
        self.listener.close()
        self.listener = None
        self._connected(conn)

    def send_record(self, step: int) -> None:
        """Send the unsent tail if any, else the next record; what the kernel does not take is
        kept in the region and goes first next time (a record is made only when the previous
        one is gone, so the tail is never more than one record)."""
        mem, new = self.mem, not self._tx
        if new:  # computed outside the busy window: only the writes and the send are inside
            n = self._rec_no + 1
            chain = chain_next(self._chain, n)
            rec = encode_record(n, step, self._rx_msgs, self._rx_digest, chain)
        struct.pack_into("<I", mem, BUSY_OFF, 1)
        if new:
            self._tx, self._rec_no, self._chain = rec, n, chain
            struct.pack_into("<Q16s", mem, _REC_OFF, n, chain)
            struct.pack_into("<I64s", mem, _TX_OFF, REC_SIZE, rec)
        try:
            sent = self.sock.send(self._tx)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            struct.pack_into("<I", mem, BUSY_OFF, 0)
            self._stop("send", e)
            return
        if sent:
            self._tx = self._tx[sent:]
            self._tx_bytes += sent
            struct.pack_into("<I64s", mem, _TX_OFF, len(self._tx), self._tx)
            struct.pack_into("<Q", mem, _TXB_OFF, self._tx_bytes)
        struct.pack_into("<I", mem, BUSY_OFF, 0)

    def receive(self) -> None:
        """Fold every whole message waiting in the kernel into (rx_msgs, rx_digest), then drop
        exactly those bytes from the kernel queue (peek first: see the module docstring)."""
        if self.listener is not None:
            self._accept()
            return
        if self.sock is None:
            return
        try:
            data = self.sock.recv(RX_PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            self._stop("recv", e)
            return
        if not data:
            self._stop("peer closed the connection", None)
            return
        whole = len(data) - len(data) % MSG_SIZE
        if not whole:
            return
        rx_msgs, digest = self._rx_msgs, self._rx_digest
        bad, used = None, 0
        for off in range(0, whole, MSG_SIZE):
            m = data[off:off + MSG_SIZE]
            why = _bad_message(m)
            msg_no = struct.unpack_from("<Q", m, 4)[0]
            if why is None and msg_no > rx_msgs + 1:
                why = f"expected msg_no {rx_msgs + 1}, got {msg_no}"
            if why is not None:
                bad = f"message {rx_msgs + 1}: {why}"
                break
            used = off + MSG_SIZE
            if msg_no <= rx_msgs:  # counted before a freeze, still queued: drop it again
                continue
            rx_msgs, digest = msg_no, digest_next(digest, m)
        if used:
            self._rx_msgs, self._rx_digest = rx_msgs, digest
            self._rx_bytes += used
            struct.pack_into("<I", self.mem, BUSY_OFF, 1)
            struct.pack_into("<Q16sQQ", self.mem, _RX_OFF, rx_msgs, digest, self._tx_bytes,
                             self._rx_bytes)
            struct.pack_into("<I", self.mem, BUSY_OFF, 0)
            self._discard(used)  # outside the window: a freeze before it is undone by msg_no
        if bad is not None and self.sock is not None:
            self._stop(bad, None)

    def _discard(self, n: int) -> None:
        try:
            self.sock.recv(n, socket.MSG_DONTWAIT)
        except OSError as e:
            self._stop("recv", e)

    def close(self) -> None:
        for s in (self.sock, self.listener):
            if s is not None:
                s.close()
        self.sock = self.listener = None

    def info(self) -> dict:
        st = STATUS_NAMES[self.status] if self.status < len(STATUS_NAMES) else str(self.status)
        sent = self._rec_no - (1 if self._tx else 0)
        return {"status": st, "listening": self.listener is not None,
                "connected": self.sock is not None, "records": sent, "rec_no": self._rec_no,
                "rx_msgs": self._rx_msgs, "tx_bytes": self._tx_bytes,
                "rx_bytes": self._rx_bytes, "error": self.error,
                "copied_busy": self.copied_busy,
                "local": list(self.local) if self.local else None,
                "peer": list(self.peer) if self.peer else None}
