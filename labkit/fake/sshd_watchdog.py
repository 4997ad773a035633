"""The power supply of an OpenSSH fake node: runs its ``sshd -D`` and powers the node off —
sshd, every connection it forked, every process carrying the node's marker — when the lab says
so, when the lab dies, or when sshd exits.

Why a process of its own: a real sshd's sessions outlive their connection, and sshd outlives
the lab that started it. If the lab is SIGKILLed (or crashes) nothing in it can clean up, so
the node must power itself off. The lab holds the write end of this program's stdin and never
writes to it: EOF on stdin is the order to power off, and the kernel gives that order itself
when the lab dies, however it dies — no polling, no pid that could be reused.

    python3 -I -S sshd_watchdog.py --marker LABKIT_NODE_ROOT=/x [--budget 2] [--interval 0.02]
                                   -- sshd -D ...

sshd's output goes to our stderr (the node's sshd.log). At power-off, one JSON line on stdout:
``{"killed": [pids], "survivors": [pids]}``; exit 0 when nothing survived, 2 on bad usage.

Stdlib only plus ``labkit/nodeside/killmarked.py`` (THE kill-by-marker), found beside this file
when run by path with ``-I -S`` (where the labkit package is not importable). sshd is started
before anything else is imported, so the node's power-on does not wait for our imports. The lab
imports ``power_off`` from here too, for a watchdog that did not answer."""

from __future__ import annotations

import os
import select
import signal
import sys
from types import ModuleType
from typing import Any

_km: ModuleType | None = None


def _killmarked() -> ModuleType:
    """killmarked, imported on first use."""
    global _km
    if _km is None:
        try:
            from labkit.nodeside import killmarked
        except ImportError:  # run by path with -I -S: the installed package is out of reach
            here = os.path.dirname(os.path.abspath(__file__))
            sys.path.insert(0, os.path.join(os.path.dirname(here), "nodeside"))
            import killmarked
        _km = killmarked
    return _km


def descendants(root: int) -> list[int]:
    """All descendants of ``root`` from one /proc snapshot: sshd's per-connection children run
    in sessions of their own and carry no marker, so only parentage finds them."""
    km = _killmarked()
    children: dict[int, list[int]] = {}
    for pid in km.pids():
        st = km.stat(pid)
        if st is not None:
            children.setdefault(st[1], []).append(pid)
    out: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stop(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGSTOP)
        except OSError:
            pass


def power_off(root: int, marker: bytes, budget: float = 2.0,
              interval: float = 0.02) -> tuple[list[int], list[int]]:
    """Kill ``root`` (sshd, or a watchdog that did not answer), its whole tree and everything
    carrying ``marker``. The tree is frozen first, top down, so sshd cannot fork a connection
    while it is being swept; frozen processes die by SIGKILL all the same.

    ``root`` must be the caller's own child, not yet reaped (running or a zombie): only then is
    its pid certain to still be that process and not a stranger that reused it. Once it has
    been waited for, sweep by ``marker`` alone (``killmarked.kill``).
    Returns (killed, survivors) as ``killmarked.kill`` does."""
    _stop([root])
    _stop(descendants(root))
    tree = [root, *descendants(root)]  # what forked before its parent froze
    # unchecked: sshd and its connections carry no marker, and this tree was just seen, frozen
    return _killmarked().kill([marker], unchecked=tree, budget=budget, interval=interval)


def shut(proc: Any, marker: bytes, log: Any, name: str, timeout: float = 10.0,
         interval: float = 0.02) -> tuple[list[int], list[int]]:
    """The lab's side of a power-off: close the lifeline of the watchdog ``proc`` (a Popen of
    this program, or None: then only the marker sweep) and read its report; if it does not answer within ``timeout``, power off from
    here (it is still our unreaped child, so its pid is its own); if its report is unreadable or
    names survivors, sweep by ``marker``. Returns (killed, survivors). One copy for every node
    kind that runs under this supply (OpenSSH nodes, QEMU guests)."""
    import json
    import subprocess

    if proc is None:  # no supply running (never started, or already stopped): sweep only
        return _killmarked().kill([marker], interval=interval)
    killed: list[int] = []
    clean = False
    try:
        out, _ = proc.communicate(timeout=timeout)  # closes the lifeline
    except subprocess.TimeoutExpired:
        log.warning("node %s: power supply did not report; powering off here", name)
        killed, _ = power_off(proc.pid, marker, interval=interval)
        proc.communicate()
    else:
        # reaped: its pid may already name a stranger, so nothing is signalled by it; a report
        # we cannot read leaves clean False, and the marker sweep below runs
        try:
            report = json.loads(out or b"{}")
            got = report.get("killed", []) if isinstance(report, dict) else None
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            got = None
        if not isinstance(got, list) or not all(isinstance(p, int) for p in got):
            log.warning("node %s: power supply's report is unreadable: %r", name, out[-200:])
        else:
            killed, clean = got, proc.returncode == 0
    survivors: list[int] = []
    if not clean:  # no report, or one that left something: sweep from here
        more, survivors = _killmarked().kill([marker], interval=interval)
        killed += more
    return killed, survivors


