"""Benchmark: pre-copy migration of a 1 GiB workload dirtying 5,000 pages/s on the fake lab.

Prints, from one run: the downtime (target <= 50 ms) beside the stop-and-copy downtime for the
same region, and the transfer throughput beside the raw SSH channel rate between the same two
nodes over the same controller relay (target >= 80%), measured just before and after the
migration (their mean is the baseline, so a load change on the machine shows up as spread).

    .venv/bin/python bench/migrate.py [--size 1G] [--rate 5000] [--tracker auto]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from labkit.config import Settings
from labkit.experiment import build_config, measure_channel_rate, run_migrate_test
from labkit.fake.harness import start_fake_lab
from labkit.ssh import ConnectionPool


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rate", default="5000")
    ap.add_argument("--tracker", default="auto")
    ap.add_argument("--channel-bytes", type=int, default=512 << 20)
    ap.add_argument("--results", default="results")
    a = ap.parse_args()
    cfg = build_config(src="node1", dst="node2", size=a.size, rate=a.rate, tracker=a.tracker)
    with tempfile.TemporaryDirectory(prefix="labkit-bench-") as tmp:
        lab = start_fake_lab(Path(tmp), count=2, power_on=True)
        try:
            inv = lab.inventory()
            settings = Settings(results_dir=a.results)
            with ConnectionPool(settings) as pool:
                raw1 = measure_channel_rate(inv, settings, "node1", "node2", a.channel_bytes,
                                            pool=pool)
                result = run_migrate_test(inv, settings, cfg, pool=pool)
                raw2 = measure_channel_rate(inv, settings, "node1", "node2", a.channel_bytes,
                                            pool=pool)
        finally:
            lab.stop()
    raw = (raw1 + raw2) / 2 / 2**20
    thr = result.throughput_mib_s or 0.0
    down = (result.downtime_s or 0) * 1000
    sc = (result.stop_copy_downtime_s or 0) * 1000
    print(result.summary())
    print()
    ratio = sc / down if down else 0.0
    base = f"raw channel {raw:.1f} MiB/s ({raw1 / 2**20:.1f} before, {raw2 / 2**20:.1f} after)"
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(the fake lab, the controller and both nodes share them)")
    print(f"{'downtime (pre-copy)':36} {down:>10.1f} ms   target <= 50 ms: "
          f"{'OK' if down <= 50 else 'MISSED'}")
    print(f"{'downtime (stop-and-copy, same size)':36} {sc:>10.1f} ms   pre-copy is "
          f"{ratio:.0f}x shorter")
    print(f"{'transfer throughput (round 0)':36} {thr:>7.1f} MiB/s   {base}: {100 * thr / raw:.0f}%"
          f", target >= 80%: {'OK' if thr >= 0.8 * raw else 'MISSED'}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
