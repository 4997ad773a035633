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

A marker is one exact ``NAME=value`` entry with a non-empty value; there is no prefix form, so
no marker can match every run of every controller. With markers, a ``--pid`` is ended only if it
still carries one of them (and ``--within``): a recorded pid may have died and been reused by
someone else's process since. With no marker the pids are ended as given, never their groups.

prints one JSON line ``{"killed": [pids], "survivors": [pids]}``; exit 0 when nothing marked
is left, 1 when something survived the budget; 2 on bad usage (nothing killed).
"""

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
    """(state, ppid, pgrp, start) from /proc/PID/stat, or None; ``start`` is the start time in
    clock ticks since boot (field 22 of proc(5)), which tells a process from a later one that
    reused its pid. The command name may hold spaces and parentheses, so fields are split
    after the last ')'. The one parser of that file for labkit, node side and controller side."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[19])
    except (IndexError, ValueError):
        return None


def pids():
    """Every pid in /proc except our own: we carry no marker when shipped (kill_command is not
    wrapped), but imported by a marked process we must not signal ourselves."""
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            out.append(int(name))
    return out


def _as_bytes(s):
    return s if isinstance(s, bytes) else s.encode()


def valid(marker):
    """Is ``marker`` (bytes) one exact ``NAME=value`` entry, both parts non-empty? ``NAME=``
    alone is refused: as a prefix it would mean every labkit process of every controller, and as
    an exact entry nothing labkit ever sets."""
    name, eq, val = marker.partition(b"=")
    return bool(name and eq and val and b"\0" not in marker)


def checked(marker):
    """``marker`` as bytes, or ValueError if it is not a valid ``NAME=value``."""
    m = _as_bytes(marker)
    if not valid(m):
        raise ValueError(f"marker {m!r} is not NAME=value with a non-empty value")
    return m


def carries(env, markers, within=None):
    """Does an environment (list of entries) carry any of ``markers`` (exact ``NAME=value``
    entries) — and ``within`` if given?"""
    if env is None:
        return False
    if within is not None and within not in env:
        return False
    return any(m in env for m in markers)


def marked(markers, within=None):
    """Live (not zombie) pids whose environment carries one of ``markers``."""
    markers = [checked(m) for m in markers]
    within = checked(within) if within is not None else None
    out = []
    for pid in pids():
        # environment first: most processes are not ours, and one read rules them out (a
        # zombie's environ reads empty, so the stat check is only for the few that match)
        if carries(environ(pid), markers, within):
            st = stat(pid)
            if st is not None and st[0] not in "ZX":
                out.append(pid)
    return out


def alive(pid):
    st = stat(pid)
    return st is not None and st[0] not in "ZX"


def _groups(victims, leaders, mode):
    """Process groups to signal as a whole, found from ``leaders`` (the marked victims only: a
    pid we were merely given may be someone else's by now, and so may its group). "all": the
    group led by each (catches members that cleared their environment); "safe": a leader's
    group only if every live member is a victim (nothing unmarked is ever signalled); "none":
    no groups."""
    if mode == "none" or not leaders:
        return set()
    if mode == "all":
        return set(leaders)
    members = {}
    for pid in pids():
        st = stat(pid)
        if st is not None and st[0] not in "ZX":
            members.setdefault(st[2], set()).add(pid)
    groups = set()
    for pid in leaders:
        st = stat(pid)
        if st is not None and members.get(st[2], set()) <= set(victims):
            groups.add(st[2])
    return groups


