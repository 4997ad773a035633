"""Start-up cost of the ``labkit`` program against a bare interpreter, measured in the same run.

    .venv/bin/python bench/startup.py [--labkit PATH] [--runs 21]

Whole processes, medians over RUNS, the commands interleaved round by round so that load on a
shared machine hits them alike:

  1. ``python -c pass``                      the baseline (the interpreter running this script)
  2. ``labkit --help``                       as a user runs it (help cache warm)   target <= 4x
  3. ``labkit --help`` with LABKIT_HELP_CACHE=0   what Invoke's own path costs
  4. ``labkit --list``                       (help cache warm)
  5. ``labkit power-status -n node1``        against a one-node fake lab: the whole process, and
     its imports alone (``-X importtime``: the sum over top-level imports; importtime's own
     bookkeeping inflates it somewhat), and whether paramiko, numpy or matplotlib got loaded.

``--labkit`` measures another checkout's program, e.g. the one before a change:
``/work/main/.venv/bin/python bench/startup.py --labkit /work/main/.venv/bin/labkit``
(the baseline interpreter is then that venv's python). The help cache lives in a temporary
folder for the run, so the figures do not depend on your own ~/.cache.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 4.0
HEAVY = ("paramiko", "numpy", "matplotlib")


def run(cmd: list[str], env: dict[str, str], cwd: str, check: bool = True) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    took = time.perf_counter() - t0
    if check and r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return took


def imports(cmd: list[str], python: str, env: dict[str, str], cwd: str) -> tuple[float, set[str]]:
    """(seconds spent in top-level imports, the top-level package names imported)."""
    r = subprocess.run([python, "-X", "importtime", *cmd], env=env, cwd=cwd,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    total = 0
    names = set()
    for line in r.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|", 2)
        try:
            us = int(cumulative)
        except ValueError:
            continue  # the header line
        names.add(name.strip().split(".")[0])
        if not name.startswith("  "):  # top level: its figure includes everything below it
            total += us
    return total / 1e6, names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = str(Path(sys.executable).with_name("labkit"))
    ap.add_argument("--labkit", default=default, help=f"the program (default {default})")
    ap.add_argument("--runs", type=int, default=21)
    args = ap.parse_args(argv)
    py = sys.executable
    labkit = [args.labkit]
    with tempfile.TemporaryDirectory(prefix="labkit-startup-") as tmp:
        env = {k: v for k, v in os.environ.items()
               if k not in ("LABKIT_INVENTORY", "LABKIT_HELP_CACHE")}
        env["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")
        cold = dict(env, LABKIT_HELP_CACHE="0")
        run([*labkit, "lab.up", "--count", "1"], env, tmp)
        try:
            inv = str(Path(tmp) / ".lab" / "inventory.yaml")
            status = [*labkit, "power-status", "-n", "node1", "-i", inv]
            cases = {
                "python -c pass": ([py, "-c", "pass"], env),
                "labkit --help": ([*labkit, "--help"], env),
                "labkit --help (no cache: Invoke)": ([*labkit, "--help"], cold),
                "labkit --list": ([*labkit, "--list"], env),
                "labkit power-status -n node1": (status, env),
            }
            for cmd, e in cases.values():  # warm the page cache and the help cache
                run(cmd, e, tmp)
            times: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(args.runs):
                for name, (cmd, e) in cases.items():
                    times[name].append(run(cmd, e, tmp))
            import_s, loaded = imports(status, py, env, tmp)
            _, help_loaded = imports([*labkit, "--help"], py, env, tmp)
        finally:
            run([*labkit, "lab.down"], env, tmp, check=False)
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med["python -c pass"]
    print(f"labkit start-up ({args.labkit}), whole process, median of {args.runs} runs, "
          f"this run:")
    for name, s in med.items():
        note = ""
        if name == "labkit --help":
            verdict = "ok" if s / base <= TARGET else "MISSED"
            note = f"   target <= {TARGET:g}x: {verdict}"
            if "invoke" in help_loaded:
                note += " (served by Invoke: help cache not used)"
        print(f"  {name:36s} {s * 1000:7.1f} ms  {s / base:5.1f}x{note}")
    heavy = sorted(set(HEAVY) & loaded) or ["none"]
    print(f"  power-status imports (-X importtime)  {import_s * 1000:7.1f} ms; "
          f"{'/'.join(HEAVY)} loaded: {', '.join(heavy)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
