"""The framed page stream between the checkpoint agents (source dump -> destination restore).

Node-side payload: stdlib only, never imports labkit. Also imported by the controller, which
relays the stream between two SSH channels and peeks at the small control frames as they pass.

Why a frame format of our own: the stream crosses three hops (source agent -> SSH -> controller
-> SSH -> destination agent) and a flipped or missing byte anywhere must be *detected*, never
restored into a running process. So every frame carries a sequence number and a CRC32 of its
payload, every round ends with a trailer frame holding the round's counts and the SHA-256 of all
page data in the round, and the receiver applies a round only after that trailer validates.

Frame = 16-byte header + payload::

    magic  b"LK"   (2)
    version        (1)   = VERSION
    type           (1)   HELLO | PAGES | ROUND_END | VERIFY | ERROR | BYE | SOCKET
    length   u32   (4)   payload bytes
    seq      u32   (4)   0, 1, 2, ... across the whole stream (a dropped frame is noticed)
    crc32    u32   (4)   zlib.crc32 of the payload

Payloads:
    HELLO      JSON: {"addr", "size", "page_size", "pid", "backend", ...} — what is being sent
    PAGES      u32 nruns, u32 npages, nruns x (u64 start_addr, u64 npages), then npages pages
    ROUND_END  JSON: {"round", "pages", "bytes", "chunks", "digest", "final": bool, stats...}
               digest = SHA-256 over the round's PAGES CRC32s in order: it pins every chunk of
               the round (a lost, extra, reordered or altered-and-re-checksummed chunk shows)
               at the cost of hashing 4 bytes per chunk instead of every byte twice — the
               per-byte CPU goes to the SSH path. Whole-image strength comes from VERIFY.
    VERIFY     JSON: {"sha256": SHA-256 of the frozen source region, "step": ...} — the final
               trailer: the destination hashes its restored region and must match it
    ERROR      JSON: {"error": "..."} — the sender failed; the receiver must refuse the round
    BYE        JSON: {"frames": n} — clean end of stream
    SOCKET     JSON: {"state": tcp_repair.save()'s dict, "summary": {...}, "freeze": "drop" |
               "hold", "fault": ""} — the frozen workload's TCP connection (``--tcp``), sent
               before the final round's pages so the destination can move the address while
               the pages travel; rebuilt after the final round is applied
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from array import array

MAGIC = b"LK"
VERSION = 1
HEADER = struct.Struct("<2sBBIII")
HEADER_SIZE = HEADER.size  # 16
assert HEADER_SIZE == 16

HELLO, PAGES, ROUND_END, VERIFY, ERROR, BYE, SOCKET = 1, 2, 3, 4, 5, 6, 7
TYPE_NAMES = {HELLO: "HELLO", PAGES: "PAGES", ROUND_END: "ROUND_END", VERIFY: "VERIFY",
              ERROR: "ERROR", BYE: "BYE", SOCKET: "SOCKET"}
MAX_PAYLOAD = 64 << 20      # a sane bound so a corrupted length cannot make us allocate 4 GiB
RUNS_HEAD = struct.Struct("<II")


class StreamError(Exception):
    """The stream is corrupted, truncated or out of order; nothing from the current round may be
    applied."""


def pack_header(ftype: int, payload_len: int, seq: int, crc: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, ftype, payload_len, seq, crc & 0xFFFFFFFF)


def parse_header(buf: bytes | bytearray | memoryview) -> tuple[int, int, int, int]:
    """-> (type, length, seq, crc); raises StreamError on a bad magic/version/type/length."""
    magic, version, ftype, length, seq, crc = HEADER.unpack(bytes(buf[:HEADER_SIZE]))
    if magic != MAGIC:
        raise StreamError(f"bad frame magic {magic!r} (stream corrupted or not a page stream)")
    if version != VERSION:
        raise StreamError(f"unsupported stream version {version} (expected {VERSION})")
    if ftype not in TYPE_NAMES:
        raise StreamError(f"unknown frame type {ftype}")
    if length > MAX_PAYLOAD:
        raise StreamError(f"frame length {length} exceeds {MAX_PAYLOAD} (corrupted header)")
    return ftype, length, seq, crc


def encode_runs(runs: list[tuple[int, int]]) -> bytes:
    """runs: [(start_addr, npages)] -> the PAGES payload prefix."""
    flat = array("Q")
    total = 0
    for start, n in runs:
        flat.append(start)
        flat.append(n)
        total += n
    return RUNS_HEAD.pack(len(runs), total) + flat.tobytes()


def decode_runs(payload: memoryview | bytes, page_size: int) -> tuple[list[tuple[int, int]], int]:
    """-> (runs, offset of the page data). Validates that the data length matches."""
    if len(payload) < RUNS_HEAD.size:
        raise StreamError("PAGES frame too short")
    nruns, npages = RUNS_HEAD.unpack(bytes(payload[:RUNS_HEAD.size]))
    off = RUNS_HEAD.size + 16 * nruns
    if off > len(payload):
        raise StreamError("PAGES frame run table truncated")
    flat = array("Q")
    flat.frombytes(bytes(payload[RUNS_HEAD.size:off]))
    runs = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
    if sum(n for _, n in runs) != npages:
        raise StreamError("PAGES frame run table does not add up")
    if len(payload) - off != npages * page_size:
        raise StreamError(f"PAGES frame carries {len(payload) - off} data bytes, "
                          f"expected {npages * page_size}")
    return runs, off


def pages_to_runs(pages, page_size: int) -> list[tuple[int, int]]:
    """Sorted page addresses -> [(start, npages)] of consecutive pages (fewer iovecs, smaller
    run tables)."""
    runs: list[tuple[int, int]] = []
    start = prev = None
    n = 0
    for p in pages:
        if prev is not None and p == prev + page_size:
            n += 1
        else:
            if start is not None:
                runs.append((start, n))
            start, n = p, 1
        prev = p
    if start is not None:
        runs.append((start, n))
    return runs


def split_runs(runs: list[tuple[int, int]], max_pages: int, max_runs: int, page: int = 4096):
    """Yield lists of runs holding at most max_pages pages and max_runs runs each (one chunk =
    one process_vm_readv call = one PAGES frame)."""
    chunk: list[tuple[int, int]] = []
    count = 0
    for start, n in runs:
        while n:
            take = min(n, max_pages - count)
            chunk.append((start, take))
            count += take
            start += take * page
            n -= take
            if count >= max_pages or len(chunk) >= max_runs:
                yield chunk
                chunk, count = [], 0
    if chunk:
        yield chunk


class Writer:
    """Writes frames to a file descriptor with os.writev (no copy of the page buffer)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.seq = 0

    def _writev(self, parts: list) -> None:
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        while views:
            n = os.writev(self.fd, views)
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]

    def frame(self, ftype: int, *parts, corrupt: bool = False) -> int:
        """Write one frame whose payload is the concatenation of parts; returns its CRC32."""
        crc = 0
        length = 0
        for p in parts:
            crc = zlib.crc32(p, crc)
            length += len(p)
        hdr = pack_header(ftype, length, self.seq, crc)
        self.seq += 1
        if corrupt and parts:
            # test hook: flip one payload byte *after* the checksum was taken
            last = bytearray(parts[-1])
            last[len(last) // 2] ^= 0xFF
            parts = (*parts[:-1], bytes(last))
        self._writev([hdr, *parts])
        return crc

    def json(self, ftype: int, obj: dict) -> None:
        self.frame(ftype, json.dumps(obj, sort_keys=True).encode())


def read_exact(fd: int, n: int, into: bytearray | None = None) -> bytearray:
    """Read exactly n bytes from fd (raw reads, so nothing is buffered past the frame: the
    process may hand the fd over afterwards). Raises StreamError on EOF (a truncated stream)."""
    buf = into if into is not None else bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:n]])
        if k == 0:
            raise StreamError(f"stream truncated: EOF after {got} of {n} bytes of a frame")
        got += k
    return buf


