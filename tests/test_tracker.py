"""Dirty-page tracker (labkit/payloads/tracker.py) against ground truth from real processes.

The ground-truth target here is our own small C program (independent of the workload payload):
it writes exactly the pages it is told to, with values never stored before (so the compare
backend sees changes too), and acknowledges; rounds are driven by steps, not time.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from labkit.config import Settings
from labkit.errors import NodeError
from labkit.experiment import dirty
from labkit.inventory import Node, SshSpec
from labkit.payloads import pagemap as pm
from labkit.payloads import tracker as tr
from labkit.ssh import CommandFailed, RunResult

PAGE = pm.PAGE
PAYLOADS = Path(tr.__file__).parent

pytestmark = pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                                reason="x86_64 Linux only")

DIRTIER_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static char *region;
static long npages;
static uint64_t counter = 1;
static int nthreads;
static long *todo;
static long ntodo;
static pthread_barrier_t b1, b2;
static char *extra[64];
static long extra_n[64];
static int nextra;

static void write_page(long idx, uint64_t c) {
    volatile uint64_t *p = (volatile uint64_t *)(region + idx * 4096L);
    p[c % 512] = c;  /* a value never stored before anywhere: the content really changes */
}

static void *worker(void *arg) {
    long id = (long)arg;
    for (;;) {
        pthread_barrier_wait(&b1);
        for (long j = id; j < ntodo; j += nthreads) write_page(todo[j], counter + j);
        pthread_barrier_wait(&b2);
    }
    return NULL;
}

int main(int argc, char **argv) {
    npages = atol(argv[1]);
    nthreads = argc > 2 ? atoi(argv[2]) : 0;
    region = mmap(NULL, npages * 4096L, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) return 2;
    for (long i = 0; i < npages; i += 2) ((volatile char *)region)[i * 4096L] = 0; /* half populated */
    todo = calloc(npages + 1, sizeof(long));
    if (nthreads) {
        pthread_barrier_init(&b1, NULL, nthreads + 1);
        pthread_barrier_init(&b2, NULL, nthreads + 1);
        for (long i = 0; i < nthreads; i++) {
            pthread_t t;
            pthread_create(&t, NULL, worker, (void *)i);
        }
    }
    printf("%lx %ld\n", (unsigned long)region, npages);
    fflush(stdout);
    char cmd[16];
    while (scanf("%15s", cmd) == 1) {
        if (!strcmp(cmd, "w")) {
            if (scanf("%ld", &ntodo) != 1) return 3;
            for (long j = 0; j < ntodo; j++)
                if (scanf("%ld", &todo[j]) != 1) return 3;
            if (nthreads) {
                pthread_barrier_wait(&b1);
                pthread_barrier_wait(&b2);
            } else {
                for (long j = 0; j < ntodo; j++) write_page(todo[j], counter + j);
            }
            counter += ntodo;
            printf("ok\n");
        } else if (!strcmp(cmd, "m")) {          /* new mapping, every page written */
            /* Between two PROT_NONE guard pages, so it stays a mapping of its own: the kernel
               THP-aligns the region, and a new mapping that lands in the gap above it would
               otherwise merge into the region's VMA (seen once in ~200 runs). */
            long n;
            if (scanf("%ld", &n) != 1) return 3;
            char *g = mmap(NULL, (n + 2) * 4096L, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (g == MAP_FAILED) return 4;
            char *p = g + 4096L;
            if (mprotect(p, n * 4096L, PROT_READ | PROT_WRITE)) return 4;
            for (long i = 0; i < n; i++) p[i * 4096L] = (char)(i + 1);
            extra[nextra] = g;
            extra_n[nextra++] = n + 2;
            printf("%lx\n", (unsigned long)p);
        } else if (!strcmp(cmd, "u")) {          /* unmap the last new mapping, guards too */
            nextra--;
            munmap(extra[nextra], extra_n[nextra] * 4096L);
            printf("ok\n");
        } else if (!strcmp(cmd, "r")) {          /* replace the region: munmap + mmap, same address */
            munmap(region, npages * 4096L);
            char *p = mmap(region, npages * 4096L, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
            printf(p == region ? "ok\n" : "fail\n");
        } else if (!strcmp(cmd, "q")) {
            return 0;
        }
        fflush(stdout);
    }
    return 0;
}
"""

# A program that is not ours: threads doing deterministic work (busy loop, sleeping, writing
# memory) while the main thread sits in read(); prints a checksum at the end. The second half of
# the work waits for "armed" and the program waits for "go" before it ends, so the tracker is
# armed before those writes and the target lives until the test is done with it.
BUSY_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define N (8L << 20)
static uint64_t result[4];
static volatile int armed;

static void *writer(void *arg) {
    long id = (long)arg;
    uint64_t *buf = malloc(N);
    uint64_t x = 88172645463325252ULL + id, sum = 0;
    for (long it = 0; it < 40; it++) {
        while (it == 20 && !armed) { struct timespec ts = {0, 1000000}; nanosleep(&ts, NULL); }
        for (long i = 0; i < N / 8; i += 64) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            buf[(x >> 3) % (N / 8)] = x;
        }
        for (long i = 0; i < N / 8; i += 512) sum += buf[i];
        if (id == 1) { struct timespec ts = {0, 2000000}; nanosleep(&ts, NULL); }
    }
    result[id] = sum;
    return NULL;
}

