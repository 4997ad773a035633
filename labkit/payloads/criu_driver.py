#!/usr/bin/env python3
"""CRIU on a node: the node side of iterative pre-copy migration (issue 11).

Node-side payload: python3 stdlib only (pycriu is an optional extra for ``show``). Never imports
labkit. Two ways to run it:

* ``python3 -u criu_driver.py serve --base BASE --role src|dst``: what the controller runs, one
  long-lived driver per node per run (a new SSH exec costs ~0.9 s under TCG). One command per
  stdin line (the subcommands below, without ``--base``), exactly one JSON line per command on
  stdout (``ok: false`` + a one-line ``error`` on any failure, a bad line included; never an
  exit). When stdin ends or SIGTERM/SIGHUP arrives before ``quit``, the safety net runs: a src
  driver SIGCONTs every tree it dumped and neither resumed nor killed (the process goes on
  where it was), a dst driver SIGKILLs every tree it restored and never resumed and kills its
  page servers; both remove BASE. The contract is the controller's: criu-protocol.md.
* ``python3 criu_driver.py SUBCOMMAND --base BASE ...``: one step, one JSON line, exit 0 on
  success, 1 when the step failed, 2 on a usage error (by hand, and the tests).

TCP (issue 12, migrate-test --tcp): ``dump --tcp-established [--give-address A]``, ``restore
--tcp-established --tcp-conn L-P --take-address A`` (the connection locked as CRIU's dump locks
it, then the address, then the restore) or ``restore --tcp-close`` (a copy that never runs),
``resume`` unlocks a source dumped with its connections (CRIU leaves them in repair mode and
locked under --leave-stopped), ``kill`` puts sockets in repair mode first (closed silently),
``address take|give``; the safety net moves the address back. Facts: docs/criu-recipe.md.

Image dirs are BASE/1, BASE/2, ...; round N names its parent ``../N-1``, relative to BASE/N, on
both sides: CRIU makes the ``parent`` symlink in the images dir of whichever criu (dump or
page-server) is given --prev-images-dir. Recipe, numbers and pitfalls: docs/criu-recipe.md.
"""

from __future__ import annotations

import argparse
import array
import base64
import bisect
import contextlib
import fcntl
import hashlib
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import time
import traceback

if __package__:
    from . import netlock, netmove, tcp_repair
else:  # run as a script: siblings live next to this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import netlock  # type: ignore[no-redef]
    import netmove  # type: ignore[no-redef]
    import tcp_repair  # type: ignore[no-redef]

PAGE = 4096
IMG_COMMON = 0x54564319  # every image but the service ones (stats, inventory...) starts with it
IMG_SERVICE = 0x55105940
STATS_MAGIC = 0x57093306
PSTREE_MAGIC = 0x50273030
PAGEMAP_MAGIC = 0x56084025
# pagemap.proto pagemap_entry.flags (criu/include/pagemap.h)
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4
# stats.proto: dump_stats_entry / restore_stats_entry field numbers -> names (CRIU 3.x)
DUMP_STATS = {1: "freezing_time", 2: "frozen_time", 3: "memdump_time", 4: "memwrite_time",
              5: "pages_scanned", 6: "pages_skipped_parent", 7: "pages_written",
              8: "irmap_resolve", 9: "pages_lazy", 10: "page_pipes", 11: "page_pipe_bufs",
              12: "shpages_scanned", 13: "shpages_skipped_parent", 14: "shpages_written"}
RESTORE_STATS = {1: "pages_compared", 2: "pages_skipped_cow", 3: "forking_time",
                 4: "restore_time", 5: "pages_restored"}
LOG_NAMES = {"check": "check.log", "predump": "predump.log", "dump": "dump.log",
             "page-server": "page-server.log", "restore": "restore.log"}
PACK_LIMIT = 256 << 20  # a pack is one JSON line through the controller: keep it sane
LOG_TAIL = 1 << 20
CHUNK_PAGES = 256  # pages per pread in verify/memhash: 1 MiB, few syscalls, little memory
FILES_PREFIX = "files/"  # pack: a --file's member name is this + its absolute path minus "/"
IMAGES_PREFIX = "images/"


class StepFailed(Exception):
    """A step that did not work: what CRIU (or the node) said, and where its log is. ``extra``
    goes into the failure reply beside ``error`` (e.g. verify's first differing address)."""

    def __init__(self, reason: str, log: str | None = None, rc: int | None = None,
                 extra: dict | None = None):
        super().__init__(reason)
        self.reason = reason
        self.log = log
        self.rc = rc
        self.extra = extra or {}


class UsageError(Exception):
    """A command line argparse refused (in serve mode this must not exit the driver)."""


# ---------------------------------------------------------------- images (no pycriu needed)

def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def pb_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """A protobuf message as (field number, value) pairs: varints as ints, length-delimited as
    bytes (fixed32/64 as ints). Enough for CRIU's stats, pstree and pagemap images."""
    out: list[tuple[int, int | bytes]] = []
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
            out.append((num, v))
        elif wt == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ValueError("truncated field")
            out.append((num, buf[i:i + n]))
            i += n
        elif wt == 1:
            out.append((num, int.from_bytes(buf[i:i + 8], "little")))
            i += 8
        elif wt == 5:
            out.append((num, int.from_bytes(buf[i:i + 4], "little")))
            i += 4
        else:
            raise ValueError(f"wire type {wt} not supported")
    return out


def image_entries(data: bytes, magic: int) -> list[bytes]:
    """The entries of a CRIU image: IMG_COMMON or IMG_SERVICE magic, the image's own magic,
    then (u32 little-endian size, protobuf message) entries."""
    i = 0
    m = int.from_bytes(data[0:4], "little") if len(data) >= 4 else None
    if m in (IMG_COMMON, IMG_SERVICE):
        i = 4
        m = int.from_bytes(data[4:8], "little") if len(data) >= 8 else None
    if m != magic:
        raise ValueError(f"bad image magic {m!r:} (want {magic:#x})")
    i += 4
    entries = []
    while i < len(data):
        if i + 4 > len(data):
            raise ValueError("truncated entry size")
        n = int.from_bytes(data[i:i + 4], "little")
        i += 4
        if i + n > len(data):
            raise ValueError("truncated entry")
        entries.append(data[i:i + n])
        i += n
    return entries


def parse_stats(data: bytes) -> dict:
    """stats-dump / stats-restore → {"dump": {...}} or {"restore": {...}} (times in µs)."""
    entries = image_entries(data, STATS_MAGIC)
    if not entries:
        raise ValueError("stats image has no entry")
    out: dict = {}
    for num, val in pb_fields(entries[0]):
        if num in (1, 2) and isinstance(val, bytes):
            names = DUMP_STATS if num == 1 else RESTORE_STATS
            out["dump" if num == 1 else "restore"] = {
                names.get(k, f"field{k}"): v for k, v in pb_fields(val)}
    return out


def parse_pstree(data: bytes) -> list[dict]:
    """pstree.img → [{"pid", "ppid", "pgid", "sid", "threads": [...]}, ...]."""
    procs = []
    for entry in image_entries(data, PSTREE_MAGIC):
        p: dict = {"threads": []}
        for num, val in pb_fields(entry):
            if num == 5:  # repeated uint32 threads, packed or not
                if isinstance(val, bytes):
                    i = 0
                    while i < len(val):
                        t, i = _varint(val, i)
                        p["threads"].append(t)
                else:
                    p["threads"].append(val)
            elif num in (1, 2, 3, 4):
                p[("pid", "ppid", "pgid", "sid")[num - 1]] = val
        procs.append(p)
    return procs


def parse_pagemap(data: bytes) -> tuple[int, list[tuple[int, int, int]]]:
    """pagemap-PID.img → (pages_id, [(vaddr, nr_pages, flags), ...]) in file order.

    The first entry is a pagemap_head {pages_id=1}; the rest pagemap_entry {vaddr=1,
    nr_pages=2, in_parent=3 (images before flags existed), flags=4}. An entry without flags
    is PE_PARENT if in_parent, else PE_PRESENT (what CRIU itself assumes for old images)."""
    entries = image_entries(data, PAGEMAP_MAGIC)
    if not entries:
        raise ValueError("pagemap image has no pagemap_head")
    head = dict(pb_fields(entries[0]))
    pages_id = head.get(1, 0)
    out = []
    for e in entries[1:]:
        f = _small_varint_message(e)
        if f is None:  # not the plain shape: the general decoder
            f = dict(pb_fields(e))
        if not isinstance(f.get(1), int) or not isinstance(f.get(2), int):
            raise ValueError("pagemap entry without vaddr or nr_pages")
        if isinstance(f.get(4), int):
            flags = f[4]
        else:
            flags = PE_PARENT if f.get(3) else PE_PRESENT
        out.append((f[1], f[2], flags))
    return pages_id, out


def _small_varint_message(e: bytes) -> dict[int, int] | None:
    """A message of varint fields numbered 1..15 (a pagemap entry), decoded inline; None if
    it is not of that shape. Thousands of entries are parsed while the process is frozen, on
    guests where Python runs ~50x slower than here: pb_fields' generality cost seconds."""
    out: dict[int, int] = {}
    i, n = 0, len(e)
    while i < n:
        key = e[i]
        if key & 0x87:  # wire type not 0, or a field number above 15
            return None
        i += 1
        v = shift = 0
        while True:
            if i >= n:
                return None
            b = e[i]
            i += 1
            v |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
        out[key >> 3] = v
    return out


