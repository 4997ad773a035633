"""THE way to run one action over many nodes: a bounded thread pool, a progress line for anything
slower than a moment, and one Outcome per node. A failing node never hides the others: every
exception is caught into that node's outcome (scrubbed of secrets)."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, TypeVar

from labkit.errors import LabkitError
from labkit.secrets import scrub

N = TypeVar("N")


@dataclass
class Outcome:
    node: str
    ok: bool
    value: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"node": self.node, "ok": self.ok, "error": self.error,
                             "seconds": round(self.seconds, 3)}
        for k, v in self.value.items():
            d.setdefault(k, v)
        return d

    def line(self) -> str:
        """``node: error`` for a message that names several nodes' failures in one line."""
        return named(self.node, self.error or "ok")


def named(node: str, text: str) -> str:
    """``text`` prefixed with ``node: `` once. Most node errors already start with their node
    (``node2: BMC 10.0.0.2:623: timeout``, so that a bare exception reads well too); a
    summary that prefixed them again read ``node2: node2: ...``. Every place that puts a
    node's name before its error goes through here."""
    if text == node or text.startswith((f"{node}: ", f"{node} (")):
        return text
    return f"{node}: {text}"


def error_text(e: BaseException) -> str:
    """One line for a node's failure: our own errors speak for themselves; foreign ones get
    their type so 'timeout' and 'refused' stay distinguishable."""
    if isinstance(e, LabkitError):
        text = str(e)
    elif isinstance(e, EOFError):  # paramiko's way of saying the peer went away
        text = "connection closed unexpectedly (EOF)"
    else:
        msg = str(e) or "(no message)"
        text = f"{type(e).__name__}: {msg}"
    return scrub(" ".join(text.split()))


class Progress:
    """A single self-rewriting stderr line; silent when stderr is not a terminal (logs, CI)
    unless forced."""

    def __init__(self, label: str, total: int, mode: str = "auto", delay: float = 0.5):
        self.label = label
        self.total = total
        self.done = 0
        self.failed = 0
        self.start = time.monotonic()
        self.enabled = mode == "always" or (mode == "auto" and sys.stderr.isatty())
        self.delay = 0.0 if mode == "always" else delay
        self._lock = threading.Lock()
        self._shown = False

    def update(self, ok: bool) -> None:
        with self._lock:
            self.done += 1
            self.failed += 0 if ok else 1
            if not self.enabled or time.monotonic() - self.start < self.delay:
                return
            self._shown = True
            sys.stderr.write(f"\r{self.label}: {self.done}/{self.total} done, "
                             f"{self.failed} failed, {time.monotonic() - self.start:.1f}s ")
            sys.stderr.flush()

    def close(self) -> None:
        if self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()



def fan_out(items: Sequence[N], action: Callable[[N], dict[str, Any] | None], *,
            name: Callable[[N], str] = lambda n: n.name,  # type: ignore[attr-defined]
            parallel: int = 32, label: str = "working", progress: str = "auto") -> list[Outcome]:
    """Run action(item) for every item with at most ``parallel`` at once. Returns outcomes in
    the items' order. KeyboardInterrupt cancels what has not started and re-raises once the
    running actions have returned (they are expected to honour their own timeouts)."""
    outcomes: dict[int, Outcome] = {}
    bar = Progress(label, len(items), progress)

    def run(i: int, item: N) -> Outcome:
        t0 = time.monotonic()
        try:
            value = action(item) or {}
            return Outcome(name(item), True, value, None, time.monotonic() - t0)
        except Exception as e:  # one node's failure is that node's outcome, never the run's
            value = dict(e.value) if isinstance(e, LabkitError) else {}
            return Outcome(name(item), False, value, error_text(e), time.monotonic() - t0)

    if not items:
        return []
    pool = ThreadPoolExecutor(max_workers=max(1, min(parallel, len(items))),
                              thread_name_prefix="fanout")
    try:
        futures = {pool.submit(run, i, item): i for i, item in enumerate(items)}
        for fut in as_completed(futures):
            o = fut.result()
            outcomes[futures[fut]] = o
            bar.update(o.ok)
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
        raise
    finally:
        pool.shutdown(wait=True)
    bar.close()
    return [outcomes[i] for i in range(len(items))]


def format_table(outcomes: Iterable[Outcome], columns: Sequence[str] = ()) -> str:
    """node | ok | <columns> | seconds | error — one row per node."""
    outcomes = list(outcomes)
    head = ["node", "status", *columns, "seconds", "error"]
    rows = []
    for o in outcomes:
        rows.append([o.node, "ok" if o.ok else "FAILED",
                     *[_cell(o.value.get(c)) for c in columns],
                     f"{o.seconds:.2f}", o.error or ""])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    failed = sum(not o.ok for o in outcomes)
    lines.append(f"{len(outcomes)} node(s), {len(outcomes) - failed} ok, {failed} failed")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def report(outcomes: list[Outcome], *, as_json: bool = False, columns: Sequence[str] = (),
           out=None) -> int:
    """Print the outcomes (table or JSON array) and return the exit code: 0 all ok, 1 any failed."""
    out = out or sys.stdout
    if as_json:
        out.write(json.dumps([o.to_json() for o in outcomes], indent=2, default=str) + "\n")
    else:
        out.write(format_table(outcomes, columns) + "\n")
    out.flush()
    return 0 if all(o.ok for o in outcomes) else 1