int main(void) {
    pthread_t t[4];
    for (long i = 0; i < 4; i++) pthread_create(&t[i], NULL, writer, (void *)i);
    printf("ready\n");
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) return 4;   /* main thread blocked in read() */
    armed = 1;
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    printf("done\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 4;
    printf("%s %016llx %016llx %016llx %016llx\n", line[0] == 'g' ? "go" : "??",
           (unsigned long long)result[0], (unsigned long long)result[1],
           (unsigned long long)result[2], (unsigned long long)result[3]);
    return 0;
}
"""

# A plain Python program writing memory in a loop, with threads; prints a digest at the end.
# It starts writing on "go" and ends on a second line: it outlives every scan of the test.
PY_TARGET = textwrap.dedent("""
    import hashlib, sys, threading
    bufs = [bytearray(4 << 20) for _ in range(3)]
    out = [None] * 3
    def work(k, iters):
        b = bufs[k]
        h = hashlib.sha256()
        n = len(b) // 4096
        x = 12345 + k
        for i in range(iters):
            x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
            off = (x >> 20) % n * 4096
            b[off:off + 8] = x.to_bytes(8, "little")
            if i % 64 == 0:
                h.update(b[off:off + 64])
        out[k] = h.hexdigest()[:16] + hashlib.sha256(b).hexdigest()[:16]
    ts = [threading.Thread(target=work, args=(k, 60000)) for k in range(3)]
    print("ready", flush=True)
    sys.stdin.readline()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print("done", flush=True)
    sys.stdin.readline()
    print(" ".join(out), flush=True)
