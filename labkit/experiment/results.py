"""The results folder of a migrate-test run: run.json, rounds.csv, events.jsonl, plots, and the
printed summary. Nothing here holds a secret: configs and node facts only."""

from __future__ import annotations

import csv
import json
import threading
import time
from pathlib import Path
from typing import Any

ROUND_COLUMNS = ("round", "kind", "pages", "bytes", "scan_ms", "copy_ms", "wall_ms",
                 "apply_ms", "mib_s")


def new_folder(results_dir: str | Path, task: str, now: float | None = None) -> Path:
    """results/<YYYYmmdd-HHMMSS>-<task>/, made unique if two runs start in the same second."""
    base = Path(results_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    for i in range(1000):
        p = base / (f"{stamp}-{task}" if i == 0 else f"{stamp}-{task}-{i + 1}")
        try:
            p.mkdir(parents=True, exist_ok=False)
            return p
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a results folder under {base}")


class Events:
    """events.jsonl: one line per step of the run, with seconds since the start (monotonic) and
    wall time. Thread-safe; the line is flushed so a crashed run still leaves its trail."""

    def __init__(self, path: Path):
        self.path = path
        self.t0 = time.monotonic()
        self._f = open(path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def emit(self, kind: str, **data: Any) -> float:
        t = self.now()
        line = json.dumps({"t": round(t, 6), "wall": round(time.time(), 3), "event": kind,
                           **data}, sort_keys=True, default=str)
        with self._lock:
            if not self._f.closed:
                self._f.write(line + "\n")
        return t

    def close(self) -> None:
        with self._lock:
            self._f.close()


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_rounds(path: Path, rounds: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROUND_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rounds:
            w.writerow({k: _fmt(r.get(k)) for k in ROUND_COLUMNS})


def write_summary_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in columns})


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e6 else f"{v:.0f}"
    return "" if v is None else v


def table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    for r in rows:
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    return "\n".join(lines)
