"""The janitor's side on a node: list what controllers left here, end what the controller says
belongs to dead ones.

    python3 sweep.py KINDS WORKDIR [--scratch tmp] [--ctl-var LABKIT_CTL]
                     [--run-var LABKIT_RUN] [--within-var LABKIT_NODE_ROOT]

A line protocol over stdin/stdout, one JSON object per line:

1. prints the census: every live process whose environment carries ``CTL_VAR=<tag>`` (pid,
   ppid, pgrp, state, tag, run id, command line) and the per-controller scratch folders
   ``WORKDIR/SCRATCH/<tag>/`` (KINDS, comma-separated: ``processes``, ``files``);
2. reads the verdict ``{"dead": [tags], "dirs": [folder names], "grace": seconds}`` — only the
   controller can tell which controllers are dead (they ran on its host); EOF instead means the
   controller went away, and nothing is changed; an empty or malformed tag is ignored (as a
   marker, ``CTL_VAR=`` would mean every controller's processes);
3. ends the processes of the dead tags with ``killmarked`` (SIGTERM + SIGCONT, the grace, then
   SIGKILL until none is left; a process group only when every member carries a dead tag, so
   nothing without our marker is ever signalled), removes the dead controllers' folders, and
   prints ``{"killed": [pids], "survivors": [pids], "removed": [paths]}``.

Fake-lab nodes share the controller's /proc: when ``WITHIN_VAR`` is set in our environment, only
processes carrying the same value are considered, so a sweep of node2 never reaps node1's.
Runs with the node's python3 (3.6+), stdlib only; shipped by ``labkit.nodeside.command``.
"""

import json
import os
import shutil
import sys

try:
    from labkit.nodeside import killmarked
except ImportError:  # on a node: inlined ahead of us by labkit.nodeside.program()
    import killmarked

BUDGET = 2.0  # seconds of SIGKILL rounds after the grace


def value(env, name):
    """The value of ``name`` in a /proc environ entry list, or None."""
    prefix = name + b"="
    for e in env:
        if e.startswith(prefix):
            return e[len(prefix):].decode("utf-8", "replace")
    return None


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()[:300]
    except OSError:
        return ""


def processes(ctl_var, run_var, within=None):
    """Live processes carrying ``ctl_var`` (and ``within``, an exact entry, when given)."""
    ctl, run = ctl_var.encode(), run_var.encode()
    out = []
    for pid in sorted(killmarked.pids()):
        st = killmarked.stat(pid)
        if st is None or st[0] in "ZX":
            continue
        env = killmarked.environ(pid)
        if env is None or (within is not None and within not in env):
            continue
        tag = value(env, ctl)
        if tag:
            out.append({"pid": pid, "ppid": st[1], "pgrp": st[2], "state": st[0], "ctl": tag,
                        "run": value(env, run), "cmd": cmdline(pid)})
    return out


def folders(scratch):
    try:
        return sorted(d for d in os.listdir(scratch) if os.path.isdir(os.path.join(scratch, d)))
    except OSError:
        return []


def tags(dead):
    """The usable tags of a verdict's "dead" list. An empty one would make the marker
    ``CTL_VAR=``, and anything but a non-empty string (no NUL) is no tag we ever listed: both
    are dropped, never widened into "every controller's processes"."""
    if not isinstance(dead, list):
        return []
    return sorted({t for t in dead if isinstance(t, str) and t and "\0" not in t})


def settle(verdict, scratch, ctl_var, within=None):
    """Act on the controller's verdict; the report line's object."""
    dead = tags(verdict.get("dead", []))
    killed, survivors = [], []
    if dead:
        killed, survivors = killmarked.kill(
            [f"{ctl_var}={t}".encode() for t in dead], within=within, groups="safe",
            grace=float(verdict.get("grace", 1.0)), budget=BUDGET)
    removed = []
    for d in verdict.get("dirs", []):
        if "/" in d or d in (".", "..", ""):
            continue
        path = os.path.join(scratch, d)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed.append(path)
    return {"killed": killed, "survivors": survivors, "removed": removed}


def expand(workdir):
    if workdir.startswith("~/"):
        return os.path.join(os.environ.get("HOME", "."), workdir[2:])
    return workdir


def main(argv, stdin=None, stdout=None):
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if "-h" in argv or "--help" in argv:
        stdout.write(__doc__)
        return 0
    try:
        pos, o = killmarked.options(argv, ("scratch", "ctl-var", "run-var", "within-var"))
        if len(pos) != 2:
            raise killmarked.Usage("give KINDS and WORKDIR")
    except killmarked.Usage as e:
        sys.stderr.write(f"sweep: {e}\nusage:\n{killmarked.usage(__doc__)}")
        return 2
    kinds, workdir = pos[0].split(","), pos[1]
    ctl_var, run_var = o.get("ctl-var", "LABKIT_CTL"), o.get("run-var", "LABKIT_RUN")
    within_var = o.get("within-var", "LABKIT_NODE_ROOT")
    scratch = os.path.join(expand(workdir), o.get("scratch", "tmp"))
    mine = os.environ.get(within_var) if within_var else None
    within = f"{within_var}={mine}".encode() if mine else None
    census = {"processes": processes(ctl_var, run_var, within) if "processes" in kinds else [],
              "dirs": folders(scratch) if "files" in kinds else []}
    stdout.write(json.dumps(census) + "\n")
    stdout.flush()
    line = stdin.readline()
    if not line:
        return 0  # the controller went away: change nothing
    report = settle(json.loads(line), scratch, ctl_var, within)
    stdout.write(json.dumps(report) + "\n")
    stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
