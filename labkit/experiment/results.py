"""What a migrate-test run found, and its results folder: the ``Result`` every backend fills,
run.json, rounds.csv, events.jsonl, and the printed summary (plots: ``plots.py``). Nothing
here holds a secret: configs and node facts, and what peers said (a failure quotes their
stderr), which every writer here passes through ``scrubbed`` on the way out."""

from __future__ import annotations

import csv
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit.experiment.config import MigrateConfig, human_size
from labkit.secrets import scrub

# One row per round, whatever the backend: rounds.csv's columns (a row may hold more, such as
# freeze_ms, t_start and t_end, which the timeline plot uses).
ROUND_COLUMNS = ("round", "kind", "pages", "bytes", "scan_ms", "copy_ms", "wall_ms",
                 "apply_ms", "mib_s")


@dataclass
class Result:
    """One run's outcome. A backend fills the migration figures; the run fills the rest."""

    folder: Path
    ok: bool
    config: MigrateConfig
    rounds: list[dict[str, Any]] = field(default_factory=list)  # ROUND_COLUMNS rows
    stop_reason: str | None = None
    downtime_s: float | None = None
    stop_copy_downtime_s: float | None = None
    total_s: float | None = None
    verified: bool = False
    verify_resume: bool | None = None
    throughput_mib_s: float | None = None
    # the dirty-page tracker the source agent chose (uffd, softdirty, compare); run.json's
    # "tracker_backend", not the migration backend
    backend: str | None = None
    source_sha256: str | None = None
    restored_sha256: str | None = None
    error: str | None = None
    # what failed, for run.json's "error" and --json's "failure": run.failure_report()
    failure: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # the criu backend's own figures (version, per-round images and CRIU's statistics, the
    # downtime's parts, where the process runs now): run.json's "criu"
    criu: dict[str, Any] | None = None
    # --tcp: the client's verdict (kept, bytes, records, max_gap_ms, resets, ...): run.json's
    # "tcp"
    tcp: dict[str, Any] | None = None
    cleaned: list[str] = field(default_factory=list)  # leftovers of interrupted runs, per node

    def set_rounds(self, rows: list[dict[str, Any]], freeze_t: float, resumed_t: float) -> None:
        """The rounds as measured (round 0 first, the final round last) and the freeze and
        resume times (run seconds) for the timeline. Throughput is round 0's: the full copy,
        the only round big enough to measure the transfer by."""
        self.rounds = rows
        self.throughput_mib_s = rows[0]["mib_s"] if rows else None
        self.info["timeline"] = {"freeze_t": freeze_t, "resumed_t": resumed_t}

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "error": self.error, "failure": self.failure,
            "backend": self.config.backend,
            "stop_reason": self.stop_reason,
            "downtime_ms": _ms(self.downtime_s),
            "stop_copy_downtime_ms": _ms(self.stop_copy_downtime_s),
            "total_s": self.total_s, "verified": self.verified,
            "verify_resume": self.verify_resume, "throughput_mib_s": self.throughput_mib_s,
            "tracker_backend": self.backend, "source_sha256": self.source_sha256,
            "restored_sha256": self.restored_sha256, "rounds": len(self.rounds),
            "leftovers_cleaned": self.cleaned,
            **({"criu": self.criu} if self.criu is not None else {}),
            **({"tcp": self.tcp} if self.tcp is not None else {}),
        }

    def what(self) -> str:
        """What migrated, in words: the built-in workload's shape, or the user's process."""
        return _what(self.config)

    def summary(self) -> str:
        rows = [[("final" if r["kind"] == "final" else str(r["round"])), str(r["pages"]),
                 f"{r['bytes'] / 2**20:.2f}", f"{r.get('scan_ms') or 0:.2f}",
                 f"{r.get('copy_ms') or 0:.1f}", f"{r.get('wall_ms') or 0:.1f}",
                 f"{r.get('mib_s') or 0:.0f}"] for r in self.rounds]
        out = [f"migrate-test {self.config.src} -> {self.config.dst}: {self.what()}, "
               + (f"tracker {self.backend or self.config.tracker}"
                  if self.config.backend == "labkit" else
                  f"backend criu {(self.criu or {}).get('version') or ''}".rstrip()),
               table(rows, ["round", "pages", "MiB", "scan ms", "copy ms", "wall ms",
                            "MiB/s"])]
        if self.ok:
            out.append(f"stopped by: {self.stop_reason}   downtime: "
                       f"{_ms(self.downtime_s)} ms   stop-and-copy downtime: "
                       f"{_ms(self.stop_copy_downtime_s) if self.stop_copy_downtime_s else '-'}"
                       f" ms   throughput: {self.throughput_mib_s or 0:.0f} MiB/s   total: "
                       f"{self.total_s or 0:.2f} s")
            vr = ("" if self.verify_resume is None else
                  f"   verify-resume: {'ok' if self.verify_resume else 'FAILED'}")
            out.append(f"image verified: SHA-256 {str(self.restored_sha256)[:16]}... matches"
                       + vr)
            moved = (self.criu or {}).get("migrated")
            if moved:
                out.append(f"the process now runs on {moved['node']} as pid {moved['pid']} "
                           f"(its output: {moved.get('output') or '-'})")
        else:
            out.append(f"FAILED: {self.error}")
        if self.tcp is not None:
            t = self.tcp
            out.append(f"TCP connection {'kept' if t.get('kept') else 'NOT kept'}: "
                       f"{t.get('records', 0)} records, {t.get('bytes', 0)} bytes, "
                       f"longest client stall {t.get('max_gap_ms', '-')} ms"
                       + (f" ({t['freeze_gap_ms']} ms across the migration's freeze), "
                          if t.get("freeze_gap_ms") is not None else ", ")
                       + f"resets {t.get('resets', 0)}, freeze-time packets {t.get('freeze')}")
        out.append(f"results: {self.folder}")
        return "\n".join(out)


def _what(cfg: MigrateConfig) -> str:
    if cfg.command:
        return f"command {cfg.command!r}"
    if cfg.pid:
        return f"pid {cfg.pid}"
    return f"{human_size(cfg.size)}, {cfg.rate:g} pages/s {cfg.pattern}"


def _ms(s: float | None) -> float | None:
    return None if s is None else round(s * 1000, 3)


def scrubbed(data: Any) -> Any:
    """``data`` (JSON-like) with every registered secret masked in every string in it. The
    one place text a run did not write itself (a peer's stderr and error lines, quoted in
    messages, ``failure`` objects and events) is cleaned before it leaves the process:
    every results writer below and the ``RunFailed`` that carries --json's result."""
    if isinstance(data, str):
        return scrub(data)
    if isinstance(data, dict):
        return {k: scrubbed(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [scrubbed(v) for v in data]
    return data


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
        line = json.dumps(scrubbed({"t": round(t, 6), "wall": round(time.time(), 3),
                                    "event": kind, **data}), sort_keys=True, default=str)
        with self._lock:
            if not self._f.closed:
                self._f.write(line + "\n")
        return t

    def close(self) -> None:
        with self._lock:
            self._f.close()


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(scrubbed(data), indent=2, sort_keys=True, default=str) + "\n")


def write_rounds(path: Path, rounds: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROUND_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rounds:
            w.writerow(scrubbed({k: _fmt(r.get(k)) for k in ROUND_COLUMNS}))


def write_summary_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(scrubbed({k: _fmt(r.get(k)) for k in columns}))


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
