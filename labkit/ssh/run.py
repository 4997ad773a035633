"""The run loop: drive one started command to its end, collecting (and optionally streaming)
its output, feeding its stdin, and killing it on timeout or cancel."""

from __future__ import annotations

import contextlib
import select
import threading
import time
from collections.abc import Callable

import paramiko

from labkit.ssh.errors import SshError
from labkit.ssh.process import RemoteProcess
from labkit.ssh.shell import READ_SIZE, RunResult

CHUNK = 256 * 1024

# What a paramiko call raises once the connection under it has died (every SSH call here catches
# it: the handshake, auth, SFTP, a channel's reads and writes). paramiko raises EOFError for
# a send on a dead socket, and a read sends too (``recv`` grants the peer window as it reads), so
# a read or a close can raise it before paramiko's own reader thread has seen the connection go;
# a send that waits on a key exchange the dead peer never finishes raises SSHException.
CHANNEL_GONE: tuple[type[Exception], ...] = (OSError, EOFError, paramiko.SSHException)


class Tail:
    """A stream's bytes as a run keeps them: all of them (``keep`` None), or only the last
    ``keep`` — what bounds a controller's memory when a node writes hundreds of MB that were
    streamed elsewhere already. ``total`` counts every byte seen, so ``dropped`` says how much
    of the head is gone."""

    def __init__(self, keep: int | None = None):
        self.keep = keep
        self.total = 0
        self._parts: list[bytes] = []
        self._held = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        self._parts.append(data)
        self._held += len(data)
        if self.keep is not None and self._held > 2 * self.keep + CHUNK:
            # trim now and then, not per chunk: amortised O(1) a byte
            self._parts = [self.value()]
            self._held = len(self._parts[0])

    def value(self) -> bytes:
        data = b"".join(self._parts)
        return data if self.keep is None else data[max(0, len(data) - self.keep):]

    @property
    def dropped(self) -> int:
        return 0 if self.keep is None else self.total - min(self._held, self.keep)


class _Gone(Exception):
    """The connection died under a read."""


def _drain(ready: Callable[[], bool], read: Callable[[int], bytes], tail: Tail,
           on_data: Callable[[bytes], None] | None) -> bool:
    """Take what the channel holds of one stream; whether anything came. A read that raises
    ``CHANNEL_GONE`` (its window grant met the dead socket before paramiko's reader thread saw
    the connection go) raises ``_Gone``: the command's end is the connection's."""
    got = False
    while ready():
        try:
            data = read(READ_SIZE)
        except CHANNEL_GONE:
            raise _Gone from None
        if not data:
            break
        got = True
        tail.add(data)
        if on_data:
            on_data(data)
    return got


def run_to_end(proc: RemoteProcess, *, started: float, deadline: float | None,
               input: bytes | None = None,
               on_stdout: Callable[[bytes], None] | None = None,
               on_stderr: Callable[[bytes], None] | None = None,
               cancel: threading.Event | None = None,
               keep: int | None = None) -> RunResult:
    """Wait for ``proc`` (started at ``started``, a time.monotonic() value) until it exits, the
    connection drops (SshError), ``deadline`` passes (its processes are killed; the result says
    timed_out) or ``cancel`` is set (killed too; KeyboardInterrupt). The channel is closed on
    the way out."""
    node = proc.client.node
    ch = proc.channel
    if input:
        def feed() -> None:
            try:
                ch.sendall(input)
                ch.shutdown_write()
            except CHANNEL_GONE:
                pass
        threading.Thread(target=feed, daemon=True, name=f"stdin-{node}").start()
    else:
        try:
            ch.shutdown_write()  # like `ssh -n`: the command reads EOF, never hangs on stdin
        except CHANNEL_GONE:
            with contextlib.suppress(*CHANNEL_GONE):  # a close sends too
                proc.close()
            raise SshError(f"{node}: connection lost while starting {proc.cmd!r}") from None
    out, err = Tail(keep), Tail(keep)
    timed_out = gone = False
    try:
        while True:
            try:
                got = _drain(ch.recv_ready, ch.recv, out, on_stdout)
                got = _drain(ch.recv_stderr_ready, ch.recv_stderr, err, on_stderr) or got
            except _Gone:
                gone = True
                break
            if got:
                continue
            if (ch.eof_received and ch.exit_status_ready()) or ch.closed:
                break
            if not proc.client.active:
                raise SshError(f"{node}: connection lost while running {proc.cmd!r}")
            if cancel is not None and cancel.is_set():
                raise KeyboardInterrupt
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                timed_out = True
                proc.kill()
                break
            wait = 0.05 if ch.eof_received else 0.25
            if deadline is not None:
                wait = min(wait, deadline - now)
            select.select([ch], [], [], max(0.0, wait))
    except BaseException:
        proc.kill()
        raise
    finally:
        with contextlib.suppress(*CHANNEL_GONE):  # a close sends too
            ch.close()
    if gone:
        # closed, the channel grants no more window: what paramiko still holds reads quietly
        # (all but the piece the failed read took). No EOF came, so the output is short: an
        # exit status that came ahead of it does not make the run whole.
        with contextlib.suppress(_Gone):
            _drain(ch.recv_ready, ch.recv, out, on_stdout)
            _drain(ch.recv_stderr_ready, ch.recv_stderr, err, on_stderr)
        code = None
    else:
        code = None if timed_out else (ch.recv_exit_status() if ch.exit_status_ready() else None)
    if code == -1:
        code = None  # exit-signal or no status at all
    lost = code is None and not timed_out and (gone or proc.client.broken)
    return RunResult(code, out.value(), err.value(), time.monotonic() - started, timed_out,
                     stdout_truncated=out.dropped, stderr_truncated=err.dropped,
                     connection_lost=lost)
