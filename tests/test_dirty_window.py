"""dirty-rate's figure against programs whose writes are known (tests/dirty_writer.py).

The writer logs every write with the instant it landed (the kernel stores the time into the
page inside one system call), and writes continuously: before the tracker arms, while it arms,
through the window, while the last scan runs, and after. The expected count is derived from
that log and the window the tracker reports (CLOCK_MONOTONIC ns, the writer's clock too):
the distinct pages with a write strictly inside it. Where the tracker says "exact", its pages
must be exactly those; no tolerance, no assumption about wall-clock timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit.payloads import pagemap as pm
from labkit.payloads import ptrace_inject as pti
from labkit.payloads import tracker as tr

PAGE = pm.PAGE
TRACKER = Path(tr.__file__)
WRITER = Path(__file__).with_name("dirty_writer.py")

pytestmark = pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                                reason="x86_64 Linux only")


def uffd_or_skip() -> None:
    p = subprocess.Popen(["sleep", "30"])
    try:
        probe = tr.probe(p.pid)["uffd"]
    finally:
        p.kill()
        p.wait()
    if not probe["ok"]:
        pytest.skip(f"uffd unavailable here: {probe['reason']}")


class Writer:
    def __init__(self, *args: str):
        self.p = subprocess.Popen([sys.executable, str(WRITER), *args], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        _, base, size = self.p.stdout.readline().split()  # it is writing by now
        self.base, self.size = int(base, 16), int(size)
        self.pid = self.p.pid
        self.log: dict | None = None

    def finish(self) -> dict:
        out, _ = self.p.communicate("stop\n", timeout=60)
        assert self.p.returncode == 0
        self.log = json.loads(out)
        return self.log

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


@pytest.fixture
def writer():
    made: list[Writer] = []

    def make(*args: str) -> Writer:
        w = Writer(*args)
        made.append(w)
        return w

    yield make
    for w in made:
        w.kill()


def dirty_rate(w: Writer, *args: str, seconds: float = 1.0) -> dict:
    r = subprocess.run([sys.executable, str(TRACKER), "dirty-rate", "--pid", str(w.pid),
                        "--seconds", str(seconds), "--interval", "0.2", "--addresses",
                        "--range", f"{w.base:x}-+{w.size:#x}", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def written(log: dict, lo: int, hi: int) -> set[int]:
    """Distinct pages with a write strictly between the instants lo and hi."""
    assert all(ts not in (lo, hi) for ts, _ in log["writes"])  # no write at a bound itself
    return {addr for ts, addr in log["writes"] if lo < ts < hi}


def in_new_pieces(pages: set[int], log: dict, start_ns: int) -> tuple[int, int]:
    """How many of `pages` lie in pieces mapped after `start_ns`: (surely, at most). The
    writer reads the clock around its mmap() call, so a piece whose call straddles the instant
    counts only in the second."""
    def count(spans):
        return len({p for p in pages if any(s <= p < e for s, e in spans)})
    sure = [(a, a + n * PAGE) for t0, _, kind, a, n in log["events"]
            if kind in ("map", "replace") and t0 > start_ns]
    maybe = [(a, a + n * PAGE) for _, t1, kind, a, n in log["events"]
             if kind in ("map", "replace") and t1 > start_ns]
    return count(sure), count(maybe)


def check_exact(rep: dict, log: dict) -> set[int]:
    """The report against the log: an exact count of the window it reports."""
    w = rep["window"]
    assert rep["method"] == "exact", rep.get("method_notes")
    assert w["held"] and w["clock"] == "CLOCK_MONOTONIC"
    assert rep["window_s"] == pytest.approx((w["end_ns"] - w["start_ns"]) / 1e9, abs=1e-6)
    expected = written(log, w["start_ns"], w["end_ns"])
    got = {int(a, 16) for a in rep["addresses"]}
    assert got == expected, (f"{len(got - expected)} counted but not written in the window, "
                             f"{len(expected - got)} written but not counted")
    assert rep["pages"] == len(expected)
    assert rep["pages_per_s"] == pytest.approx(len(expected) / rep["window_s"], abs=0.1)
    # the writer wrote before and after the window too: the window really cut the stream
    assert any(ts < w["start_ns"] for ts, _ in log["writes"])
    assert any(ts > w["end_ns"] for ts, _ in log["writes"])
    return expected


def test_dirty_rate_counts_exactly_the_window_it_reports(writer):
    """1,000 distinct new pages/s written all along: the count is the pages written between
    the two instants reported, not those written while arming or during the last scan."""
    uffd_or_skip()
    w = writer("--per-tick", "10", "--tick", "0.01")
    rep = dirty_rate(w, "--backend", "uffd")
    check_exact(rep, w.finish())
    assert rep["new_mapping_pages"] == 0 and rep["rounds"] >= 2


def test_dirty_rate_counts_written_pages_of_mappings_created_in_the_window(writer):
    """New mappings appear all through the window and only every other page of each is
    written: they are in the headline figure, by the pages written, not by their size."""
    uffd_or_skip()
    w = writer("--per-tick", "5", "--newmap-every", "3", "--newmap-pages", "16")
    rep = dirty_rate(w, "--backend", "uffd")
    log = w.finish()
    expected = check_exact(rep, log)
    sure, at_most = in_new_pieces(expected, log, rep["window"]["start_ns"])
    assert sure, "no mapping was created and written inside the window"
    assert sure <= rep["new_mapping_pages"] <= at_most
    wn = rep["window"]
    created = [a for t0, _, kind, a, _ in log["events"] if kind == "map" and t0 > wn["start_ns"]]
    assert created and rep["pages"] < len(written(log, wn["start_ns"], wn["end_ns"])) + \
        16 * len(created)  # not their whole size


def test_dirty_rate_exact_with_threads(writer):
    """Four threads write at once (each its own pages): holding the target still at both
    instants holds every thread."""
    uffd_or_skip()
    w = writer("--threads", "4", "--per-tick", "4", "--newmap-every", "5")
    rep = dirty_rate(w, "--backend", "uffd")
    check_exact(rep, w.finish())


def test_dirty_rate_exact_while_threads_come_and_go(writer):
    """Threads start, write and exit all through the window (one every other tick): every one
    that runs at an instant the window opens or closes is held; none slips past the hold."""
    uffd_or_skip()
    w = writer("--threads", "2", "--per-tick", "4", "--spawn-every", "2", "--spawn-pages", "6")
    rep = dirty_rate(w, "--backend", "uffd")
    check_exact(rep, w.finish())


def test_dirty_rate_with_munmap_churn_says_it_is_a_lower_bound(writer):
    """Mappings replaced (mmap over them) and unmapped mid-window: writes to one between a
    scan and its unmapping cannot be seen, so the figure does not claim "exact"; it counts no
    page that was not written in the window, and every page of memory that stayed put."""
    uffd_or_skip()
    w = writer("--per-tick", "5", "--newmap-every", "2", "--newmap-pages", "16",
               "--churn-every", "3")
    rep = dirty_rate(w, "--backend", "uffd")
    log = w.finish()
    wn = rep["window"]
    assert wn["held"]
    churned = [e for e in log["events"] if e[2] in ("replace", "unmap")
               and wn["start_ns"] < e[0] < wn["end_ns"]]
    assert churned, "no churn inside the window"
    assert any("unmapped, replaced" in n for n in rep["method_notes"])
    truth = written(log, wn["start_ns"], wn["end_ns"])
    moved = set()
    for _, _, _, a, n in churned:
        moved |= set(range(a, a + n * PAGE, PAGE))
    # a piece replaced or unmapped between a scan's first look at it and its reading of the
    # pages' content (a loaded machine) leaves pages that held data and then read as zero or
    # not at all: not counted either, so the figure stays a lower bound, nothing more
    assert rep["method"] == "lower-bound", rep["method_notes"]
    assert not rep["populated_addresses"], rep["method_notes"]
    got = {int(a, 16) for a in rep["addresses"]}
    assert got <= truth, f"{len(got - truth)} pages counted that were not written in the window"
    assert truth - moved <= got
    assert rep["pages"] == len(got)


def test_dirty_rate_brackets_the_window_when_the_target_cannot_be_held(writer):
    """Another tracer holds the target (a debugger): it cannot be stopped, so the window is
    bracketed (inner and outer instants) and the method says so, with the reason; the count
    holds every page written in the inner window and none outside the outer."""
    w = writer("--per-tick", "10")
    pti.ptrace(pti.PTRACE_SEIZE, w.pid)  # we are its tracer now (its threads keep running)
    try:
        rep = dirty_rate(w, "--backend", "compare")
    finally:  # a tracee must be stopped to be detached
        pti.ptrace(pti.PTRACE_INTERRUPT, w.pid)
        os.waitpid(w.pid, pti.WALL)
        pti.ptrace(pti.PTRACE_DETACH, w.pid)
    log = w.finish()
    wn = rep["window"]
    assert wn["held"] is False
    assert wn["outer_start_ns"] < wn["start_ns"] < wn["end_ns"] < wn["outer_end_ns"]
    assert rep["method"] == "lower-bound"  # compare cannot see a write that changes nothing
    notes = " ".join(rep["method_notes"])
    assert "could not be held still" in notes and "already traced" in notes
    got = {int(a, 16) for a in rep["addresses"]}
    # every write stores a new time: content changes with each, so compare sees them all
    assert written(log, wn["start_ns"], wn["end_ns"]) <= got
    assert got <= written(log, wn["outer_start_ns"], wn["outer_end_ns"])


def check_upper_bound(rep: dict, log: dict) -> tuple[set[int], set[int], set[int]]:
    """An upper bound that names all it may over-count: every page written in the window is
    counted; the counted pages not named (`populated_addresses`) were all written in it; the
    counted pages not written are all named, and lie in pieces mapped in the window. Returns
    (written in the window, counted, named)."""
    w = rep["window"]
    assert w["held"]
    assert rep["method"] == "upper-bound", rep.get("method_notes")
    assert any("without a write" in n for n in rep["method_notes"]), rep["method_notes"]
    truth = written(log, w["start_ns"], w["end_ns"])
    got = {int(a, 16) for a in rep["addresses"]}
    maybe = {int(a, 16) for a in rep["populated_addresses"]}
    assert rep["populated_pages"] == len(maybe) and maybe <= got and rep["pages"] == len(got)
    assert truth <= got, f"{len(truth - got)} written but not counted"
    assert got - maybe <= truth, f"{len(got - maybe - truth)} counted as surely written, were not"
    new = [(a, a + n * PAGE) for _, t1, kind, a, n in log["events"]
           if kind == "map" and t1 > w["start_ns"]]
    assert all(any(s <= p < e for s, e in new) for p in got - truth)
    assert rep["pages"] - rep["populated_pages"] <= len(truth) <= rep["pages"]
    return truth, got, maybe


def test_dirty_rate_map_populate_pages_are_named_not_called_written(writer):
    """Mappings created in the window with MAP_POPULATE: every page is in place before any
    write, and half of each is never written. They are counted (an upper bound, says so) and
    the ones that may be unwritten are named apart; the rest were all written."""
    uffd_or_skip()
    w = writer("--per-tick", "5", "--newmap-every", "3", "--newmap-pages", "16",
               "--newmap-populate")
    rep = dirty_rate(w, "--backend", "uffd")
    truth, got, _ = check_upper_bound(rep, w.finish())
    assert got - truth, "no populated page went unwritten: the case was not exercised"


def anon_huge_kb(pid: int, lo: int, hi: int) -> int:
    """AnonHugePages (kB) of the VMAs of `pid` inside [lo, hi): huge pages mapped whole."""
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and ":" not in head:
                s, e = (int(x, 16) for x in head.split("-"))
                inside = lo <= s and e <= hi
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1])
    return total


def test_dirty_rate_transparent_huge_pages_are_named_not_called_written(writer):
    """Mappings created in the window with MADV_HUGEPAGE: the first write puts 512 pages in
    place, and only one page in two is ever written (one a tick). The unwritten rest is
    counted (an upper bound, says so) and named apart; the rest were all written."""
    uffd_or_skip()
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off here")
    w = writer("--per-tick", "5", "--newmap-every", "10", "--newmap-pages", "512",
               "--newmap-huge")
    rep = dirty_rate(w, "--backend", "uffd")
    # those written in the window were split by the tracking; the next one mapped stays huge
    deadline = time.monotonic() + 10
    while not (huge := anon_huge_kb(w.pid, w.base, w.base + w.size)) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    log = w.finish()
    if not huge:
        pytest.skip("no transparent huge page formed here (memory too fragmented?)")
    truth, got, _ = check_upper_bound(rep, log)
    assert len(got - truth) >= 256, "no huge page's unwritten rest was counted"


# A child that maps a zero-filled, populated piece (MAP_POPULATE) and, on cue, maps a fresh
# piece over it: what a program's churn does between a scan's first look and its content read.
CHURNER = r"""
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
RW, FLAGS = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
N = 16 * mmap.PAGESIZE
base = libc.mmap(None, 3 * N, 0, FLAGS, -1, 0)  # PROT_NONE
piece = base + N
print(hex(base), 3 * N, flush=True)
for line in sys.stdin:
    fixed = FLAGS | 0x10 | (0x8000 if line.strip() == "map" else 0)  # MAP_FIXED, MAP_POPULATE
    assert libc.mmap(piece, N, RW, fixed, -1, 0) == piece
    print(hex(piece), flush=True)
