"""Error types. A user error is one line that names the thing at fault (file:line where it
applies); it maps to exit code 2. Anything else that fails an operation maps to exit 1."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class LabkitError(Exception):
    """An operation failed; the message is shown to the user as is (one line, no secrets).

    ``value`` is data for the report (a node's outcome fields, such as ``console_tail`` or the
    results ``folder``): part of the error from construction, so a fan-out can print what a
    failed node had to say beside its one-line message."""

    exit_code = 1

    def __init__(self, message: str = "", *, value: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.value: dict[str, Any] = dict(value or {})


class UserError(LabkitError):
    """Bad input: inventory, selectors, arguments. Nothing was started."""

    exit_code = 2


class InventoryError(UserError):
    """A problem in an inventory file, reported as ``path:line: message``."""

    def __init__(self, path: object, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {message}")


class RetryableError(LabkitError):
    """A transient failure (timeout, busy BMC) that the retry policy may try again."""


class NodeError(LabkitError):
    """One node's operation failed; carried into that node's outcome."""


class LeaseError(LabkitError):
    """A node is leased by someone else."""

    exit_code = 1