ERROR_RE = re.compile(r"^(?:\([\d.]+\)\s+)?(?:\d+: )?Error \(([^)]*)\):\s*(.*)$")


def criu_reason(text: str) -> str | None:
    """CRIU's reason in one line: the first "Error (file:line): ..." of its log (the first is
    the cause; the ones after it are the unwinding), else None."""
    for line in text.splitlines():
        m = ERROR_RE.match(line.strip())
        if m:
            return f"{m.group(2).strip()} ({m.group(1)})"
    return None


def parse_check(rc: int, out: str) -> tuple[bool, str]:
    """``criu check`` → (usable, one-line reason). It prints "Looks good." when the kernel has
    what dump/restore need (errors about tun or ptmx are printed even then: probes of optional
    features), and exits non-zero otherwise."""
    if rc == 0 and "Looks good" in out:
        return True, "Looks good."
    reason = criu_reason(out)
    if reason is None:
        lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"criu check exited {rc}"
    return False, reason


# ---------------------------------------------------------------- the pages an image holds

def read_pagemap(d: str, pid: int) -> tuple[int, list[tuple[int, int, int]]]:
    """``parse_pagemap`` of pagemap-PID.img in ``d``; a missing or bad one is a StepFailed."""
    path = os.path.join(d, f"pagemap-{pid}.img")
    try:
        with open(path, "rb") as f:
            return parse_pagemap(f.read())
    except FileNotFoundError:
        raise StepFailed(f"{path} missing: the round's pages never arrived here") from None
    except ValueError as e:
        raise StepFailed(f"{path}: {e}") from None


class _PidMap:
    """One process's pagemap in one images dir: entries sorted by vaddr, each with the offset
    of its pages in pages-<id>.img (-1 for entries whose pages are not in this dir)."""

    def __init__(self, d: str, pid: int):
        pages_id, entries = read_pagemap(d, pid)
        self.pages = os.path.join(d, f"pages-{pages_id}.img")
        rows, off = [], 0
        for vaddr, nr, flags in entries:  # pages-<id>.img holds PE_PRESENT runs in file order
            rows.append((vaddr, nr, flags, off if flags & PE_PRESENT else -1))
            if flags & PE_PRESENT:
                off += nr * PAGE
        rows.sort()
        self.rows = rows
        self.starts = [r[0] for r in rows]


class ImageSet:
    """The pages of a round's images dir and its ``parent`` chain, as runs of
    (vaddr, npages, file, offset) per pid: what ``verify`` compares and hashes."""

    def __init__(self, d: str):
        self.d = d
        self._maps: dict[tuple[str, int], _PidMap] = {}
        self._parents: dict[str, str] = {}

    def _map(self, d: str, pid: int) -> _PidMap:
        key = (d, pid)
        if key not in self._maps:
            self._maps[key] = _PidMap(d, pid)
        return self._maps[key]

    def _parent(self, d: str) -> str:
        """``d``'s parent images dir, resolved once per dir (per entry, realpath's lstat
        walk was most of the time of a four-round chain)."""
        if d not in self._parents:
            p = os.path.join(d, "parent")
            if not os.path.isdir(p):
                raise StepFailed(f"{d} has pages marked in-parent but no parent images dir "
                                 f"({p})")
            self._parents[d] = os.path.realpath(p)
        return self._parents[d]

    def segments(self, pid: int) -> list[tuple[int, int, str, int]]:
        """Every page the image holds for ``pid``, in vaddr order, merged into runs."""
        out: list[tuple[int, int, str, int]] = []
        m = self._map(self.d, pid)
        for vaddr, nr, flags, off in m.rows:
            if flags & PE_PRESENT:
                out.append((vaddr, nr, m.pages, off))
            elif flags & PE_PARENT:
                out += self._from_parent(self._parent(self.d), pid, vaddr, nr, 1)
            # PE_LAZY alone: the pages are not in any image (lazy restore): nothing to compare
        return _merge(out)

    def _from_parent(self, d: str, pid: int, vaddr: int, nr: int,
                     depth: int) -> list[tuple[int, int, str, int]]:
        if depth > 1000:
            raise StepFailed(f"parent chain of {self.d} deeper than 1000 (a loop?)")
        m = self._map(d, pid)
        out: list[tuple[int, int, str, int]] = []
        end = vaddr + nr * PAGE
        i = max(bisect.bisect_right(m.starts, vaddr) - 1, 0)
        cur = vaddr
        while cur < end:
            if i >= len(m.rows) or m.rows[i][0] > cur:
                raise StepFailed(f"pid {pid} page {cur:#x} is marked in-parent but {d} does "
                                 "not hold it")
            ev, en, ef, eo = m.rows[i]
            eend = ev + en * PAGE
            if eend <= cur:
                i += 1
                continue
            piece_end = min(end, eend)
            n = (piece_end - cur) // PAGE
            if ef & PE_PRESENT:
                out.append((cur, n, m.pages, eo + (cur - ev)))
            elif ef & PE_PARENT:
                out += self._from_parent(self._parent(d), pid, cur, n, depth + 1)
            else:
                raise StepFailed(f"pid {pid} page {cur:#x} is marked in-parent but {d} holds "
                                 "it only lazily")
            cur = piece_end
            i += 1
        return out


def _merge(segs: list[tuple[int, int, str, int]]) -> list[tuple[int, int, str, int]]:
    out: list[tuple[int, int, str, int]] = []
    for v, n, f, o in segs:
        if out:
            pv, pn, pf, po = out[-1]
            if pf == f and pv + pn * PAGE == v and po + pn * PAGE == o:
                out[-1] = (pv, pn + n, pf, po)
                continue
        out.append((v, n, f, o))
    return out


_HEAD = struct.Struct("<QQQ")


