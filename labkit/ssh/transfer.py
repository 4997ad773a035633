"""Files over SFTP: one session per connection, atomic uploads, pipelined requests.

Uploads are written to a temporary name beside the target, chmod'ed, then posix-renamed over
it, so a reader on the node never sees half a file. Requests are 128 KiB (below OpenSSH
sftp-server's 256 KiB message cap, 4x paramiko's 32 KiB) and pipelined; a bulk payload push
goes through deploy's stream (``labkit.ssh.stream``) instead.
"""

from __future__ import annotations

import os
import stat
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import paramiko

from labkit.ssh.errors import SshError, exc_text
from labkit.ssh.run import CHANNEL_GONE

SFTP_CHUNK = 128 * 1024


class SftpFiles:
    """The SFTP session of one connection, opened on first use. paramiko's SFTPClient is not
    for concurrent use from several threads, so every operation holds one lock."""

    def __init__(self, node: str, open_channel: Callable[[], paramiko.Channel],
                 timeout: float):
        self.node = node
        self._open_channel = open_channel
        self._timeout = timeout
        self._sftp: paramiko.SFTPClient | None = None
        self.lock = threading.RLock()

    def session(self) -> paramiko.SFTPClient:
        with self.lock:
            if self._sftp is None or self._sftp.sock.closed:
                try:
                    ch = self._open_channel()
                    ch.invoke_subsystem("sftp")
                    self._sftp = paramiko.SFTPClient(ch)
                except CHANNEL_GONE as e:
                    raise SshError(f"{self.node}: cannot start sftp: {exc_text(e)}") from None
                self._sftp.get_channel().settimeout(self._timeout)
            return self._sftp

    def close(self) -> None:
        with self.lock:
            if self._sftp is not None:
                try:
                    self._sftp.close()
                except Exception:  # noqa: BLE001 - closing a dead session must not fail
                    pass
                self._sftp = None

    def put_bytes(self, data: bytes, remote: str, mode: int = 0o644, *,
                  atomic: bool = True) -> None:
        self._put(lambda f: _write_all(f, memoryview(data)), remote, mode, atomic)

    def put_file(self, local: str | os.PathLike, remote: str, mode: int | None = None, *,
                 atomic: bool = True) -> None:
        local = Path(local)
        if mode is None:
            mode = stat.S_IMODE(local.stat().st_mode)

        def body(f: paramiko.SFTPFile) -> None:
            with open(local, "rb") as src:
                while chunk := src.read(4 * 1024 * 1024):
                    _write_all(f, memoryview(chunk))

        self._put(body, remote, mode, atomic)

    def _put(self, body: Callable[[paramiko.SFTPFile], None], remote: str, mode: int,
             atomic: bool) -> None:
        with self.lock:
            sftp = self.session()
            tmp = f"{remote}.labkit-tmp-{uuid.uuid4().hex[:8]}" if atomic else remote
            try:
                with sftp.open(tmp, "wb", bufsize=0) as f:
                    f.set_pipelined(True)
                    f.MAX_REQUEST_SIZE = SFTP_CHUNK
                    body(f)
                sftp.chmod(tmp, mode)
                if atomic:
                    sftp.posix_rename(tmp, remote)
            except CHANNEL_GONE as e:
                if atomic:
                    try:
                        sftp.remove(tmp)
                    except CHANNEL_GONE:
                        pass
                raise SshError(f"{self.node}: upload to {remote} failed: {exc_text(e)}") \
                    from None

    def get_bytes(self, remote: str) -> bytes:
        with self.lock:
            sftp = self.session()
            try:
                with sftp.open(remote, "rb", bufsize=0) as f:
                    f.MAX_REQUEST_SIZE = SFTP_CHUNK
                    size = f.stat().st_size
                    f.prefetch(size)
                    # read in request-sized pieces: f.read() walks 8 KiB at a time through
                    # the prefetch table (quadratic), and grows one bytes object
                    parts = []
                    got = 0
                    while got < size:
                        data = f.read(min(SFTP_CHUNK, size - got))
                        if not data:
                            break
                        parts.append(data)
                        got += len(data)
                    return b"".join(parts)
            except CHANNEL_GONE as e:
                raise SshError(f"{self.node}: download of {remote} failed: {exc_text(e)}") \
                    from None


def _write_all(f: paramiko.SFTPFile, view: memoryview) -> None:
    # One SFTP write request per SFTP_CHUNK: handing paramiko a big buffer makes it re-slice
    # (copy) the remainder after every request, quadratic in the buffer size.
    for i in range(0, len(view), SFTP_CHUNK):
        f.write(bytes(view[i:i + SFTP_CHUNK]))