""")


def _build(src: str, tmp: Path, name: str) -> Path:
    c = tmp / f"{name}.c"
    c.write_text(src)
    exe = tmp / name
    subprocess.run(["gcc", "-O1", "-pthread", "-o", str(exe), str(c)], check=True)
    return exe


@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trackerbins")
    return {"dirtier": _build(DIRTIER_C, tmp, "dirtier"), "busy": _build(BUSY_C, tmp, "busy")}


class Dirtier:
    """Drives the C ground-truth target: write exactly these pages, then ack."""

    def __init__(self, exe: Path, npages: int, threads: int = 0):
        self.p = subprocess.Popen([str(exe), str(npages), str(threads)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, bufsize=1)
        base, n = self.p.stdout.readline().split()
        self.base = int(base, 16)
        self.npages = int(n)
        self.pid = self.p.pid

    @property
    def range(self) -> tuple[int, int]:
        return self.base, self.base + self.npages * PAGE

    def cmd(self, line: str) -> str:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def write(self, idx: list[int]) -> set[int]:
        assert self.cmd(f"w {len(idx)} " + " ".join(map(str, idx))) == "ok"
        return {self.base + i * PAGE for i in idx}

    def close(self) -> None:
        try:
            self.p.stdin.write("q\n")
            self.p.stdin.flush()
        except OSError:
            pass
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


@pytest.fixture
def dirtier(bins):
    made = []

    def make(npages=2048, threads=0):
        d = Dirtier(bins["dirtier"], npages, threads)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def patterns(npages: int, rounds: int, seed: int = 7):
    """Per-round page lists for the three patterns (varying sizes; includes empty rounds)."""
    rng = random.Random(seed)
    hot = rng.sample(range(npages), max(1, npages // 10))
    cursor = 0
    out = {"uniform": [], "hotset": [], "sequential": []}
    for r in range(rounds):
        k = [0, 1, 37, 300, 1000][r % 5]
        out["uniform"].append(rng.sample(range(npages), k))
        out["hotset"].append([rng.choice(hot) if rng.random() < 0.9 else rng.randrange(npages)
                              for _ in range(k)])
        seq = [(cursor + i) % npages for i in range(k)]
        cursor = (cursor + k) % npages
        out["sequential"].append(seq)
    return out


_PROBE: dict = {}


def available(backend: str) -> None:
    """Skip (with the probe's reason) when the backend does not work on this machine."""
    if not _PROBE:
        p = subprocess.Popen(["sleep", "30"])
        try:
            _PROBE.update(tr.probe(p.pid))
        finally:
            p.kill()
            p.wait()
    if not _PROBE[backend]["ok"]:
        pytest.skip(f"{backend} unavailable here: {_PROBE[backend]['reason']}")


def in_range(pages, lo, hi) -> set[int]:
    return {int(a) for a in pages if lo <= a < hi}


@pytest.mark.parametrize("backend", ["uffd", "compare", "softdirty"])
@pytest.mark.parametrize("pattern", ["uniform", "hotset", "sequential"])
def test_exact_per_round(dirtier, backend, pattern):
    available(backend)
    d = dirtier(2048)
    lists = patterns(d.npages, 10, seed=hash(pattern) & 0xFFFF)[pattern]
    with tr.open_tracker(d.pid, backend, ranges=[d.range]) as t:
        assert t.backend == backend
        t.start()
        assert len(t.scan().pages) == 0
        for rnd, idx in enumerate(lists):
            expected = d.write(idx)
            r = t.scan()
            got = [int(a) for a in r.pages]
            assert got == sorted(got) and len(got) == len(set(got))
            assert set(got) == expected, f"round {rnd}: {len(got)} vs {len(expected)}"
            assert sum(r.per_mapping.values()) == len(expected)
            assert r.new_mappings == 0 and r.dropped_mappings == 0


@pytest.mark.parametrize("backend", ["uffd", "compare"])
def test_exact_threads_whole_process(dirtier, backend):
    """4 writer threads; the tracker follows all writable mappings (ranges=None): inside the
    region the set is exact, and new mappings appear (wholly dirty) and vanish."""
    available(backend)
    d = dirtier(1024, threads=4)
    lo, hi = d.range
    with tr.open_tracker(d.pid, backend) as t:
        t.start()
        t.scan()
        lists = patterns(d.npages, 6, seed=3)["uniform"]
        for idx in lists:
            expected = d.write(idx)
            r = t.scan()
            assert in_range(r.pages, lo, hi) == expected
        # a new mapping mid-run: counted wholly dirty, labelled, then followed like the rest
        addr = int(d.cmd("m 64"), 16)
        r = t.scan()
        assert r.new_mappings >= 1
        assert in_range(r.pages, addr, addr + 64 * PAGE) == {addr + i * PAGE for i in range(64)}
        assert r.per_mapping.get(f"[anon@{addr:x}]") == 64
        r = t.scan()
        assert in_range(r.pages, addr, addr + 64 * PAGE) == set()
        expected = d.write([1, 2, 3])
        r = t.scan()
        assert in_range(r.pages, lo, hi) == expected
        assert d.cmd("u") == "ok"
        r = t.scan()
        assert r.dropped_mappings >= 1
        assert in_range(r.pages, addr, addr + 64 * PAGE) == set()


def test_uffd_replaced_mapping_is_rearmed(dirtier):
    """munmap + mmap at the same address loses the uffd registration; the tracker notices (EPERM
    from CHECK_WPASYNC), re-registers, counts the region wholly dirty, then is exact again."""
    available("uffd")
    d = dirtier(512)
    with tr.open_tracker(d.pid, "uffd", ranges=[d.range]) as t:
        t.start()
        d.write([5, 6])
        assert d.cmd("r") == "ok"
        r = t.scan()
        assert set(map(int, r.pages)) == {d.base + i * PAGE for i in range(d.npages)}
        assert r.new_mappings >= 1
        for idx in ([], [0, 511], list(range(100, 140))):
            expected = d.write(idx)
            assert set(map(int, t.scan().pages)) == expected


def test_auto_picks_uffd_and_probe_reasons(dirtier):
    d = dirtier(64)
    p = tr.probe(d.pid)
    assert set(p) == {"uffd", "softdirty", "compare"}
    for v in p.values():
        assert isinstance(v["ok"], bool) and v["reason"]
    assert p["compare"]["ok"]
    with tr.open_tracker(d.pid) as t:
        best = next(b for b in tr.BACKENDS if p[b]["ok"])
        assert t.backend == best
    gone = tr.probe(2**22 + 12345)
    assert not any(v["ok"] for v in gone.values())


def test_close_is_safe_when_target_died(dirtier):
    d = dirtier(64)
    t = tr.open_tracker(d.pid, "uffd" if tr.probe(d.pid)["uffd"]["ok"] else "compare")
    t.start()
    d.p.kill()
    d.p.wait()
    with pytest.raises(tr.TargetGone):
        t.scan()
    t.close()
    t.close()


def _run_busy(exe: Path, track: bool) -> tuple[str, list]:
    p = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    rounds = _scan_until_done(p, track, "armed")
    out, _ = p.communicate("go\n", timeout=30)
    assert p.returncode == 0
    return out.strip(), rounds


def _scan_until_done(p: subprocess.Popen, track: bool, start: str) -> list:
    """Arm a tracker on p (when track), tell p to `start` its writes, scan while it writes and
    once after it says "done" (so every write is seen); p stays alive until told more."""
    rounds = []
    t = tr.open_tracker(p.pid, "uffd") if track else None
    try:
        if t is not None:
            t.start()
        p.stdin.write(start + "\n")
        p.stdin.flush()
        if t is not None:
            while True:
                rounds.append(t.scan())
                if select.select([p.stdout], [], [], 0.02)[0]:  # "done" (or p died)
                    break
        assert p.stdout.readline().strip() == "done"
        if t is not None:
            rounds.append(t.scan())
    finally:
        if t is not None:
            t.close()
    return rounds


def test_uffd_foreign_c_program_continues_correctly(bins):
    """A multi-threaded C program (busy loop, nanosleep, main thread in read()) registered from
    outside: its result is unaffected and its writes are seen."""
    available("uffd")
    base, _ = _run_busy(bins["busy"], track=False)
    out, rounds = _run_busy(bins["busy"], track=True)
    assert out == base and out.startswith("go ")
    assert sum(len(r.pages) for r in rounds) > 100


def test_uffd_foreign_python_program_continues_correctly(tmp_path):
    available("uffd")
    script = tmp_path / "target.py"
    script.write_text(PY_TARGET)

    def run(track: bool):
        p = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, bufsize=1)
        assert p.stdout.readline().strip() == "ready"
        seen = sum(len(r.pages) for r in _scan_until_done(p, track, "go"))
        out, _ = p.communicate("\n", timeout=60)
        assert p.returncode == 0
        return out.strip(), seen

    base, _ = run(False)
    out, seen = run(True)
    assert out == base
    assert seen > 50


