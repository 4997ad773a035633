"""Where the output of a command run on many nodes at once goes as it arrives: each node's
streams to the terminal as whole prefixed lines (``node| ...``), to files under a folder, or
both, while the run itself holds only a bounded tail (``RemoteShell.run(keep=)``).

What ``labkit run`` prints, here so that a test (or another task) reaches it without the CLI."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

from labkit.errors import UserError

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
    (every byte, as written), or both."""

    def __init__(self, prefixer: LinePrefixer | None, file: IO[bytes] | None):
        self.prefixer = prefixer
        self.file = file

    def __call__(self, data: bytes) -> None:
        if self.file is not None:
            self.file.write(data)
        if self.prefixer is not None:
            self.prefixer(data)

    def close(self) -> None:
        try:
            if self.prefixer is not None:
                self.prefixer.flush()
        finally:
            if self.file is not None:
                self.file.close()


class NodeOutput:
    """A node's stdout and stderr sinks for one run: ``stream`` prints them prefixed to this
    process's stdout / stderr (``lock`` shared by every node, so lines never interleave);
    ``out_dir`` writes them whole to ``NODE.stdout`` / ``NODE.stderr`` there. A context
    manager: leaving it prints a trailing partial line and closes the files."""

    def __init__(self, node: str, lock: threading.Lock, *, stream: bool,
                 out_dir: Path | None = None):
        self.stdout: Sink
        self.stderr: Sink
        sinks: list[Sink] = []
        try:
            for std, what in ((sys.stdout, "stdout"), (sys.stderr, "stderr")):
                file = open(out_dir / f"{node}.{what}", "wb") if out_dir is not None else None  # noqa: SIM115
                sinks.append(Sink(LinePrefixer(node, std, lock) if stream else None, file))
        except BaseException:
            for s in sinks:
                s.close()
            raise
        self.stdout, self.stderr = sinks

    def close(self) -> None:
        try:
            self.stdout.close()
        finally:
            self.stderr.close()

    def __enter__(self) -> NodeOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def output_dir(path: str) -> Path:
    """``--out``: the folder (created) that will hold every node's output; refused (a
    ``UserError``) before anything starts when it cannot be written."""
    where = Path(path)
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise UserError(f"--out {path}: cannot write there: {e.strerror or e}") from None
    return Path(os.path.abspath(where))
