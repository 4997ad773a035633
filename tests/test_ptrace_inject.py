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


def test_getpid_in_sleeping_process_and_sleep_is_resumed():
    p = subprocess.Popen(["sleep", "0.6"])
    try:
        time.sleep(0.1)
        t0 = time.monotonic()
        assert pti.inject_syscall(p.pid, pti.SYS_getpid) == p.pid
        assert p.wait(5) == 0
        assert 0.35 < time.monotonic() - t0 < 1.5  # nanosleep restarted with its remaining time
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
        time.sleep(0.05)
        with pti.Injector(p.pid) as inj:
            addr = inj.syscall(pti.SYS_mmap, 0, 4096, PROT_RW, MAP_PRIVATE_ANON, 2**64 - 1, 0)
            assert f"{addr:x}-{addr + 4096:x} rw-p" in _maps(p.pid)
            assert inj.syscall(pti.SYS_munmap, addr, 4096) == 0
            with pytest.raises(pti.InjectError) as ei:
                inj.syscall(pti.SYS_close, 987654)
            assert ei.value.errno == errno.EBADF
        assert f"{addr:x}-{addr + 4096:x}" not in _maps(p.pid)
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
        time.sleep(0.05)
        with pti.Injector(p.pid) as inj:
            os.kill(p.pid, signal.SIGUSR1)
            time.sleep(0.02)
            assert inj.syscall(pti.SYS_getpid) == p.pid
        assert p.stdout.readline().strip() == "usr1"
    finally:
        p.kill()
        p.wait()


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
        time.sleep(0.1)
        with pti.Freezer(p.pid) as fz:
            assert len(fz.held) == 3
            a = ticks()
            time.sleep(0.3)
            assert ticks() - a <= 1
        deadline = time.monotonic() + 10  # running again (slowly, if the machine is loaded)
        while ticks() - a < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ticks() - a >= 5
    finally:
        p.kill()
        p.wait()


def test_stopped_target_stays_stopped():
    """A target frozen with SIGSTOP (e.g. for the final copy) is still stopped after injection."""
    p = subprocess.Popen(["sleep", "5"])
    try:
        time.sleep(0.1)
        os.kill(p.pid, signal.SIGSTOP)
        for _ in range(100):
            if pti._thread_state(p.pid, p.pid) == "T":
                break
            time.sleep(0.01)
        assert pti.inject_syscall(p.pid, pti.SYS_getpid) == p.pid
        time.sleep(0.05)
        assert pti._thread_state(p.pid, p.pid) == "T"
        with pti.Injector(p.pid):  # no syscall: plain detach keeps it stopped too
            pass
        time.sleep(0.05)
        assert pti._thread_state(p.pid, p.pid) == "T"
        os.kill(p.pid, signal.SIGCONT)
        time.sleep(0.05)
        assert pti._thread_state(p.pid, p.pid) in ("S", "R")
    finally:
        p.kill()
        p.wait()
