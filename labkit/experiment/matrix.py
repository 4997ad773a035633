"""``migrate-test --matrix``: one run per cell of a grid of configs, on nodes prepared once,
each run in its own folder under one matrix folder, plus summary.csv and summary.png."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from labkit.config import Settings
from labkit.errors import LabkitError
from labkit.experiment import results as res
from labkit.experiment.config import MigrateConfig, apply_cell
from labkit.experiment.run import MigrateRun
from labkit.inventory import Inventory

COLUMNS = ["label", "backend", "size", "rate", "pattern", "ok", "rounds", "stop_reason", "downtime_ms",
           "stop_copy_downtime_ms", "throughput_mib_s", "total_s", "tracker_backend",
           "verified", "tcp_freeze", "tcp_kept", "tcp_max_gap_ms",
           "tcp_freeze_gap_ms", "error", "folder"]


def run_matrix(inventory: Inventory, settings: Settings, base: MigrateConfig,
               cells: list[dict[str, Any]], *, deploy: bool = True,
               out: Callable[[str], object] | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """Every cell of the grid (validated up front, so a typo starts nothing); a failed cell
    is a row with its error, and the next cell runs. Returns the matrix folder and the rows."""
    from labkit.ssh import ConnectionPool

    configs = [apply_cell(base, c) for c in cells]
    folder = res.new_folder(settings.results_dir, "migrate-matrix")
    rows: list[dict[str, Any]] = []
    with ConnectionPool(settings) as pool:
        prepared = None
        for i, cfg in enumerate(configs):
            sub = folder / f"{i + 1:02d}-{cfg.name().replace('=', '').replace('/', '_')}"
            sub.mkdir()
            run = MigrateRun(inventory, settings, cfg, folder=sub, deploy=deploy, pool=pool,
                             prepared=prepared)
            row: dict[str, Any] = {"label": cfg.name(), "backend": cfg.backend,
                                   "size": cfg.size, "rate": cfg.rate,
                                   "pattern": cfg.pattern, "folder": sub.name}
            try:
                r = run.run()
                prepared = run.prepared
                row.update(r.to_json())
            except LabkitError as e:
                prepared = run.prepared
                failed = e.value.get("result")
                if isinstance(failed, dict):  # a failed run's figures (its tcp verdict) too
                    row.update(failed)
                row.update(ok=False, error=str(e))
            if cfg.tcp:
                tcp = row.get("tcp") or {}
                row.update(tcp_freeze=cfg.tcp_freeze, tcp_kept=tcp.get("kept", False),
                           tcp_max_gap_ms=tcp.get("max_gap_ms"),
                           tcp_freeze_gap_ms=tcp.get("freeze_gap_ms"))
            rows.append(row)
            if out:
                out(f"[{i + 1}/{len(configs)}] {row['label']}: "
                    + (f"downtime {row.get('downtime_ms')} ms, {row.get('rounds')} rounds"
                       if row.get("ok") else f"FAILED: {row.get('error')}"))
    res.write_summary_csv(folder / "summary.csv", rows, COLUMNS)
    from labkit.experiment import plots

    plots.plot_matrix(folder / "summary.png", rows)
    return folder, rows
