#!/usr/bin/env python3
"""Dirty-page tracker: which pages of a process were written between two scans.

Node-side payload: python3 stdlib + ctypes (numpy used when importable). Never imports labkit.
Runs as `python3 tracker.py {probe,track,dirty-rate} ...` or as `labkit.payloads.tracker`.

Backends (best first; `auto` picks the first that works for the target):
  uffd       userfaultfd async write-protect + PAGEMAP_SCAN (Linux >= 6.7). The uffd is created
             inside the target by ptrace-injecting userfaultfd() and copied out with
             pidfd_getfd(), so the target needs no cooperation. Exact, atomic per page.
  softdirty  clear_refs "4" + pagemap bit 55. Read-and-clear is made atomic by holding every
             thread of the target in a ptrace-stop for the (short) scan.
  compare    process_vm_readv into a copy + page compare with the previous round's copy. Needs
             nothing from the kernel; sees changed content rather than writes.

Library API:
    probe(pid) -> {"uffd": {"ok", "reason"}, "softdirty": {...}, "compare": {...}}
    t = open_tracker(pid, backend="auto", ranges=None); t.start(); r = t.scan(); t.close()
    r.pages (sorted array('Q') of page addresses: what a copy must take, a new mapping whole),
    r.written_pages (the pages known written: a new mapping's populated pages only),
    r.lower / r.upper (why written_pages may miss or over-count), r.maybe (pages of
    written_pages that may have been filled without a write: MAP_POPULATE, THP), r.per_mapping,
    r.new_mappings, r.dropped_mappings, r.seconds
    with t.hold(): ...   (every thread of the target stopped for the body)
    DirtyRate(t): arm(), round(final=...), report() -- the dirty-rate measurement

A target may exit at any moment (while the tracker attaches, between rounds, in the middle of a
scan or of re-protecting pages): open_tracker/start/scan then raise TargetGone, never whatever
the kernel said first (ESRCH, EPERM from ptrace, an empty /proc/PID/maps...), and a round that
overlapped the exit is never returned. The rounds before it stand.

CLI exit codes: 0 done; 1 the tracker cannot work on this target (JSON {"pid", "error"}: one
line saying why, e.g. "pid 7: no tracking backend works: uffd: ptrace(...) denied: ..."); 2 usage;
3 the target exited or never existed: stdout ends, after the rounds so far, with one JSON line
{"gone": true, "rounds": N, "error": "pid 4242 exited after 3 rounds", ...}; for dirty-rate that
line is the partial measurement (the part of the window before the exit).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import ctypes
import errno
import json
import mmap
import os
import sys
import threading
import time
from array import array
from dataclasses import dataclass, field

if __package__:
    from . import pagemap as pm
    from . import ptrace_inject as pti
else:  # run as a script: siblings live next to this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import pagemap as pm  # type: ignore[no-redef]
    import ptrace_inject as pti  # type: ignore[no-redef]

np = pm.np
PAGE = pm.PAGE
BACKENDS = ("uffd", "softdirty", "compare")


class TrackerError(OSError):
    """The tracker cannot work on this target (reason in the message)."""


class TargetGone(ProcessLookupError):
    """The target process exited: what was measured before stands, nothing after it."""


class NoProcess(TargetGone):
    """There was no such process when the tracker opened."""


EXIT_GONE = 3  # CLI exit code: the target exited (or never existed); see the module docstring


def populated_note(n: int) -> str:
    """Why `n` counted pages may not have been written (see ScanResult.maybe)."""
    return (f"{n} {'page' if n == 1 else 'pages'} counted as written held data (zero-filled, "
            "or in a file-backed mapping) when a mapping that appeared in the window was first "
            "seen, and may have been put there without a write (MAP_POPULATE, the rest of a "
            "transparent huge page)")


WHOLE_NEW = ("mappings that appeared in the window are counted whole (%s cannot tell which of "
             "their pages were written)")


@dataclass
class ScanResult:
    pages: array  # sorted, unique page-aligned addresses (array('Q'))
    per_mapping: dict[str, int]  # mapping label -> dirty pages (only labels with > 0)
    new_mappings: int  # mapping pieces that appeared since the last scan (counted wholly dirty)
    dropped_mappings: int  # tracked ranges that vanished (munmap, mprotect to read-only)
    seconds: float  # time the scan took
    backend: str = ""
    new_pages: int = 0  # pages counted dirty because their mapping is new (or re-registered)
    tracked_pages: int = 0  # size of the tracked set, in pages
    notes: list[str] = field(default_factory=list)
    new_ranges: list[tuple[int, int]] = field(default_factory=list)  # the new_pages, merged
    # `pages` is what a copy must take (a new mapping whole); `written` the pages known to have
    # been written since the previous scan (a new mapping: only its pages that hold data), for
    # a measurement that claims writes. None: the same as `pages`.
    written: array | None = None
    lower: list[str] = field(default_factory=list)  # why writes may be missing from `written`
    upper: list[str] = field(default_factory=list)  # why `written` may hold unwritten pages
    # pages of `written` that held data when their (new) mapping was first seen and may have
    # been put there without a write (MAP_POPULATE, a transparent huge page): sorted, unique
    maybe: array = field(default_factory=lambda: array("Q"))

    @property
    def maybe_note(self) -> str:
        """The `upper` reason the `maybe` pages give ("" when there are none)."""
        return populated_note(len(self.maybe)) if len(self.maybe) else ""

    @property
    def written_pages(self) -> array:
        return self.pages if self.written is None else self.written

    def to_json(self, addresses: bool = False) -> dict:
        d = {
            "pages": len(self.pages),
            "per_mapping": self.per_mapping,
            "new_mappings": self.new_mappings,
            "dropped_mappings": self.dropped_mappings,
            "scan_ms": round(self.seconds * 1000, 3),
            "backend": self.backend,
            "new_pages": self.new_pages,
            "tracked_pages": self.tracked_pages,
            "populated_pages": len(self.maybe),
        }
        if self.notes:
            d["notes"] = self.notes
        if addresses:
            d["addresses"] = [f"{a:#x}" for a in self.pages]
        return d


def _open_pidfd(pid: int) -> int:
    """A pidfd for `pid` (-1 where the kernel has none: /proc alone then tells)."""
    try:
        return pti.pidfd_open(pid)
    except OSError as e:
        if e.errno == errno.ESRCH:
            raise NoProcess(errno.ESRCH, f"no process {pid}") from e
        return -1


# ----------------------------------------------------------------------------------------------
class Tracker:
    """Common part: follows the target's writable private mappings (clipped to `ranges`)."""

    backend = "?"
    unseen = ""  # writes this backend cannot see at all, in words ("" : it sees every write)

    def __init__(self, pid: int, ranges: list[tuple[int, int]] | None = None):
        self.pid = pid
        self.ranges = pm.merge([(int(s), int(e)) for s, e in ranges]) if ranges else None
        for s, e in self.ranges or ():
            if s % PAGE or e % PAGE:
                raise ValueError(f"range [{s:#x}, {e:#x}) is not page-aligned")
        self.pieces: list[tuple[int, int, str]] = []  # tracked (start, end, label), sorted
        self.started = False
        self.closed = False
        self.auto_reasons: dict[str, str] = {}
        self._held = False
        self.pidfd = _open_pidfd(pid)

    # -- the target's life --
    def gone(self) -> bool:
        """Has the target exited (or is it exiting)? Its pidfd says so even after the pid has
        been reused by another process."""
        return pti.exiting(self.pid, self.pidfd)

    def wait_exit(self, timeout: float) -> bool:
        """Sleep up to `timeout` s, waking at once if the target exits; True if it has."""
        if self.pidfd >= 0:
            return pti.pidfd_exited(self.pidfd, timeout)
        time.sleep(timeout)
        return self.gone()

    @contextlib.contextmanager
    def hold(self, required: bool = True):
        """Every thread of the target held in a ptrace-stop for the body (nested: the outer
        hold counts), so nothing it does can fall inside a read-and-clear or across an instant
        the caller reads the clock at. Yields whether the target is held: with
        required=False a target that may not be stopped (already traced, ptrace refused)
        yields False instead of raising (`hold_error` says why)."""
        if self._held:
            yield True
            return
        freezer = None
        try:
            with self._watch():
                freezer = pti.Freezer(self.pid)
        except TargetGone:
            raise
        except OSError as e:
            if required:
                raise
            self.hold_error = _reason(self.pid, e)
        if freezer is None:
            yield False
            return
        self._held = True
        try:
            yield True
        finally:
            self._held = False
            freezer.close()

    hold_error = ""

    @contextlib.contextmanager
    def _watch(self):
        """A failure while the target exits is its exit: whatever the kernel said (ESRCH from
        PAGEMAP_SCAN, EPERM from ptrace, EBADF from pidfd_getfd...) becomes TargetGone."""
        try:
            yield
        except TargetGone:
            raise
        except OSError as e:
            if self.gone():
                raise TargetGone(errno.ESRCH, f"pid {self.pid} exited") from e
            raise

    def _alive_after(self) -> None:
        """After a step that succeeded: if the target is now exiting, its address space may
        have been torn down under the step (maps read empty, a register or clear_refs that did
        nothing), so the step's answer is not one to report."""
        if self.gone():
            raise TargetGone(errno.ESRCH, f"pid {self.pid} exited")

    # -- mapping bookkeeping --
    _mq: pm.MapsQuery | None = None

    def _read_maps(self) -> list[pm.Vma]:
        """The VMAs that matter: all of them, or (with ranges) those intersecting the ranges."""
        try:
            if self.ranges:
                if self._mq is None:
                    self._mq = pm.MapsQuery(self.pid)
                if self._mq.ok:
                    out: list[pm.Vma] = []
                    for lo, hi in self.ranges:
                        for v in self._mq.query(lo, hi):
                            if not out or v.start >= out[-1].end:
                                out.append(v)
                    return out
            return pm.read_maps(self.pid)
        except FileNotFoundError as e:
            raise TargetGone(errno.ESRCH, f"pid {self.pid} exited") from e
        except ProcessLookupError as e:
            raise TargetGone(errno.ESRCH, f"pid {self.pid} exited") from e

    def _diff(self):
        """Re-read the maps; returns (vmas, added pieces, number of dropped intervals) and
        updates self.pieces to the surviving old pieces (added ones are NOT yet included)."""
        vmas = self._read_maps()
        cur = pm.writable_pieces(vmas, self.ranges)
        cur_cov = pm.merge([(s, e) for s, e, _ in cur])
        old_cov = pm.merge([(s, e) for s, e, _ in self.pieces])
        added_iv = pm.subtract(cur_cov, old_cov)
        removed_iv = pm.subtract(old_cov, cur_cov)
        added = []
        if added_iv:
            starts = [a for a, _ in added_iv]
            for s, e, label in cur:
                i = max(0, bisect.bisect_right(starts, s) - 1)
                while i < len(added_iv) and added_iv[i][0] < e:
                    a, b = added_iv[i]
                    lo, hi = max(a, s), min(b, e)
                    if lo < hi:
                        added.append((lo, hi, label))
                    i += 1
        if removed_iv:
            kept = []
            for s, e, label in self.pieces:
                for a, b in pm.subtract([(s, e)], removed_iv):
                    kept.append((a, b, label))
            self._drop([iv for iv in removed_iv])
            self.pieces = kept
        return vmas, added, len(removed_iv)

    def _drop(self, removed: list[tuple[int, int]]) -> None:
        """Hook: ranges that vanished."""

    def _per_mapping(self, pages) -> dict[str, int]:
        if not len(pages) or not self.pieces:
            return {}
        starts = [s for s, _, _ in self.pieces]
        out: dict[str, int] = {}
        if np is not None:
            p = np.frombuffer(pages, dtype=np.uint64) if isinstance(pages, array) else pages
            idx = np.searchsorted(np.asarray(starts, dtype=np.uint64), p, side="right") - 1
            counts = np.bincount(idx[idx >= 0], minlength=len(starts))
            for (_s, _e, label), c in zip(self.pieces, counts.tolist()):
                if c:
                    out[label] = out.get(label, 0) + c
            return out
        for a in pages:
            i = bisect.bisect_right(starts, a) - 1
            if i >= 0:
                label = self.pieces[i][2]
                out[label] = out.get(label, 0) + 1
        return out

    def _result(self, chunks, t0, new, dropped, new_ranges, unique, notes=None,
                written=None, upper=None, maybe=None) -> ScanResult:
        pages = pm.concat(chunks)
        if unique or (np is None and len(chunks) > 1):
            pages = pm.to_array_q(pages)
        elif np is not None:
            a = array("Q")
            a.frombytes(pages.astype(np.uint64, copy=False).tobytes())
            pages = a
        self.pieces.sort()
        lower = []
        if dropped:
            ranges = "tracked range was" if dropped == 1 else "tracked ranges were"
            lower.append(f"{dropped} {ranges} unmapped, replaced or made read-only "
                         "between two scans: writes to them after the earlier scan are not seen")
        maybe_a = pm.to_array_q(pm.concat(maybe)) if maybe else array("Q")
        upper = list(upper or [])
        if len(maybe_a):
            upper.append(populated_note(len(maybe_a)))
        return ScanResult(
            maybe=maybe_a,
            written=None if written is None else pm.to_array_q(pm.concat(written)),
            lower=lower,
            upper=upper,
            pages=pages,
            per_mapping=self._per_mapping(pages),
            new_mappings=new,
            dropped_mappings=dropped,
            seconds=time.perf_counter() - t0,
            backend=self.backend,
            new_pages=pm.page_count(new_ranges),
            tracked_pages=sum((e - s) // PAGE for s, e, _ in self.pieces),
            notes=notes or [],
            new_ranges=new_ranges,
        )

    # -- API --
    def start(self) -> None:
        """Arm: from now on, writes show in the next scan."""
        with self._watch():
            self._start()
        self._alive_after()
        self.started = True

    def scan(self) -> ScanResult:
        """Pages written since the previous scan (or start); TargetGone once the target exits."""
        if not self.started:
            raise RuntimeError("scan() before start()")
        with self._watch():
            r = self._scan()
        self._alive_after()
        return r

    def _start(self) -> None:
        raise NotImplementedError

    def _scan(self) -> ScanResult:
        raise NotImplementedError

    def close(self) -> None:
        if self._mq is not None:
            self._mq.close()
            self._mq = None
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
def _anonymous(vmas: list[pm.Vma] | None, addr: int) -> bool:
    """Is `addr` in an anonymous VMA (no file behind it: inode 0)? Unknown counts as not, the
    cautious answer for _register."""
    if not vmas:
        return False
    i = bisect.bisect_right([v.start for v in vmas], addr) - 1
    return i >= 0 and vmas[i].start <= addr < vmas[i].end and vmas[i].inode == 0


def create_target_uffd(pid: int) -> int:
    """A userfaultfd created in `pid`'s mm, as a file descriptor of this process."""
    if pid == os.getpid():
        return pm.local_userfaultfd()
    with pti.Injector(pid) as inj:
        rfd = inj.syscall(pti.SYS_userfaultfd, pm.UFFD_FLAGS)
        try:
            return pti.pidfd_getfd(pid, rfd)
        finally:
            inj.syscall(pti.SYS_close, rfd)


class UffdTracker(Tracker):
    backend = "uffd"

    def __init__(self, pid: int, ranges=None):
        super().__init__(pid, ranges)
        self.uffd = None
        self.scanner = None
        self.unregistered: list[tuple[int, int]] = []  # pieces registration refused: always dirty
        try:
            with self._watch():
                self._attach()
            self._alive_after()
        except BaseException:
            self.close()
            raise

    def _attach(self) -> None:
        pid = self.pid
        try:
            fd = create_target_uffd(pid)
        except FileNotFoundError as e:
            raise TargetGone(errno.ESRCH, f"pid {pid} exited") from e
        self.uffd = pm.Uffd(fd)
        try:
            self.uffd.api(pm.UFFD_FEATURES)
        except OSError:
            # kernels without hugetlbfs/shmem wp: anonymous + file-private still work
            self.uffd.close()
            self.uffd = pm.Uffd(create_target_uffd(pid))
            self.uffd.api(pm.UFFD_FEATURE_WP_ASYNC | pm.UFFD_FEATURE_WP_UNPOPULATED)
        need = pm.UFFD_FEATURE_WP_ASYNC | pm.UFFD_FEATURE_WP_UNPOPULATED
        if self.uffd.features & need != need:
            raise TrackerError(errno.ENOTSUP, "kernel lacks UFFD_FEATURE_WP_ASYNC/WP_UNPOPULATED")
        self.scanner = pm.PagemapScanner(pid)

    def _register(self, s: int, e: int, written: list | None = None, maybe: list | None = None,
                  anon: bool = True) -> bool:
        """Register and write-protect [s, e). With `written` (a range that appeared since the
        previous scan), append the pages that already hold data: those populated before the
        protection (present or swapped: the first look) and those populated between that look
        and the protection (present after it; markers of empty entries read as swapped by
        then, hence present only); those of them that may hold data without having been
        written go to `maybe` as well.

        Holding data is not having been written: MAP_POPULATE fills a whole mapping, and the
        first write to a 2 MiB region that may take a transparent huge page (MADV_HUGEPAGE,
        THP "always") puts 512 pages in place. No kernel state tells these apart from written
        pages: PAGE_IS_WRITTEN is "not write-protected", true of every page of a range not yet
        protected; a new VMA is soft-dirty as a whole; PAGE_IS_HUGE is lost when the huge page
        is split (an async write-protect fault splits it). Content does tell, for anonymous
        memory (`anon`): its pages start zero-filled, so one holding a nonzero byte was written.
        So: in an anonymous mapping a page holding data is written if nonzero, else maybe; in
        a file-backed one (a copied page holds the file's bytes) a page of the first look is
        maybe, one that appeared only after it was put there by a write fault (the protection
        allocates page tables for the markers, so no huge page forms after it)."""
        try:
            self.uffd.register_wp(s, e)
            if written is not None:
                first = self.scanner.populated(s, e)
            self.uffd.writeprotect(s, e)
            if written is not None:
                then = self.scanner.populated(s, e, swapped=False)
        except OSError:
            return False
        if written is None:
            return True
        first_a = pm.to_array_q(pm.concat(first))
        then_a = pm.to_array_q(pm.concat(then))
        if anon:
            if self._reader is None:
                self._reader = pm.VmReader(self.pid)
            sure, unsure = pm.split_by_content(self._reader, pm.union(first_a, then_a))
            if len(unsure) and (gone := self._gone(s, e)):
                # replaced or unmapped between the first look and the read: what such a page
                # held is gone, so nothing says it was written; like any page of a mapping
                # that went in the window it is not counted (the churn note: a lower bound)
                unsure = pm.difference(unsure, pm.pages_of(gone))
        else:
            sure, unsure = pm.difference(then_a, first_a), first_a
        written.extend((sure, unsure))
        if maybe is not None and len(unsure):
            maybe.append(unsure)
        return True

    _reader: pm.VmReader | None = None

    def _gone(self, s: int, e: int) -> list[tuple[int, int]]:
        """Parts of [s, e), registered just now, that are no longer a registered mapping (a new
        mapping over a range carries no registration). Read only when zero-filled pages make
        it matter: smaps is slow."""
        try:
            vflags = pm.vma_flags_list(self.pid)
        except FileNotFoundError:
            return [(s, e)]
        kept = [(max(v.start, s), min(v.end, e)) for v, flags in vflags
                if "uw" in flags and v.start < e and v.end > s]
        return pm.subtract([(s, e)], pm.merge(kept))

    def _add(self, pieces, written: list | None = None, maybe: list | None = None,
             vmas: list[pm.Vma] | None = None) -> list:
        """Register + protect new pieces; returns their ranges (to copy whole). With
        `written`, appends their pages that hold data, and to `maybe` those that may not have
        been written (see _register; `vmas` tells anonymous pieces from file-backed)."""
        out = []
        for s, e, label in pieces:
            if not self._register(s, e, written, maybe, _anonymous(vmas, s)):
                self.unregistered.append((s, e))
            self.pieces.append((s, e, label))
            out.append((s, e))
        return out

    def _drop(self, removed) -> None:
        if self.unregistered:
            self.unregistered = pm.subtract(pm.merge(self.unregistered), removed)

    def _start(self) -> None:
        _, added, _ = self._diff()
        self._add(added)
        self.pieces.sort()

    def _runs(self, vmas) -> list[tuple[int, int]]:
        """Tracked, registered ranges merged over holes (never over an untracked VMA)."""
        unreg = pm.merge(self.unregistered)
        iv = pm.subtract(pm.merge([(s, e) for s, e, _ in self.pieces]), unreg)
        if not iv:
            return []
        vstarts = [v.start for v in vmas]
        runs = [list(iv[0])]
        for s, e in iv[1:]:
            g0, g1 = runs[-1][1], s
            # with ranges we only know the VMAs inside them: never merge over the outside
            blocked = bool(self.ranges) and bool(pm.subtract([(g0, g1)], self.ranges))
            i = bisect.bisect_right(vstarts, g0) - 1
            for j in (i, i + 1):
                if 0 <= j < len(vmas) and vmas[j].start < g1 and vmas[j].end > g0:
                    blocked = True
            if blocked:
                runs.append([s, e])
            else:
                runs[-1][1] = e
        return [(s, e) for s, e in runs]

    def _repair(self, s: int, e: int, counters: dict) -> list[tuple[int, int]]:
        """After EPERM in [s, e): re-register tracked VMAs that lost registration (replaced by
        munmap+mmap), track new writable VMAs that appeared; returns the sub-ranges of [s, e)
        that are safe to scan again."""
        try:
            vflags = pm.vma_flags_list(self.pid)
        except FileNotFoundError as ex:
            raise TargetGone(errno.ESRCH, f"pid {self.pid} exited") from ex
        bad = []
        tracked = pm.merge([(a, b) for a, b, _ in self.pieces])
        for v, flags in vflags:
            if v.end <= s or v.start >= e or "uw" in flags:
                continue
            lo, hi = max(v.start, s), min(v.end, e)
            want = pm.writable_pieces([v], self.ranges)
            want = [(max(a, lo), min(b, hi), lab) for a, b, lab in want if max(a, lo) < min(b, hi)]
            for a, b, lab in want:
                was = pm.subtract([(a, b)], pm.subtract([(a, b)], tracked))
                if self._register(a, b, counters["written"], counters["maybe"], v.inode == 0):
                    if was:
                        counters["dropped"] += 1
                    else:
                        self.pieces.append((a, b, lab))
                    counters["new"] += 1
                    counters["dirty"].append((a, b))
                else:
                    bad.append((a, b))
                    if not was:
                        self.pieces.append((a, b, lab))
                    self.unregistered.append((a, b))
                    counters["dirty"].append((a, b))
            covered = pm.merge([(a, b) for a, b, _ in want])
            bad.extend(pm.subtract([(lo, hi)], covered))  # not ours to scan (read-only etc.)
        return pm.subtract([(s, e)], pm.merge(bad))

    def _scan_range(self, s: int, e: int, chunks: list, counters: dict, depth: int = 0) -> None:
        try:
            chunks.extend(self.scanner.scan(s, e))
        except pm.ScanEPERM as ex:
            chunks.extend(ex.partial)
            counters["unique"] = True
            if depth >= 4:
                raise TrackerError(errno.EPERM, f"PAGEMAP_SCAN keeps failing in [{s:#x}, {e:#x})") from ex
            for a, b in self._repair(s, e, counters):
                self._scan_range(a, b, chunks, counters, depth + 1)

    def _scan(self) -> ScanResult:
        t0 = time.perf_counter()
        vmas, added, dropped = self._diff()
        new_written: list = []
        maybe: list = []
        fresh = self._add(added, new_written, maybe, vmas)
        counters = {"new": len(added), "dropped": dropped, "dirty": list(fresh), "unique": False,
                    "written": new_written, "maybe": maybe}
        chunks: list = []
        for s, e in self._runs(vmas):
            self._scan_range(s, e, chunks, counters)
        if maybe:  # written after the protection (found by this scan): written, surely
            maybe = [pm.difference(pm.concat(maybe), pm.concat(chunks))]
        unreg = pm.merge(self.unregistered)
        always = pm.subtract(unreg, pm.merge(counters["dirty"]))
        notes, upper = [], []
        if self.unregistered:
            notes.append(f"{pm.page_count(unreg)} pages in ranges that refused "
                         "uffd registration are reported dirty every round")
            upper.append(f"{pm.page_count(unreg)} pages in ranges that refused uffd "
                         "registration are counted as written every round")
        extra = pm.merge(counters["dirty"] + always)
        written = None
        if extra:  # what was written differs from what a copy takes: list it apart
            written = [*chunks, *counters["written"], pm.pages_of(unreg)]
            chunks.append(pm.pages_of(extra))
        unique = counters["unique"] or bool(extra)
        return self._result(chunks, t0, counters["new"], counters["dropped"],
                            pm.merge(counters["dirty"]), unique, notes, written, upper, maybe)

    def close(self) -> None:
        if self.scanner is not None:
            self.scanner.close()
            self.scanner = None
        if self.uffd is not None:
            self.uffd.close()  # last reference: the kernel drops the registration
            self.uffd = None
        super().close()


# ----------------------------------------------------------------------------------------------
class _Slot:
    """Per-thread compare state: a pre-faulted scratch chunk and its process_vm_readv iovecs."""

    def __init__(self, pid: int, chunk: int):
        self.reader = pm.VmReader(pid)
        self.scratch = pm.anon_buffer(chunk)
        self.addr = pm.buffer_address(self.scratch)
        if np is not None:
            self.rows = np.frombuffer(self.scratch, dtype=np.uint64).reshape(-1, PAGE // 8)
            self.ne = np.empty(self.rows.shape, dtype=bool)
        self.out: list = []
        self.unreadable = 0
        self.error: BaseException | None = None


class CompareTracker(Tracker):
    """Keeps a copy of the tracked memory; a page is dirty when its content changed.

    Each round reads the tracked memory in 4 MiB chunks with process_vm_readv into a cache-hot
    scratch buffer and memcmp()s it with the copy (measured faster than numpy here: one pass, no
    temporary); only chunks that differ are narrowed to pages (numpy (a != b).any(axis=1) when
    available, else memcmp per 64 KiB block and page) and their changed pages copied into the
    copy. Large targets are split over threads (the GIL is released in both calls)."""

    backend = "compare"
    unseen = ("compare sees pages whose content changed: a write that leaves a page's bytes as "
              "they were is not seen")
    DEFAULT_CHUNK = 4 << 20  # per thread: read + compare while the chunk is still in cache (L3)
    PARALLEL_MIN = 32 << 20  # split over threads above this many tracked bytes

    def __init__(self, pid: int, ranges=None, chunk: int = DEFAULT_CHUNK, threads: int | None = None):
        super().__init__(pid, ranges)
        self.reader = pm.VmReader(pid)
        self.chunk = chunk
        self.threads = threads or max(1, min(4, len(os.sched_getaffinity(0))))
        self.slots: list[_Slot] = []
        self.store: dict[int, tuple[int, mmap.mmap]] = {}  # piece start -> (end, copy)
        self.unreadable = 0
        try:  # fail early (EPERM, ESRCH) rather than at the first scan
            with self._watch():
                try:
                    self._read_maps()
                    with open(f"/proc/{pid}/mem", "rb"):
                        pass
                except PermissionError as e:
                    raise TrackerError(errno.EPERM, f"cannot read the memory of pid {pid}: "
                                       f"{e.strerror}: {e.filename}") from e
            self._alive_after()
        except BaseException:
            self.close()
            raise

    def _copy_in(self, s: int, e: int) -> None:
        buf = pm.anon_buffer(e - s)
        addr = pm.buffer_address(buf)
        off = 0
        while off < e - s:
            try:
                got = self.reader.read_into(addr + off, s + off, min(64 << 20, e - s - off))
            except OSError as ex:
                if ex.errno == errno.ESRCH:
                    raise TargetGone(errno.ESRCH, f"pid {self.pid} exited") from ex
                got = 0
            off += got if got else PAGE  # unreadable page: leave zeros
            off -= off % PAGE
        self.store[s] = (e, buf)

    def _drop(self, removed) -> None:
        for s in list(self.store):
            e, buf = self.store[s]
            parts = pm.subtract([(s, e)], removed)
            if parts == [(s, e)]:
                continue
            del self.store[s]
            for a, b in parts:
                nb = pm.anon_buffer(b - a)
                nb[:] = buf[a - s : b - s]
                self.store[a] = (b, nb)
            buf.close()

    def _add(self, pieces) -> list:
        for s, e, label in pieces:
            self._copy_in(s, e)
            self.pieces.append((s, e, label))
        return [(s, e) for s, e, _ in pieces]

    def _start(self) -> None:
        _, added, _ = self._diff()
        self._add(added)
        self.pieces.sort()

    def _work(self, slot: _Slot, jobs: list, first: int, step: int) -> None:
        try:
            for i in range(first, len(jobs), step):
                self._compare_chunk(slot, *jobs[i])
        except BaseException as e:  # handed to the caller
            slot.error = e

    def _compare_chunk(self, slot: _Slot, remote: int, n: int, local: int, rows, r0: int) -> None:
        off = 0
        while off < n:
            want = n - off
            try:
                got = slot.reader.read_into(slot.addr, remote + off, want)
            except OSError as ex:
                if ex.errno == errno.ESRCH:
                    raise TargetGone(errno.ESRCH, f"pid {self.pid} exited") from ex
                got = 0
            got -= got % PAGE
            if got and pm.memcmp(slot.addr, local + off, got):
                k = got // PAGE
                if np is not None:
                    a = slot.rows[:k]
                    b = rows[r0 + off // PAGE : r0 + off // PAGE + k]
                    idx = np.flatnonzero(np.not_equal(a, b, out=slot.ne[:k]).any(axis=1))
                    b[idx] = a[idx]
                    slot.out.append(np.uint64(remote + off) + idx.astype(np.uint64) * np.uint64(PAGE))
                else:
                    self._narrow(slot, local + off, remote + off, got)
            if got < want:  # an unreadable page (e.g. file hole past EOF): skip it
                slot.unreadable += 1
                got += PAGE
            off += got

    @staticmethod
    def _narrow(slot: _Slot, local: int, remote: int, n: int) -> None:
        blk = 64 << 10
        out = array("Q")
        for o in range(0, n, blk):
            m = min(blk, n - o)
            if pm.memcmp(slot.addr + o, local + o, m) == 0:
                continue
            for p in range(o, o + m, PAGE):
                if pm.memcmp(slot.addr + p, local + p, PAGE):
                    ctypes.memmove(local + p, slot.addr + p, PAGE)
                    out.append(remote + p)
        if out:
            slot.out.append(out)

    def _compare(self, old: list) -> list:
        jobs = []
        total = 0
        for s, (e, buf) in old:
            local = pm.buffer_address(buf)
            rows = np.frombuffer(buf, dtype=np.uint64).reshape(-1, PAGE // 8) if np is not None else None
            for off in range(0, e - s, self.chunk):
                jobs.append((s + off, min(self.chunk, e - s - off), local + off, rows, 0))
                if rows is not None:
                    jobs[-1] = (s + off, min(self.chunk, e - s - off), local + off, rows, off // PAGE)
            total += e - s
        n = self.threads if total >= self.PARALLEL_MIN else 1
        while len(self.slots) < n:
            self.slots.append(_Slot(self.pid, self.chunk))
        slots = self.slots[:n]
        for sl in slots:
            sl.out, sl.error, sl.unreadable = [], None, 0
        if n == 1:
            self._work(slots[0], jobs, 0, 1)
        else:
            ts = [threading.Thread(target=self._work, args=(sl, jobs, i, n), daemon=True)
                  for i, sl in enumerate(slots)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        chunks = []
        for sl in slots:
            if sl.error is not None:
                raise sl.error
            chunks.extend(sl.out)
            self.unreadable += sl.unreadable
        return chunks

    def _scan(self) -> ScanResult:
        t0 = time.perf_counter()
        _, added, dropped = self._diff()
        old = sorted((s, self.store[s]) for s, _, _ in self.pieces if s in self.store)
        fresh = self._add(added)
        chunks = self._compare(old)
        if fresh:
            chunks.append(pm.pages_of(fresh))
        notes = [f"{self.unreadable} unreadable pages skipped"] if self.unreadable else []
        unique = bool(fresh) or len(chunks) > 1
        upper = [WHOLE_NEW % "compare"] if fresh else []
        return self._result(chunks, t0, len(added), dropped, pm.merge(fresh), unique, notes,
                            upper=upper)

    def close(self) -> None:
        for _, buf in self.store.values():
            try:
                buf.close()
            except BufferError:
                pass
        self.store.clear()
        super().close()


# ----------------------------------------------------------------------------------------------
class SoftDirtyTracker(Tracker):
    """clear_refs "4" + pagemap bit 55; every thread is held in a ptrace-stop while the bits are
    read and cleared, so no write can fall between the read and the clear."""

    backend = "softdirty"

    def __init__(self, pid: int, ranges=None):
        super().__init__(pid, ranges)
        self.pm_fd = -1
        self.clear_path = f"/proc/{pid}/clear_refs"
        try:
            ok, reason = softdirty_kernel_ok()
            if not ok:
                raise TrackerError(errno.ENOTSUP, reason)
            with self._watch():
                self.pm_fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            self._alive_after()
        except BaseException:
            self.close()
            raise

    def _clear(self) -> None:
        with open(self.clear_path, "w") as f:
            f.write("4")

    def _add(self, pieces) -> list:
        self.pieces.extend(pieces)
        return [(s, e) for s, e, _ in pieces]

    def _start(self) -> None:
        _, added, _ = self._diff()
        self._add(added)
        self.pieces.sort()
        with self.hold():
            self._clear()

    def _scan(self) -> ScanResult:
        t0 = time.perf_counter()
        chunks: list = []
        with self.hold():
            _, added, dropped = self._diff()
            old = [(s, e) for s, e, _ in self.pieces]
            fresh = self._add(added)
            for s, e in pm.merge(old):
                chunks.append(pm.soft_dirty_pages(pm.read_pagemap(self.pm_fd, s, e), s))
            self._clear()
        if fresh:
            chunks.append(pm.pages_of(fresh))
        upper = [WHOLE_NEW % "soft-dirty"] if fresh else []
        return self._result(chunks, t0, len(added), dropped, pm.merge(fresh), bool(fresh),
                            upper=upper)

    def close(self) -> None:
        if self.pm_fd >= 0:
            os.close(self.pm_fd)
            self.pm_fd = -1
        super().close()


# ----------------------------------------------------------------------------------------------
_softdirty_cache: tuple[bool, str] | None = None


def softdirty_kernel_ok() -> tuple[bool, str]:
    """Prove soft-dirty works: clear, check a page reads clean, write it, check the bit sets.
    (On kernels without CONFIG_MEM_SOFT_DIRTY the clear is silently accepted and the bit never
    sets.) Runs on this process's own page."""
    global _softdirty_cache
    if _softdirty_cache is not None:
        return _softdirty_cache
    buf = pm.anon_buffer(PAGE)
    addr = pm.buffer_address(buf)
    try:
        buf[0] = 1
        with open("/proc/self/clear_refs", "w") as f:
            f.write("4")
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            before = int(pm.read_pagemap(fd, addr, addr + PAGE)[0])
            buf[0] = 2
            after = int(pm.read_pagemap(fd, addr, addr + PAGE)[0])
        finally:
            os.close(fd)
        bit = 1 << pm.PM_SOFT_DIRTY_BIT
        if after & bit and not before & bit:
            res = (True, "soft-dirty bit clears on clear_refs and sets on write")
        elif not after & bit:
            res = (False, "kernel lacks soft-dirty (CONFIG_MEM_SOFT_DIRTY): pagemap bit 55 stays "
                          "clear after writing a page following clear_refs 4")
        else:
            res = (False, "soft-dirty bit does not clear on clear_refs 4")
    except OSError as e:
        res = (False, f"soft-dirty self-test failed: {e}")
    finally:
        del addr
        try:
            buf.close()
        except BufferError:
            pass
    _softdirty_cache = res
    return res


def _uffd_kernel_ok() -> tuple[bool, str]:
    """Self-test on this process: async uffd-wp + PAGEMAP_SCAN report exactly a written page."""
    try:
        fd = pm.local_userfaultfd()
    except OSError as e:
        why = {errno.ENOSYS: "kernel lacks userfaultfd (CONFIG_USERFAULTFD)",
               errno.EPERM: "userfaultfd denied (seccomp, or vm.unprivileged_userfaultfd=0)"}
        return False, why.get(e.errno, f"userfaultfd: {e}")
    uffd = pm.Uffd(fd)
    buf = pm.anon_buffer(2 * PAGE)
    addr = pm.buffer_address(buf)
    sc = None
    try:
        try:
            feats = uffd.api(pm.UFFD_FEATURE_WP_ASYNC | pm.UFFD_FEATURE_WP_UNPOPULATED)
        except OSError:
            return False, "kernel lacks UFFD_FEATURE_WP_ASYNC (needs Linux >= 6.7)"
        del feats
        uffd.register_wp(addr, addr + 2 * PAGE)
        uffd.writeprotect(addr, addr + 2 * PAGE)
        sc = pm.PagemapScanner(os.getpid(), vec_len=16)
        try:
            first = pm.concat(sc.scan(addr, addr + 2 * PAGE))
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOTTY):
                return False, "kernel lacks PAGEMAP_SCAN (needs Linux >= 6.7)"
            raise
        buf[PAGE] = 7
        second = pm.concat(sc.scan(addr, addr + 2 * PAGE))
        if len(first) == 0 and list(map(int, second)) == [addr + PAGE]:
            return True, "userfaultfd async write-protect + PAGEMAP_SCAN work"
        return False, f"uffd-wp self-test mismatch: {list(first)} / {list(second)}"
    except OSError as e:
        return False, f"uffd-wp self-test failed: {e}"
    finally:
        if sc is not None:
            sc.close()
        uffd.close()
        del addr
        try:
            buf.close()
        except BufferError:
            pass


def _reason(pid: int, e: OSError) -> str:
    """One line for why the tracker cannot work on `pid`: the kernel's words without the
    "[Errno N]" prefix, and for a refusal the likely cause (Yama, another tracer, uid...)."""
    text = e.strerror if e.strerror and not e.filename else str(e)
    if e.filename:
        text = f"{e.strerror}: {e.filename}"
    if e.errno in (errno.EPERM, errno.EACCES) and not isinstance(e, pti.InjectError):
        text += f" ({pti.ptrace_denied_reason(pid)})"
    return text


def _access_reason(pid: int, what: str, e: OSError) -> str:
    if e.errno == errno.ESRCH or isinstance(e, FileNotFoundError):
        return f"no process {pid}"
    if e.errno in (errno.EPERM, errno.EACCES):
        return f"{what}: {e.strerror} ({pti.ptrace_denied_reason(pid)})"
    return f"{what}: {e}"


def probe(pid: int) -> dict[str, dict]:
    """Which backends work for `pid` on this node, and why not."""
    out: dict[str, dict] = {}
    # uffd
    ok, reason = _uffd_kernel_ok()
    if ok:
        try:
            fd = create_target_uffd(pid)
            os.close(fd)
            reason = "userfaultfd created in the target by ptrace injection; async uffd-wp + PAGEMAP_SCAN work"
            try:
                os.close(os.open(f"/proc/{pid}/pagemap", os.O_RDONLY))
            except OSError as e:
                ok, reason = False, _access_reason(pid, "open pagemap", e)
        except pti.InjectError as e:
            ok = False
            if e.errno == errno.EPERM and "ptrace" in str(e):
                reason = str(e)
            elif e.errno in (errno.EPERM, errno.ENOSYS):
                reason = f"userfaultfd() in the target failed ({e.strerror}): seccomp or policy denies it"
            else:
                reason = _access_reason(pid, "ptrace injection", e)
        except OSError as e:
            ok, reason = False, _access_reason(pid, "uffd setup", e)
    out["uffd"] = {"ok": ok, "reason": reason}
    # softdirty
    ok, reason = softdirty_kernel_ok()
    if ok:
        try:
            os.close(os.open(f"/proc/{pid}/clear_refs", os.O_WRONLY))
            os.close(os.open(f"/proc/{pid}/pagemap", os.O_RDONLY))
            with pti.Freezer(pid):
                pass
        except OSError as e:
            ok, reason = False, _access_reason(pid, "softdirty access", e)
    out["softdirty"] = {"ok": ok, "reason": reason}
    # compare
    try:
        vmas = pm.read_maps(pid)
        cand = [v for v in vmas if v.writable_private and v.name not in pm.SKIP_NAMES]
        if not cand:
            out["compare"] = {"ok": False, "reason": "target has no writable private mapping"}
        else:
            buf = pm.anon_buffer(PAGE)
            try:
                pm.VmReader(pid).read_into(pm.buffer_address(buf), cand[0].start, PAGE)
            finally:
                try:
                    buf.close()
                except BufferError:
                    pass
            out["compare"] = {"ok": True, "reason": "process_vm_readv works; compares page contents"}
    except OSError as e:
        out["compare"] = {"ok": False, "reason": _access_reason(pid, "process_vm_readv", e)}
    return out


def open_tracker(pid: int, backend: str = "auto", ranges: list[tuple[int, int]] | None = None) -> Tracker:
    """A tracker for `pid` (not started). backend: auto|uffd|softdirty|compare."""
    classes = {"uffd": UffdTracker, "softdirty": SoftDirtyTracker, "compare": CompareTracker}
    if backend != "auto":
        if backend not in classes:
            raise ValueError(f"unknown backend {backend!r} (auto, {', '.join(BACKENDS)})")
        return classes[backend](pid, ranges)
    reasons = {}
    for name in BACKENDS:
        try:
            t = classes[name](pid, ranges)
        except TargetGone:
            raise
        except OSError as e:
            reasons[name] = _reason(pid, e)
            continue
        t.auto_reasons = reasons
        return t
    raise TrackerError(errno.ENOTSUP, f"pid {pid}: no tracking backend works: "
                       + "; ".join(f"{k}: {v}" for k, v in reasons.items()))


# ----------------------------------------------------------------------------------------------
def _parse_range(text: str) -> tuple[int, int]:
    a, b = text.split("-", 1)
    s = int(a, 16)
    e = int(b, 16) if not b.startswith("+") else s + _parse_size(b[1:])
    return s, e


def _parse_size(text: str) -> int:
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower()
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t, 0)


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def _rounds(n: int) -> str:
    return f"{n} round" if n == 1 else f"{n} rounds"


def _gone_line(pid: int, rounds: int, message: str, partial: dict | None = None) -> int:
    """The one line that ends a run whose target exited (after whatever it measured)."""
    _emit({**(partial or {}), "pid": pid, "gone": True, "rounds": rounds, "error": message})
    return EXIT_GONE


def _count_in(pages: array, ranges: list[tuple[int, int]]) -> int:
    """How many of the sorted `pages` fall in the merged `ranges`."""
    return sum(bisect.bisect_left(pages, e) - bisect.bisect_left(pages, s) for s, e in ranges)


def _track(t: Tracker, a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    t.start()
    start_s = time.perf_counter() - t0
    _emit({"round": 0, "backend": t.backend, "start_ms": round(start_s * 1000, 3),
           "tracked_pages": sum((e - s) // PAGE for s, e, _ in t.pieces),
           **({"auto_reasons": t.auto_reasons} if t.auto_reasons else {})})
    last = time.perf_counter()
    for rnd in range(1, a.rounds + 1):
        if a.stdin:
            if not sys.stdin.readline():
                break
        else:  # an exit ends the wait at once (the scan then says so)
            t.wait_exit(max(0.0, a.interval - (time.perf_counter() - last)))
        try:
            r = t.scan()
        except TargetGone:
            return _gone_line(t.pid, rnd - 1, f"pid {t.pid} exited after {_rounds(rnd - 1)}")
        now = time.perf_counter()
        dt = max(now - last, 1e-9)
        last = now
        d = r.to_json(a.addresses)
        d.update(round=rnd, mib_per_s=round(len(r.pages) * PAGE / (1 << 20) / dt, 3),
                 interval_s=round(dt, 6))
        _emit(d)
    return 0


class DirtyRate:
    """The distinct pages a process writes in a window, and the window, both exact.

    The window opens at an instant the target is held still (every thread in a ptrace-stop)
    with tracking armed, and closes at an instant it is held still again, before the final
    collection: no write can fall between arming and the opening or between the closing and
    the collection, so the count is exactly the distinct pages written between the two
    instants, and `window_s` is exactly their distance. Within the window the target is
    scanned every `interval` s and the rounds united (each write lands in exactly one round),
    so mappings created in the window are followed (their written pages counted, not their
    size), replaced ones re-armed, and a target that exits mid-window leaves the part before.

    Where a bound cannot be held still (the target may not be stopped: another tracer holds
    it), the window is bracketed instead: every page written between `start_ns` and `end_ns`
    is counted, and none written outside [`outer_start_ns`, `outer_end_ns`]. What else keeps
    the count from being exact (a tracked mapping unmapped between two scans, a backend that
    cannot see every write) is named in `method_notes`, and `method` is not "exact".
    A mapping created in the window may hold pages nobody wrote when it is first seen:
    MAP_POPULATE fills it whole, and a write to a region that may take a transparent huge page
    (MADV_HUGEPAGE, or THP "always") puts 512 pages in place. Such pages (zero-filled, or any
    in a file-backed mapping, not written in a later round) are counted, their number is
    `populated_pages`, and `method` is "upper-bound": the pages written are between
    `pages - populated_pages` and `pages`.
    Instants are CLOCK_MONOTONIC nanoseconds, the clock a program on the node reads too.
    Not seen, and not flagged (nothing in /proc tells): a mapping created and unmapped between
    two scans, and pages discarded (MADV_DONTNEED) from a mapping created in the window; a
    mapping that turns writable (mprotect) or moves (mremap) in the window counts as new, with
    the pages it already held (those holding nonzero bytes unflagged). A shorter `interval` narrows the first."""

    def __init__(self, t: Tracker):
        self.t = t
        self.seen = array("Q")  # sorted, unique: every page written so far in the window
        self.maybe = array("Q")  # of `seen`: pages that may have been filled without a write
        self.new: list[tuple[int, int]] = []  # ranges of mappings that appeared in the window
        self.rounds = 0
        self.lower: dict[str, None] = {}  # ordered sets of reasons
        self.upper: dict[str, None] = {}
        self.held: list[str] = []  # why a bound could not be held still
        self.window: dict = {}
        self.last: ScanResult | None = None
        self.per_mapping: dict[str, int] = {}

    def arm(self) -> None:
        outer = time.monotonic_ns()
        with self.t.hold(required=False) as held:
            self.t.start()
            start = time.monotonic_ns()
        self.start_held = bool(held)
        if held:
            outer = start
        else:
            self.held.append(f"the target could not be held still to open the window "
                             f"({self.t.hold_error})")
        self.window = {"clock": "CLOCK_MONOTONIC", "start_ns": start, "end_ns": None,
                       "outer_start_ns": outer, "outer_end_ns": None, "held": bool(held)}

    def round(self, final: bool = False) -> None:
        """One scan; the final one closes the window (held still, where it may be)."""
        if final:
            with self.t.hold(required=False) as held:
                begin = time.monotonic_ns()
                r = self.t.scan()
            if not held:
                self.held.append(f"the target could not be held still to close the window "
                                 f"({self.t.hold_error})")
        else:
            held = False
            begin = time.monotonic_ns()
            r = self.t.scan()
        end = begin if held else time.monotonic_ns()
        self.rounds += 1
        self.last = r
        w = r.written_pages
        if len(r.maybe) or len(self.maybe):  # a page written in any round is not a maybe
            sure_before = pm.difference(self.seen, self.maybe)
            self.maybe = pm.union(pm.difference(self.maybe, pm.difference(w, r.maybe)),
                                  pm.difference(r.maybe, sure_before))
        self.seen = pm.to_array_q(pm.concat([self.seen, w])) if self.rounds > 1 else \
            pm.to_array_q(w)
        self.new = pm.merge(self.new + r.new_ranges)
        # labelled now: a later round that ends in the target's exit may find its maps gone
        self.per_mapping = self.t._per_mapping(self.seen)
        for why in r.lower:
            self.lower[why] = None
        for why in r.upper:
            if why != r.maybe_note:  # counted over the whole window, in method()
                self.upper[why] = None
        self.window.update(end_ns=begin, outer_end_ns=end,
                           held=self.start_held and bool(held))

    def method(self) -> tuple[str, list[str]]:
        lower = ([self.t.unseen] if self.t.unseen else []) + list(self.lower)
        upper = list(self.upper) + ([populated_note(len(self.maybe))] if len(self.maybe) else [])
        notes = lower + upper + (self.held if not self.window["held"] else [])
        if not self.window["held"] and not self.held:
            notes.append("the window ends at the start of the last scan before the target "
                         "exited; pages written during that scan may be counted")
        if lower and upper:
            return "approximate", notes
        if lower:
            return "lower-bound", notes
        if upper:
            return "upper-bound", notes
        return ("exact" if self.window["held"] else "bracketed"), notes

    def report(self) -> dict:
        out: dict = {"pid": self.t.pid, "backend": self.t.backend, "window_s": None,
                     "pages": None, "new_mapping_pages": None, "populated_pages": None,
                     "mib_per_s": None,
                     "pages_per_s": None, "per_mapping": {}, "tracked_pages": None,
                     "rounds": self.rounds, "window": dict(self.window)}
        method, notes = self.method()
        out["method"] = method
        if notes:
            out["method_notes"] = notes
        if not self.rounds:
            return out
        window = max((self.window["end_ns"] - self.window["start_ns"]) / 1e9, 1e-9)
        n = len(self.seen)
        out.update(window_s=round(window, 6), pages=n,
                   new_mapping_pages=_count_in(self.seen, self.new),
                   populated_pages=len(self.maybe),
                   mib_per_s=round(n * PAGE / (1 << 20) / window, 3),
                   pages_per_s=round(n / window, 1), per_mapping=self.per_mapping,
                   tracked_pages=self.last.tracked_pages if self.last else None)
        return out


def _dirty_rate(t: Tracker, a: argparse.Namespace) -> int:
    """Distinct pages written in a window of --seconds (see DirtyRate); the report is the one
    JSON line on stdout; stderr says {"armed": true} once the window is open."""
    m = DirtyRate(t)
    m.arm()
    t_start = time.monotonic()
    sys.stderr.write(json.dumps({"armed": True, "backend": t.backend,
                                 "start_ns": m.window["start_ns"]}) + "\n")
    sys.stderr.flush()
    end = t_start + a.seconds
    while True:
        left = end - time.monotonic()
        final = left <= a.interval
        t.wait_exit(max(0.0, min(a.interval, left)))
        try:
            m.round(final=final)
        except TargetGone:
            at = time.monotonic() - t_start
            out = m.report()
            what = (f"after {_rounds(m.rounds)} (the rate covers its first "
                    f"{out['window_s']:.3g} s)" if m.rounds else
                    "before the first scan: nothing measured")
            return _gone_line(t.pid, m.rounds, f"pid {t.pid} exited {at:.3g} s into the "
                              f"{a.seconds:g} s window, {what}", out)
        if final:
            break
    out = m.report()
    if a.addresses:
        out["addresses"] = [f"{x:#x}" for x in m.seen]
        out["populated_addresses"] = [f"{x:#x}" for x in m.maybe]
    _emit(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tracker.py", description=__doc__.split("\n\n")[0],
                                 epilog="exit codes: 0 done, 1 cannot track this target, 2 usage, "
                                        "3 the target exited (or never existed): the last line "
                                        "says so, after the rounds measured before")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="which backends work for PID (JSON)")
    p.add_argument("--pid", type=int, required=True)
    for name in ("track", "dirty-rate"):
        p = sub.add_parser(name)
        p.add_argument("--pid", type=int, required=True)
        p.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS)
        p.add_argument("--range", action="append", default=[], metavar="START-END",
                       help="hex START-END or START-+SIZE; repeatable (default: all writable private)")
        if name == "track":
            p.add_argument("--rounds", type=int, default=10)
            p.add_argument("--interval", type=float, default=1.0)
            p.add_argument("--stdin", action="store_true",
                           help="scan once per line read from stdin instead of on a timer")
            p.add_argument("--addresses", action="store_true", help="include the page addresses")
        else:
            p.add_argument("--seconds", type=float, default=1.0)
            p.add_argument("--interval", type=float, default=1.0,
                           help="scan (and unite the rounds) this often within the window, so "
                                "a target that exits mid-window leaves a partial rate")
            p.add_argument("--addresses", action="store_true",
                           help="include the addresses of the pages counted (and, apart, of "
                                "those that may have been filled without a write)")
    a = ap.parse_args(argv)
    if a.cmd != "probe" and a.interval <= 0:
        ap.error("--interval must be > 0")
    try:
        if a.cmd == "probe":
            _emit({"pid": a.pid, **probe(a.pid)})
            return 0
        ranges = [_parse_range(r) for r in a.range] or None
        t = open_tracker(a.pid, a.backend, ranges)
        try:
            return _dirty_rate(t, a) if a.cmd == "dirty-rate" else _track(t, a)
        finally:
            t.close()
    except NoProcess:
        return _gone_line(a.pid, 0, f"pid {a.pid}: no such process")
    except TargetGone:
        return _gone_line(a.pid, 0, f"pid {a.pid} exited while the tracker attached: nothing "
                                    "measured")
    except OSError as e:  # one line that says why, for the controller's error text
        why = _reason(a.pid, e)
        if a.cmd != "probe" and a.backend != "auto":
            why = f"{a.backend} backend: {why}"
        _emit({"pid": a.pid, "error": why if why.startswith(f"pid {a.pid}") else
               f"pid {a.pid}: {why}"})
        return 1


if __name__ == "__main__":
    sys.exit(main())
