"""Benchmark: what a TCP client sees of a migration, beside the migration's downtime, for both
backends, on two QEMU guest nodes (CRIU and TCP_REPAIR run in their Debian 6.1 kernel).

One ``migrate-test --tcp`` of the built-in workload (default 64 MiB, 1,000 pages/s, timed) per
variant: the labkit backend with freeze-time packets dropped, the same with them held
(NFQUEUE), and the criu backend (CRIU's network lock drops), repeated --repeat times in turn
so a load change on the shared machine hits every variant. The client (on the controller, on
the lab LAN through a lan port) reports the longest gap between two records it received
(``max_gap_ms``) and the longest wait for the server's echo of a message it sent
(``max_echo_ms``); each is set beside the run's own downtime. What to read: the stall minus
the downtime is what the address move and the retransmissions cost the client. The runs skip
the stop-and-copy baseline (the criu backend's freezes the live source before the migration,
and would be the stall measured).

    .venv/bin/python bench/tcp.py [--size 64M] [--rate 1000] [--repeat 1]

Everything runs under TCG on a 2-core shared host: absolute times are TCG times; the ratios
and differences are what to read.
"""

from __future__ import annotations

import os
import statistics
import sys
from typing import Any

import guests

from labkit.experiment import build_config

VARIANTS = ({"backend": "labkit", "tcp_freeze": "drop"},
            {"backend": "labkit", "tcp_freeze": "hold"},
            {"backend": "criu", "tcp_freeze": "drop"})


def name(cell: dict[str, Any]) -> str:
    return f"{cell['backend']}/{cell['tcp_freeze']}"


def main() -> int:
    a = guests.parser(__doc__.split("\n\n")[0], repeat=1).parse_args()
    if guests.cannot_run():
        return 2
    # no stop-and-copy baseline: the criu backend's runs first, from the live source, and its
    # freeze would be the client's longest stall; the figure here is the migration's
    cfg = build_config(src="node1", dst="node2", size=a.size, rate=a.rate, tcp=True,
                       stop_and_copy=False)
    cells = [dict(c) for _ in range(a.repeat) for c in VARIANTS]
    folder, rows, took = guests.matrix(a, cfg, cells, "labkit-bench-tcp-")
    print(f"{a.size} built-in workload, {a.rate} pages/s, --tcp, two TCG guests; "
          f"{a.repeat} run(s) per variant, {took:.0f} s in all; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"results: {folder}")
    print()
    print(f"{'variant':12} {'ok':3} {'kept':4} {'downtime ms':>12} {'client stall ms':>16} "
          f"{'stall/downtime':>15} {'echo wait ms':>13} {'records':>8} {'resets':>6}")
    per: dict[str, list[dict[str, Any]]] = {name(c): [] for c in VARIANTS}
    for cell, row in zip(cells, rows, strict=True):
        tcp = row.get("tcp") or {}
        down = row.get("downtime_ms")
        gap = tcp.get("freeze_gap_ms", tcp.get("max_gap_ms"))  # the migration's own stall
        ratio = gap / down if down and gap is not None else None
        per[name(cell)].append({"ok": row.get("ok"), "kept": tcp.get("kept"), "down": down,
                                "gap": gap, "echo": tcp.get("max_echo_ms"), "ratio": ratio})
        print(f"{name(cell):12} {'yes' if row.get('ok') else 'NO':3} "
              f"{'yes' if tcp.get('kept') else 'NO':4} {down or 0:>12.0f} {gap or 0:>16.0f} "
              f"{ratio or 0:>15.2f} {tcp.get('max_echo_ms') or 0:>13.0f} "
              f"{tcp.get('records') or 0:>8} {tcp.get('resets') or 0:>6}"
              + ("" if row.get("ok") else f"   {row.get('error')}"))
    print()
    print("medians (kept runs):")
    verdict = 0
    for variant, got in per.items():
        good = [g for g in got if g["ok"] and g["kept"]]
        if not good:
            print(f"  {variant}: no run kept its connection")
            verdict = 1
            continue
        med = {k: statistics.median(g[k] for g in good if g[k] is not None)
               for k in ("down", "gap", "echo")}
        print(f"  {variant:12} downtime {med['down']:.0f} ms; client stall {med['gap']:.0f} ms "
              f"({med['gap'] - med['down']:+.0f} ms, {med['gap'] / med['down']:.2f}x); "
              f"longest echo wait {med['echo']:.0f} ms")
    return verdict


if __name__ == "__main__":
    sys.exit(main())
