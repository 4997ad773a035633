"""ptrace syscall injection (labkit/payloads/ptrace_inject.py) into real, uncooperative processes."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from labkit.payloads import ptrace_inject as pti

pytestmark = pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                                reason="x86_64 Linux only")

PROT_RW = 3
MAP_PRIVATE_ANON = 0x02 | 0x20


def _spawn(code: str, **kw) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, bufsize=1, **kw)
    assert p.stdout.readline().strip() == "ready"
    return p


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def _perms_at(pid: int, addr: int) -> str | None:
    """Permissions of the mapping of `pid` that holds `addr`, or None when it is unmapped. (Not
    a match on a whole maps line: the kernel merges a new anonymous mapping into an adjacent
    one with the same flags, so a page we mapped may be part of a larger line.)"""
    for line in _maps(pid).splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= addr < hi:
            return line.split()[1]
    return None


def _wait_for(pred, what: str, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while not (got := pred()):
        assert time.monotonic() < end, f"never {what}"
        time.sleep(0.005)
    return got


def _in_syscall(pid: int, *nrs: int) -> bool:
    """Is the (main thread of) pid blocked in one of these system calls?"""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            return int(f.read().split()[0]) in nrs
    except (OSError, ValueError, IndexError):  # "running" reads as no number
        return False


def _settled_state(pid: int, transient: tuple[str, ...]) -> str:
    """The thread's state once it has left the transient ones (it is running towards the next)."""
    return _wait_for(lambda: (s := pti._thread_state(pid, pid)) not in transient and s,
                     f"left {transient}")


def test_getpid_in_sleeping_process_and_sleep_is_resumed():
    t_spawn = time.monotonic()
    p = subprocess.Popen(["sleep", "0.6"])
    try:
        _wait_for(lambda: _in_syscall(p.pid, 35, 230), "in nanosleep")  # (clock_)nanosleep
        t0 = time.monotonic()
        assert pti.inject_syscall(p.pid, pti.SYS_getpid) == p.pid
        assert p.wait(5) == 0
        # nanosleep restarted with its remaining time: not cut short (and it still ends)
        assert time.monotonic() - t_spawn >= 0.6
        assert time.monotonic() - t0 < 1.5
    finally:
        p.kill()
        p.wait()


def test_target_blocked_in_read_continues():
    p = _spawn("""
        import sys
        print("ready", flush=True)
        line = sys.stdin.readline()
        print("got " + line.strip(), flush=True)
    """)
    try:
        _wait_for(lambda: _in_syscall(p.pid, 0), "blocked in read()")
        with pti.Injector(p.pid) as inj:
            addr = inj.syscall(pti.SYS_mmap, 0, 4096, PROT_RW, MAP_PRIVATE_ANON, 2**64 - 1, 0)
            assert _perms_at(p.pid, addr) == _perms_at(p.pid, addr + 4095) == "rw-p"
            assert inj.syscall(pti.SYS_munmap, addr, 4096) == 0
            # the page alone is gone (if it had been merged, its neighbour remains)
            assert _perms_at(p.pid, addr) is None and _perms_at(p.pid, addr + 4095) is None
            with pytest.raises(pti.InjectError) as ei:
                inj.syscall(pti.SYS_close, 987654)
            assert ei.value.errno == errno.EBADF
        assert _perms_at(p.pid, addr) is None
        p.stdin.write("hello\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "got hello"
        assert p.wait(5) == 0
    finally:
        p.kill()
        p.wait()


def test_busy_multithreaded_target_computes_the_same():
    code = """
        import hashlib, sys, threading
        out = {}
        def work(k):
            h = hashlib.sha256(str(k).encode())
            for _ in range(150000):
                h = hashlib.sha256(h.digest())
            out[k] = h.hexdigest()[:12]
        ts = [threading.Thread(target=work, args=(k,)) for k in range(3)]
        for t in ts:
            t.start()
        print("ready", flush=True)
        for t in ts:
            t.join()
        sys.stdin.readline()  # stay alive until the test is done injecting, however fast we are
        print(" ".join(out[k] for k in range(3)), flush=True)
    """
    base = _spawn(code)
    expected = base.communicate("\n", timeout=60)[0].strip()
    p = _spawn(code)
    try:
        for _ in range(20):
            assert pti.inject_syscall(p.pid, pti.SYS_getpid) == p.pid
            time.sleep(0.005)
        assert p.communicate("\n", timeout=60)[0].strip() == expected
    finally:
        p.kill()
        p.wait()


def test_signal_arriving_while_held_is_delivered_after():
    p = _spawn("""
        import signal, sys, time
        got = []
        signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
        print("ready", flush=True)
        for _ in range(200):
            if got:
                print("usr1", flush=True)
                break
            time.sleep(0.01)
        else:
            print("none", flush=True)
    """)
    try:
        with pti.Injector(p.pid) as inj:
            os.kill(p.pid, signal.SIGUSR1)
            _wait_for(lambda: _pending(p.pid) & (1 << (signal.SIGUSR1 - 1)), "SIGUSR1 pending")
            assert inj.syscall(pti.SYS_getpid) == p.pid
        assert p.stdout.readline().strip() == "usr1"
    finally:
        p.kill()
        p.wait()


def _pending(pid: int) -> int:
    """Signals pending for the process (shared) or its main thread, as a mask."""
    mask = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("SigPnd:", "ShdPnd:")):
                mask |= int(line.split()[1], 16)
    return mask