def _hash_chunk(h, pid: int, vaddr: int, buf) -> None:
    """The protocol's construction, per chunk of a range (at most CHUNK_PAGES pages, ranges
    walked in order on both sides): pid, vaddr, npages (8 bytes LE each), then the pages."""
    h.update(_HEAD.pack(pid, vaddr, len(buf) // PAGE))
    h.update(buf)


def _chunks(runs: list[list[int]]):
    for vaddr, n in runs:
        for c in range(0, n, CHUNK_PAGES):
            yield vaddr + c * PAGE, min(CHUNK_PAGES, n - c)


def _read_into(fd: int, buf: bytearray, off: int, what: str) -> bytearray:
    """Fill ``buf`` from ``off``. Reused buffers: a fresh 1 MiB bytes per read costs 256 page
    faults, which under TCG made reading 64 MiB of /proc/PID/mem 2.5x slower."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        try:
            n = os.preadv(fd, [view[got:]], off + got)
        except OSError as e:
            raise StepFailed(f"{what}: cannot read at {off + got:#x}: {e.strerror}") from None
        if n == 0:
            raise StepFailed(f"{what}: only {got} of {len(buf)} bytes at {off:#x}")
        got += n
    return buf


class _Buffers:
    """Two reusable buffers per chunk size (image, memory); bytearray == bytearray is a
    memcmp, where comparing memoryviews goes item by item (150x slower)."""

    def __init__(self):
        self._by_pages: dict[int, tuple[bytearray, bytearray]] = {}

    def get(self, k: int) -> tuple[bytearray, bytearray]:
        if k not in self._by_pages:
            self._by_pages[k] = (bytearray(k * PAGE), bytearray(k * PAGE))
        return self._by_pages[k]


class _Mem:
    """/proc/PID/mem of a stopped process, opened once."""

    def __init__(self, pid: int):
        self.pid = pid
        try:
            self.fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        except OSError as e:
            raise StepFailed(f"cannot open the memory of pid {pid}: {e.strerror}") from None

    def read(self, vaddr: int, buf: bytearray) -> bytearray:
        return _read_into(self.fd, buf, vaddr, f"memory of pid {self.pid}")

    def close(self) -> None:
        os.close(self.fd)


class _Files:
    """The pages files of a chain, each read once (a run of pre-dumps scatters a process's
    pages over every round's file: one pread per scattered run cost seconds under TCG)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, path: str) -> bytes:
        if path not in self.data:
            try:
                with open(path, "rb") as f:
                    self.data[path] = f.read()
            except OSError as e:
                raise StepFailed(f"{path}: {e.strerror}") from None
        return self.data[path]


def image_ranges(d: str, pids: list[int]) -> dict[str, list[list[int]]]:
    """The pages the images of ``d`` (and its parent chain) hold, per pid, as merged
    [vaddr, npages] runs: what memhash reads on src while dst restores."""
    imgs = ImageSet(d)
    return {str(pid): _merge_ranges([(v, n) for v, n, _, _ in imgs.segments(pid)])
            for pid in pids}


def verify_images(d: str, pids: list[int]) -> dict:
    """Compare every page the images of ``d`` hold against the live (stopped) processes:
    memory read in big runs, compared with the image's bytes (each pages file read once),
    the memory hashed. Equal everywhere means the image's hash is the memory's; where they
    differ the run fails, and the image's own hash is computed for the report."""
    imgs = ImageSet(d)
    files = _Files()
    bufs = _Buffers()
    h_mem = hashlib.sha256()
    pages = differ = 0
    first: tuple[int, int] | None = None
    ranges: dict[str, list[list[int]]] = {}
    segs_of: dict[int, list[tuple[int, int, str, int]]] = {}
    for pid in pids:
        segs = imgs.segments(pid)
        segs_of[pid] = segs
        ranges[str(pid)] = _merge_ranges([(v, n) for v, n, _, _ in segs])
        mem = _Mem(pid)
        try:
            i = 0
            for va, k in _chunks(ranges[str(pid)]):
                live = mem.read(va, bufs.get(k)[1])
                _hash_chunk(h_mem, pid, va, live)
                pages += k
                end = va + k * PAGE
                while i < len(segs) and segs[i][0] < end:
                    sv, sn, path, off = segs[i]
                    lo, hi = max(sv, va), min(sv + sn * PAGE, end)
                    # bytes == bytearray is one memcmp (memoryviews compare item by item)
                    img = files.get(path)[off + lo - sv:off + hi - sv]
                    mine = live[lo - va:hi - va]
                    if img != mine:
                        for a in range(0, hi - lo, PAGE):
                            if img[a:a + PAGE] != mine[a:a + PAGE]:
                                differ += 1
                                first = first or (pid, lo + a)
                    if sv + sn * PAGE > end:
                        break  # the rest of this segment is in the next chunk
                    i += 1
        finally:
            mem.close()
    sha_mem = h_mem.hexdigest()
    res = {"sha256": sha_mem, "memory_sha256": sha_mem, "pages": pages,
           "ranges_b64": base64.b64encode(json.dumps(ranges).encode()).decode()}
    if first is not None:
        res["sha256"] = _image_hash(segs_of, ranges, files)
        raise StepFailed(f"memory of the restored tree differs from the image: pid {first[0]} "
                         f"at {first[1]:#x} first, {differ} page(s) differ of {pages}",
                         extra={**res, "pid": first[0], "address": hex(first[1]),
                                "pages_differ": differ})
    return res


def _image_hash(segs_of: dict[int, list[tuple[int, int, str, int]]],
                ranges: dict[str, list[list[int]]], files: _Files) -> str:
    """The image's own hash (same construction), assembled from its pages files."""
    h = hashlib.sha256()
    for pid, segs in segs_of.items():
        flat = bytearray()
        for _v, n, path, off in segs:
            flat += files.get(path)[off:off + n * PAGE]
        pos = 0
        for va, k in _chunks(ranges[str(pid)]):
            _hash_chunk(h, pid, va, bytes(flat[pos:pos + k * PAGE]))
            pos += k * PAGE
    return h.hexdigest()


def _b64json(obj) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


def _merge_ranges(runs: list[tuple[int, int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for v, n in runs:
        if out and out[-1][0] + out[-1][1] * PAGE == v:
            out[-1][1] += n
        else:
            out.append([v, n])
    return out


def memhash(ranges: dict[str, list[list[int]]]) -> dict:
    """The hash ``verify`` computes, over the same pages of the live (frozen) source."""
    h = hashlib.sha256()
    bufs = _Buffers()
    pages = 0
    for key, runs in ranges.items():
        pid = int(key)
        mem = _Mem(pid)
        try:
            for va, k in _chunks(runs):
                _hash_chunk(h, pid, va, mem.read(va, bufs.get(k)[1]))
                pages += k
        finally:
            mem.close()
    return {"sha256": h.hexdigest(), "pages": pages}


# ---------------------------------------------------------------- running criu

def _criu() -> str:
    return os.environ.get("CRIU", "criu")


def _round_dir(base: str, rnd: int) -> str:
    if rnd < 1:
        raise StepFailed(f"--round {rnd}: rounds are numbered from 1")
    return os.path.join(base, str(rnd))


def _parent_arg(rnd: int) -> list[str]:
    return ["--prev-images-dir", f"../{rnd - 1}"] if rnd > 1 else []


def _run_criu(args: list[str], log: str, timeout: float) -> tuple[int, str, float]:
    t0 = time.monotonic()
    try:
        p = subprocess.run([_criu(), *args, "-o", log], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise StepFailed(f"{_criu()} not found: CRIU is not installed on this node") from None
    except subprocess.TimeoutExpired:
        raise StepFailed(f"criu {args[0]} did not finish in {timeout:g} s", log) from None
    return p.returncode, p.stdout + p.stderr, time.monotonic() - t0


def _fail_from_log(what: str, log: str, rc: int, output: str) -> StepFailed:
    text = output
    try:
        with open(log, errors="replace") as f:
            text = f.read() + "\n" + output
    except OSError:
        pass
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    reason = criu_reason(text) or (lines[-1] if lines else f"exit status {rc}")
    return StepFailed(f"criu {what} failed: {reason}", log, rc)


def _dir_bytes(path: str, skip_logs: bool = True) -> int:
    total = 0
    for name in os.listdir(path):
        if skip_logs and name.endswith(".log"):
            continue
        full = os.path.join(path, name)
        if os.path.isfile(full) and not os.path.islink(full):
            total += os.path.getsize(full)
    return total


def _read_stats(d: str, name: str) -> dict:
    try:
        with open(os.path.join(d, name), "rb") as f:
            return parse_stats(f.read())
    except (OSError, ValueError):
        return {}


def _read_pstree(d: str) -> list[dict]:
    path = os.path.join(d, "pstree.img")
    try:
        with open(path, "rb") as f:
            return parse_pstree(f.read())
    except FileNotFoundError:
        raise StepFailed(f"{path} missing: the final dump's images were not copied "
                         "here") from None
    except ValueError as e:
        raise StepFailed(f"{path}: {e}") from None


def _dump_result(d: str, seconds: float, log: str, page_server: str | None) -> dict:
    st = _read_stats(d, "stats-dump").get("dump", {})
    pages = st.get("pages_written", 0)
    return {"dir": d, "seconds": round(seconds, 3), "pages_written": pages,
            "pages_skipped_parent": st.get("pages_skipped_parent", 0),
            "pages_scanned": st.get("pages_scanned", 0), "page_bytes": pages * PAGE,
            "image_bytes": _dir_bytes(d), "frozen_s": st.get("frozen_time", 0) / 1e6,
            "memdump_s": st.get("memdump_time", 0) / 1e6,
            "memwrite_s": st.get("memwrite_time", 0) / 1e6,
            "page_server": page_server, "stats": st, "log": log}


def _page_server_args(spec: str | None) -> list[str]:
    if not spec:
        return []
    host, _, port = spec.rpartition(":")
    if not host or not port.isdigit():
        raise StepFailed(f"--page-server {spec!r}: want HOST:PORT")
    return ["--page-server", "--address", host, "--port", port]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def proc_state(pid: int) -> str | None:
    """The one-letter state of /proc/PID/stat (R, S, T, t, Z...), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2]


def _wait(cond, timeout: float, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(interval)


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        todo += _children(p)
    return out


def _signal_all(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# ---------------------------------------------------------------- TCP connections (issue 12)
# What CRIU 3.17.1 does with an established connection, verified in guests (docs/criu-recipe.md,
# "A live TCP connection"): ``dump --tcp-established`` puts the socket in repair mode and adds
# two iptables rules per connection (DROP, except packets marked netlock.SOCCR_MARK); with
# ``--leave-stopped`` it leaves both as they are. ``restore --tcp-established`` binds the
# socket to its address (which must be local), turns repair off, and deletes the same two
# rules at its end. The driver does the rest: the rules on dst before the address arrives there,
# the source's unlock when it resumes, a silent kill.

SOL_TCP = socket.IPPROTO_TCP
TCP_REPAIR = tcp_repair.TCP_REPAIR
TCP_REPAIR_WINDOW = tcp_repair.TCP_REPAIR_WINDOW


def _hexaddr(text: str) -> str:
    """/proc/net/tcp's "0100007F:1F90" -> "127.0.0.1:8080" (address in host byte order)."""
    ip, _, port = text.partition(":")
    return f"{socket.inet_ntoa(struct.pack('<I', int(ip, 16)))}:{int(port, 16)}"


def tcp_connections(pids: list[int]) -> list[dict]:
    """The established IPv4 TCP connections the tree holds: {"pid", "fd", "local", "peer"},
    one per socket (the first fd that holds it)."""
    out: list[dict] = []
    seen: set[int] = set()
    for pid in pids:
        inodes: dict[int, int] = {}
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.setdefault(int(link[8:-1]), int(fd))
            with open(f"/proc/{pid}/net/tcp") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) < 10 or cols[3] != "01":  # 01: TCP_ESTABLISHED
                continue
            inode = int(cols[9])
            if inode in inodes and inode not in seen:
                seen.add(inode)
                out.append({"pid": pid, "fd": inodes[inode], "local": _hexaddr(cols[1]),
                            "peer": _hexaddr(cols[2])})
    return out


def _split_conn(spec: str) -> tuple[str, str]:
    local, sep, peer = spec.partition("-")
    if not sep or ":" not in local or ":" not in peer:
        raise StepFailed(f"--tcp-conn {spec!r}: want LOCAL:PORT-PEER:PORT")
    return local, peer


def tcp_lock(conns: list[tuple[str, str]]) -> None:
    """Lock the connections here (netlock) as CRIU's dump does on src: on dst before the
    address arrives, so the peer's retransmissions are dropped, not answered with a RST by a
    node that has the address but not yet the socket."""
    try:
        netlock.lock(conns)
    except netlock.LockError as e:
        raise StepFailed(str(e)) from None


def _dup(pid: int, fd: int) -> int:
    """Another process's socket, duplicated here (tcp_repair's pidfd_getfd); its failure as
    the OSError the driver's steps catch."""
    try:
        return tcp_repair.pidfd_getfd(pid, fd)
    except tcp_repair.RepairError as e:
        raise OSError(str(e)) from None


def _repair(pid: int, fd: int, on: bool, reuse: int | None = None) -> None:
    """TCP_REPAIR on or off for a socket of another process; off restores SO_REUSEADDR too
    (the kernel forces it while in repair and leaves it 0 after: CRIU puts it back; without
    that a later bind of the port failed here against the old connection's TIME-WAIT)."""
    with socket.socket(fileno=_dup(pid, fd)) as s:  # closes our duplicate only
        s.setsockopt(SOL_TCP, TCP_REPAIR, 1 if on else 0)  # off (0): and a window probe
        if not on and reuse is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuse)


def sock_state(pid: int, fd: int) -> dict:
    """{"repair": bool, "reuseaddr": int} of another process's TCP socket. TCP_REPAIR_WINDOW
    can be read only in repair mode (EPERM otherwise): the one probe for it."""
    with socket.socket(fileno=_dup(pid, fd)) as s:
        try:
            s.getsockopt(SOL_TCP, TCP_REPAIR_WINDOW, 20)
            repair = True
        except OSError:
            repair = False
        return {"repair": repair,
                "reuseaddr": s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)}


def quiet_sockets(pids: list[int]) -> list[str]:
    """Put the tree's established TCP sockets in repair mode before it is killed: a socket
    closed in repair mode goes without a FIN or RST (tcp_disconnect). A copy that is killed
    must not speak for a connection that lives on elsewhere with the same addresses (the
    source after the move, dst after an undo). -> what could not be quieted."""
    failed = []
    for c in tcp_connections(pids):
        try:
            _repair(c["pid"], c["fd"], True)
        except OSError as e:
            failed.append(f"{c['local']}-{c['peer']}: {e.strerror or e}")
    return failed


# ---------------------------------------------------------------- the driver's state

class Driver:
    """What a serve session did that its safety net must undo: trees it froze (src), trees it
    restored and page servers it started (dst). One-shot subcommands use a throwaway one."""

    def __init__(self, base: str | None, role: str | None):
        self.base = base
        self.role = role
        self.frozen: dict[int, list[int]] = {}    # src: dumped, left stopped, not resumed/killed
        self.restored: dict[int, list[int]] = {}  # dst: restored, not resumed/killed
        self.page_servers: dict[int, str] = {}    # dst: pid -> images dir
        self.cwd = os.getcwd()
        # TCP (dump/restore --tcp-established): per dumped root, its connections as they were
        # before the dump (SO_REUSEADDR included); every connection whose lock rules may be
        # here; the service address this driver gave up (src) or took (dst) and not yet
        # settled (the safety net moves it back)
        self.tcp: dict[int, list[dict]] = {}
        self.locked: set[tuple[str, str]] = set()
        self.gave: str | None = None
        self.took: str | None = None

    def forget(self, pid: int) -> None:
        self.frozen.pop(pid, None)
        self.restored.pop(pid, None)

    def unlock(self, pid: int) -> list[str]:
        """The source's connections back to life before it runs again (what CRIU's dump does
        when the task lives on, and skips with --leave-stopped): lock rules deleted, repair
        off, SO_REUSEADDR as it was. -> what was done."""
        done = []
        for c in self.tcp.pop(pid, []):
            conn = (c["local"], c["peer"])
            done += netlock.unlock([conn])
            self.locked.discard(conn)
            try:
                _repair(c["pid"], c["fd"], False, c.get("reuseaddr"))
                done.append(f"repair off {c['local']}-{c['peer']}")
            except OSError as e:
                raise StepFailed(f"turning repair off for {c['local']}-{c['peer']} (pid "
                                 f"{c['pid']} fd {c['fd']}): {e.strerror or e}") from None
        return done

    def safety_net(self) -> list[str]:
        """Undo what is half done; returns what it did (for stderr: stdout may be gone)."""
        done = []
        for pid, pids in list(self.restored.items()):  # dst first: it must not answer
            done += [f"not quiet: {m}" for m in quiet_sockets(pids)]
            _signal_all(sorted(set(pids) | set(_tree(pid))), signal.SIGKILL)
            done.append(f"SIGKILL {pid}")
        self.restored.clear()
        if self.took:
            with contextlib.suppress(OSError, netmove.NetMoveError):
                netmove.give(self.took)
                done.append(f"gave {self.took}")
            self.took = None
        if self.gave:
            with contextlib.suppress(OSError, netmove.NetMoveError):
                netmove.take(self.gave)
                done.append(f"took {self.gave} back")
            self.gave = None
        for pid, pids in list(self.frozen.items()):
            with contextlib.suppress(StepFailed):
                done += self.unlock(pid)
            _signal_all(sorted(set(pids) | set(_tree(pid))), signal.SIGCONT)
            done.append(f"SIGCONT {pid}")
        self.frozen.clear()
        if self.locked:
            done += netlock.unlock(sorted(self.locked))
            self.locked.clear()
        for pid in list(self.page_servers):
            if _pid_alive(pid) and "page-server" in _cmdline(pid):
                _signal_all([pid], signal.SIGKILL)
                done.append(f"SIGKILL page server {pid}")
        self.page_servers.clear()
        if self.base and os.path.isdir(self.base):
            # the page servers must be gone before their dirs are: they write into them
            for pid in [int(x) for x in os.listdir("/proc") if x.isdigit()]:
                if "page-server" in _cmdline(pid) and self.base in _cmdline(pid):
                    _signal_all([pid], signal.SIGKILL)
            shutil.rmtree(self.base, ignore_errors=True)
            done.append(f"removed {self.base}")
        return done


# ---------------------------------------------------------------- subcommands

def _ipv4_addresses() -> list[str]:
    """This node's IPv4 addresses but loopback (SIOCGIFCONF: every address, aliases too)."""
    siocgifconf, size, n = 0x8912, 40, 64  # struct ifreq is 40 bytes on x86_64
    buf = array.array("B", bytes(size * n))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        res = fcntl.ioctl(s.fileno(), siocgifconf,
                          struct.pack("iL", len(buf), buf.buffer_info()[0]))
    used = struct.unpack("iL", res)[0]
    raw = buf.tobytes()
    out = []
    for i in range(0, used, size):
        ip = socket.inet_ntoa(raw[i + 20:i + 24])  # ifr_addr: sockaddr_in's sin_addr
        if not ip.startswith("127."):
            out.append(ip)
    return out


def _criu_version() -> str | None:
    try:
        v = subprocess.run([_criu(), "--version"], capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"Version:\s*(\S+)", v.stdout)
    return m.group(1) if m else None


def cmd_hello(a, drv: Driver) -> dict:
    try:
        addresses = _ipv4_addresses()
    except OSError:
        addresses = []
    return {"pid": os.getpid(), "kernel": os.uname().release, "addresses": addresses,
            "criu": _criu_version(), "base": drv.base, "role": drv.role}


def cmd_check(a, drv: Driver) -> dict:
    try:
        p = subprocess.run([_criu(), "check"], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=a.timeout)
    except FileNotFoundError:
        raise StepFailed(f"{_criu()} not found: CRIU is not installed on this node") from None
    except subprocess.TimeoutExpired:
        raise StepFailed(f"criu check did not finish in {a.timeout:g} s") from None
    ok, reason = parse_check(p.returncode, p.stdout + p.stderr)
    if not ok:
        raise StepFailed(f"criu check: {reason}", rc=p.returncode)
    t = subprocess.run([_criu(), "check", "--feature", "mem_dirty_track"], capture_output=True,
                       text=True, timeout=a.timeout, stdin=subprocess.DEVNULL)
    if t.returncode != 0:
        raise StepFailed("criu check: no memory tracking (soft-dirty): pre-dump rounds would "
                         "each write every page; "
                         + (criu_reason(t.stdout + t.stderr) or t.stdout.strip()))
    thp = None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = re.search(r"\[(\w+)\]", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    return {"reason": reason, "version": _criu_version(),
            "kernel": os.uname().release, "mem_track": True, "thp": thp}


def _random_upper_pid() -> bool:
    """Make the next fork land at a random pid in the upper half of pid_max: two guests boot
    alike, so a low pid on src is likely taken on dst, and CRIU restores every task with its
    own pid. Needs root (CAP_SYS_ADMIN / CAP_CHECKPOINT_RESTORE); False when not allowed.
    CRIU_DRIVER_PID_PLACEMENT=off turns it off: tests on a shared host, where another test
    may be steering ns_last_pid itself."""
    if os.environ.get("CRIU_DRIVER_PID_PLACEMENT") == "off":
        return False
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            pid_max = int(f.read())
        lo, hi = pid_max // 2, pid_max - 4096  # leave room for the tree's own forks
        if hi <= lo:
            hi = pid_max - 64
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(random.randrange(lo, hi)))
        return True
    except (OSError, ValueError):
        return False


def _read_all(fd: int, timeout: float) -> bytes:
    import select
    data = b""
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise StepFailed(f"spawn: the command did not start in {timeout:g} s")
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return data
        data += chunk


def cmd_spawn(a, drv: Driver) -> dict:
    try:
        command = base64.b64decode(a.command_b64, validate=True).decode()
    except (ValueError, UnicodeDecodeError) as e:
        raise StepFailed(f"spawn: --command-b64 is not base64 of UTF-8 text: {e}") from None
    if not os.path.isdir(a.cwd):
        raise StepFailed(f"spawn: --cwd {a.cwd}: no such directory")
    log = os.path.abspath(a.log)
    if not os.path.isdir(os.path.dirname(log)):
        raise StepFailed(f"spawn: --log {log}: its folder does not exist")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABKIT_")}
    placed = _random_upper_pid()
    r, w = os.pipe()  # close-on-exec: EOF once the command's shell has exec'd
    first = os.fork()
    if first == 0:  # pragma: no cover - the child's side (exec'd or _exit)
        code = 0
        try:
            os.close(r)
            second = os.fork()
            if second == 0:
                try:
                    # the session leader itself: CRIU wants the root of a tree it dumps to
                    # lead its session (else --shell-job), and nothing ties it to the driver
                    os.setsid()
                    os.chdir(a.cwd)
                    fin = os.open(os.devnull, os.O_RDONLY)
                    fout = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(fin, 0)
                    os.dup2(fout, 1)
                    os.dup2(fout, 2)
                    for s in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
                        signal.signal(s, signal.SIG_DFL)  # ignored ones survive exec
                    signal.pthread_sigmask(signal.SIG_SETMASK, [])
                    os.execve("/bin/sh", ["/bin/sh", "-c", command], env)
                except BaseException as e:  # noqa: BLE001 - reported through the pipe
                    with contextlib.suppress(OSError):
                        os.write(w, f"E{type(e).__name__}: {e}".encode())
                os._exit(127)
            os.write(w, f"{second}\n".encode())
        except BaseException:  # noqa: BLE001
            code = 1
        os._exit(code)
    os.close(w)
    try:
        os.waitpid(first, 0)
        data = _read_all(r, a.timeout).decode(errors="replace")
    finally:
        os.close(r)
    head, _, rest = data.partition("\n")
    if not head.isdigit():
        raise StepFailed(f"spawn: could not start /bin/sh: {data.strip() or 'no pid'}")
    pid = int(head)
    if rest.startswith("E"):
        raise StepFailed(f"spawn: could not start the command: {rest[1:].strip()}")
    res = {"pid": pid, "log": log, "pid_placed": placed}
    if a.wait_line is not None:
        line = _first_line(log, pid, a.wait_line)
        try:
            res["first_line"] = json.loads(line)
        except ValueError:
            res["first_line"] = line
    return res


def _first_line(log: str, pid: int, timeout: float) -> str:
    def have() -> bool:
        try:
            with open(log, "rb") as f:
                return b"\n" in f.read(1 << 16)
        except OSError:
            return False

    def gone() -> bool:
        return proc_state(pid) in (None, "Z")

    _wait(lambda: have() or gone(), timeout)
    if have():
        with open(log, "rb") as f:
            return f.read(1 << 16).split(b"\n", 1)[0].decode(errors="replace")
    tail = ""
    with contextlib.suppress(OSError), open(log, "rb") as f:
        tail = f.read()[-300:].decode(errors="replace").strip().replace("\n", " | ")
    if gone():
        raise StepFailed(f"spawn: pid {pid} ended before writing a line to {log}"
                         + (f": {tail}" if tail else ""), extra={"pid": pid})
    _signal_all(_tree(pid), signal.SIGKILL)  # the caller never learns its pid: nothing stays
    raise StepFailed(f"spawn: pid {pid} wrote no line to {log} in {timeout:g} s (killed it)"
                     + (f": {tail}" if tail else ""), extra={"pid": pid})


def cmd_workspace(a, drv: Driver) -> dict:
    """Copy the release the driver runs from to a path that is the same on both nodes: CRIU
    restores a process's cwd by its resolved path, and release folders are named by time."""
    path = os.path.abspath(a.path)
    if os.path.exists(path):
        return {"path": path, "copied": False}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(drv.cwd, tmp, symlinks=True)
    try:
        os.rename(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(path):
            raise
        return {"path": path, "copied": False}
    return {"path": path, "copied": True}


def _open_for_writing(pids: list[int]) -> list[dict]:
    """Regular files the tree holds open O_WRONLY/O_RDWR: CRIU reopens them by path on
    restore and checks their size, so the controller copies them as they are at the freeze."""
    seen: dict[str, dict] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    m = re.search(r"^flags:\s*([0-7]+)", f.read(), re.M)
                if not m or int(m.group(1), 8) & os.O_ACCMODE not in (os.O_WRONLY, os.O_RDWR):
                    continue
                path = os.readlink(f"/proc/{pid}/fd/{fd}")
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or not path.startswith("/") \
                    or path.endswith(" (deleted)"):
                continue  # CRIU carries deleted files itself (ghost files)
            seen.setdefault(path, {"path": path, "size": st.st_size,
                                   "mtime_ns": st.st_mtime_ns})
    return sorted(seen.values(), key=lambda f: f["path"])


def cmd_predump(a, drv: Driver, final: bool = False) -> dict:
    d = _round_dir(a.base, a.round)
    os.makedirs(d, exist_ok=True)
    if a.round > 1 and not os.path.isdir(_round_dir(a.base, a.round - 1)):
        raise StepFailed(f"round {a.round}: no {_round_dir(a.base, a.round - 1)} "
                         "(the parent round's images)")
    if not _pid_alive(a.pid):
        raise StepFailed(f"pid {a.pid} does not exist")
    what = "dump" if final else "pre-dump"
    log = os.path.join(d, LOG_NAMES["dump" if final else "predump"])
    args = [what, "-t", str(a.pid), "-D", d, *_parent_arg(a.round), "--track-mem",
            *_page_server_args(a.page_server), *(["-v4"] if a.verbose else [])]
    if final:
        # left stopped (not killed) so a restore that fails on dst can be undone with SIGCONT
        args += [*([] if a.kill else ["--leave-stopped"]), "--file-locks", "--link-remap",
                 *(["--tcp-established"] if a.tcp_established else [])]
    if a.shell_job:
        args.append("--shell-job")
    conns: list[dict] = []
    if final and a.tcp_established:
        # as they are before CRIU forces SO_REUSEADDR: the unlock puts it back
        conns = tcp_connections(_tree(a.pid))
        for c in conns:
            with contextlib.suppress(OSError):
                c["reuseaddr"] = sock_state(c["pid"], c["fd"])["reuseaddr"]
    rc, out, secs = _run_criu(args, log, a.timeout)
    if rc != 0:
        if final and not a.kill and _pid_alive(a.pid) and proc_state(a.pid) in ("T", "t"):
            _signal_all(_tree(a.pid), signal.SIGCONT)  # a failed dump never leaves it frozen
        raise _fail_from_log(what, log, rc, out)
    res = {"round": a.round, "final": final, **_dump_result(d, secs, log, a.page_server)}
    if final:
        stopped = not a.kill and proc_state(a.pid) in ("T", "t")
        res["left_stopped"] = stopped
        try:
            tree = [p["pid"] for p in _read_pstree(d)]
        except StepFailed:
            tree = _tree(a.pid)
        res["tree"] = tree
        if stopped:
            drv.frozen[a.pid] = tree
            res["files"] = _open_for_writing(tree)
        else:
            res["files"] = []
        if a.tcp_established:
            # CRIU left the sockets in repair mode and its lock rules in place (both verified)
            drv.tcp[a.pid] = conns
            drv.locked.update((c["local"], c["peer"]) for c in conns)
            res["tcp"] = conns
        if a.give_address:
            res["gave"] = _give(a.give_address, drv)
    return res


def _give(address: str, drv: Driver) -> bool:
    try:
        gone = netmove.give(address)
    except (OSError, netmove.NetMoveError) as e:
        raise StepFailed(f"giving up {address}: {e}") from None
    drv.gave = address if drv.role == "src" else None
    if drv.role == "dst":
        drv.took = None
    return gone


def _take(address: str, drv: Driver, announce: bool = True) -> str:
    try:
        dev = netmove.take(address, announce=announce)
    except (OSError, netmove.NetMoveError) as e:
        raise StepFailed(f"taking {address}: {e}") from None
    drv.took = address if drv.role == "dst" else None
    if drv.role == "src":
        drv.gave = None
    return dev


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def cmd_page_server(a, drv: Driver) -> dict:
    d = _round_dir(a.base, a.round)
    os.makedirs(d, exist_ok=True)
    log = os.path.join(d, LOG_NAMES["page-server"])
    pidfile = os.path.join(d, "page-server.pid")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)
    port = a.port or _free_port(a.address)
    args = ["page-server", "-D", d, *_parent_arg(a.round), "--port", str(port),
            "--address", a.address, "--auto-dedup", "-d", "--pidfile", pidfile]
    # -d: criu binds the port, then daemonizes; on return the server is listening
    rc, out, secs = _run_criu(args, log, a.timeout)
    if rc != 0:
        raise _fail_from_log("page-server", log, rc, out)
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        pid = None
    if pid:
        drv.page_servers[pid] = d
    return {"round": a.round, "dir": d, "port": port, "address": a.address, "pid": pid,
            "seconds": round(secs, 3), "log": log}


def _wait_page_server(d: str, timeout: float, drv: Driver) -> None:
    """The round's page server exits when the dump that fed it closes the connection; its
    pages are complete only then."""
    try:
        with open(os.path.join(d, "page-server.pid")) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return
    if not _wait(lambda: not _pid_alive(pid) or proc_state(pid) == "Z", timeout):
        raise StepFailed(f"page server {pid} of {d} still running after {timeout:g} s "
                         "(the dump never finished sending?)",
                         os.path.join(d, LOG_NAMES["page-server"]))
    drv.page_servers.pop(pid, None)


def pids_in_use(procs: list[dict]) -> list[str]:
    """The image's pids and tids that are taken on this node (criu restore needs each one
    free: it recreates every task with its dumped pid)."""
    taken = []
    for p in procs:
        for tid in [p.get("pid"), *p.get("threads", [])]:
            if tid and os.path.exists(f"/proc/{tid}"):
                try:
                    with open(f"/proc/{tid}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
                taken.append(f"{tid} ({comm})")
    return sorted(set(taken))


def cmd_restore(a, drv: Driver) -> dict:
    d = _round_dir(a.base, a.round)
    if not os.path.isdir(d):
        raise StepFailed(f"no images in {d}")
    _wait_page_server(d, a.timeout, drv)
    procs = _read_pstree(d)
    if not procs:
        raise StepFailed(f"{d}/pstree.img lists no process")
    root = procs[0]["pid"]
    taken = pids_in_use(procs)
    if taken:
        raise StepFailed("pid(s) needed by the restore are in use on this node: "
                         + ", ".join(taken) + " (CRIU restores every task with its own pid)",
                         extra={"taken": taken})
    if a.tcp_established and a.tcp_close:
        raise StepFailed("restore: --tcp-established or --tcp-close, not both")
    log = os.path.join(d, LOG_NAMES["restore"])
    pidfile = os.path.join(d, "restore.pid")
    args = ["restore", "-D", d, "-d", "--pidfile", pidfile, "--file-locks", "--link-remap",
            "--leave-stopped",  # verified before it runs; the driver's safety net kills it
            *(["--shell-job"] if a.shell_job else []),
            *(["--tcp-established"] if a.tcp_established else []),
            # the baseline's copy: its sockets come back closed (no address needed, and
            # killing it later sends nothing to the peer the source still serves)
            *(["--tcp-close"] if a.tcp_close else []),
            *(["-v4"] if a.verbose else [])]
    conns = [_split_conn(c) for c in a.tcp_conn]
    res: dict = {}
    t_net = time.monotonic()
    if conns:  # locked before the address arrives: no RST from here before the socket is
        tcp_lock(conns)
        drv.locked.update(conns)
    if a.take_address:
        res["took"] = _take(a.take_address, drv, announce=not a.no_announce)
    res["net_s"] = round(time.monotonic() - t_net, 3)
    rc, out, secs = _run_criu(args, log, a.timeout)
    pids = [p["pid"] for p in procs]
    if rc != 0:
        _signal_all([p for p in pids if _pid_alive(p)], signal.SIGKILL)  # nothing half-done
        if conns:
            netlock.unlock(conns)
            drv.locked.difference_update(conns)
        raise _fail_from_log("restore", log, rc, out)
    drv.restored[root] = pids
    if conns:  # CRIU's restore deleted the rules itself (its network unlock): check
        res["tcp"] = {f"{lo}-{pe}": sock_state_of(pids, lo, pe) for lo, pe in conns}
    st = _read_stats(d, "stats-restore").get("restore", {})
    state = proc_state(root)
    return {"round": a.round, "dir": d, "pid": root, "pids": pids,
            "state": state, "stopped": state in ("T", "t"), "seconds": round(secs, 3),
            "pages_restored": st.get("pages_restored"),
            "restore_s": st.get("restore_time", 0) / 1e6, "stats": st, "log": log, **res}


def sock_state_of(pids: list[int], local: str, peer: str) -> dict:
    """The restored socket of one connection: found, and its repair/SO_REUSEADDR state."""
    for c in tcp_connections(pids):
        if (c["local"], c["peer"]) == (local, peer):
            with contextlib.suppress(OSError):
                return {"found": True, **sock_state(c["pid"], c["fd"])}
            return {"found": True}
    return {"found": False}


def cmd_verify(a, drv: Driver) -> dict:
    d = _round_dir(a.base, a.round)
    procs = _read_pstree(d)
    if procs[0]["pid"] != a.pid:
        raise StepFailed(f"verify: --pid {a.pid} is not the image's root ({procs[0]['pid']})")
    pids = [p["pid"] for p in procs]
    running = [p for p in pids if proc_state(p) not in ("T", "t")]
    if running:
        raise StepFailed(f"verify: pid(s) {', '.join(map(str, running))} not stopped (gone or "
                         "running): their memory cannot be compared with the image")
    return verify_images(d, pids)


def final_ranges(d: str, pids: list[int]) -> dict[str, list[list[int]]]:
    """The pages the image of ``d`` holds, per pid, from its own pagemaps alone (an entry
    says whether its pages are here or in a parent; which parent holds them does not change
    which pages they are): no walk of the chain, which costs seconds under TCG."""
    out: dict[str, list[list[int]]] = {}
    for pid in pids:
        _pages_id, entries = read_pagemap(d, pid)
        held = sorted((v, n) for v, n, fl in entries if fl & (PE_PRESENT | PE_PARENT))
        out[str(pid)] = _merge_ranges(held)
    return out


def _ranges_arg(text: str, what: str) -> dict[str, list[list[int]]]:
    try:
        ranges = json.loads(base64.b64decode(text, validate=True))
        if not isinstance(ranges, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise StepFailed(f"{what}: --ranges-b64 is not base64 of a JSON object: {e}") from None
    return ranges


def cmd_ranges(a, drv: Driver) -> dict:
    """The pages the round's image holds (no memory read, no chain walk): the controller hands
    them to memhash on both nodes at once (the frozen source, the restored tree)."""
    d = _round_dir(a.base, a.round)
    ranges = final_ranges(d, [p["pid"] for p in _read_pstree(d)])
    return {"ranges_b64": base64.b64encode(json.dumps(ranges).encode()).decode(),
            "pages": sum(n for runs in ranges.values() for _v, n in runs)}


def cmd_imagehash(a, drv: Driver) -> dict:
    """The same hash over the image's own bytes (the chain walked to each page's round): that
    the images hold what the source held, checked after the process runs on (it reads no
    memory)."""
    d = _round_dir(a.base, a.round)
    ranges = _ranges_arg(a.ranges_b64, "imagehash")
    imgs = ImageSet(d)
    segs_of: dict[int, list[tuple[int, int, str, int]]] = {}
    for key, runs in ranges.items():
        segs = imgs.segments(int(key))
        mine = _merge_ranges([(v, n) for v, n, _, _ in segs])
        if mine != runs:
            raise StepFailed(f"imagehash: the chain of {d} holds other pages for pid {key} "
                             "than its own pagemap lists")
        segs_of[int(key)] = segs
    return {"sha256": _image_hash(segs_of, ranges, _Files()),
            "pages": sum(n for runs in ranges.values() for _v, n in runs)}


def cmd_memhash(a, drv: Driver) -> dict:
    ranges = _ranges_arg(a.ranges_b64, "memhash")
    for key in ranges:
        if proc_state(int(key)) not in ("T", "t"):
            raise StepFailed(f"memhash: pid {key} is not stopped: its memory may change "
                             "while it is read")
    return memhash(ranges)


def cmd_pack(a, drv: Driver) -> dict:
    d = _round_dir(a.base, a.round)
    if not os.path.isdir(d):
        raise StepFailed(f"pack: no images in {d}")
    members: list[tuple[str, str]] = []
    for name in sorted(os.listdir(d)):
        full = os.path.join(d, name)
        if name.endswith((".log", ".pid")) or not (os.path.islink(full)
                                                     or os.path.isfile(full)):
            continue
        members.append((IMAGES_PREFIX + name, full))
    for path in a.file:
        if not os.path.isabs(path) or os.path.normpath(path) != path:
            raise StepFailed(f"pack: --file {path}: want a normalised absolute path")
        if not os.path.isfile(path):
            raise StepFailed(f"pack: --file {path}: not a regular file")
        members.append((FILES_PREFIX + path.lstrip("/"), path))
    sizes = [(0 if os.path.islink(p) else os.path.getsize(p), p) for _, p in members]
    total = sum(s for s, _ in sizes)
    if total > PACK_LIMIT:
        big = max(sizes)
        raise StepFailed(f"pack: {total} bytes is over {PACK_LIMIT >> 20} MiB; the biggest is "
                         f"{big[1]} ({big[0]} bytes)")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in members:
            info = tar.gettarinfo(path, arcname=name)
            ns = os.lstat(path).st_mtime_ns  # exact: a float mtime loses the nanoseconds
            info.pax_headers["mtime"] = f"{ns // 10**9}.{ns % 10**9:09d}"
            if info.isfile():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    data = buf.getvalue()
    return {"tar_b64": base64.b64encode(data).decode(), "bytes": len(data),
            "members": [n for n, _ in members]}


def _mtime_ns(member: tarfile.TarInfo) -> int:
    sec, _, frac = member.pax_headers.get("mtime", str(int(member.mtime))).partition(".")
    return int(sec) * 10**9 + int((frac + "000000000")[:9])


def _write_atomic(path: str, data: bytes, member: tarfile.TarInfo) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if os.geteuid() == 0:
            os.chown(tmp, member.uid, member.gid)
        os.chmod(tmp, member.mode & 0o7777)
        mtime_ns = _mtime_ns(member)
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cmd_unpack(a, drv: Driver) -> dict:
    d = _round_dir(a.base, a.round)
    os.makedirs(d, exist_ok=True)
    try:
        data = base64.b64decode(a.tar_b64, validate=True)
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except (ValueError, tarfile.TarError) as e:
        raise StepFailed(f"unpack: not a base64 tar: {e}") from None
    images = 0
    files = []
    with tar:
        for m in tar.getmembers():
            if m.name.startswith(IMAGES_PREFIX):
                name = m.name[len(IMAGES_PREFIX):]
                if not name or "/" in name or name in (".", ".."):
                    raise StepFailed(f"unpack: bad image name {m.name!r}")
                dest = os.path.join(d, name)
                if m.issym():
                    if os.path.islink(dest) and os.readlink(dest) == m.linkname:
                        continue  # the page server made the same parent link
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(dest)
                    os.symlink(m.linkname, dest)
                    continue
                if not m.isfile():
                    raise StepFailed(f"unpack: {m.name} is not a regular file")
                _write_atomic(dest, tar.extractfile(m).read(), m)
                images += 1
            elif m.name.startswith(FILES_PREFIX):
                path = "/" + m.name[len(FILES_PREFIX):]
                if os.path.normpath(path) != path or not m.isfile():
                    raise StepFailed(f"unpack: bad file member {m.name!r}")
                parent = os.path.dirname(path)
                if not os.path.isdir(parent):
                    raise StepFailed(f"unpack: {path}: its folder {parent} does not exist on "
                                     "this node")
                _write_atomic(path, tar.extractfile(m).read(), m)
                files.append(path)
            else:
                raise StepFailed(f"unpack: unexpected member {m.name!r}")
    return {"round": a.round, "images": images, "files": files}


def cmd_resume(a, drv: Driver) -> dict:
    if not _pid_alive(a.pid):
        raise StepFailed(f"pid {a.pid} does not exist")
    took = _take(a.take_address, drv) if a.take_address else None
    unlocked = drv.unlock(a.pid)  # a source dumped with its connections: them first
    pids = _tree(a.pid)
    _signal_all(pids, signal.SIGCONT)
    if not _wait(lambda: all(proc_state(p) not in ("T", "t") for p in pids), a.timeout):
        still = [p for p in pids if proc_state(p) in ("T", "t")]
        raise StepFailed(f"pid(s) {', '.join(map(str, still))} still stopped after SIGCONT")
    if a.pid in drv.restored:
        drv.took = None  # the restored tree runs: the address is its own now
    drv.forget(a.pid)
    return {"pid": a.pid, "pids": pids, "state": proc_state(a.pid),
            **({"unlocked": unlocked} if unlocked else {}), **({"took": took} if took else {})}


def cmd_kill(a, drv: Driver) -> dict:
    """SIGKILL the tree and wait until every pid is reaped: a zombie still holds its pid, and a
    restore of the same image here would find it taken."""
    pids = _tree(a.pid)
    _signal_all(pids, signal.SIGSTOP)  # no new children between the listing and the kill
    pids = sorted(set(pids) | set(t for p in pids for t in _tree(p)))
    loud = quiet_sockets(pids)  # its connections may live on elsewhere: no FIN, no RST
    _signal_all(pids, signal.SIGKILL)
    drv.forget(a.pid)
    conns = [(c["local"], c["peer"]) for c in drv.tcp.pop(a.pid, [])]
    if not _wait(lambda: all(proc_state(p) is None for p in pids), a.timeout):
        left = [f"{p} ({proc_state(p)})" for p in pids if proc_state(p) is not None]
        raise StepFailed(f"pid(s) {', '.join(left)} not gone {a.timeout:g} s after SIGKILL "
                         "(a zombie its parent does not reap?)")
    if conns:  # a dumped source: CRIU's lock rules go once its sockets are gone
        netlock.unlock(conns)
        drv.locked.difference_update(conns)
    return {"pid": a.pid, "killed": pids, **({"not_quiet": loud} if loud else {})}


def _ctl_write(path: str, line: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(line if line.endswith("\n") else line + "\n")
    os.rename(tmp, path)


def _ctl_reply(ctl: str, timeout: float) -> dict:
    reply = ctl + ".reply"
    if not _wait(lambda: os.path.exists(reply), timeout):
        raise StepFailed(f"wlctl: no reply in {reply} after {timeout:g} s")
    with open(reply) as f:
        text = f.read()
    try:
        return json.loads(text)
    except ValueError:
        raise StepFailed(f"wlctl: {reply} is not JSON: {text[:200]!r}") from None


def cmd_wlctl(a, drv: Driver) -> dict:
    try:
        line = base64.b64decode(a.line_b64, validate=True).decode()
    except (ValueError, UnicodeDecodeError) as e:
        raise StepFailed(f"wlctl: --line-b64 is not base64 of UTF-8 text: {e}") from None
    if not _pid_alive(a.pid):
        raise StepFailed(f"wlctl: pid {a.pid} does not exist")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(a.ctl + ".reply")
    _ctl_write(a.ctl, line)
    os.kill(a.pid, signal.SIGUSR1)
    if a.no_wait:
        return {"pid": a.pid}
    return {"pid": a.pid, "reply": _ctl_reply(a.ctl, a.timeout)}


def cmd_wlctl_wait(a, drv: Driver) -> dict:
    return {"reply": _ctl_reply(a.ctl, a.timeout)}


def cmd_logs(a, drv: Driver) -> dict:
    logs = {}
    if a.base and os.path.isdir(a.base):
        for root, _dirs, names in os.walk(a.base):
            for name in sorted(names):
                if not name.endswith(".log"):
                    continue
                full = os.path.join(root, name)
                try:
                    with open(full, "rb") as f:
                        size = os.fstat(f.fileno()).st_size
                        f.seek(max(0, size - LOG_TAIL))
                        logs[os.path.relpath(full, a.base)] = f.read().decode(errors="replace")
                except OSError:
                    continue
    return {"logs": logs}


def cmd_cleanup(a, drv: Driver) -> dict:
    """BASE, and each --also path (the run's workspace, output, control files on a node the
    process no longer runs on): files or folders, gone or not."""
    freed = 0
    removed = []
    for path in [a.base, *a.also]:
        if not path or not os.path.lexists(path):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            for root, _dirs, names in os.walk(path):
                for name in names:
                    with contextlib.suppress(OSError):
                        freed += os.lstat(os.path.join(root, name)).st_blocks * 512
            shutil.rmtree(path)
        else:
            with contextlib.suppress(OSError):
                freed += os.lstat(path).st_blocks * 512
            os.unlink(path)
        removed.append(path)
    rules = netlock.unlock(sorted(drv.locked)) if drv.locked else []
    drv.locked.clear()
    return {"base": a.base, "bytes": freed, "removed": removed,
            **({"rules_removed": rules} if rules else {})}


def cmd_address(a, drv: Driver) -> dict:
    """The service address here (take: added as a /32 and announced) or not (give)."""
    if a.action == "take":
        return {"address": a.address, "took": _take(a.address, drv)}
    return {"address": a.address, "gave": _give(a.address, drv)}


def cmd_quit(a, drv: Driver) -> dict:
    return {}


def cmd_stats(a, drv: Driver) -> dict:
    with open(a.file, "rb") as f:
        data = f.read()
    name = os.path.basename(a.file)
    if name.startswith("pstree"):
        return {"file": a.file, "pstree": parse_pstree(data)}
    if name.startswith("pagemap"):
        pages_id, entries = parse_pagemap(data)
        return {"file": a.file, "pages_id": pages_id, "entries": entries}
    return {"file": a.file, **parse_stats(data)}


def cmd_show(a, drv: Driver) -> dict:
    """Any image decoded by CRIU's own pycriu (optional: Debian's criu package ships it)."""
    try:
        sys.path.append("/usr/lib/python3/dist-packages")
        import pycriu  # noqa: PLC0415
    except ImportError:
        raise StepFailed("pycriu not importable: install the criu package (Debian ships "
                         "pycriu in /usr/lib/python3/dist-packages) or use `stats`") from None
    with open(a.file, "rb") as f:
        img = pycriu.images.load(f, pretty=True)
    return {"file": a.file, "image": img}


# ---------------------------------------------------------------- command lines

class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting: in serve mode a bad line is a reply."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None):  # type: ignore[override]
        raise UsageError((message or f"{self.prog}: exit {status}").strip())


def build_parser(base: str | None = None) -> argparse.ArgumentParser:
    """``base``: serve mode's BASE, the default of every --base (which one-shot needs)."""
    ap = _Parser(prog="criu_driver.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def common(name: str, timeout: float = 600.0, with_base: bool = False, **kw):
        p = sub.add_parser(name, **kw)
        p.add_argument("--timeout", type=float, default=timeout)
        if with_base:
            p.add_argument("--base", required=base is None, default=base,
                           help="images base dir (rounds are BASE/N)")
        return p

    p = sub.add_parser("serve", help="the controller's command loop (one JSON line each)")
    p.add_argument("--base", required=True)
    p.add_argument("--role", choices=("src", "dst"), required=True)
    common("hello", 30.0, with_base=True)
    common("check", 60.0, help="criu check + memory tracking")
    p = common("spawn", 10.0, help="start a command in its own session")
    p.add_argument("--log", required=True)
    p.add_argument("--cwd", required=True)
    p.add_argument("--command-b64", required=True)
    p.add_argument("--wait-line", type=float, metavar="SECONDS")
    p = common("workspace", 120.0, help="copy this release to PATH (same path on both nodes)")
    p.add_argument("--path", required=True)
    for name in ("predump", "dump"):
        p = common(name, with_base=True)
        p.add_argument("--pid", type=int, required=True)
        p.add_argument("--round", type=int, required=True)
        p.add_argument("--page-server", metavar="HOST:PORT")
        p.add_argument("--shell-job", action="store_true")
        p.add_argument("--verbose", action="store_true", help="criu -v4")
        if name == "dump":
            p.add_argument("--kill", action="store_true",
                           help="let criu kill the tasks (default: leave them stopped)")
            p.add_argument("--tcp-established", action="store_true")
            p.add_argument("--give-address", metavar="ADDR",
                           help="after the dump: remove this service address from here")
    p = common("page-server", 60.0, with_base=True)
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--port", type=int, default=0, help="0: pick a free one")
    p.add_argument("--address", default="0.0.0.0")
    p = common("restore", with_base=True)
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--leave-stopped", action="store_true", help="(always: kept for old callers)")
    p.add_argument("--shell-job", action="store_true")
    p.add_argument("--tcp-established", action="store_true")
    p.add_argument("--tcp-close", action="store_true",
                   help="restore established connections closed (a copy that never runs)")
    p.add_argument("--tcp-conn", action="append", default=[], metavar="LOCAL:P-PEER:P",
                   help="lock this connection (iptables, as CRIU's dump) before the restore")
    p.add_argument("--take-address", metavar="ADDR",
                   help="before the restore: add this service address here and announce it")
    p.add_argument("--no-announce", action="store_true",
                   help="take the address without a gratuitous ARP (test fault keep-address)")
    p.add_argument("--verbose", action="store_true")
    p = common("verify", 300.0, with_base=True)
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--pid", type=int, required=True)
    p = common("ranges", 60.0, with_base=True)
    p.add_argument("--round", type=int, required=True)
    p = common("imagehash", 300.0, with_base=True)
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--ranges-b64", required=True)
    p = common("memhash", 300.0)
    p.add_argument("--ranges-b64", required=True)
    p = common("pack", 120.0, with_base=True)
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--file", action="append", default=[])
    p = common("unpack", 120.0, with_base=True)
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--tar-b64", required=True)
    for name in ("resume", "kill"):
        p = common(name, 10.0)
        p.add_argument("--pid", type=int, required=True)
        if name == "resume":
            p.add_argument("--take-address", metavar="ADDR",
                           help="first: the service address back here, announced (undo)")
    p = common("address", 30.0, help="the service address: take (add + announce) or give")
    p.add_argument("action", choices=("take", "give"))
    p.add_argument("--address", required=True)
    p = common("wlctl", 120.0)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--ctl", required=True)
    p.add_argument("--line-b64", required=True)
    p.add_argument("--no-wait", action="store_true")
    p = common("wlctl-wait", 120.0)
    p.add_argument("--ctl", required=True)
    common("logs", with_base=True)
    p = common("cleanup", with_base=True)
    p.add_argument("--also", action="append", default=[],
                   help="another path to remove (repeatable)")
    common("quit")
    p = sub.add_parser("stats", help="decode stats-*/pstree/pagemap images (stdlib)")
    p.add_argument("file")
    p = sub.add_parser("show", help="decode any image with pycriu")
    p.add_argument("file")
    return ap


COMMANDS = {"hello": cmd_hello, "check": cmd_check, "spawn": cmd_spawn,
            "workspace": cmd_workspace, "predump": cmd_predump,
            "dump": lambda a, drv: cmd_predump(a, drv, final=True),
            "page-server": cmd_page_server, "restore": cmd_restore, "verify": cmd_verify,
            "ranges": cmd_ranges, "memhash": cmd_memhash, "imagehash": cmd_imagehash, "pack": cmd_pack, "unpack": cmd_unpack,
            "resume": cmd_resume, "kill": cmd_kill, "wlctl": cmd_wlctl,
            "wlctl-wait": cmd_wlctl_wait, "logs": cmd_logs, "cleanup": cmd_cleanup,
            "address": cmd_address,
            "quit": cmd_quit, "stats": cmd_stats, "show": cmd_show}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def run_command(a, drv: Driver) -> dict:
    """One parsed command → its reply (never raises)."""
    t0 = time.monotonic()
    try:
        res = {"cmd": a.cmd, "ok": True, **COMMANDS[a.cmd](a, drv)}
    except StepFailed as e:
        res = {"cmd": a.cmd, "ok": False, "error": _one_line(e.reason), "log": e.log,
               "rc": e.rc, **e.extra}
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        res = {"cmd": a.cmd, "ok": False, "error": _one_line(f"{a.cmd}: {type(e).__name__}: {e}"),
               "log": None}
    except Exception as e:  # noqa: BLE001 - a bug must not end the session: a reply, and stderr
        traceback.print_exc(file=sys.stderr)
        res = {"cmd": a.cmd, "ok": False, "log": None,
               "error": _one_line(f"{a.cmd}: internal error {type(e).__name__}: {e}")}
    res["wall_s"] = round(time.monotonic() - t0, 3)
    return res


def _split(line: str) -> list[str]:
    """shlex is pure Python and slow on a multi-MB --tar-b64 (minutes under TCG): lines
    without quotes or escapes split on whitespace, which is what shlex would do."""
    if any(c in line for c in "'\"\\#"):
        return shlex.split(line)
    return line.split()


def _serve_line(parser: argparse.ArgumentParser, line: str, drv: Driver) -> dict:
    t0 = time.monotonic()
    argv: list[str] = []
    try:
        argv = _split(line)
        with contextlib.redirect_stdout(io.StringIO()):  # --help must not reach the protocol
            a = parser.parse_args(argv)
        if a.cmd == "serve":
            raise UsageError("serve: already serving")
    except (UsageError, ValueError) as e:
        return {"cmd": argv[0] if argv else None, "ok": False,
                "error": _one_line(f"bad command line: {e}"), "log": None,
                "wall_s": round(time.monotonic() - t0, 3)}
    return run_command(a, drv)


class _Stop(BaseException):
    """SIGTERM/SIGHUP while waiting for a command: end the session (with the safety net)."""


def serve(base: str, role: str) -> int:
    """The command loop. stdout is the protocol: fd 1 is pointed at stderr so nothing else
    (a child, a stray print) can write a line the controller would misread."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    base = os.path.abspath(base)
    os.makedirs(base, exist_ok=True)
    drv = Driver(base, role)
    parser = build_parser(base)
    state = {"busy": False, "signal": None}

    def on_signal(signo, _frame):
        state["signal"] = signo
        if not state["busy"]:
            raise _Stop()
        # mid-command: it finishes (a dump killed halfway leaves a half-parasited process);
        # the loop stops after its reply

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    quit_ = False
    try:
        while state["signal"] is None:
            raw = sys.stdin.buffer.readline()
            if not raw:
                break
            line = raw.decode(errors="replace")  # a bad byte is a bad line, not the end
            if not line.strip():
                continue
            state["busy"] = True
            try:
                res = _serve_line(parser, line, drv)
                out.write(json.dumps(res, default=str) + "\n")
            except BrokenPipeError:
                break
            finally:
                state["busy"] = False
            if res.get("cmd") == "quit" and res.get("ok"):
                quit_ = True
                break
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if not quit_:
            done = drv.safety_net()
            print(f"criu_driver: session ended without quit "
                  f"({'signal ' + str(state['signal']) if state['signal'] else 'stdin closed'})"
                  f": {'; '.join(done) or 'nothing to undo'}", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        a = build_parser().parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    if a.cmd == "serve":
        return serve(a.base, a.role)
    res = run_command(a, Driver(getattr(a, "base", None), None))
    print(json.dumps(res, default=str), flush=True)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
