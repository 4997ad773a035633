"""The power supply of an OpenSSH fake node: runs its ``sshd -D`` and powers the node off —
sshd, every connection it forked, every process carrying the node's marker — when the lab says
so, when the lab dies, or when sshd exits.

Why a process of its own: a real sshd's sessions outlive their connection, and sshd outlives
the lab that started it. If the lab is SIGKILLed (or crashes) nothing in it can clean up, so
the node must power itself off. The lab holds the write end of this program's stdin and never
writes to it: EOF on stdin is the order to power off, and the kernel gives that order itself
when the lab dies, however it dies — no polling, no pid that could be reused.

    python3 -I -S sshd_watchdog.py --marker LABKIT_NODE_ROOT=/x [--budget 2] -- sshd -D ...

sshd's output goes to our stderr (the node's sshd.log). At power-off, one JSON line on stdout:
``{"killed": [pids], "survivors": [pids]}``; exit 0 when nothing survived. Stdlib only plus
``labkit/nodeside/killmarked.py`` (THE kill-by-marker), found beside this file when run by path
with ``-I -S`` (where the labkit package is not importable); the lab imports ``power_off`` from
here too, for a watchdog that did not answer."""

import json
import os
import select
import signal
import subprocess
import sys

try:
    from labkit.nodeside import killmarked
except ImportError:  # run by path with -I -S: the installed package is out of reach
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "nodeside"))
    import killmarked


def descendants(root):
    """All descendants of ``root`` from one /proc snapshot: sshd's per-connection children run
    in sessions of their own and carry no marker, so only parentage finds them."""
    children = {}
    for pid in killmarked.pids():
        st = killmarked.stat(pid)
        if st is not None:
            children.setdefault(st[1], []).append(pid)
    out = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stop(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGSTOP)
        except OSError:
            pass


def power_off(root, marker, budget=2.0):
    """Kill ``root`` (sshd, or a watchdog that did not answer), its whole tree and everything
    carrying ``marker``. The tree is frozen first, top down, so sshd cannot fork a connection
    while it is being swept; frozen processes die by SIGKILL all the same.
    Returns (killed, survivors) as ``killmarked.kill`` does."""
    _stop([root])
    _stop(descendants(root))
    tree = [root, *descendants(root)]  # what forked before its parent froze
    return killmarked.kill([marker], extra=tree, budget=budget)


class _Signalled(Exception):
    pass


def _raise(signum, frame):
    raise _Signalled(signum)


def watch(sshd):
    """Block until the lab closes our stdin (or dies), sshd exits, or a signal asks us to end."""
    poller = select.poll()
    poller.register(0, select.POLLIN)  # POLLHUP/POLLERR are always reported
    try:
        pidfd = os.pidfd_open(sshd.pid)
        poller.register(pidfd, select.POLLIN)
    except (AttributeError, OSError):  # no pidfd (old kernel, seccomp): look every second
        pidfd = None
    try:
        while sshd.poll() is None:
            for fd, _events in poller.poll(None if pidfd is not None else 1000):
                if fd == 0 and not os.read(0, 4096):
                    return
    finally:
        if pidfd is not None:
            os.close(pidfd)


def main(argv):
    import argparse

    ap = argparse.ArgumentParser(prog="sshd_watchdog", description=__doc__.split("\n\n")[0])
    ap.add_argument("--marker", required=True, help="the node's NAME=value marker")
    ap.add_argument("--budget", type=float, default=2.0)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- sshd -D ...")
    a = ap.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command or "=" not in a.marker:
        ap.error("need --marker NAME=value and the sshd command after --")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _raise)  # being asked to end is being asked to power off
    sshd = None
    try:
        sshd = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=2, close_fds=True)
        watch(sshd)
    except _Signalled:
        pass
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the sweep short
    marker = a.marker.encode()
    if sshd is not None and sshd.poll() is None:
        killed, survivors = power_off(sshd.pid, marker, a.budget)
        sshd.wait()
    else:  # sshd died by itself: its sessions may live on
        killed, survivors = killmarked.kill([marker], budget=a.budget)
    try:
        sys.stdout.write(json.dumps({"killed": killed, "survivors": survivors}) + "\n")
        sys.stdout.flush()
    except OSError:  # the lab is gone: nobody to tell
        pass
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
