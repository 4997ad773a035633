"""Power-status fan-out benchmark: labkit vs. FreeIPMI's ipmipower and an ipmitool loop.

    .venv/bin/python bench/power_fanout.py [--counts 64,256] [--rounds 7]
                                           [--before /work/main/.venv/bin/labkit]

For each COUNT it starts a fake lab of COUNT BMCs (labkit.fake.lab, no SSH; a separate process)
and measures, all in this run, the contenders interleaved round by round (the machine is shared,
so load hits them alike):

  in-process (imports and interpreter start excluded):
    engine      labkit.bmc.engine.power_status: every session a state machine, one selector loop
    threads     the previous path: PowerClient + labkit.fanout.fan_out (settings.parallel threads)
  whole process (what a user waits for):
    labkit      `labkit power-status -i INV --json` (this tree)
    library     a fresh `python -c` doing what the task does (load, engine, JSON report) without
                the CLI: the whole-process floor of the power path itself, CLI imports excluded
    beforeN     the same command from earlier versions (--before PROGRAM, repeatable; default
                /work/main's venv)
    ipmipower   `ipmipower -D LAN_2_0 -I 3 -h h:p,... --stat`: FreeIPMI, C, all sessions in one
                event loop. The password goes in a 0600 --config-file, never argv.
    ipmitool    `ipmitool -I lanplus ... chassis power status` once per BMC, in sequence, as the
                issue's baseline was taken (password via -f FILE); one pass, COUNT <= 64 unless
                --ipmitool-all. ~27 ms a call here: the loop moves with the machine's load
    python      `python -c pass` from this venv: the floor of any Python command

and prints medians with the targets of issue 8:
  64 BMCs:  ipmitool loop / labkit (whole process)   >= 20x
  256 BMCs: labkit (whole process) / ipmipower         <= 2.5x (the aim: 1x)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from labkit import inventory
from labkit.bmc.engine import power_status
from labkit.bmc.power import PowerClient
from labkit.config import Settings
from labkit.errors import InventoryError
from labkit.fake import lab
from labkit.fanout import fan_out

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BEFORE = Path("/work/main/.venv/bin/labkit")
MS = 1000.0
LIBRARY = ("import sys; from labkit import inventory; from labkit.bmc.engine import power_status;"
           " from labkit.fanout import report; "
           "sys.exit(report(power_status(inventory.load(sys.argv[1]).select(None)), as_json=True))")


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def start_lab(count: int, tmp: Path) -> Path:
    for _ in range(5):  # generate() picks free ports one by one and may pick one twice
        inv_path = lab.generate(count, tmp / "lab", ssh=False, power_delay=(0.0, 0.0),
                                boot_delay=0.0)
        try:  # a port drawn twice is an inventory error; the password file comes with up()
            inventory.load(inv_path, check_secrets=False)
        except InventoryError:
            continue
        try:
            lab.up(inv_path)
            return inv_path
        except Exception:  # a port taken between generate() and up(): draw again
            continue
    raise SystemExit("could not start the fake lab")


def labkit_program() -> list[str]:
    script = Path(sys.executable).parent / "labkit"
    return [str(script)] if script.exists() else [sys.executable, "-m", "labkit.cli"]


def run_ok(argv: list[str], check: Callable[[subprocess.CompletedProcess], bool], what: str,
           env: dict[str, str] | None = None) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    if r.returncode != 0 or not check(r):
        raise SystemExit(f"{what} failed (exit {r.returncode}): {(r.stderr or r.stdout)[-300:]}")


def bench(count: int, rounds: int, befores: list[Path],
          ipmitool_all: bool) -> dict[str, float]:
    ipmitool = shutil.which("ipmitool")
    ipmipower = shutil.which("ipmipower")
    with tempfile.TemporaryDirectory(prefix="labkit-bench-") as tmpdir:
        tmp = Path(tmpdir)
        inv_path = start_lab(count, tmp)
        try:
            inv = inventory.load(inv_path)
            nodes = list(inv.nodes.values())
            settings = Settings(bmc_timeout=5.0, retry_window=10.0, progress="never")
            pw_file = lab.state_dir_of(inv) / lab.PASSWORD_FILE
            cfg = tmp / "freeipmi.conf"
            fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(b"username admin\npassword " + pw_file.read_bytes().strip() + b"\n")
            hosts = ",".join(f"{n.bmc.host}:{n.bmc.port}" for n in nodes if n.bmc)

            def engine() -> None:
                bad = [o for o in power_status(nodes, settings) if not o.ok]
                if bad:
                    raise SystemExit(f"engine failed on {len(bad)} node(s): {bad[0].error}")

            def threads() -> None:
                with PowerClient(settings) as c:
                    out = fan_out(nodes, lambda n: {"power": c.status(n)},
                                  parallel=settings.parallel, progress="never")
                if not all(o.ok for o in out):
                    raise SystemExit("threaded fan-out failed")

            def all_ok(r: subprocess.CompletedProcess) -> bool:
                return r.stdout.count('"ok": true') == count

            contenders: dict[str, Callable[[], object]] = {
                "engine": engine,
                "threads": threads,
                "labkit": lambda: run_ok([*labkit_program(), "power-status", "-i", str(inv_path),
                                          "--json"], all_ok, "labkit power-status"),
                "library": lambda: run_ok([sys.executable, "-c", LIBRARY, str(inv_path)], all_ok,
                                          "library power-status"),
                "python": lambda: run_ok([sys.executable, "-c", "pass"], lambda r: True,
                                         "python"),
            }
            for k, before in enumerate(befores):
                contenders[f"before{k}"] = lambda b=before: run_ok(
                    [str(b), "power-status", "-i", str(inv_path), "--json"], all_ok,
                    f"{b} power-status")
            if ipmipower:
                contenders["ipmipower"] = lambda: run_ok(
                    [ipmipower, "--config-file", str(cfg), "-D", "LAN_2_0", "-I", "3",
                     "-h", hosts, "--stat"], lambda r: r.stdout.count(": off") == count,
                    "ipmipower")
            for name, fn in contenders.items():  # warm-up: every BMC answers, caches are hot
                try:
                    fn()
                except SystemExit as e:
                    print(f"  ({count} BMCs: {name} warm-up failed: {str(e)[:120]})")
            samples: dict[str, list[float]] = {k: [] for k in contenders}
            failed: dict[str, int] = {k: 0 for k in contenders}
            for _ in range(rounds):
                for name, fn in contenders.items():
                    try:
                        samples[name].append(timed(fn))
                    except SystemExit as e:  # a loaded machine can starve the fake lab
                        failed[name] += 1
                        print(f"  ({count} BMCs: a {name} round failed: {str(e)[:120]})")
            result = {k: statistics.median(v) for k, v in samples.items() if v}
            for name, n in failed.items():
                if n:
                    result[f"{name}_failed"] = n
            if ipmitool and (count <= 64 or ipmitool_all):
                def tool(n: inventory.Node) -> None:
                    assert n.bmc is not None
                    run_ok([ipmitool, "-I", "lanplus", "-H", n.bmc.host,
                            "-p", str(n.bmc.port), "-U", n.bmc.user, "-f", str(pw_file),
                            "chassis", "power", "status"],
                           lambda r: "Chassis Power is" in r.stdout, f"ipmitool {n.name}")

                result["ipmitool"] = timed(lambda: [tool(n) for n in nodes])
            return result
        finally:
            lab.down(inv_path)


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="64,256", help="BMC counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--before", type=Path, action="append",
                    help="a `labkit` program of an earlier version, measured alike (repeatable; "
                         f"default {DEFAULT_BEFORE} if present)")
    ap.add_argument("--ipmitool-all", action="store_true",
                    help="also run the sequential ipmitool loop for counts above 64")
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",") if c]
    befores = [b for b in (args.before or [DEFAULT_BEFORE]) if b.exists()]
    print(f"power status over N fake BMCs, loopback, medians of {args.rounds} interleaved "
          f"rounds; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    for k, b in enumerate(befores):
        print(f"  before{k} = {b}")
    results: dict[int, dict[str, float]] = {}
    for count in counts:
        r = results[count] = bench(count, args.rounds, befores, args.ipmitool_all)
        print(f"\n{count} BMCs")
        rows = [("engine", "in-process: labkit.bmc.engine.power_status"),
                ("threads", "in-process: PowerClient + fan_out threads (before)"),
                ("labkit", "whole process: labkit power-status (this tree)"),
                ("library", "whole process: the same without the CLI (python -c)"),
                *((f"before{k}", f"whole process: before{k} power-status")
                  for k in range(len(befores))),
                ("ipmipower", "whole process: ipmipower -D LAN_2_0 -I 3 --stat"),
                ("ipmitool", "whole process: ipmitool loop, sequential, one pass"),
                ("python", "whole process: python -c pass (the floor)")]
        for key, label in rows:
            if key in r:
                bad = r.get(f"{key}_failed")
                note = f"  ({bad:.0f} of {args.rounds} rounds failed)" if bad else ""
                print(f"  {label:<52} {r[key] * MS:8.1f} ms{note}")
        print("  ratios")
        if "ipmitool" in r and "labkit" in r:
            x = r["ipmitool"] / r["labkit"]
            print(f"    ipmitool loop / labkit whole process        {x:7.1f}x"
                  f"{'  target >= 20x: ' + verdict(x >= 20) if count == 64 else ''}")
            for k in range(len(befores)):
                if f"before{k}" in r:
                    print(f"    ipmitool loop / before{k} whole process       "
                          f"{r['ipmitool'] / r[f'before{k}']:7.1f}x")
        if "ipmipower" in r and "labkit" in r:
            x = r["labkit"] / r["ipmipower"]
            print(f"    labkit whole process / ipmipower            {x:7.2f}x"
                  f"{'  target <= 2.5x: ' + verdict(x <= 2.5) if count >= 256 else ''}")
            if "engine" in r:
                print(f"    labkit in-process engine / ipmipower        "
                      f"{r['engine'] / r['ipmipower']:7.2f}x")
            for k in range(len(befores)):
                if f"before{k}" in r:
                    print(f"    before{k} whole process / ipmipower           "
                          f"{r[f'before{k}'] / r['ipmipower']:7.2f}x")
        if "threads" in r and "engine" in r:
            print(f"    threads / engine (in-process)               "
                  f"{r['threads'] / r['engine']:7.1f}x")
        for k in range(len(befores)):
            if f"before{k}" in r and "labkit" in r:
                print(f"    before{k} / labkit (whole process)            "
                      f"{r[f'before{k}'] / r['labkit']:7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
