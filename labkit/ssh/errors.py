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
