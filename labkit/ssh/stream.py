"""A flow-controlled byte stream into a remote command's stdin.

For pushing tens of MiB through one exec channel (deploy's stage step) without holding it in
memory, and at less CPU per byte on the node than an SFTP server spends for ``scp``. The remote
side acknowledges what it has written with ``@ack N`` lines on its stdout (N: total bytes so
far, one line at least every ``ack_every`` bytes, which the caller tells it); everything else it
prints is its answer, returned as the result's stdout.

Why our own flow control on top of SSH's window: windows are 64 MiB here, and paramiko's receive
buffer pays a memmove of everything still queued on every read — a deep queue made the node side
burn more CPU per byte than SFTP does. At most IN_FLIGHT unacknowledged bytes keeps it linear,
and also means a node that fails stops the sender within a couple of MiB.
"""

from __future__ import annotations

import contextlib
import select
import threading
import time
from collections.abc import Iterator

from labkit.ssh.shell import READ_SIZE, RemoteShell, RunResult

ACK_EVERY = 256 * 1024       # the remote side reports progress every this many bytes ...
IN_FLIGHT = 2 * 1024 * 1024  # ... and we keep at most this many unacknowledged bytes in flight
ACK = b"@ack "


class Replies:
    """The remote command's stdout: ``@ack N`` progress lines, then its answer."""

    def __init__(self) -> None:
        self.acked = 0
        self.buf = bytearray()
        self.err = bytearray()
        self.done = False
        self.cond = threading.Condition()

    def feed(self, data: bytes) -> None:
        with self.cond:
            self.buf.extend(data)
            while self.buf.startswith(ACK):
                nl = self.buf.find(b"\n")
                if nl < 0:
                    break
                self.acked = int(self.buf[len(ACK):nl])
                del self.buf[:nl + 1]
            self.cond.notify_all()

    def finish(self) -> None:
        with self.cond:
            self.done = True
            self.cond.notify_all()


def exec_streaming(shell: RemoteShell, command: str, chunks: Iterator[bytes],
                   timeout: float) -> RunResult:
    """Run ``command`` with ``chunks`` streamed to its stdin, at most IN_FLIGHT bytes ahead of
    its acknowledgements. Replies are read by a thread so a node that fails early cannot
    deadlock our sends; on timeout (or any exception here) the remote processes are killed."""
    from labkit.ssh.run import CHANNEL_GONE  # paramiko's: loaded here, not with the types

    t0 = time.monotonic()
    proc = shell.open_exec(command)
    ch = proc.channel
    rep = Replies()

    def drain() -> None:
        try:
            while True:
                r, _, _ = select.select([ch], [], [], 0.5)
                while ch.recv_stderr_ready():
                    rep.err.extend(ch.recv_stderr(READ_SIZE))
                if not r and not ch.recv_ready():
                    if ch.closed or (ch.eof_received and ch.exit_status_ready()):
                        break
                    continue
                b = ch.recv(READ_SIZE)
                if not b:
                    break
                rep.feed(b)
        except CHANNEL_GONE:
            pass
        finally:
            rep.finish()

    reader = threading.Thread(target=drain, daemon=True, name=f"stream-{shell.node}")
    reader.start()
    deadline = time.monotonic() + timeout
    sent = 0
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    with rep.cond:
                        while (not rep.done and sent - rep.acked > IN_FLIGHT
                               and time.monotonic() < deadline):
                            rep.cond.wait(0.5)
                    if rep.done or ch.closed or time.monotonic() >= deadline:
                        break
                    piece = view[:ACK_EVERY]
                    ch.sendall(piece)
                    sent += len(piece)
                    view = view[len(piece):]
                if view:
                    break  # the node stopped early (its answer says why), or the deadline
            else:
                ch.shutdown_write()
        except CHANNEL_GONE:
            pass  # the channel went away: the node's answer (or its absence) says why
        reader.join(max(0.0, deadline - time.monotonic()))
        if reader.is_alive():
            proc.kill()
            return RunResult(None, bytes(rep.buf), bytes(rep.err), time.monotonic() - t0, True)
        code = proc.wait(max(1.0, min(10.0, deadline - time.monotonic())))
        with contextlib.suppress(*CHANNEL_GONE):
            while ch.recv_stderr_ready():
                rep.err.extend(ch.recv_stderr(READ_SIZE))
        return RunResult(code, bytes(rep.buf), bytes(rep.err), time.monotonic() - t0)
    except BaseException:
        proc.kill()
        raise
    finally:
        with contextlib.suppress(*CHANNEL_GONE):  # a close sends too
            proc.close()
