"""What can go wrong talking to a node over SSH, sorted by what the caller should do about it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from labkit.errors import NodeError, RetryableError


class SshError(NodeError):
    """An SSH connection or operation to one node failed."""


class SshUnreachable(SshError, RetryableError):
    """Refused / reset / timed out / no banner: what a booting node looks like; retryable."""


class HostKeyError(SshError):
    """Unknown or changed host key. Never retried: it will not fix itself."""


class SshAuthError(SshError):
    """The node answered but refused every key we offered."""


class CommandFailed(NodeError):
    """A remote command exited non-zero or timed out; ``value`` carries its RunResult fields so
    the fan-out outcome keeps exit code and output."""

    def __init__(self, message: str, value: Mapping[str, Any]):
        super().__init__(message, value=value)


def exc_text(e: BaseException) -> str:
    """A library exception as one line: paramiko's often have an empty message."""
    return str(e) or type(e).__name__


ERROR_LINE_MAX = 300  # characters of a command's last stderr line kept in an error message


def last_error_line(stderr: bytes) -> str | None:
    """The last non-empty line of a command's stderr, one printable line: what a failed
    program says last is nearly always why (a traceback's last line, ``error: ...``), and the
    node's error text is the one place a user reads first. None when it wrote nothing."""
    text = stderr[-16384:].decode(errors="replace")
    for line in reversed(text.splitlines()):
        line = "".join(c if c.isprintable() else " " for c in line).strip()
        if line:
            return line if len(line) <= ERROR_LINE_MAX else line[:ERROR_LINE_MAX] + "..."
    return None


def exit_text(code: int, stderr: bytes) -> str:
    """``exit code N: <last stderr line>`` (or just ``exit code N``): a failed command's
    error text, the same for every task."""
    line = last_error_line(stderr)
    return f"exit code {code}: {line}" if line else f"exit code {code}"
