"""Kill every process whose environment carries a marker: THE way labkit ends what it started.

Every remote command labkit starts carries ``LABKIT_RUN=<id>`` and ``LABKIT_CTL=<controller>`` in
its environment, and every process a fake node starts carries ``LABKIT_NODE_ROOT=<root>``. A
process group or a parent pid is not enough to find them all: a payload may ``setsid`` or
double-fork, and its children then belong to no group we know and are re-parented to init. The
environment is inherited through all of that, so /proc/PID/environ is what we match.

One sweep is not enough either: a process that forks between our scan and our signal leaves a
child we did not see, so ``kill`` scans again until nothing marked is left or its budget ends.

Used on nodes (shipped by ``labkit.nodeside.command("killmarked", ...)``) and, imported, by the
fake lab on the controller's own /proc. Stdlib only; python3 >= 3.6.

    python3 killmarked.py --marker LABKIT_RUN=ab12 [--marker ...] [--pid 4242 ...]
                          [--within LABKIT_NODE_ROOT=/x] [--groups all|safe|none]
                          [--grace 1.0] [--budget 2.0]

prints one JSON line ``{"killed": [pids], "survivors": [pids]}``; exit 0 when nothing marked
is left, 1 when something survived the budget.
"""

import json
import os
import signal
import sys
import time

GROUP_MODES = ("all", "safe", "none")


def environ(pid):
    """The NUL-separated entries of a process's environment, or None if it is gone/unreadable."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return None


def stat(pid):
    """(state, ppid, pgrp) from /proc/PID/stat, or None. The command name may hold spaces and
    parentheses, so fields are split after the last ')'."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    return fields[0].decode(), int(fields[1]), int(fields[2])


def pids():
    """Every pid in /proc except our own (and our parent's shell, which ran us)."""
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            out.append(int(name))
    return out


def _as_bytes(s):
    return s if isinstance(s, bytes) else s.encode()


def carries(env, markers, within=None):
    """Does an environment (list of entries) carry any of ``markers`` (exact ``NAME=value``
    entries, or ``NAME=`` prefixes when a marker ends with '=') — and ``within`` if given?"""
    if env is None:
        return False
    if within is not None and within not in env:
        return False
    for m in markers:
        if m.endswith(b"="):
            if any(e.startswith(m) for e in env):
                return True
        elif m in env:
            return True
    return False


def marked(markers, within=None):
    """Live (not zombie) pids whose environment carries one of ``markers``."""
    markers = [_as_bytes(m) for m in markers]
    within = _as_bytes(within) if within is not None else None
    out = []
    for pid in pids():
        st = stat(pid)
        if st is None or st[0] in "ZX":
            continue
        if carries(environ(pid), markers, within):
            out.append(pid)
    return out


def alive(pid):
    st = stat(pid)
    return st is not None and st[0] not in "ZX"


def _groups(victims, mode):
    """Process groups to signal as a whole. "all": the group led by each victim (catches members
    that cleared their environment); "safe": a victim's group only if every live member is a
    victim (nothing unmarked is ever signalled); "none": no groups."""
    if mode == "none":
        return set()
    if mode == "all":
        return set(victims)
    members = {}
    for pid in pids():
        st = stat(pid)
        if st is not None and st[0] not in "ZX":
            members.setdefault(st[2], set()).add(pid)
    groups = set()
    for pid in victims:
        st = stat(pid)
        if st is not None and members.get(st[2], set()) <= set(victims):
            groups.add(st[2])
    return groups


def _signal(victims, sig, mode):
    for g in _groups(victims, mode):
        try:
            os.killpg(g, sig)
        except OSError:
            pass
    for pid in victims:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def kill(markers, extra=(), within=None, groups="all", grace=0.0, budget=2.0, interval=0.02):
    """End ``extra`` pids and every process carrying one of ``markers``.

    ``grace`` > 0 sends SIGTERM (and SIGCONT, so a stopped process receives it) first and waits
    up to ``grace`` seconds; then SIGKILL, scanning again until nothing marked is left or
    ``budget`` seconds have passed. Returns (killed, survivors): sorted pid lists."""
    if groups not in GROUP_MODES:
        raise ValueError(f"groups must be one of {', '.join(GROUP_MODES)}")
    extra = [int(p) for p in extra]
    killed = set()

    def victims():
        return sorted(set(marked(markers, within)) | set(p for p in extra if alive(p)))

    now = victims()
    if grace > 0 and now:
        _signal(now, signal.SIGTERM, groups)
        _signal(now, signal.SIGCONT, groups)
        killed.update(now)
        end = time.monotonic() + grace
        while now and time.monotonic() < end:
            time.sleep(interval)
            now = victims()
    end = time.monotonic() + budget
    while now:
        _signal(now, signal.SIGKILL, groups)
        killed.update(now)
        if time.monotonic() > end:
            break
        time.sleep(interval)
        now = victims()
    return sorted(killed), victims()


def main(argv):
    import argparse

    ap = argparse.ArgumentParser(prog="killmarked", description=__doc__.split("\n\n")[0])
    ap.add_argument("--marker", action="append", default=[], help="NAME=value (repeatable)")
    ap.add_argument("--pid", action="append", type=int, default=[], help="also this pid")
    ap.add_argument("--within", help="only processes that also carry this NAME=value")
    ap.add_argument("--groups", choices=GROUP_MODES, default="all")
    ap.add_argument("--grace", type=float, default=0.0)
    ap.add_argument("--budget", type=float, default=2.0)
    a = ap.parse_args(argv)
    for m in a.marker + ([a.within] if a.within else []):
        if "=" not in m:
            ap.error(f"marker {m!r} is not NAME=value")
    if not a.marker and not a.pid:
        ap.error("nothing to kill: give --marker or --pid")
    killed, survivors = kill([m.encode() for m in a.marker], a.pid,
                             within=a.within.encode() if a.within else None,
                             groups=a.groups, grace=a.grace, budget=a.budget)
    sys.stdout.write(json.dumps({"killed": killed, "survivors": survivors}) + "\n")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
