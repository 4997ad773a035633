"""Benchmark: the labkit and criu backends side by side on the same workload, on two QEMU guest
nodes (CRIU needs their Debian 6.1 kernel; this host's may not run it).

One run of the built-in workload (default 64 MiB, 1,000 pages/s, timed) per backend, repeated
--repeat times alternately (labkit, criu, labkit, ...) so a load change on the shared machine
hits both. Each run also measures its own stop-and-copy baseline (every page moved while
frozen), so each backend's pre-copy downtime is set beside its own stop-and-copy downtime
from the same run. Prints the medians and the per-run figures; target: the criu backend's
pre-copy downtime is at least 5x below its stop-and-copy downtime.

    .venv/bin/python bench/criu.py [--size 64M] [--rate 1000] [--repeat 3]

Everything runs under TCG on a 2-core shared host: absolute times are TCG times (a remote
python3 start costs ~1 s); the ratios are what to read.
"""

from __future__ import annotations

import csv
import os
import statistics
import sys
from pathlib import Path

import guests

from labkit.experiment import build_config

BACKENDS = ("labkit", "criu")


def bytes_sent(folder: Path) -> int:
    with open(folder / "rounds.csv") as f:
        return sum(int(float(r["bytes"] or 0)) for r in csv.DictReader(f))


def main() -> int:
    a = guests.parser(__doc__.split("\n\n")[0], repeat=3).parse_args()
    if guests.cannot_run():
        return 2
    cfg = build_config(src="node1", dst="node2", size=a.size, rate=a.rate)
    cells = [{"backend": b} for _ in range(a.repeat) for b in BACKENDS]
    folder, rows, took = guests.matrix(a, cfg, cells, "labkit-bench-criu-")
    print(f"{a.size} built-in workload, {a.rate} pages/s, two TCG guests; "
          f"{a.repeat} run(s) per backend, {took:.0f} s in all; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"results: {folder}")
    print()
    head = f"{'backend':8} {'ok':3} {'rounds':>6} {'MiB sent':>9} {'total s':>8} " \
           f"{'downtime ms':>12} {'stop-and-copy ms':>17} {'ratio':>6}"
    print(head)
    per: dict[str, list[dict]] = {b: [] for b in BACKENDS}
    for row in rows:
        sub = folder / row["folder"]
        sent = bytes_sent(sub) if (sub / "rounds.csv").exists() else 0
        down, sc = row.get("downtime_ms"), row.get("stop_copy_downtime_ms")
        ratio = sc / down if row.get("ok") and down and sc else None
        per[row["backend"]].append({**row, "sent": sent, "ratio": ratio})
        print(f"{row['backend']:8} {'yes' if row.get('ok') else 'NO':3} "
              f"{row.get('rounds') or 0:>6} {sent / 2**20:>9.1f} {row.get('total_s') or 0:>8.1f} "
              f"{down or 0:>12.0f} {sc or 0:>17.0f} {ratio or 0:>6.1f}"
              + ("" if row.get("ok") else f"   {row.get('error')}"))
    print()
    print("medians:")
    verdict = 0
    for b in BACKENDS:
        good = [r for r in per[b] if r.get("ok")]
        if not good:
            print(f"  {b}: no successful run")
            verdict = 1
            continue
        med = {k: statistics.median(r[k] for r in good)
               for k in ("downtime_ms", "stop_copy_downtime_ms", "total_s", "sent", "rounds")}
        ratio = med["stop_copy_downtime_ms"] / med["downtime_ms"]
        line = (f"  {b:7} downtime {med['downtime_ms']:.0f} ms vs stop-and-copy "
                f"{med['stop_copy_downtime_ms']:.0f} ms: {ratio:.1f}x shorter; "
                f"{med['rounds']:.0f} rounds, {med['sent'] / 2**20:.1f} MiB, "
                f"{med['total_s']:.1f} s")
        if b == "criu":
            line += f"   target >= 5x: {'OK' if ratio >= 5 else 'MISSED'}"
        print(line)
    return verdict


if __name__ == "__main__":
    sys.exit(main())
