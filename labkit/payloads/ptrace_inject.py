"""Run a system call inside another process with ptrace, and copy file descriptors out of it.

Node-side payload: stdlib + ctypes only, x86_64 Linux. Never imports labkit.

Recipe (no cooperation from the target needed):
PTRACE_SEIZE + PTRACE_INTERRUPT one thread, save its registers, point rip at any ``0f 05``
(``syscall``) byte pair in an executable mapping, load rax/args, orig_rax=-1 (so the kernel does
not restart an interrupted syscall over ours), PTRACE_SINGLESTEP, read rax, restore the registers,
PTRACE_DETACH (re-delivering any signal that the stop swallowed).

    with Injector(pid) as inj:
        fd = inj.syscall(SYS_userfaultfd, flags)
        local = pidfd_getfd(pid, fd)
        inj.syscall(SYS_close, fd)
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import select
import signal
import time

SYS_close = 3
SYS_mmap = 9
SYS_munmap = 11
SYS_getpid = 39
SYS_userfaultfd = 323
SYS_pidfd_open = 434
SYS_pidfd_getfd = 438

PTRACE_PEEKDATA = 2
PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_EVENT_STOP = 128

WALL = 0x40000000  # __WALL

_libc = ctypes.CDLL(None, use_errno=True)
_ptrace = _libc.ptrace
_ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_ptrace.restype = ctypes.c_long
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class user_regs_struct(ctypes.Structure):  # noqa: N801 - kernel name
    _fields_ = [
        (n, ctypes.c_ulonglong)
        for n in (
            "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax "
            "rip cs eflags rsp ss fs_base gs_base ds es fs gs"
        ).split()
    ]


class InjectError(OSError):
    """ptrace injection failed; errno (if any) says why (EPERM: ptrace denied, ESRCH: gone...)."""


def _err(what: str, e: int | None = None) -> InjectError:
    e = ctypes.get_errno() if e is None else e
    return InjectError(e, f"{what}: {os.strerror(e)}")


def ptrace(req: int, pid: int, addr: int = 0, data: int = 0) -> int:
    ctypes.set_errno(0)
    r = _ptrace(req, pid, ctypes.c_void_p(addr), ctypes.c_void_p(data))
    if r == -1 and ctypes.get_errno():
        raise _err(f"ptrace({req:#x}, {pid})")
    return r


def raw_syscall(nr: int, *args: int) -> int:
    """Call a syscall in this process; returns the result or raises OSError."""
    r = _syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if r == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def pidfd_open(pid: int) -> int:
    return raw_syscall(SYS_pidfd_open, pid, 0)


def pidfd_exited(pidfd: int, timeout: float = 0.0) -> bool:
    """Wait up to `timeout` s for the process behind `pidfd` to exit; True once it has (the
    pidfd turns readable when the whole thread group is gone, zombie or reaped, and never
    names a process that later reuses the pid)."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    deadline = time.monotonic() + max(0.0, timeout)
    while True:  # poll() takes whole ms: round up, or a window comes out short by < 1 ms
        left = deadline - time.monotonic()
        if p.poll(max(0, math.ceil(left * 1000))):
            return True
        if time.monotonic() >= deadline:
            return False


PF_EXITING = 0x4  # task->flags: the thread is in do_exit(); its memory is going or gone


def exiting(pid: int, pidfd: int = -1) -> bool:
    """True when `pid` has exited or is past the point of no return: every thread of it is a
    zombie or already in do_exit(). Once that holds, failures to read or trace its memory mean
    "the target exited", not "permission denied" or "bad address"; and an answer read from it
    may come from an address space being torn down. (A zombie leader with live threads is
    alive; a process that is only stopped is alive.) Costs a poll and one small read while the
    main thread lives."""
    if pidfd >= 0 and pidfd_exited(pidfd):
        return True
    lives = _thread_lives(pid, pid)
    if lives is not False:
        return lives is None  # None: no /proc/PID at all
    try:  # the main thread is done: the process lives on while another thread does
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return True
    return not any(_thread_lives(pid, tid) for tid in tids if tid != pid)