"""


@pytest.mark.parametrize("churn", [False, True])
def test_a_piece_replaced_between_first_look_and_read_is_not_counted(monkeypatch, churn):
    """Deterministic (the race itself, on cue): a new piece whose pages are all in place and
    zero is "maybe written" (MAP_POPULATE); replaced between the scan's first look at it and
    its reading of their content, those pages are gone, so they are not counted at all and
    the figure stays a lower bound instead of claiming them."""
    uffd_or_skip()
    child = subprocess.Popen([sys.executable, "-c", CHURNER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        base, size = child.stdout.readline().split()
        base = int(base, 16)
        t = tr.UffdTracker(child.pid, ranges=[(base, base + int(size))])
        t.start()
        child.stdin.write("map\n")
        child.stdin.flush()
        piece = int(child.stdout.readline(), 16)
        real_split = tr.pm.split_by_content
        cue = [churn]  # once: the replaced piece is found and registered again, then read

        def split_after_churn(reader, pages, *a, **kw):
            if cue.pop() if cue else False:
                child.stdin.write("replace\n")
                child.stdin.flush()
                assert int(child.stdout.readline(), 16) == piece
            return real_split(reader, pages, *a, **kw)

        monkeypatch.setattr(tr.pm, "split_by_content", split_after_churn)
        r = t.scan()
        pages = set(range(piece, piece + 16 * PAGE, PAGE))
        if churn:
            assert not len(r.maybe) and not pages & set(r.written_pages), r
        else:
            assert set(r.maybe) == pages and pages <= set(r.written_pages), r
        t.close()
    finally:
        child.kill()
        child.wait()