def test_cli_probe_track_dirty_rate(dirtier):
    """The CLI runs as a plain script (python3 tracker.py), stdlib-only path included."""
    d = dirtier(256)
    script = str(PAYLOADS / "tracker.py")
    out = subprocess.run([sys.executable, script, "probe", "--pid", str(d.pid)],
                         capture_output=True, text=True, check=True).stdout
    probe = json.loads(out)
    assert probe["compare"]["ok"] and "reason" in probe["uffd"]
    backend = "uffd" if probe["uffd"]["ok"] else "compare"
    lo, hi = d.range
    p = subprocess.Popen([sys.executable, script, "track", "--pid", str(d.pid), "--backend", backend,
                          "--rounds", "3", "--stdin", "--addresses", "--range", f"{lo:x}-{hi:x}"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    head = json.loads(p.stdout.readline())
    assert head["round"] == 0 and head["backend"] == backend and head["tracked_pages"] == 256
    for k, idx in enumerate(([1, 2, 3], [], list(range(10, 60)))):
        expected = d.write(idx)
        p.stdin.write("\n")
        p.stdin.flush()
        line = json.loads(p.stdout.readline())
        assert line["round"] == k + 1 and line["pages"] == len(expected)
        assert {int(a, 16) for a in line["addresses"]} == expected
        assert {"per_mapping", "mib_per_s", "scan_ms"} <= set(line)
    p.stdin.close()
    assert p.wait(10) == 0
    # dirty-rate over a window in which a known number of distinct pages is written
    p = subprocess.Popen([sys.executable, script, "dirty-rate", "--pid", str(d.pid), "--seconds", "1",
                          "--backend", backend, "--range", f"{lo:x}-+{256 * PAGE:#x}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert json.loads(p.stderr.readline())["armed"]  # tracking is armed: the window has begun
    d.write(list(range(0, 200, 2)) + list(range(0, 200, 4)))  # 100 distinct pages
    rate = json.loads(p.communicate(timeout=10)[0])
    assert rate["pages"] == 100
    assert rate["method"] == ("exact" if backend == "uffd" else "lower-bound")
    w = rate["window"]
    assert rate["window_s"] == pytest.approx((w["end_ns"] - w["start_ns"]) / 1e9, abs=1e-6)
    assert rate["mib_per_s"] == pytest.approx(100 * PAGE / 2**20 / rate["window_s"], rel=1e-2)


def test_cli_reports_gone_target():
    out = subprocess.run([sys.executable, str(PAYLOADS / "tracker.py"), "track", "--pid",
                          str(2**22 + 12345), "--backend", "compare", "--rounds", "1"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "error" in json.loads(out.stdout)


def test_payload_imports_no_labkit():
    """Payloads must run on nodes without labkit: run them with a clean path, numpy hidden."""
    code = (f"import sys; sys.modules['numpy'] = None; sys.path.insert(0, {str(PAYLOADS)!r}); "
            "import tracker, pagemap, ptrace_inject; assert pagemap.np is None; "
            "assert not any(m.startswith('labkit') for m in sys.modules); print('ok')")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


NONUMPY_DRIVER = textwrap.dedent("""
    import sys, json
    sys.modules['numpy'] = None
    sys.path.insert(0, sys.argv[1])
    import tracker
    pid, lo, hi, backend = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    t = tracker.open_tracker(pid, backend, ranges=[(lo, hi)])
    t.start()
    for line in sys.stdin:
        r = t.scan()
        print(json.dumps([int(a) for a in r.pages]), flush=True)
    t.close()
""")


@pytest.mark.parametrize("backend", ["uffd", "compare"])
def test_exact_without_numpy(dirtier, tmp_path, backend):
    """The stdlib fallback paths (array('Q') decode, ctypes memcmp) are exact too."""
    available(backend)
    d = dirtier(1024)
    drv = tmp_path / "drv.py"
    drv.write_text(NONUMPY_DRIVER)
    lo, hi = d.range
    p = subprocess.Popen([sys.executable, "-I", str(drv), str(PAYLOADS), str(d.pid), str(lo), str(hi),
                          backend], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
        for pattern, lists in patterns(d.npages, 5, seed=11).items():
            for idx in lists:
                expected = d.write(idx)
                p.stdin.write("\n")
                p.stdin.flush()
                assert set(json.loads(p.stdout.readline())) == expected, pattern
    finally:
        p.stdin.close()
        p.wait(10)


def test_uffd_many_regions_walk_end(dirtier):
    """More dirty regions than the PAGEMAP_SCAN buffer holds: resumed walks lose nothing."""
    available("uffd")
    d = dirtier(8192)
    with tr.open_tracker(d.pid, "uffd", ranges=[d.range]) as t:
        t.scanner.close()
        t.scanner = pm.PagemapScanner(d.pid, vec_len=64)  # force many resumptions
        t.start()
        idx = list(range(0, 8192, 2))  # 4096 separate regions
        expected = d.write(idx)
        assert set(map(int, t.scan().pages)) == expected
        assert t.scanner.calls >= 4096 // 64
        assert len(t.scan().pages) == 0


# --- a target that exits mid-track ------------------------------------------------------------
# The target exits on a signal from the test, at a chosen step of the tracker (a hook on the
# call that starts that step), and the test waits until it has exited (a zombie, not reaped: a
# foreign target's parent need not have reaped it either), so nothing here races.

def exit_now(p: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Make p exit by `sig` and wait until it has (SIGKILL when the tracker holds it stopped)."""
    os.kill(p.pid, sig)
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)


def exit_on_call(monkeypatch, owner, name: str, p: subprocess.Popen, nth: int = 1,
                 when=lambda *a, **k: True, after: bool = False) -> list[int]:
    """Hook owner.name: at its nth call (counting calls where `when` holds) p exits, before
    the call runs or, with after, once it has returned. Returns the call counter."""
    real = getattr(owner, name)
    calls = [0]

    def hooked(*a, **k):
        hit = False
        if when(*a, **k):
            calls[0] += 1
            hit = calls[0] == nth
        if hit and not after:
            exit_now(p, signal.SIGKILL)
        out = real(*a, **k)
        if hit and after:
            exit_now(p, signal.SIGKILL)
        return out

    monkeypatch.setattr(owner, name, hooked)
    return calls


def _round_is_exact(d: Dirtier, t: tr.Tracker, idx: list[int]) -> None:
    expected = d.write(idx)
    assert in_range(t.scan().pages, *d.range) == expected


# Where the target exits, per backend: (hook target, name, nth, filter, after), installed
# before open ("attach"/"inject") or after the first, exact round (the rest).
_SCAN = {"when": lambda fd, req, arg: req == pm.PAGEMAP_SCAN}
EXIT_POINTS = {
    "attach": ("open", lambda: (tr, "_open_pidfd", 1, {}, True)),
    "inject": ("open", lambda: (tr.pti, "pidfd_getfd", 1, {}, False)),  # mid-injection (uffd)
    "arm": ("start", None),
    "between-rounds": ("round", None),
    "mid-scan-uffd": ("round", lambda: (pm.PagemapScanner, "scan", 1, {}, False)),
    "mid-reprotect-uffd": ("round", lambda: (pm, "_ioctl", 2, _SCAN, False)),
    "register-new-mapping-uffd": ("round", lambda: (pm.Uffd, "writeprotect", 1, {}, False)),
    "mid-compare": ("round", lambda: (pm.VmReader, "read_into", 2, {}, False)),
    "mid-scan-softdirty": ("round", lambda: (pm, "read_pagemap", 1, {}, False)),
    "clear-softdirty": ("round", lambda: (tr.SoftDirtyTracker, "_clear", 1, {}, False)),
}
CASES = [(b, point) for b in ("uffd", "compare", "softdirty") for point in EXIT_POINTS
         if not (point.endswith("-uffd") or point == "inject") or b == "uffd"
         if not point.endswith("-softdirty") or b == "softdirty"
         if point != "mid-compare" or b == "compare"]


@pytest.mark.parametrize("backend, point", CASES, ids=[f"{b}-{p}" for b, p in CASES])
def test_target_exits_mid_track(dirtier, monkeypatch, backend, point):
    """Wherever the target exits, the tracker ends in TargetGone (never ESRCH/EPERM/EBADF out
    of the kernel, never a round computed from a torn-down address space); the rounds before
    stand, and closing is safe."""
    available(backend)
    d = dirtier(1024)
    lo, hi = d.range
    phase, hook = EXIT_POINTS[point]

    def install() -> list[int]:
        owner, name, nth, kw, after = hook()
        return exit_on_call(monkeypatch, owner, name, d.p, nth=nth, after=after, **kw)

    calls = install() if phase == "open" else None
    ranges = None if point == "register-new-mapping-uffd" else [d.range]
    if phase == "open":
        with pytest.raises(tr.TargetGone, match=f"pid {d.pid} exited"):
            tr.open_tracker(d.pid, backend, ranges=ranges)
        assert calls == [1]
        return
    if backend == "compare" and point == "mid-compare":
        t = tr.CompareTracker(d.pid, ranges=ranges, chunk=64 * PAGE)  # 16 chunks to compare
    else:
        t = tr.open_tracker(d.pid, backend, ranges=ranges)
    try:
        if point == "arm":
            exit_now(d.p)
            with pytest.raises(tr.TargetGone, match=f"pid {d.pid} exited"):
                t.start()
            return
        t.start()
        if point == "mid-reprotect-uffd":
            t.scanner.close()
            t.scanner = pm.PagemapScanner(d.pid, vec_len=16)  # many PAGEMAP_SCAN calls per scan
        _round_is_exact(d, t, [1, 2, 3, 500])  # the partial result: this round stands
        if point == "mid-reprotect-uffd":
            d.write(list(range(0, 1024, 2)))  # 512 separate regions: the scan re-protects them
        elif point == "register-new-mapping-uffd":
            d.cmd("m 64")  # the next scan registers and write-protects a new mapping
        else:
            d.write([7, 8, 9])
        if point == "between-rounds":
            exit_now(d.p)
        else:
            calls = install()
        with pytest.raises(tr.TargetGone, match=f"pid {d.pid} exited"):
            t.scan()
        if calls is not None:  # the target exited where it was meant to
            assert calls[0] >= hook()[2]
        with pytest.raises(tr.TargetGone):  # and stays gone
            t.scan()
    finally:
        t.close()
        t.close()


def _track_cli(d: Dirtier, backend: str, *extra: str, stdin: bool = True) -> subprocess.Popen:
    lo, hi = d.range
    return subprocess.Popen(
        [sys.executable, str(PAYLOADS / "tracker.py"), "track", "--pid", str(d.pid), "--backend",
         backend, "--range", f"{lo:x}-{hi:x}", *extra, *(["--stdin"] if stdin else [])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        bufsize=1)


@pytest.mark.parametrize("backend", ["uffd", "compare", "softdirty"])
def test_cli_track_target_exits_between_rounds(dirtier, backend):
    """`track` prints the rounds it measured, then one line saying the target exited; exit
    code 3, nothing on stderr (no traceback)."""
    available(backend)
    d = dirtier(256)
    p = _track_cli(d, backend, "--rounds", "10")
    assert json.loads(p.stdout.readline())["round"] == 0
    for k, idx in enumerate(([1, 2], list(range(10, 20)))):
        expected = d.write(idx)
        p.stdin.write("\n")
        p.stdin.flush()
        line = json.loads(p.stdout.readline())
        assert line["round"] == k + 1 and line["pages"] == len(expected)
    exit_now(d.p)
    p.stdin.write("\n")
    p.stdin.flush()
    out, err = p.communicate(timeout=30)
    assert p.returncode == tr.EXIT_GONE, err
    assert err == ""
    (last,) = out.splitlines()
    assert json.loads(last) == {"pid": d.pid, "gone": True, "rounds": 2,
                                "error": f"pid {d.pid} exited after 2 rounds"}


def test_cli_track_on_a_timer_ends_when_the_target_exits(dirtier):
    """On a timer, the exit ends the wait at once (not at the next tick)."""
    available("compare")
    d = dirtier(64)
    p = _track_cli(d, "compare", "--rounds", "1000", "--interval", "30", stdin=False)
    assert json.loads(p.stdout.readline())["round"] == 0
    t0 = time.monotonic()
    exit_now(d.p)
    out, err = p.communicate(timeout=20)
    assert time.monotonic() - t0 < 15  # the 30 s tick never came
    assert p.returncode == tr.EXIT_GONE and err == ""
    assert json.loads(out)["error"] == f"pid {d.pid} exited after 0 rounds"


def written(pid: int, lo: int, hi: int) -> set[int]:
    """Pages of [lo, hi) that uffd-wp says were written since they were last protected (a
    read-only PAGEMAP_SCAN: it re-protects nothing, so the tracker's next round is intact)."""
    sc = pm.PagemapScanner(pid)
    try:
        return {int(a) for c in sc.scan(lo, hi, wp=False, check=False) for a in c}
    finally:
        sc.close()


def wait_written(pid: int, lo: int, hi: int, want: set[int], timeout: float = 30) -> None:
    """Until the written set is `want`: empty once the tracker armed or scanned the range."""
    end = time.monotonic() + timeout
    while (got := written(pid, lo, hi)) != want:
        assert time.monotonic() < end, f"written pages {len(got)}, want {len(want)}"
        time.sleep(0.01)


def wait_round_done(d: Dirtier, pages: set[int]) -> None:
    """Until a round of the tracker has taken `pages` (written just before) AND has ended.
    Their re-protection shows inside that round's scan, which may still be checking that the
    target lives; a second re-protection (of a page rewritten in `pages`: no new page) shows
    that the next round has begun, so the first one counted."""
    lo, hi = d.range
    wait_written(d.pid, lo, hi, set())
    again = d.write([(min(pages) - lo) // PAGE])
    assert again <= pages
    wait_written(d.pid, lo, hi, set())


@pytest.mark.parametrize("backend", ["uffd", "compare"])
def test_cli_dirty_rate_target_exits_before_the_first_scan(dirtier, backend):
    available(backend)
    d = dirtier(64)
    lo, hi = d.range
    p = subprocess.Popen([sys.executable, str(PAYLOADS / "tracker.py"), "dirty-rate", "--pid",
                          str(d.pid), "--backend", backend, "--seconds", "60", "--interval", "30",
                          "--range", f"{lo:x}-{hi:x}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert json.loads(p.stderr.readline())["armed"]
    t0 = time.monotonic()
    exit_now(d.p)
    out, err = p.communicate(timeout=20)
    assert time.monotonic() - t0 < 15
    assert p.returncode == tr.EXIT_GONE and err == ""
    res = json.loads(out)
    assert res["gone"] and res["rounds"] == 0 and res["pages"] is None
    assert res["error"].startswith(f"pid {d.pid} exited ") and res["error"].endswith(
        "s into the 60 s window, before the first scan: nothing measured")


def test_cli_dirty_rate_target_exits_after_a_round_keeps_its_rate(dirtier):
    """The rate of the part of the window before the exit: exact, from the rounds so far."""
    available("uffd")
    d = dirtier(256)
    lo, hi = d.range
    p = subprocess.Popen([sys.executable, str(PAYLOADS / "tracker.py"), "dirty-rate", "--pid",
                          str(d.pid), "--backend", "uffd", "--seconds", "120", "--interval",
                          "0.2", "--range", f"{lo:x}-{hi:x}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert json.loads(p.stderr.readline())["armed"]
    wait_written(d.pid, lo, hi, set())
    pages = d.write(list(range(0, 200, 2)))
    wait_round_done(d, pages)
    exit_now(d.p)
    out, err = p.communicate(timeout=20)
    assert p.returncode == tr.EXIT_GONE and err == ""
    res = json.loads(out)
    assert res["gone"] and res["rounds"] >= 1
    assert res["pages"] == len(pages) and res["new_mapping_pages"] == 0
    assert res["mib_per_s"] == pytest.approx(len(pages) * PAGE / 2**20 / res["window_s"], rel=1e-2)
    assert f"after {res['rounds']} round" in res["error"]
    assert res["error"].startswith(f"pid {d.pid} exited ")


@pytest.mark.slow  # a lab, a deploy and two 1 s rounds
def test_dirty_rate_task_target_exits_mid_window(make_fake_lab, dirtier, tmp_path):
    """Through the `dirty-rate` task on a fake node (the nodes share this machine): the node's
    row fails with one line saying the process exited and carries the partial rate; exit 1,
    no traceback."""
    available("uffd")
    lab = make_fake_lab(count=1, power_on=True)
    lab.wait("node1", phase="up", ssh=True, timeout=30)
    env = {**lab.env, "LABKIT_SSH_CONFIG": str(tmp_path / "none"),
           "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "INVOKE_LABKIT_LEASE_DIR": str(tmp_path / "leases")}
    labkit = [sys.executable, "-m", "labkit.cli"]
    r = subprocess.run([*labkit, "deploy", "-n", "node1"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    d = dirtier(256)
    lo, hi = d.range
    p = subprocess.Popen([*labkit, "dirty-rate", "-n", "node1", "--pid", str(d.pid),
                          "--seconds", "120", "--json"], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_written(d.pid, lo, hi, set())  # armed (the tracker tracks all writable memory)
        pages = d.write(list(range(0, 100)))
        wait_round_done(d, pages)  # (rounds are 1 s apart)
        exit_now(d.p)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 1, out + err
    assert "Traceback" not in err
    (row,) = json.loads(out)
    assert row["ok"] is False and row["gone"] is True and row["rounds"] >= 1
    assert row["error"].startswith(f"pid {d.pid} exited ") and "s into the 120 s window" in \
        row["error"], row["error"]
    assert "\n" not in row["error"]
    assert row["pages"] >= len(pages)  # the whole process is tracked: its stack too
    assert max(row["per_mapping"].values()) >= len(pages)


LEADER_EXITS_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
static void *waiter(void *arg) { char c; read(0, &c, 1); _exit(0); return arg; }
int main(void) {
    pthread_t t;
    pthread_create(&t, NULL, waiter, NULL);
    printf("ready\n");
    fflush(stdout);
    pthread_exit(NULL);  /* the main thread ends (a zombie leader); the process lives on */
}
"""


def test_exiting_tells_a_zombie_leader_from_an_exited_process(tmp_path):
    """What the tracker's "target gone" rests on: a process whose main thread has ended but
    another runs is alive; once the last thread exits it is gone, reaped or not."""
    exe = _build(LEADER_EXITS_C, tmp_path, "leader_exits")
    p = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ready\n"
        pidfd = tr.pti.pidfd_open(p.pid)
        try:
            wait_state = time.monotonic() + 10
            while tr.pti._thread_state(p.pid, p.pid) != "Z":  # the leader is a zombie
                assert time.monotonic() < wait_state
                time.sleep(0.005)
            assert not tr.pti.exiting(p.pid, pidfd) and not tr.pti.exiting(p.pid)
            p.stdin.write(b"x")
            p.stdin.flush()
            os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
            assert tr.pti.exiting(p.pid, pidfd) and tr.pti.exiting(p.pid)
            assert tr.pti.pidfd_exited(pidfd)
            p.wait()
            assert tr.pti.exiting(p.pid, pidfd) and tr.pti.exiting(p.pid)  # reaped
        finally:
            os.close(pidfd)
    finally:
        p.kill()
        p.wait()


# --- labkit.experiment.dirty: the dirty-rate measurement the task fans out ------------------

class LocalShell:
    """A ``RemoteShell`` over this machine's /bin/sh (the Protocol's "a local shell can stand
    in"): ``dirty_rate`` runs the real tracker payload in a real process, without a lab."""

    def __init__(self, node: str = "local"):
        self.node = node
        self.settings = Settings(command_timeout=30.0)
        # the venv's python3 first on PATH, as a node has its own python3
        self.env = {**os.environ,
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def run(self, cmd: str, *, timeout: float | None = None, input: bytes | None = None,
            env: dict[str, str] | None = None, **_: object) -> RunResult:
        t0 = time.monotonic()
        try:
            p = subprocess.run(["/bin/sh", "-c", cmd], input=input, capture_output=True,
                               timeout=timeout, env={**self.env, **(env or {})})
        except subprocess.TimeoutExpired as e:
            return RunResult(None, e.stdout or b"", e.stderr or b"", time.monotonic() - t0,
                             timed_out=True)
        return RunResult(p.returncode, p.stdout, p.stderr, time.monotonic() - t0)

    def check(self, cmd: str, **kw: object) -> RunResult:
        r = self.run(cmd, **kw)  # type: ignore[arg-type]
        if not r.ok:
            raise CommandFailed(r.failure(self.node), r.to_json())
        return r

    def open_exec(self, cmd: str, *, env: dict[str, str] | None = None) -> object:
        raise NotImplementedError("dirty_rate runs one command to completion")


@pytest.fixture
def local_node(tmp_path) -> Node:
    """A node whose deployed payloads (``<workdir>/payloads/current``) are this tree's."""
    (tmp_path / "payloads").mkdir()
    (tmp_path / "payloads" / "current").symlink_to(PAYLOADS)
    return Node("local", None, SshSpec(host="localhost", workdir=str(tmp_path)))


def test_dirty_rate_command_runs_the_tracker_in_the_payload_dir(local_node):
    cmd = dirty.dirty_rate_command(local_node, 42, 1.5, "uffd")
    assert cmd == (f"cd {local_node.ssh.workdir}/payloads/current && exec python3 tracker.py "
                   "dirty-rate --pid 42 --seconds 1.5 --backend uffd")


def test_gone_report_reads_only_the_trackers_gone_line():
    gone = {"gone": True, "rounds": 0, "error": "pid 7 exited"}
    assert dirty.gone_report({"exit_code": 3, "stdout": "x\n" + json.dumps(gone)}) == gone
    assert dirty.gone_report({"exit_code": 1, "stdout": json.dumps(gone)}) is None
    assert dirty.gone_report({"exit_code": 3, "stdout": ""}) is None
    # exit 3 from something else (a shell, a crash): not JSON, not the tracker's report
    assert dirty.gone_report({"exit_code": 3, "stdout": "Traceback ...\n"}) is None
    assert dirty.gone_report({"exit_code": 3, "stdout": '{"gone": false}'}) is None


def test_dirty_rate_measures_a_live_process(local_node, dirtier):
    available("uffd")
    d = dirtier(64)
    rep = dirty.dirty_rate(local_node, LocalShell(), d.pid, 0.3, "uffd")
    assert rep["backend"] == "uffd" and rep["method"] == "exact"
    assert rep["window_s"] > 0 and rep["pages"] >= 0 and "mib_per_s" in rep


def test_dirty_rate_missing_process_is_a_node_error_carrying_the_report(local_node):
    pid = 2**22 + 12345  # above pid_max's default: no such process
    with pytest.raises(NodeError) as ei:
        dirty.dirty_rate(local_node, LocalShell(), pid, 1, "compare")
    assert not isinstance(ei.value, CommandFailed)
    assert ei.value.value["gone"] is True and ei.value.value["rounds"] == 0
    assert str(ei.value) == ei.value.value["error"] and "\n" not in str(ei.value)


def test_dirty_rate_other_failures_stay_command_failed(local_node):
    with pytest.raises(CommandFailed) as ei:  # the tracker's argparse refuses it: exit 2
        dirty.dirty_rate(local_node, LocalShell(), 1, 1, "no-such-backend")
    assert ei.value.value["exit_code"] == 2 and "no-such-backend" in ei.value.value["stderr"]


def test_dirty_rate_target_exits_mid_window_keeps_the_partial_rate(local_node, dirtier):
    """What the dirty-rate task's row shows when the process exits during the window: one
    line, and the rate of the rounds before the exit (the slow lab test goes through the CLI)."""
    available("uffd")
    d = dirtier(256)
    lo, hi = d.range
    got: dict[str, BaseException] = {}

    def measure() -> None:
        try:
            dirty.dirty_rate(local_node, LocalShell(), d.pid, 120, "auto")
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            got["error"] = e

    t = threading.Thread(target=measure, daemon=True)
    t.start()
    try:
        wait_written(d.pid, lo, hi, set())  # armed (the tracker tracks all writable memory)
        pages = d.write(list(range(0, 100)))
        wait_round_done(d, pages)
    finally:
        exit_now(d.p)
    t.join(60)
    assert not t.is_alive()
    e = got["error"]
    assert isinstance(e, NodeError) and not isinstance(e, CommandFailed), repr(e)
    assert str(e).startswith(f"pid {d.pid} exited ") and "s into the 120 s window" in str(e)
    assert e.value["gone"] is True and e.value["rounds"] >= 1
    assert e.value["pages"] >= len(pages)


def test_pidfd_wait_never_returns_early():
    """A window of --seconds S must last at least S: poll() takes whole milliseconds, and a
    timeout truncated to them ended a 0.3 s window at 0.2999 s (seen once in CI)."""
    p = subprocess.Popen(["sleep", "60"])
    pidfd = tr.pti.pidfd_open(p.pid)
    try:
        for timeout in (0.0005, 0.0019, 0.0299):
            t0 = time.monotonic()
            assert tr.pti.pidfd_exited(pidfd, timeout) is False
            assert time.monotonic() - t0 >= timeout
        p.kill()
        assert tr.pti.pidfd_exited(pidfd, 10)  # and wakes at once when it ends
    finally:
        os.close(pidfd)
        p.kill()
        p.wait()