def test_pidfd_getfd_copies_the_target_fd():
    p = _spawn("""
        import os
        r, w = os.pipe()
        print("ready", flush=True)
        print(w, flush=True)
        os.read(r, 5) and print(os.read(r, 100).decode() or "", flush=True)
    """)
    try:
        wfd = int(p.stdout.readline())
        local = pti.pidfd_getfd(p.pid, wfd)
        os.write(local, b"12345from-outside")
        os.close(local)
        assert p.stdout.readline().strip() == "from-outside"
    finally:
        p.kill()
        p.wait()


def test_errors_name_the_reason():
    with pytest.raises(pti.InjectError) as ei:
        pti.inject_syscall(2**22 + 4321, pti.SYS_getpid)
    assert ei.value.errno == errno.ESRCH
    # a process already traced cannot be seized again
    p = subprocess.Popen(["sleep", "5"])
    try:
        with pti.Injector(p.pid):
            with pytest.raises(pti.InjectError) as ei:
                pti.Injector(p.pid)
            assert ei.value.errno == errno.EPERM
            assert "already traced" in str(ei.value)
    finally:
        p.kill()
        p.wait()


def test_freezer_stops_all_threads():
    p = _spawn("""
        import threading, time
        n = [0, 0]
        def spin(k):
            while True:
                n[k] += 1
        for k in range(2):
            threading.Thread(target=spin, args=(k,), daemon=True).start()
        print("ready", flush=True)
        time.sleep(30)
    """)
    try:
        def ticks():
            with open(f"/proc/{p.pid}/stat") as f:
                f_ = f.read().rsplit(")", 1)[1].split()
            return int(f_[11]) + int(f_[12])  # utime + stime
        with pti.Freezer(p.pid) as fz:
            assert len(fz.held) == 3
            # every thread sits in a ptrace-stop ("t"): none of them runs
            assert {pti._thread_state(p.pid, tid) for tid in fz.held} == {"t"}
            a = ticks()
        deadline = time.monotonic() + 10  # running again (slowly, if the machine is loaded)
        while ticks() - a < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ticks() - a >= 5
    finally:
        p.kill()
        p.wait()


def test_stopped_target_stays_stopped():
    """A target frozen with SIGSTOP (e.g. for the final copy) is still stopped after injection."""
    p = subprocess.Popen(["sleep", "5"])  # exec'd when Popen returns
    try:
        os.kill(p.pid, signal.SIGSTOP)
        _wait_for(lambda: pti._thread_state(p.pid, p.pid) == "T", "stopped")
        assert pti.inject_syscall(p.pid, pti.SYS_getpid) == p.pid
        # after the detach it runs (R) only on its way to a stop (T) or, wrongly, back into
        # its nanosleep (S): wait until it is in one of those
        assert _settled_state(p.pid, ("R", "t")) == "T"
        with pti.Injector(p.pid):  # no syscall: plain detach keeps it stopped too
            pass
        assert _settled_state(p.pid, ("R", "t")) == "T"
        os.kill(p.pid, signal.SIGCONT)
        assert _settled_state(p.pid, ("T", "t")) in ("S", "R")
    finally:
        p.kill()
        p.wait()
