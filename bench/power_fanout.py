"""Power-status fan-out benchmark: labkit over 64 fake BMCs vs. a sequential ipmitool loop.

    .venv/bin/python bench/power_fanout.py [--count 64] [--rounds 5]

Starts a fake lab of COUNT BMCs (labkit.fake.lab, no SSH), then prints, all measured in this run:

  1. labkit: one power status to one BMC (round trip, including the RMCP+ login)  -- median
  2. labkit: power status over all COUNT BMCs, the fan-out the `power-status` task runs (fresh
     client: every BMC gets a new session, login included)                       -- median
  3. `ipmitool -I lanplus ... chassis power status` run once per BMC, in sequence (password
     via -f FILE, never -P)                                                      -- one pass
  4. ipmitool: one status to one BMC                                             -- median
  5. the `invoke power-status` command end to end (process start included), COUNT nodes vs 1
and the ratios: loop / labkit-COUNT (target >= 20x) and labkit-COUNT / labkit-one (target <= 2x).
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
from labkit.bmc.power import PowerClient
from labkit.config import Settings
from labkit.errors import InventoryError
from labkit.fake import lab
from labkit.fanout import fan_out

ROOT = Path(__file__).resolve().parent.parent


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_of(rounds: int, fn: Callable[[], object]) -> float:
    return statistics.median(timed(fn) for _ in range(rounds))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    ipmitool = shutil.which("ipmitool")
    with tempfile.TemporaryDirectory(prefix="labkit-bench-") as tmp:
        for _ in range(5):  # generate() picks free ports one by one and may pick one twice
            inv_path = lab.generate(args.count, Path(tmp) / "lab", ssh=False,
                                    power_delay=(0.0, 0.0), boot_delay=0.0)
            try:
                inventory.load(inv_path)
                break
            except InventoryError:
                continue
        lab.up(inv_path)
        try:
            inv = inventory.load(inv_path)
            nodes = list(inv.nodes.values())
            settings = Settings(parallel=args.count, bmc_timeout=5.0, retry_window=10.0)
            # labkit ---------------------------------------------------------------------------
            for n in nodes:  # warm-up: every BMC answers, imports and caches are hot
                with PowerClient(settings) as c:
                    assert c.status(n) in ("on", "off")

            def one() -> None:
                with PowerClient(settings) as c:
                    c.status(nodes[0])

            def fan() -> None:
                with PowerClient(settings) as c:
                    out = fan_out(nodes, lambda n: {"power": c.status(n)},
                                  parallel=settings.parallel, progress="never")
                bad = [o for o in out if not o.ok]
                if bad:
                    raise SystemExit(f"fan-out failed on {len(bad)} node(s): {bad[0].error}")

            t_one = median_of(args.rounds * 4, one)
            t_fan = median_of(args.rounds, fan)
            with PowerClient(settings) as warm:  # sessions kept: what --wait polling costs
                fan_out(nodes, lambda n: {"power": warm.status(n)}, parallel=settings.parallel,
                        progress="never")
                t_warm = median_of(args.rounds, lambda: fan_out(
                    nodes, lambda n: {"power": warm.status(n)}, parallel=settings.parallel,
                    progress="never"))
            # ipmitool -------------------------------------------------------------------------
            t_loop = t_tool_one = None
            if ipmitool:
                pw_file = str(lab.state_dir_of(inv) / lab.PASSWORD_FILE)

                def tool(n: inventory.Node) -> None:
                    assert n.bmc is not None
                    r = subprocess.run(
                        [ipmitool, "-I", "lanplus", "-H", n.bmc.host, "-p", str(n.bmc.port),
                         "-U", n.bmc.user, "-f", pw_file, "chassis", "power", "status"],
                        capture_output=True, text=True, timeout=30)
                    if r.returncode != 0 or "Chassis Power is" not in r.stdout:
                        raise SystemExit(f"ipmitool failed on {n.name}: {r.stderr.strip()}")

                t_loop = timed(lambda: [tool(n) for n in nodes])
                t_tool_one = median_of(args.rounds, lambda: tool(nodes[0]))
            # the command end to end -----------------------------------------------------------
            cli = [sys.executable, "-m", "invoke", "--search-root", str(ROOT), "power-status",
                   "-i", str(inv_path), "--json"]
            env = dict(os.environ, INVOKE_LABKIT_PARALLEL=str(args.count))

            def run_cli(*extra: str) -> None:
                r = subprocess.run([*cli, *extra], capture_output=True, env=env, timeout=60)
                if r.returncode != 0:
                    raise SystemExit(f"power-status failed: {r.stderr.decode()[-300:]}")

            t_cli_all = median_of(3, run_cli)
            t_cli_one = median_of(3, lambda: run_cli("-n", nodes[0].name))
        finally:
            lab.down(inv_path)

    n = args.count
    ms = 1000.0
    print(f"power status over {n} fake BMCs (loopback, one run; medians where noted)")
    print(f"  labkit, 1 BMC (login + status), median      {t_one * ms:9.1f} ms")
    print(f"  labkit, {n} BMCs fan-out, median              {t_fan * ms:9.1f} ms"
          f"   ({n / t_fan:,.0f} BMCs/s)")
    print(f"  labkit, {n} BMCs fan-out, sessions reused      {t_warm * ms:9.1f} ms"
          f"   ({n / t_warm:,.0f} BMCs/s)")
    if t_loop is not None and t_tool_one is not None:
        print(f"  ipmitool loop, {n} BMCs sequential            {t_loop * ms:9.1f} ms")
        print(f"  ipmitool, 1 BMC, median                      {t_tool_one * ms:9.1f} ms")
    else:
        print("  ipmitool: not installed, baseline skipped")
    print(f"  `invoke power-status` {n} nodes, median       {t_cli_all * ms:9.1f} ms")
    print(f"  `invoke power-status` 1 node, median         {t_cli_one * ms:9.1f} ms")
    def verdict(ok: bool) -> str:
        return "OK" if ok else "MISSED"

    print("ratios (targets: loop / fan-out >= 20x; all BMCs <= 2x one BMC's round trip)")
    if t_loop is not None and t_tool_one is not None:
        r1 = t_loop / t_fan
        print(f"  ipmitool loop / labkit fan-out               {r1:9.1f}x  {verdict(r1 >= 20)}")
        r3 = t_fan / t_tool_one
        print(f"  labkit fan-out / ipmitool 1-BMC round trip   {r3:9.2f}x  {verdict(r3 <= 2)}")
    r4 = t_cli_all / t_cli_one
    print(f"  command {n} nodes / command 1 node            {r4:9.2f}x  {verdict(r4 <= 2)}")
    r2 = t_fan / t_one
    print(f"  labkit fan-out / labkit 1-BMC call           {r2:9.2f}x  {verdict(r2 <= 2)}"
          "  (in-process: every login's crypto shares one GIL)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