def _thread_lives(pid: int, tid: int) -> bool | None:
    """Is the thread neither a zombie nor in do_exit()? None if it is not there at all."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return fields[0] not in (b"Z", b"X") and not int(fields[6]) & PF_EXITING


def pidfd_getfd(pid: int, fd: int) -> int:
    """Duplicate file descriptor `fd` of process `pid` into this process (close-on-exec)."""
    pfd = pidfd_open(pid)
    try:
        return raw_syscall(SYS_pidfd_getfd, pfd, fd, 0)
    finally:
        os.close(pfd)


def _wait_stop(tid: int) -> int:
    """waitpid a ptrace-stop of `tid`; returns the raw status. Raises if the thread died."""
    while True:
        try:
            _, status = os.waitpid(tid, WALL)
        except InterruptedError:
            continue
        if os.WIFSTOPPED(status):
            return status
        raise InjectError(errno.ESRCH, f"thread {tid} exited during injection")


def find_syscall_insn(pid: int, tries: int = 25) -> int:
    """Address of a ``0f 05`` byte pair in an executable, readable mapping of `pid`.
    (Retries briefly: a process caught in the middle of exec has not mapped its libraries.)"""
    for _ in range(tries - 1):
        try:
            return _find_syscall_insn(pid)
        except InjectError as e:
            if e.errno != errno.ENOEXEC:
                raise
            if exiting(pid):  # an exiting process has no mappings left: no point waiting
                raise InjectError(errno.ESRCH, f"process {pid} exited") from e
            time.sleep(0.02)
    return _find_syscall_insn(pid)


def _find_syscall_insn(pid: int) -> int:
    cands = []
    try:
        f = open(f"/proc/{pid}/maps")  # noqa: SIM115 - closed below
    except FileNotFoundError as e:
        raise InjectError(errno.ESRCH, f"no process {pid}") from e
    with f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 5 or "x" not in parts[1] or "r" not in parts[1]:
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            name = parts[5].strip() if len(parts) > 5 else ""
            # prefer the vdso (small, always there) then libraries
            cands.append((0 if name == "[vdso]" else 1, lo, hi))
    cands.sort()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for _, lo, hi in cands:
            pos = lo
            while pos < hi:
                n = min(1 << 20, hi - pos)
                try:
                    mem.seek(pos)
                    buf = mem.read(n + 1 if pos + n < hi else n)
                except OSError:
                    break
                i = buf.find(b"\x0f\x05")
                if i >= 0:
                    return pos + i
                pos += n
    raise InjectError(errno.ENOEXEC, f"no syscall instruction found in {pid}'s executable mappings")


def _thread_state(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


def _pick_thread(pid: int) -> int:
    """The thread to stop: the main thread unless it has exited (zombie leader)."""
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError as e:
        raise InjectError(errno.ESRCH, f"no process {pid}") from e
    for tid in [pid] + [t for t in tids if t != pid]:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            return tid
    raise InjectError(errno.ESRCH, f"process {pid} has no live thread")


class Injector:
    """Hold one thread of `pid` in a ptrace-stop and run syscalls in it.

    The registers are restored and the thread detached on close(); a signal that arrived while
    we held it is re-delivered at detach."""

    def __init__(self, pid: int):
        self.pid = pid
        self.tid = _pick_thread(pid)
        self.saved: user_regs_struct | None = None
        self.pending_sig = 0
        self.stepped = False
        # a target stopped by SIGSTOP (e.g. frozen for the final copy) must stay stopped
        self.was_stopped = _thread_state(pid, self.tid) == "T"
        self.insn = find_syscall_insn(pid)
        self._attached = False
        try:
            ptrace(PTRACE_SEIZE, self.tid, 0, 0)
        except InjectError as e:
            if exiting(pid):  # a process in do_exit() refuses PTRACE_SEIZE with EPERM too
                raise InjectError(errno.ESRCH, f"process {pid} exited") from e
            if e.errno == errno.EPERM:
                raise InjectError(
                    errno.EPERM,
                    f"ptrace(PTRACE_SEIZE, {self.tid}) denied: {os.strerror(e.errno)} "
                    f"({ptrace_denied_reason(pid)})",
                ) from e
            raise
        self._attached = True
        try:
            ptrace(PTRACE_INTERRUPT, self.tid)
            status = _wait_stop(self.tid)
            sig = os.WSTOPSIG(status)
            event = status >> 16
            if event == 0 and sig != signal.SIGTRAP:
                # signal-delivery-stop: we swallow it now and hand it back at detach
                self.pending_sig = sig
            regs = user_regs_struct()
            ptrace(PTRACE_GETREGS, self.tid, 0, ctypes.addressof(regs))
            self.saved = regs
        except BaseException:
            self._detach()
            raise

    def syscall(self, nr: int, *args: int) -> int:
        """Run syscall `nr` in the stopped thread; returns its result (raises on -errno)."""
        assert self.saved is not None
        regs = user_regs_struct.from_buffer_copy(self.saved)
        regs.rip = self.insn
        regs.rax = nr
        regs.orig_rax = 0xFFFFFFFFFFFFFFFF
        a = list(args) + [0] * (6 - len(args))
        regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9 = (x & (2**64 - 1) for x in a)
        ptrace(PTRACE_SETREGS, self.tid, 0, ctypes.addressof(regs))
        self.stepped = True
        ptrace(PTRACE_SINGLESTEP, self.tid, 0, 0)
        while True:
            status = _wait_stop(self.tid)
            sig = os.WSTOPSIG(status)
            if sig == signal.SIGTRAP and (status >> 16) == 0:
                break
            if (status >> 16) != 0:  # a late PTRACE_EVENT_STOP: step again
                ptrace(PTRACE_SINGLESTEP, self.tid, 0, 0)
                continue
            # another signal arrived first: keep it for detach, step again
            if (status >> 16) == 0 and not self.pending_sig:
                self.pending_sig = sig
            ptrace(PTRACE_SINGLESTEP, self.tid, 0, 0)
        out = user_regs_struct()
        ptrace(PTRACE_GETREGS, self.tid, 0, ctypes.addressof(out))
        if out.rip != self.insn + 2:
            raise InjectError(errno.EFAULT, f"injected syscall {nr}: rip {out.rip:#x} != {self.insn + 2:#x}")
        r = ctypes.c_long(out.rax).value
        if -4096 < r < 0:
            raise InjectError(-r, f"injected syscall {nr} in {self.pid}: {os.strerror(-r)}")
        return r

    def _detach(self) -> None:
        if not self._attached:
            return
        self._attached = False
        try:
            if self.saved is not None:
                ptrace(PTRACE_SETREGS, self.tid, 0, ctypes.addressof(self.saved))
            sig = self.pending_sig
            if self.was_stopped and self.stepped and not sig:
                # single-stepping took the thread out of its group-stop: detaching with SIGSTOP
                # (we are in a signal-delivery-stop) stops it again before it runs user code
                sig = signal.SIGSTOP
            ptrace(PTRACE_DETACH, self.tid, 0, sig)
            if self.was_stopped and sig != signal.SIGSTOP:
                os.kill(self.pid, signal.SIGSTOP)
        except InjectError as e:
            if e.errno != errno.ESRCH:
                raise

    def close(self) -> None:
        self._detach()

    def __enter__(self) -> Injector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def inject_syscall(pid: int, nr: int, *args: int) -> int:
    """One syscall in `pid` (seize, run, restore, detach)."""
    with Injector(pid) as inj:
        return inj.syscall(nr, *args)


def ptrace_denied_reason(pid: int) -> str:
    """Best guess at why ptrace of `pid` is refused, in words."""
    reasons = []
    try:
        scope = int(open("/proc/sys/kernel/yama/ptrace_scope").read())
    except (OSError, ValueError):
        scope = None
    if scope == 1:
        reasons.append(
            "kernel.yama.ptrace_scope=1: only descendants (or a target that called "
            "prctl(PR_SET_PTRACER)) may be traced without CAP_SYS_PTRACE"
        )
    elif scope == 2:
        reasons.append("kernel.yama.ptrace_scope=2: needs CAP_SYS_PTRACE")
    elif scope == 3:
        reasons.append("kernel.yama.ptrace_scope=3: ptrace disabled")
    try:
        theirs = _status(f"/proc/{pid}/status")
        ours = _status("/proc/self/status")
        if theirs.get("TracerPid", "0") != "0":
            reasons.append(f"already traced by pid {theirs['TracerPid']}")
        st = os.stat(f"/proc/{pid}")
        if os.geteuid() != 0 and st.st_uid != os.geteuid():
            reasons.append(f"target owned by uid {st.st_uid}, we are uid {os.geteuid()}")
        extra = int(theirs.get("CapPrm", "0"), 16) & ~int(ours.get("CapPrm", "0"), 16)
        if extra:
            reasons.append(f"the target holds capabilities we lack (CapPrm bits {extra:#x})")
    except (OSError, ValueError):
        pass
    if not reasons and scope is None:
        reasons.append("no Yama, no other tracer, same uid: a security module or container "
                       "policy refuses it")
    return "; ".join(reasons)


def _status(path: str) -> dict[str, str]:
    """/proc/PID/status as {field: first word}."""
    out = {}
    with open(path) as f:
        for line in f:
            k, _, v = line.partition(":")
            if v.split():
                out[k] = v.split()[0]
    return out


class Freezer:
    """Stop every thread of `pid` with PTRACE_SEIZE + PTRACE_INTERRUPT (no SIGSTOP visible to
    the parent) and resume them on close(). Used to make read-and-clear sequences atomic."""

    def __init__(self, pid: int):
        self.pid = pid
        self.held: dict[int, int] = {}  # tid -> signal to re-deliver
        done: set[int] = set()  # threads that ended (or were zombies) while we stopped them
        try:
            # threads may be created while we stop the others: list again until a listing
            # shows none we do not hold (a held thread creates none), else the hold is a lie
            for _ in range(100):
                try:
                    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
                except FileNotFoundError as e:
                    raise InjectError(errno.ESRCH, f"no process {pid}") from e
                new = [t for t in tids if t not in self.held and t not in done]
                if not new:
                    break
                for tid in new:
                    try:
                        ptrace(PTRACE_SEIZE, tid, 0, 0)
                    except InjectError as e:
                        if e.errno == errno.ESRCH or _thread_state(pid, tid) in ("Z", "X", "?"):
                            done.add(tid)  # gone, or a zombie (EPERM): nothing of it runs
                            continue
                        if exiting(pid):
                            raise InjectError(errno.ESRCH, f"process {pid} exited") from e
                        if e.errno == errno.EPERM:
                            raise InjectError(
                                errno.EPERM, f"ptrace(PTRACE_SEIZE, {tid}) denied: "
                                f"{os.strerror(e.errno)} ({ptrace_denied_reason(pid)})") from e
                        raise
                    self.held[tid] = 0
                    ptrace(PTRACE_INTERRUPT, tid)
                for tid in new:
                    if tid not in self.held:
                        continue
                    try:
                        status = _wait_stop(tid)
                    except InjectError:
                        del self.held[tid]
                        done.add(tid)
                        continue
                    if (status >> 16) == 0 and os.WSTOPSIG(status) != signal.SIGTRAP:
                        self.held[tid] = os.WSTOPSIG(status)
            else:
                raise InjectError(errno.EAGAIN, f"process {pid} keeps creating threads "
                                  "faster than they can be stopped")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        held, self.held = self.held, {}
        for tid, sig in held.items():
            try:
                ptrace(PTRACE_DETACH, tid, 0, sig)
            except InjectError:
                pass

    def __enter__(self) -> Freezer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
