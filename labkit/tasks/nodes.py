"""Tasks on nodes over SSH: ``run``.

``invoke run -n SEL -- CMD...`` (or ``labkit run ...``): the words after ``--`` are joined with
spaces like ssh does, so ``-- 'cat x | wc -l'`` and ``-- cat x '|' wc -l`` mean the same."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from invoke import Context

from labkit.errors import UserError
from labkit.tasks import args
from labkit.tasks.common import finish, lab, labtask

if TYPE_CHECKING:
    from labkit.fanout import Outcome


LINE_MAX = 64 * 1024  # bytes of a line without a newline printed as one prefixed piece
KEEP = 1024 * 1024    # bytes of each stream per node kept for the table / --json (the last)


class LinePrefixer:
    """Writes a node's stream to a shared output as whole lines prefixed ``node| ``, so lines
    from parallel nodes never interleave mid-line. A line longer than ``LINE_MAX`` (output
    without newlines) is printed in pieces of that size, each prefixed, as it arrives: what is
    held back stays bounded. ``flush()`` emits a trailing partial line."""

    def __init__(self, node: str, out: Any, lock: threading.Lock):
        self.prefix = f"{node}| ".encode()
        self.out = out
        self.lock = lock
        self.buf = bytearray()

    def __call__(self, data: bytes) -> None:
        self.buf += data
        cut = self.buf.rfind(b"\n", len(self.buf) - len(data)) + 1
        pieces: list[bytes] = []
        if cut:
            for line in bytes(self.buf[:cut - 1]).split(b"\n"):
                pieces += [line[i:i + LINE_MAX] for i in range(0, len(line), LINE_MAX)] or [b""]
            del self.buf[:cut]
        while len(self.buf) >= LINE_MAX:
            pieces.append(bytes(self.buf[:LINE_MAX]))
            del self.buf[:LINE_MAX]
        if pieces:
            self._write(b"".join(self.prefix + p + b"\n" for p in pieces))

    def flush(self) -> None:
        if self.buf:
            self._write(self.prefix + bytes(self.buf) + b"\n")
            self.buf.clear()

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


class Sink:
    """Where one stream of one node goes as it arrives: the terminal (prefixed lines), a file
    under ``--out`` (every byte, as written), or both; ``total`` counts the bytes."""

    def __init__(self, prefixer: LinePrefixer | None, path: Path | None):
        self.prefixer = prefixer
        self.file = open(path, "wb") if path is not None else None  # noqa: SIM115
        self.total = 0

    def __call__(self, data: bytes) -> None:
        self.total += len(data)
        if self.file is not None:
            self.file.write(data)
        if self.prefixer is not None:
            self.prefixer(data)

    def close(self) -> None:
        if self.prefixer is not None:
            self.prefixer.flush()
        if self.file is not None:
            self.file.close()


def run_on_nodes(lab_: Any, nodes: list, command: str, *, timeout: float | None,
                 stream: bool, cancel: threading.Event,
                 out_dir: Path | None = None) -> list[Outcome]:
    """The library side of ``run``: one pooled connection per node, the command everywhere at
    once, a node's non-zero exit or timeout is that node's failure. Output is passed on as it
    arrives (``stream``: prefixed to the terminal; ``out_dir``: NODE.stdout / NODE.stderr) and
    only the last ``KEEP`` bytes of each stream are held for the result, so memory stays
    bounded however much a node writes; ``stdout_truncated`` / ``stderr_truncated`` say how
    many bytes of the head the result lacks."""
    from labkit.ssh import CommandFailed, ConnectionPool, exit_text
    from labkit.ssh.run import run_to_end

    lock = threading.Lock()
    pool = ConnectionPool(lab_.settings)
    limit = lab_.settings.command_timeout if timeout is None else timeout

    def action(node: Any) -> dict[str, Any]:
        client = pool.get(node)
        sinks = [Sink(LinePrefixer(node.name, std, lock) if stream else None,
                      out_dir / f"{node.name}.{what}" if out_dir is not None else None)
                 for std, what in ((sys.stdout, "stdout"), (sys.stderr, "stderr"))]
        t0 = time.monotonic()
        try:
            proc = client.open_exec(command)
            r = run_to_end(proc, started=t0, deadline=t0 + limit if limit > 0 else None,
                           on_stdout=sinks[0], on_stderr=sinks[1], cancel=cancel, keep=KEEP)
        finally:
            for s in sinks:
                s.close()
        value = r.to_json()
        value["stdout_truncated"] = sinks[0].total - len(r.stdout)
        value["stderr_truncated"] = sinks[1].total - len(r.stderr)
        if not r.ok:
            if r.timed_out:
                msg = f"timed out after {r.seconds:.1f}s, remote processes killed"
            elif r.exit_code is not None:
                msg = exit_text(r.exit_code, r.stderr)
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


def output_dir(path: str) -> Path:
    """``--out``: the folder (created) that will hold every node's output; refused before
    anything starts when it cannot be written."""
    import os
    import tempfile

    where = Path(path)
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise UserError(f"--out {path}: cannot write there: {e.strerror or e}") from None
    return Path(os.path.abspath(where))


@labtask(help={
    "timeout": "seconds before the remote command is killed (default labkit.command_timeout)",
    "json": "print a JSON array with exit_code, stdout, stderr per node (no streaming; the "
            "last 1 MiB of each stream, *_truncated: bytes left out)",
    "out": "folder to write every node's whole output to, as NODE.stdout and NODE.stderr",
}, changes=True)
def run(ctx: Context, nodes: str | None = None, inventory: str | None = None,
        timeout: str | None = None, json: bool = False, force: bool = False,
        out: str | None = None) -> None:
    """Run a shell command on nodes in parallel: invoke run -n SEL -- CMD..."""
    from labkit import signals

    command = (getattr(ctx, "remainder", "") or "").strip()
    if not command:
        raise UserError("nothing to run: give the command after --, e.g. run -n node1 -- uptime")
    seconds = args.seconds(timeout, "--timeout") if timeout is not None else None
    lab_ = lab(ctx, inventory)
    selected = lab_.select(nodes, change=True, force=force)
    out_dir = output_dir(out) if out is not None else None
    # Ctrl-C, SIGTERM, SIGHUP (labkit.signals): every node's run loop sees the cancel event and
    # kills its remote processes while the main thread is interrupted; the fan-out waits for
    # the workers, which now return within a round trip.
    outcomes = run_on_nodes(lab_, selected, command, timeout=seconds, stream=not json,
                            cancel=signals.cancel_event(), out_dir=out_dir)
    finish(outcomes, as_json=json, columns=("exit_code",))


TASKS = [run]
COLLECTION = None
