#!/usr/bin/env python3
"""A deterministic memory-dirtying workload whose whole state lives in one region at a fixed
address, so that a copy of that region *is* the process state and can be resumed elsewhere.

Node-side payload: python3 stdlib + ctypes only, never imports labkit.
Runs as ``python3 workload.py {run,restore} ...`` or as ``labkit.payloads.workload``.

Why it looks like this:
- One private anonymous region, mapped with MAP_FIXED_NOREPLACE at a 2 MiB-aligned address in
  0x1000_0000_0000-0x5000_0000_0000 (clear of ASLR's heap and mmap areas). Page 0 is the header
  (parameters + the step counter); pages 1.. are data. Nothing outside the region matters for
  the state, and it holds offsets, never pointers: restore = map at the same address, copy the
  image in, resume.
- The RNG is counter-based: step s draws its pages from random.Random((seed << 64) | s), so
  (seed, step) is the whole RNG state and a resumed copy draws exactly what the original would.
- Every write stores (step, page index) at the start of the page: a rewrite always changes the
  content (the compare tracker sees it), and redoing a half-finished step is idempotent (a
  process frozen mid-step and resumed elsewhere converges to the same state).
- The step counter in the header is bumped *after* a step's data writes, so the header always
  names the last complete step.
- THP is disabled on the region (MADV_NOHUGEPAGE): tracking and migration work in 4 KiB pages.

Modes: ``--timed`` (``rate`` pages/s of wall time, in steps of ``batch`` pages) or commanded
(steps only on ``step N`` / ``run-to S``). Commands on stdin, one per line, one JSON reply line:
    step N | run-to S | hash | info | hold | go | quit
EOF on stdin ends the process (a lost controller leaves nothing behind) unless --stdin ignore.

``--ctl PATH``: the same commands without stdin, for a workload CRIU migrates (CRIU cannot carry
a pipe to an ssh session, so it runs with ``--stdin ignore``). On SIGUSR1 the workload reads one
command line from PATH and writes its one JSON reply to PATH + ".reply" (tmp + rename, so a
reader never sees half a reply). PATH is opened per command and no fd to it is held: a
checkpoint carries nothing of it. The signal handler only sets a flag and wakes the loop (a
self-pipe); the command runs between steps, never inside one.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import mmap
import os
import random
import select
import signal
import struct
import sys
import time
from pathlib import Path

if __package__:
    from . import tcpstream
else:  # run as a script: siblings live next to this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tcpstream  # type: ignore[no-redef]

PAGE = mmap.PAGESIZE
BASE = 0x1000_0000_0000
SLOT_SPAN = 0x100_0000_0000  # 1 TiB per slot: slots 0..63 stay below 0x5000_0000_0000
HUGE = 2 << 20

MAGIC = b"LKWLOAD1"
PATTERNS = ("uniform", "hotset", "sequential")
# magic, version, page_size, addr, size, npages, step, seed, batch, rate, pattern, hot_fraction,
# hot_prob
HEAD = struct.Struct("<8sIIQQQQQQdIdd")
STEP_OFF = struct.calcsize("<8sIIQQQ")  # offset of the step counter (bumped every step)
STAMP = struct.Struct("<QQ")

PROT_READ, PROT_WRITE = 1, 2
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
MAP_FIXED_NOREPLACE = 0x100000
MADV_NOHUGEPAGE = 15
PR_SET_PTRACER = 0x59616D61
PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


class WorkloadError(Exception):
    pass


def slot_address(slot: int) -> int:
    if not 0 <= slot < 64:
        raise WorkloadError(f"slot {slot} out of range 0..63")
    return BASE + slot * SLOT_SPAN


def parse_size(text: str | int) -> int:
    """'64M', '1G', '4096', '2MiB' -> bytes."""
    if isinstance(text, int):
        return text
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        value = float(t) * mult
    except ValueError:
        raise WorkloadError(f"bad size {text!r} (use e.g. 64M, 1G)") from None
    if value <= 0:
        raise WorkloadError(f"bad size {text!r}: must be > 0")
    return int(value)


def allow_ptrace() -> None:
    """Under Yama ptrace_scope=1 only ancestors may ptrace us (and so read our memory or scan
    our pagemap); the tracker is not our ancestor, so say that anyone may. EINVAL without Yama."""
    _libc.prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0)


def map_region(addr: int, size: int) -> memoryview:
    """mmap a private anonymous region at exactly addr (never over an existing mapping)."""
    if addr % HUGE:
        raise WorkloadError(f"region address {addr:#x} is not 2 MiB-aligned")
    if size % PAGE:
        raise WorkloadError(f"region size {size} is not a multiple of the page size {PAGE}")
    got = _libc.mmap(addr, size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
    if got is None or got == ctypes.c_void_p(-1).value:
        e = ctypes.get_errno()
        raise WorkloadError(f"mmap at {addr:#x} ({size} bytes) failed: {os.strerror(e)}"
                            + (" (address already in use)" if e == 17 else ""))
    if got != addr:  # kernels < 4.17 treat MAP_FIXED_NOREPLACE as a hint
        _libc.munmap(got, size)
        raise WorkloadError(f"kernel mapped the region at {got:#x}, not {addr:#x} "
                            "(MAP_FIXED_NOREPLACE unsupported?)")
    _libc.madvise(addr, size, MADV_NOHUGEPAGE)
    return memoryview((ctypes.c_char * size).from_address(addr)).cast("B")


class Workload:
    """The workload's state, all of it inside ``self.mem`` (the region)."""

    def __init__(self, mem: memoryview, addr: int):
        self.mem = mem
        self.addr = addr
        (magic, version, page_size, haddr, size, npages, step, seed, batch, rate, pattern,
         hot_fraction, hot_prob) = HEAD.unpack_from(mem, 0)
        if magic != MAGIC or version != 1:
            raise WorkloadError("region has no workload header (bad image?)")
        if page_size != PAGE or haddr != addr or size != len(mem):
            raise WorkloadError(f"image is for page size {page_size} at {haddr:#x} ({size} B); "
                                f"this is page size {PAGE} at {addr:#x} ({len(mem)} B)")
        self.npages, self.seed, self.batch = npages, seed, batch
        self.rate, self.pattern = rate, PATTERNS[pattern]
        self.hot_fraction, self.hot_prob = hot_fraction, hot_prob
        self.data_pages = npages - 1
        self.hot_pages = max(1, int(self.data_pages * hot_fraction))
        self.log = None

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(cls, addr: int, size: int, *, rate: float, pattern: str, seed: int,
               batch: int | None = None, hot_fraction: float = 0.1,
               hot_prob: float = 0.9) -> Workload:
        if pattern not in PATTERNS:
            raise WorkloadError(f"unknown pattern {pattern!r} (one of {', '.join(PATTERNS)})")
        if rate < 0:
            raise WorkloadError(f"rate must be >= 0, got {rate}")
        if not 0 < hot_fraction <= 1:
            raise WorkloadError(f"hot fraction must be in (0, 1], got {hot_fraction}")
        size = -(-size // PAGE) * PAGE
        npages = size // PAGE
        if npages < 2:
            raise WorkloadError("region must hold at least 2 pages")
        if batch is None:
            batch = max(1, int(rate // 100))  # ~100 steps/s in timed mode
        mem = map_region(addr, size)
        # Fill every page with seed-derived bytes (so the copy carries real content and the
        # region is fully populated), tiled from a 1 MiB block.
        block = random.Random(seed).randbytes(min(size, 1 << 20))
        for off in range(0, size, len(block)):
            n = min(len(block), size - off)
            mem[off:off + n] = block[:n]
        HEAD.pack_into(mem, 0, MAGIC, 1, PAGE, addr, size, npages, 0, seed, batch, float(rate),
                       PATTERNS.index(pattern), float(hot_fraction), float(hot_prob))
        return cls(mem, addr)

    @classmethod
    def restore(cls, image, addr: int | None = None) -> Workload:
        """Map the region at the address the image's header names and load the image into it.
        ``image`` is a binary file object (a file or stdin)."""
        head = _read_exact(image, PAGE)
        magic, version, page_size, haddr, size = struct.unpack_from("<8sIIQQ", head, 0)
        if magic != MAGIC:
            raise WorkloadError("not a workload image (bad magic)")
        if addr is not None and addr != haddr:
            raise WorkloadError(f"image is for {haddr:#x}, asked for {addr:#x}")
        mem = map_region(haddr, size)
        mem[:PAGE] = head
        got = PAGE
        while got < size:
            n = image.readinto(mem[got:])
            if not n:
                raise WorkloadError(f"image truncated: {got} of {size} bytes")
            got += n
        return cls(mem, haddr)

    # -- the work ---------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return struct.unpack_from("<Q", self.mem, STEP_OFF)[0]

    def pages_for(self, step: int) -> list[int]:
        """Page indexes (1..npages-1, possibly repeated) written by step `step` (1-based)."""
        k, d = self.batch, self.data_pages
        if self.pattern == "sequential":
            start = ((step - 1) * k) % d
            return [1 + (start + i) % d for i in range(k)]
        rng = random.Random((self.seed << 64) | step)
        rb = rng.randrange
        if self.pattern == "uniform":
            return [1 + rb(d) for _ in range(k)]
        h, p, rnd = self.hot_pages, self.hot_prob, rng.random
        return [1 + (rb(h) if rnd() < p else rb(d)) for _ in range(k)]

    def do_step(self) -> list[int]:
        s = self.step + 1
        mem, pack = self.mem, STAMP.pack_into
        pages = self.pages_for(s)
        for pg in pages:
            pack(mem, pg * PAGE, s, pg)
        struct.pack_into("<Q", mem, STEP_OFF, s)  # last: the header names complete steps only
        if self.log is not None:
            self.log.write(json.dumps({"step": s, "pages": sorted({0, *pages})}) + "\n")
        return pages

    def sha256(self) -> str:
        return hashlib.sha256(self.mem).hexdigest()

    def info(self) -> dict:
        return {"pid": os.getpid(), "addr": self.addr, "size": len(self.mem),
                "npages": self.npages, "step": self.step, "seed": self.seed,
                "batch": self.batch, "rate": self.rate, "pattern": self.pattern,
                "page_size": PAGE}


def _read_exact(f, n: int) -> bytes:
    buf = bytearray(n)
    got = 0
    while got < n:
        k = f.readinto(memoryview(buf)[got:])
        if not k:
            raise WorkloadError(f"image truncated: {got} of {n} bytes")
        got += k
    return bytes(buf)


# --- the command loop -------------------------------------------------------------------------
class Server:
    """Runs the workload: timed steps and/or commands from an input fd, JSON replies to an
    output fd. Used by ``run``, ``restore`` and by the restore agent (which becomes the resumed
    workload in-process, so resuming costs no image load)."""

    def __init__(self, wl: Workload, *, timed: bool, in_fd: int | None = 0, out_fd: int = 1,
                 ctl: str | None = None, tcp: tcpstream.TcpService | None = None):
        self.wl = wl
        self.tcp = tcp
        self.timed = timed
        self.in_fd = in_fd
        self.out_fd = out_fd
        self._buf = b""
        self.quit = False
        self.ctl = ctl
        self._ctl_pending = False
        self._wake_r: int | None = None
        if ctl is not None:
            self._arm_ctl()

    def _arm_ctl(self) -> None:
        """SIGUSR1 sets a flag; the C-level handler also writes to a self-pipe so a select()
        in progress returns at once (PEP 475 would otherwise resume it for its full timeout
        and the command would wait for the next step or forever)."""
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_r = r
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)

        def on_usr1(_signo: int, _frame: object) -> None:
            self._ctl_pending = True

        signal.signal(signal.SIGUSR1, on_usr1)

    def reply(self, obj: dict) -> None:
        data = (json.dumps(obj, sort_keys=True) + "\n").encode()
        while data:
            data = data[os.write(self.out_fd, data):]

    def handle(self, line: str) -> None:
        obj = self.answer(line)
        if obj is not None:
            self.reply(obj)

    def answer(self, line: str) -> dict | None:
        """The reply to one command line (None for a blank line), whichever way it came."""
        parts = line.split()
        if not parts:
            return None
        cmd, args = parts[0], parts[1:]
        wl = self.wl
        try:
            if cmd == "step":
                n = int(args[0]) if args else 1
                distinct: set[int] = {0}
                for _ in range(n):
                    distinct.update(wl.do_step())
                self._pump()
                return {"ok": True, "step": wl.step, "pages": len(distinct)}
            if cmd == "run-to":
                target = int(args[0])
                if wl.step > target:
                    raise WorkloadError(f"already at step {wl.step}, past {target}")
                while wl.step < target:
                    wl.do_step()
                self._pump()
                return {"ok": True, "step": wl.step}
            if cmd == "hash":
                return {"ok": True, "step": wl.step, "sha256": wl.sha256()}
            if cmd == "info":
                return {"ok": True, **self.info()}
            if cmd == "hold":
                self.timed = False
                return {"ok": True, "step": wl.step, "timed": False}
            if cmd == "go":
                self.timed = True
                self._next = time.monotonic()
                return {"ok": True, "step": wl.step, "timed": True}
            if cmd == "quit":
                self.quit = True
                return {"ok": True, "step": wl.step}
            raise WorkloadError(f"unknown command {cmd!r}")
        except (WorkloadError, ValueError, IndexError) as e:
            return {"ok": False, "error": str(e)}

    def info(self) -> dict:
        out = {**self.wl.info(), "timed": self.timed}
        if self.tcp is not None:
            out["tcp"] = self.tcp.info()
        return out

    def _pump(self) -> None:
        """One record out and the client's messages in, after a step (see tcpstream)."""
        if self.tcp is not None:
            self.tcp.pump(self.wl.step)

    def _handle_ctl(self) -> None:
        """One SIGUSR1 = one command from the ctl file; always one reply (the sender waits for
        it), even for a missing file or a blank line."""
        self._ctl_pending = False
        assert self.ctl is not None
        try:
            line = Path(self.ctl).read_text(errors="replace").split("\n", 1)[0]
        except OSError as e:
            obj: dict | None = {"ok": False, "error": f"cannot read {self.ctl}: {e.strerror}"}
        else:
            obj = self.answer(line)
            if obj is None:
                obj = {"ok": False, "error": f"no command in {self.ctl}"}
        target = self.ctl + ".reply"
        tmp = f"{target}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps(obj, sort_keys=True) + "\n")
            os.replace(tmp, target)
        except OSError as e:  # nobody to tell but our own log
            print(f"workload[{os.getpid()}]: cannot write {target}: {e}", file=sys.stderr,
                  flush=True)

    def _poll(self, timeout: float | None) -> None:
        """Wait up to timeout for input (stdin lines, a ctl signal) and handle it all."""
        if self._ctl_pending:
            self._handle_ctl()
            return
        tcp_fd = self.tcp.fileno() if self.tcp is not None else None
        fds = [fd for fd in (self.in_fd, self._wake_r, tcp_fd) if fd is not None]
        if not fds:
            if timeout is None:
                signal.pause()
            elif timeout > 0:
                time.sleep(timeout)
            return
        r, _, _ = select.select(fds, [], [], None if timeout is None else max(timeout, 0))
        if self._wake_r is not None and self._wake_r in r:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        if tcp_fd is not None and tcp_fd in r:  # a client to accept, or whole messages
            self.tcp.receive()
        if self._ctl_pending:
            self._handle_ctl()
        if self.in_fd is None or self.in_fd not in r:
            return
        data = os.read(self.in_fd, 65536)
        if not data:
            self.quit = True  # controller gone: do not linger
            return
        self._buf += data
        while b"\n" in self._buf and not self.quit:
            line, self._buf = self._buf.split(b"\n", 1)
            self.handle(line.decode(errors="replace"))

    def serve(self) -> None:
        wl = self.wl
        self._next = time.monotonic()
        while not self.quit:
            if self.timed and wl.rate > 0:
                interval = wl.batch / wl.rate
                now = time.monotonic()
                if now >= self._next:
                    self._poll(0)  # a "hold" must win over an overdue step
                    if self.quit or not self.timed:
                        continue
                    wl.do_step()
                    self._pump()
                    self._next += interval
                    if now - self._next > 1.0:  # we were frozen/starved: do not burst to catch up
                        self._next = now
                    continue
                self._poll(self._next - now)
            else:
                self._poll(None)


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timed", action="store_true", help="step on wall time at --rate pages/s")
    p.add_argument("--stdin", choices=("commands", "ignore"), default="commands",
                   help="read commands from stdin (EOF ends the process) or ignore stdin")
    p.add_argument("--log", help="ground-truth log: one JSON line per step with its pages")
    p.add_argument("--ctl", metavar="PATH",
                   help="on SIGUSR1 run the one command in PATH, reply to PATH.reply")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="workload.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="create the region and run")
    r.add_argument("--size", default="64M")
    r.add_argument("--rate", type=float, default=1000.0, help="pages/s in timed mode")
    r.add_argument("--batch", type=int, default=None, help="pages per step (default rate/100)")
    r.add_argument("--pattern", choices=PATTERNS, default="uniform")
    r.add_argument("--hot-fraction", type=float, default=0.1)
    r.add_argument("--hot-prob", type=float, default=0.9)
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--slot", type=int, default=0)
    r.add_argument("--tcp-serve", metavar="ADDR:PORT",
                   help="serve the record stream (tcpstream) to one TCP client on ADDR:PORT")
    _common_args(r)
    s = sub.add_parser("restore", help="map the region at its address, load an image, resume")
    s.add_argument("--image", required=True, help="image file, or - for stdin")
    s.add_argument("--hash", action="store_true", help="put the region's SHA-256 in the ready line")
    _common_args(s)
    a = ap.parse_args(argv)
    if a.ctl:  # SIGUSR1's default action kills: hold it pending until the server handles it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    allow_ptrace()
    try:
        if a.cmd == "run":
            wl = Workload.create(slot_address(a.slot), parse_size(a.size), rate=a.rate,
                                 pattern=a.pattern, seed=a.seed, batch=a.batch,
                                 hot_fraction=a.hot_fraction, hot_prob=a.hot_prob)
        else:
            if a.image == "-":
                wl = Workload.restore(sys.stdin.buffer.raw)
            else:
                with open(a.image, "rb", buffering=0) as f:
                    wl = Workload.restore(f)
        tcp = None
        if getattr(a, "tcp_serve", None):
            host, _, port = a.tcp_serve.rpartition(":")
            try:
                tcp = tcpstream.TcpService.listen(host, int(port), wl.mem, seed=wl.seed)
            except (OSError, ValueError) as e:
                raise WorkloadError(f"--tcp-serve {a.tcp_serve}: {e}") from None
    except WorkloadError as e:  # the reason on both streams, like the agent's
        print(f"workload[{os.getpid()}]: {e}", file=sys.stderr, flush=True)
        print(json.dumps({"event": "error", "error": str(e)}), flush=True)
        return 2
    if a.log:
        wl.log = open(a.log, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    in_fd = 0 if a.stdin == "commands" else None  # an image on stdin was read exactly: no loss
    srv = Server(wl, timed=a.timed, in_fd=in_fd, ctl=os.path.abspath(a.ctl) if a.ctl else None,
                 tcp=tcp)
    if a.ctl:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    ready = {"event": "ready", **srv.info(), "restored": a.cmd == "restore"}
    if a.cmd == "restore" and a.hash:
        ready["sha256"] = wl.sha256()
    srv.reply(ready)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    srv.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