def _signal(victims, leaders, sig, mode):
    for g in _groups(victims, leaders, mode):
        try:
            os.killpg(g, sig)
        except OSError:
            pass
    for pid in victims:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def kill(markers, extra=(), within=None, groups="all", grace=0.0, budget=2.0, interval=0.02,
         unchecked=()):
    """End every process carrying one of ``markers`` (exact ``NAME=value`` entries; ValueError
    for a malformed or empty one), and ``extra`` pids.

    ``extra`` pids are recorded ones (a workload's pid, a child already reaped) and may belong
    to someone else by now: with markers, one is ended only if it still carries a marker (and
    ``within``), which the marker scan finds anyway; with no markers, it is ended as given (if
    it carries ``within``, when given) but its group never is. ``unchecked`` pids are ended
    whether marked or not, never their groups: only for pids the caller has just seen alive
    and holds still (a frozen process tree it enumerated), never for recorded ones.

    ``grace`` > 0 sends SIGTERM (and SIGCONT, so a stopped process receives it) first and waits
    up to ``grace`` seconds; then SIGKILL, scanning again until nothing marked is left or
    ``budget`` seconds have passed. Returns (killed, survivors): sorted pid lists."""
    if groups not in GROUP_MODES:
        raise ValueError(f"groups must be one of {', '.join(GROUP_MODES)}")
    markers = [checked(m) for m in markers]
    within = checked(within) if within is not None else None
    extra = [] if markers else [int(p) for p in extra]
    unchecked = [int(p) for p in unchecked]
    killed = set()

    def given(pid):
        return alive(pid) and (within is None or within in (environ(pid) or ()))

    def scan():
        """(victims, leaders): everything to signal, and the marked ones whose groups may be."""
        leaders = set(marked(markers, within)) if markers else set()
        rest = {p for p in extra if given(p)} | {p for p in unchecked if alive(p)}
        return sorted(leaders | rest), leaders

    now, leaders = scan()
    if grace > 0 and now:
        _signal(now, leaders, signal.SIGTERM, groups)
        _signal(now, leaders, signal.SIGCONT, groups)
        killed.update(now)
        end = time.monotonic() + grace
        while now and time.monotonic() < end:
            time.sleep(interval)
            now, leaders = scan()
    end = time.monotonic() + budget
    while now:
        _signal(now, leaders, signal.SIGKILL, groups)
        killed.update(now)
        if time.monotonic() > end:
            break
        time.sleep(interval)
        now, leaders = scan()
    return sorted(killed), scan()[0]


class Usage(Exception):
    """A bad command line: exit 2 with the message, as argparse would."""


def options(argv, names, repeated=()):
    """A small ``--name value`` / ``--name=value`` parser -> (positionals, options), a list
    for each ``repeated`` name. Not argparse or getopt: they import re and gettext, which on a
    slow node costs more than the whole kill (this runs on every timeout and Ctrl-C)."""
    pos, opts = [], {n: [] for n in repeated}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            name, eq, val = arg[2:].partition("=")
            if name not in names:
                raise Usage(f"unknown option --{name}")
            if not eq:
                i += 1
                if i >= len(argv):
                    raise Usage(f"--{name} needs a value")
                val = argv[i]
            if name in repeated:
                opts[name].append(val)
            else:
                opts[name] = val
        else:
            pos.append(arg)
        i += 1
    return pos, opts


def usage(doc):
    """The indented usage block of a program's docstring."""
    blocks = [b for b in doc.split("\n\n") if b.startswith("    python3 ")]
    return (blocks[0] if blocks else "") + "\n"


def _ints(values):
    return "[" + ", ".join(str(int(v)) for v in values) + "]"


def main(argv, out=None):
    out = out or sys.stdout
    if "-h" in argv or "--help" in argv:
        out.write(__doc__)
        return 0
    try:
        pos, o = options(argv, ("marker", "pid", "within", "groups", "grace", "budget"),
                         repeated=("marker", "pid"))
        if pos:
            raise Usage(f"unexpected argument {pos[0]!r}")
        for m in o["marker"] + ([o["within"]] if "within" in o else []):
            if not valid(m.encode()):
                raise Usage(f"marker {m!r} is not NAME=value with a non-empty value")
        if not o["marker"] and not o["pid"]:
            raise Usage("nothing to kill: give --marker or --pid")
        groups = o.get("groups", "all")
        if groups not in GROUP_MODES:
            raise Usage(f"--groups must be one of {', '.join(GROUP_MODES)}")
        pids = [int(p) for p in o["pid"]]
        grace, budget = float(o.get("grace", 0.0)), float(o.get("budget", 2.0))
    except (Usage, ValueError) as e:
        sys.stderr.write(f"killmarked: {e}\nusage:\n{usage(__doc__)}")
        return 2
    within = o["within"].encode() if "within" in o else None
    killed, survivors = kill([m.encode() for m in o["marker"]], pids, within=within,
                             groups=groups, grace=grace, budget=budget)
    # JSON, without importing json: two lists of ints
    out.write(f'{{"killed": {_ints(killed)}, "survivors": {_ints(survivors)}}}\n')
    out.flush()
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