def spawn(command: list[str]) -> int:
    """Start sshd: stdin /dev/null (the lifeline stays ours alone), stdout to our stderr, and
    the signal dispositions Python changed at start-up back to their defaults."""
    return os.posix_spawnp(command[0], command, os.environ,
                           file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                         (os.POSIX_SPAWN_DUP2, 2, 1)],
                           setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))


def exited(pid: int) -> bool:
    """Has our child ``pid`` exited? (reaps it if so)"""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True


def _ignore(signum: int, frame: object) -> None:
    """A Python-level handler that does nothing: the C-level one has already written the signal
    to the wakeup fd, which ``watch`` polls. Raising from here instead would let the exception
    land anywhere, e.g. right after ``exited`` reaped sshd but before it returned: sshd would
    then be taken for alive and its reaped — reusable — pid signalled."""


def watch(sshd: int, wakeup: int) -> bool:
    """Block until the lab closes our stdin (or dies), sshd exits, or a signal (written to
    ``wakeup`` by ``signal.set_wakeup_fd``) asks us to end. Returns whether sshd has exited
    and was reaped; False means it is still our unreaped child."""
    poller = select.poll()
    poller.register(0, select.POLLIN)  # POLLHUP/POLLERR are always reported
    poller.register(wakeup, select.POLLIN)
    try:
        pidfd = os.pidfd_open(sshd)
        poller.register(pidfd, select.POLLIN)
    except (AttributeError, OSError):  # no pidfd (old kernel, seccomp): look every second
        pidfd = None
    try:
        while not exited(sshd):
            for fd, _events in poller.poll(None if pidfd is not None else 1000):
                if fd == wakeup or (fd == 0 and not os.read(0, 4096)):
                    return False
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def parse(argv: list[str]) -> tuple[bytes, float, float, list[str]]:
    """(marker, budget, interval, command); argparse would cost the node's power-on its import."""
    opts = {"--marker": "", "--budget": "2.0", "--interval": "0.02"}
    i = 0
    while i < len(argv) and argv[i] != "--":
        if argv[i] not in opts or i + 1 >= len(argv):
            raise ValueError(f"unknown or incomplete option {argv[i]!r}")
        opts[argv[i]] = argv[i + 1]
        i += 2
    command = argv[i + 1:]
    if "=" not in opts["--marker"] or not command:
        raise ValueError("need --marker NAME=value and the sshd command after --")
    return opts["--marker"].encode(), float(opts["--budget"]), float(opts["--interval"]), command


def main(argv: list[str]) -> int:
    try:
        marker, budget, interval, command = parse(argv)
    except ValueError as e:
        sys.stderr.write(f"sshd_watchdog: {e}\n{__doc__.split(chr(10) * 2)[2]}\n")
        return 2
    # Signals are handled synchronously: they only wake ``watch`` through a pipe, so sshd's
    # state (reaped or not) is always what ``gone`` says, whenever a signal arrives.
    rfd, wfd = os.pipe()  # close-on-exec: sshd does not inherit it
    os.set_blocking(wfd, False)
    signal.set_wakeup_fd(wfd)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _ignore)
    sshd: int | None = None
    gone = False
    try:
        sshd = spawn(command)
    except OSError as e:
        sys.stderr.write(f"sshd_watchdog: cannot start {command[0]}: {e}\n")
    if sshd is not None:
        _killmarked()  # while sshd starts, not at power-off
        gone = watch(sshd, rfd)  # being asked to end is being asked to power off
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the sweep short
    if sshd is not None and not gone:  # still our unreaped child: its pid is its own
        killed, survivors = power_off(sshd, marker, budget, interval)
        try:
            os.waitpid(sshd, 0)
        except ChildProcessError:  # reaped after all (nothing else here waits for it)
            pass
    else:  # never started, or died by itself: its sessions may live on
        killed, survivors = _killmarked().kill([marker], budget=budget, interval=interval)
    try:
        sys.stdout.write(f'{{"killed": {killed}, "survivors": {survivors}}}\n')
        sys.stdout.flush()
    except OSError:  # the lab is gone: nobody to tell
        pass
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
