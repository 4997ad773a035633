#!/usr/bin/env python3
"""Ground truth for the dirty-rate tests: a program whose every write is logged with the instant
it landed, to compare with what the tracker counts in the window it reports.

Stdlib only (ctypes). Every write is a clock_gettime(CLOCK_MONOTONIC) *system call* whose result
the kernel stores into the page itself: the time is read and the page written inside one kernel
entry, where no ptrace-stop can fall between the two. So for any instant T at which the tracker
holds this process still, "the logged time is before T" is exactly "the write landed before T":
the ground truth has no bracket of its own. (The writer reads the value back from the page to
log it; only one thread ever writes a given page.)

Memory: one reservation (PROT_NONE, nothing else is ever placed in it) whose first --pages pages
are the main region, written K new distinct pages per tick per thread (--threads threads, each
its own pages). With --newmap-every N, thread 0 maps a new read-write piece of --newmap-pages
pages inside the reservation every N ticks and writes every other page of it, one per tick.
With --newmap-populate those pieces are mapped with MAP_POPULATE (every page in place at once,
none written); with --newmap-huge they are 2 MiB-aligned and advised MADV_HUGEPAGE before the
first write (which then puts a transparent huge page, 512 pages, in place where the kernel can).
With --churn-every N it also, every N ticks, replaces the oldest new piece with a fresh one
(mmap MAP_FIXED over it: the old pages are gone) or unmaps it (MAP_FIXED PROT_NONE), in turn.
With --spawn-every N it also starts, every N ticks, a short-lived thread that writes
--spawn-pages pages of its own (from the second half of the main region) and exits: threads
come and go through the window.

Protocol: prints "ready <base hex> <reservation bytes>" once every thread has written; on a line
(or EOF) on stdin it stops and prints one JSON object: {"writes": [[ns, addr], ...], "events":
[[ns_before, ns_after, kind, addr, npages], ...]}.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import sys
import threading
import time

PAGE = mmap.PAGESIZE
SYS_clock_gettime = 228  # x86_64
CLOCK_MONOTONIC = 1
PROT_NONE, PROT_RW = 0, 3
MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_NORESERVE, MAP_POPULATE = 0x02, 0x10, 0x20, 0x4000, 0x8000
MADV_HUGEPAGE = 14
HUGE = 2 << 20

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _mmap(addr: int | None, npages: int, prot: int, fixed: bool, populate: bool = False) -> int:
    flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | (MAP_FIXED if fixed else 0) | \
        (MAP_POPULATE if populate else 0)
    r = libc.mmap(addr, npages * PAGE, prot, flags, -1, 0)
    if r in (None, ctypes.c_void_p(-1).value) or (fixed and r != addr):
        raise OSError(ctypes.get_errno(), "mmap failed")
    return r


def write(addr: int) -> int:
    """Write page `addr` (the kernel stores the time into it); the time, in ns."""
    if libc.syscall(ctypes.c_long(SYS_clock_gettime), ctypes.c_long(CLOCK_MONOTONIC),
                    ctypes.c_void_p(addr)) != 0:
        raise OSError(ctypes.get_errno(), "clock_gettime")
    ts = (ctypes.c_int64 * 2).from_address(addr)
    return ts[0] * 1_000_000_000 + ts[1]


class Writer:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.size = a.reserve_pages * PAGE
        self.base = _mmap(None, a.reserve_pages, PROT_NONE, False)
        _mmap(self.base, a.pages, PROT_RW, True)
        self.next_free = self.base + a.pages * PAGE + 16 * PAGE  # new pieces go here
        self.stop = threading.Event()
        self.logs: list[list[tuple[int, int]]] = [[] for _ in range(a.threads)]
        self.events: list[tuple[int, int, str, int, int]] = []
        self.pieces: list[list[int]] = []  # [addr, npages, next page to write]
        self.churned = 0
        self.ticked = [threading.Event() for _ in range(a.threads)]
        half = a.pages // 2 if a.spawn_every else a.pages
        self.mine = [range(t, half, a.threads) for t in range(a.threads)]
        self.spawn_next = half  # the next page a spawned thread takes
        self.spawned: list[threading.Thread] = []

    def _spawn(self) -> None:
        first, n = self.spawn_next, self.a.spawn_pages
        if first + n > self.a.pages:
            return
        self.spawn_next += n
        log: list[tuple[int, int]] = []
        self.logs.append(log)  # (list.append: atomic under the GIL)

        def short_lived() -> None:
            for i in range(first, first + n):
                addr = self.base + i * PAGE
                log.append((write(addr), addr))

        t = threading.Thread(target=short_lived)
        t.start()
        self.spawned.append(t)

    def _new_piece(self) -> None:
        n = self.a.newmap_pages
        addr = self.next_free
        if self.a.newmap_huge:
            addr = -(-addr // HUGE) * HUGE
        if addr + n * PAGE > self.base + self.size:
            return
        self.next_free = addr + (n + 1) * PAGE  # a PROT_NONE page between pieces: no VMA merging
        t0 = time.monotonic_ns()
        _mmap(addr, n, PROT_RW, True, populate=self.a.newmap_populate)
        if self.a.newmap_huge and libc.madvise(addr, n * PAGE, MADV_HUGEPAGE) != 0:
            raise OSError(ctypes.get_errno(), "madvise(MADV_HUGEPAGE)")
        self.events.append((t0, time.monotonic_ns(), "map", addr, n))
        self.pieces.append([addr, n, 0])

    def _churn(self) -> None:
        if not self.pieces:
            return
        addr, n, _ = self.pieces.pop(0)
        kind = "replace" if self.churned % 2 == 0 else "unmap"
        self.churned += 1
        t0 = time.monotonic_ns()
        _mmap(addr, n, PROT_RW if kind == "replace" else PROT_NONE, True)
        self.events.append((t0, time.monotonic_ns(), kind, addr, n))
        if kind == "replace":
            self.pieces.append([addr, n, 0])

    def run(self, tid: int) -> None:
        a, log = self.a, self.logs[tid]
        mine = self.mine[tid]
        k = 0
        tick = 0
        while not self.stop.is_set():
            for _ in range(a.per_tick):
                addr = self.base + mine[k % len(mine)] * PAGE
                log.append((write(addr), addr))
                k += 1
            if tid == 0:
                if a.newmap_every and tick % a.newmap_every == 0:
                    self._new_piece()
                if a.churn_every and tick and tick % a.churn_every == 0:
                    self._churn()
                if a.spawn_every and tick % a.spawn_every == 0:
                    self._spawn()
                for p in self.pieces:  # every other page of each piece, one per tick
                    if p[2] < p[1]:
                        addr = p[0] + p[2] * PAGE
                        log.append((write(addr), addr))
                        p[2] += 2
            self.ticked[tid].set()
            tick += 1
            time.sleep(a.tick)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=16384)
    ap.add_argument("--reserve-pages", type=int, default=65536)
    ap.add_argument("--per-tick", type=int, default=10, help="new distinct pages per tick per thread")
    ap.add_argument("--tick", type=float, default=0.01, help="seconds between ticks")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--newmap-every", type=int, default=0)
    ap.add_argument("--newmap-pages", type=int, default=32)
    ap.add_argument("--newmap-populate", action="store_true", help="map new pieces MAP_POPULATE")
    ap.add_argument("--newmap-huge", action="store_true",
                    help="2 MiB-align new pieces and advise MADV_HUGEPAGE before writing them")
    ap.add_argument("--churn-every", type=int, default=0)
    ap.add_argument("--spawn-every", type=int, default=0)
    ap.add_argument("--spawn-pages", type=int, default=8)
    a = ap.parse_args()
    w = Writer(a)
    ts = [threading.Thread(target=w.run, args=(i,), daemon=True) for i in range(a.threads)]
    for t in ts:
        t.start()
    for e in w.ticked:
        e.wait()
    print(f"ready {w.base:x} {w.size}", flush=True)
    sys.stdin.readline()
    w.stop.set()
    for t in ts + w.spawned:
        t.join()
    writes = sorted(x for log in w.logs for x in log)
    json.dump({"writes": writes, "events": w.events}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
