"""The SFTP server of a ``PythonSshNode``: paramiko's, rooted at the node's folder so relative
paths land on the node's "disk" as they would in a real node's $HOME, with the details an
OpenSSH client checks (an exit status when the subsystem ends, SFTP v3 rename semantics,
attributes applied on create)."""

from __future__ import annotations

import os
import stat as stat_mod
from pathlib import Path
from typing import Any

import paramiko
from paramiko import (
    SFTP_FAILURE,
    SFTP_OK,
    SFTPAttributes,
    SFTPHandle,
    SFTPServer,
    SFTPServerInterface,
)


class SftpSubsystem(SFTPServer):
    """paramiko's SFTP server, plus the exit status OpenSSH's sftp-server gives when the
    session ends (scp/sftp clients report a missing one as failure)."""

    def start_subsystem(self, name: str, transport: paramiko.Transport,
                        channel: paramiko.Channel) -> None:
        super().start_subsystem(name, transport, channel)
        try:
            channel.send_exit_status(0)
        except (OSError, EOFError, paramiko.SSHException):
            pass


class _Handle(SFTPHandle):
    def stat(self) -> SFTPAttributes | int:
        try:
            return SFTPAttributes.from_stat(os.fstat(self.readfile.fileno()))
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)

    def chattr(self, attr: SFTPAttributes) -> int:
        try:
            _apply_attrs(self.filename, attr)
            return SFTP_OK
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)


def _apply_attrs(path: str, attr: SFTPAttributes) -> None:
    if attr._flags & attr.FLAG_PERMISSIONS:
        os.chmod(path, stat_mod.S_IMODE(attr.st_mode))
    if attr._flags & attr.FLAG_UIDGID:
        try:
            os.chown(path, attr.st_uid, attr.st_gid)
        except PermissionError:
            pass
    if attr._flags & attr.FLAG_AMTIME:
        os.utime(path, (attr.st_atime, attr.st_mtime))
    if attr._flags & attr.FLAG_SIZE:
        with open(path, "r+b") as f:
            f.truncate(attr.st_size)


class RootedSftp(SFTPServerInterface):
    """Absolute paths as they are (it is a local fake); relative paths against the node root,
    so ``put("x", "payloads/x")`` lands on the node's disk like on a real node's $HOME."""

    def __init__(self, server: Any, *args: Any, root: Path, **kwargs: Any):
        super().__init__(server, *args, **kwargs)
        self.root = str(root)

    def _p(self, path: str | bytes) -> str:
        if isinstance(path, bytes):
            path = path.decode(errors="surrogateescape")
        return os.path.join(self.root, path) if not os.path.isabs(path) else path

    @staticmethod
    def _err(e: OSError) -> int:
        return SFTPServer.convert_errno(e.errno)

    def canonicalize(self, path: str) -> str:
        return os.path.normpath(self._p(path or "."))

    def list_folder(self, path: str) -> list[SFTPAttributes] | int:
        p = self._p(path)
        try:
            out = []
            for name in os.listdir(p):
                a = SFTPAttributes.from_stat(os.lstat(os.path.join(p, name)))
                a.filename = name
                out.append(a)
            return out
        except OSError as e:
            return self._err(e)

    def stat(self, path: str) -> SFTPAttributes | int:
        try:
            return SFTPAttributes.from_stat(os.stat(self._p(path)))
        except OSError as e:
            return self._err(e)

    def lstat(self, path: str) -> SFTPAttributes | int:
        try:
            return SFTPAttributes.from_stat(os.lstat(self._p(path)))
        except OSError as e:
            return self._err(e)

    def open(self, path: str, flags: int, attr: SFTPAttributes) -> SFTPHandle | int:
        p = self._p(path)
        mode = attr.st_mode if attr is not None and attr.st_mode is not None else 0o666
        try:
            fd = os.open(p, flags | getattr(os, "O_BINARY", 0), stat_mod.S_IMODE(mode))
        except OSError as e:
            return self._err(e)
        if flags & os.O_CREAT and attr is not None:
            attr._flags &= ~attr.FLAG_PERMISSIONS  # mode already applied (modulo umask)
            try:
                _apply_attrs(p, attr)
            except OSError:
                pass
        if flags & os.O_WRONLY:
            fmode = "ab" if flags & os.O_APPEND else "wb"
        elif flags & os.O_RDWR:
            fmode = "a+b" if flags & os.O_APPEND else "r+b"
        else:
            fmode = "rb"
        try:
            f = os.fdopen(fd, fmode, buffering=0)
        except OSError as e:
            os.close(fd)
            return self._err(e)
        h = _Handle(flags)
        h.filename = p
        h.readfile = f
        h.writefile = f
        return h

    def remove(self, path: str) -> int:
        try:
            os.remove(self._p(path))
        except OSError as e:
            return self._err(e)
        return SFTP_OK

    def rename(self, oldpath: str, newpath: str) -> int:
        new = self._p(newpath)
        if os.path.lexists(new):  # SFTP v3 rename must not overwrite
            return SFTP_FAILURE
        try:
            os.rename(self._p(oldpath), new)
        except OSError as e:
            return self._err(e)
        return SFTP_OK

    def posix_rename(self, oldpath: str, newpath: str) -> int:
        try:
            os.rename(self._p(oldpath), self._p(newpath))
        except OSError as e:
            return self._err(e)
        return SFTP_OK

    def mkdir(self, path: str, attr: SFTPAttributes) -> int:
        p = self._p(path)
        try:
            os.mkdir(p)
            if attr is not None:
                _apply_attrs(p, attr)
        except OSError as e:
            return self._err(e)
        return SFTP_OK

    def rmdir(self, path: str) -> int:
        try:
            os.rmdir(self._p(path))
        except OSError as e:
            return self._err(e)
        return SFTP_OK

    def chattr(self, path: str, attr: SFTPAttributes) -> int:
        try:
            _apply_attrs(self._p(path), attr)
        except OSError as e:
            return self._err(e)
        return SFTP_OK

    def symlink(self, target_path: str, path: str) -> int:
        # target kept verbatim (relative targets stay relative, like OpenSSH's sftp-server)
        try:
            os.symlink(target_path, self._p(path))
        except OSError as e:
            return self._err(e)
        return SFTP_OK

    def readlink(self, path: str) -> str | int:
        try:
            return os.readlink(self._p(path))
        except OSError as e:
            return self._err(e)