class Reader:
    """Reads and checks frames from a file descriptor: magic, version, sequence, CRC32."""

    def __init__(self, fd: int):
        self.fd = fd
        self.seq = 0
        self._hdr = bytearray(HEADER_SIZE)

    def next(self) -> tuple[int, bytearray] | None:
        """-> (type, payload) or None at a clean EOF *between* frames."""
        view = memoryview(self._hdr)
        first = os.readv(self.fd, [view])
        if first == 0:
            return None
        if first < HEADER_SIZE:
            read_exact_into(self.fd, view[first:])
        ftype, length, seq, crc = parse_header(self._hdr)
        if seq != self.seq:
            raise StreamError(f"frame sequence {seq}, expected {self.seq} (frame lost or "
                              "duplicated)")
        self.seq += 1
        payload = read_exact(self.fd, length)
        if zlib.crc32(payload) != crc:
            raise StreamError(f"CRC mismatch in {TYPE_NAMES[ftype]} frame #{seq} "
                              "(stream corrupted)")
        return ftype, payload


def read_exact_into(fd: int, view: memoryview) -> None:
    got = 0
    while got < len(view):
        k = os.readv(fd, [view[got:]])
        if k == 0:
            raise StreamError("stream truncated inside a frame header")
        got += k


def load_json(payload: bytes | bytearray) -> dict:
    try:
        obj = json.loads(bytes(payload))
    except ValueError as e:
        raise StreamError(f"control frame is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise StreamError("control frame is not a JSON object")
    return obj


class FrameScanner:
    """Incremental frame-boundary tracker for a relay: feed it the raw bytes as they pass and it
    returns the complete control frames (everything but PAGES, whose payload it skips without
    copying). Cheap enough to sit on a multi-hundred-MB/s relay; it checks headers and CRCs of
    control frames only — the receiving agent checks everything."""

    def __init__(self) -> None:
        self._hdr = bytearray()
        self._need = 0          # payload bytes still to pass for the current frame
        self._keep: bytearray | None = None
        self._type = 0
        self._crc = 0
        self.frames = 0
        self.page_bytes = 0

    def feed(self, data: bytes | memoryview) -> list[tuple[int, dict]]:
        out: list[tuple[int, dict]] = []
        mv = memoryview(data)
        i = 0
        n = len(mv)
        while i < n:
            if self._need == 0 and self._keep is None:
                take = min(HEADER_SIZE - len(self._hdr), n - i)
                self._hdr += mv[i:i + take]
                i += take
                if len(self._hdr) < HEADER_SIZE:
                    break
                ftype, length, _seq, crc = parse_header(self._hdr)
                self._hdr = bytearray()
                self._type, self._crc, self._need = ftype, crc, length
                self._keep = bytearray() if ftype != PAGES else None
                if ftype == PAGES:
                    self.page_bytes += length
                if length == 0:
                    self._finish(out)
                continue
            take = min(self._need, n - i)
            if self._keep is not None:
                self._keep += mv[i:i + take]
            i += take
            self._need -= take
            if self._need == 0:
                self._finish(out)
        return out

    def _finish(self, out: list) -> None:
        self.frames += 1
        if self._keep is not None:
            payload, self._keep = self._keep, None
            if zlib.crc32(payload) != self._crc:
                raise StreamError(f"CRC mismatch in a {TYPE_NAMES[self._type]} frame")
            out.append((self._type, load_json(payload)))
        self._need = 0

    @property
    def at_boundary(self) -> bool:
        return self._need == 0 and self._keep is None and not self._hdr


def sha256_hex(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()
