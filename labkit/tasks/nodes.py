"""Tasks on nodes over SSH: ``run``.

``invoke run -n SEL -- CMD...`` (or ``labkit run ...``): the words after ``--`` are joined with
spaces like ssh does, so ``-- 'cat x | wc -l'`` and ``-- cat x '|' wc -l`` mean the same."""

from __future__ import annotations

import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

from invoke import Context

from labkit.errors import UserError
from labkit.tasks import args
from labkit.tasks.common import finish, lab, labtask

if TYPE_CHECKING:
    from labkit.fanout import Outcome


class LinePrefixer:
    """Writes a node's stream to a shared output as whole lines prefixed ``node| ``, so lines
    from parallel nodes never interleave mid-line. ``flush()`` emits a trailing partial line."""

    def __init__(self, node: str, out: Any, lock: threading.Lock):
        self.prefix = f"{node}| ".encode()
        self.out = out
        self.lock = lock
        self.buf = b""

    def __call__(self, data: bytes) -> None:
        self.buf += data
        if b"\n" not in self.buf:
            return
        head, _, self.buf = self.buf.rpartition(b"\n")
        text = b"".join(self.prefix + line + b"\n" for line in head.split(b"\n"))
        self._write(text)

    def flush(self) -> None:
        if self.buf:
            self._write(self.prefix + self.buf + b"\n")
            self.buf = b""

    def _write(self, data: bytes) -> None:
        with self.lock:
            stream = getattr(self.out, "buffer", None)
            if stream is not None:
                self.out.flush()
                stream.write(data)
                stream.flush()
            else:
                self.out.write(data.decode(errors="replace"))
                self.out.flush()


def run_on_nodes(lab_: Any, nodes: list, command: str, *, timeout: float | None,
                 stream: bool, cancel: threading.Event) -> list[Outcome]:
    """The library side of ``run``: one pooled connection per node, the command everywhere at
    once, a node's non-zero exit or timeout is that node's failure."""
    from labkit.ssh import CommandFailed, ConnectionPool

    lock = threading.Lock()
    pool = ConnectionPool(lab_.settings)

    def action(node: Any) -> dict[str, Any]:
        client = pool.get(node)
        out = LinePrefixer(node.name, sys.stdout, lock) if stream else None
        err = LinePrefixer(node.name, sys.stderr, lock) if stream else None
        try:
            r = client.run(command, timeout=timeout, on_stdout=out, on_stderr=err,
                           cancel=cancel)
        finally:
            for p in (out, err):
                if p:
                    p.flush()
        value = r.to_json()
        if not r.ok:
            if r.timed_out:
                msg = f"timed out after {r.seconds:.1f}s, remote processes killed"
            elif r.exit_code is not None:
                msg = f"exit code {r.exit_code}"
            elif not client.active:
                msg = (f"connection lost after {r.seconds:.1f}s (node powered off or "
                       f"rebooted?); no exit status")
            else:
                msg = "no exit status (the command was killed by a signal?)"
            raise CommandFailed(msg, value)
        return value

    try:
        return lab_.fan_out(nodes, action, label="run")
    finally:
        pool.close_all()


@labtask(help={
    "timeout": "seconds before the remote command is killed (default labkit.command_timeout)",
    "json": "print a JSON array with exit_code, stdout, stderr per node (no streaming)",
}, changes=True)
def run(ctx: Context, nodes: str | None = None, inventory: str | None = None,
        timeout: str | None = None, json: bool = False, force: bool = False) -> None:
    """Run a shell command on nodes in parallel: invoke run -n SEL -- CMD..."""
    command = (getattr(ctx, "remainder", "") or "").strip()
    if not command:
        raise UserError("nothing to run: give the command after --, e.g. run -n node1 -- uptime")
    seconds = args.seconds(timeout, "--timeout") if timeout is not None else None
    lab_ = lab(ctx, inventory)
    selected = lab_.select(nodes, change=True, force=force)
    cancel = threading.Event()
    # Ctrl-C: tell every node's run loop to kill its remote processes, then interrupt the main
    # thread; the fan-out waits for the workers, which now return within a round trip.
    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_sigint(signum: int, frame: Any) -> None:
            cancel.set()
            raise KeyboardInterrupt
        previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        outcomes = run_on_nodes(lab_, selected, command, timeout=seconds, stream=not json,
                                cancel=cancel)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    finish(outcomes, as_json=json, columns=("exit_code",))


TASKS = [run]
COLLECTION = None
