"""The remote shell as the rest of labkit sees it: run a command, start one to stream through,
the one result type of a finished command, and a pool of shells to many nodes.

Deploy, the janitor, sync and the experiment take a ``RemoteShell``, not an ``SshClient``: what
they need is these few calls, and a test or another transport (a VM's serial agent, a local
shell) can stand in by providing them. ``SshClient`` implements it. Nothing here imports
paramiko, so typing against it costs no start-up time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import threading

    from labkit.config import Settings
    from labkit.inventory import Node
    from labkit.ssh.process import RemoteProcess

# What a channel reader asks for per call. paramiko's receive buffer is an array whose front
# deletion moves the rest, so draining a backlog of N bytes in reads of c costs about N*N/2c
# bytes of copying: a 64 MiB backlog took 3.2 s in 64 KiB reads, 0.2 s in 1 MiB reads (and a
# reader that falls behind would fall further behind). Larger reads buy little more and cost
# elsewhere: sendall and line splitting copy what is left of their piece each time.
READ_SIZE = 1 << 20


@dataclass
class RunResult:
    """A finished (or abandoned) remote command."""

    exit_code: int | None      # None when timed out / killed before an exit status came back
    stdout: bytes
    stderr: bytes
    seconds: float
    timed_out: bool = False
    # bytes of the head of each stream not in stdout / stderr: a run with ``keep=N`` holds only
    # the last N of each (the rest went to on_stdout / on_stderr as it came)
    stdout_truncated: int = 0
    stderr_truncated: int = 0
    connection_lost: bool = False  # no exit status because the connection died under it

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def to_json(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code,
                "stdout": self.stdout.decode(errors="replace"),
                "stderr": self.stderr.decode(errors="replace"),
                "timed_out": self.timed_out}

    def reason(self) -> str:
        """Why this result is not ok, in the words every task uses for a node's error (exit
        codes through ``exit_text``): one line, without the node's name."""
        if self.timed_out:
            return f"timed out after {self.seconds:.1f}s, remote processes killed"
        if self.exit_code is not None:
            from labkit.ssh.errors import exit_text

            return exit_text(self.exit_code, self.stderr)
        if self.connection_lost:
            return (f"connection lost after {self.seconds:.1f}s (node powered off or "
                    f"rebooted?); no exit status")
        return "no exit status (the command was killed by a signal?)"

    def failure(self, node: str) -> str:
        """One line saying why this result is not ok, for an error message."""
        return f"{node}: {self.reason()}"


class RemoteShell(Protocol):
    """A shell on one node. Every command it starts carries the run and controller markers
    (``labkit.ssh.process``), so a timeout, a Ctrl-C or a later sweep can end it whole."""

    node: str            # the node's inventory name, for messages
    settings: Settings   # where the timeouts come from

    def run(self, cmd: str, *, timeout: float | None = None, input: bytes | None = None,
            env: dict[str, str] | None = None,
            on_stdout: Callable[[bytes], None] | None = None,
            on_stderr: Callable[[bytes], None] | None = None,
            cancel: threading.Event | None = None, keep: int | None = None) -> RunResult:
        """Run ``cmd`` (``/bin/sh -c``) to completion; a timeout kills it and returns
        ``timed_out=True``. ``keep=N`` holds only the last N bytes of each stream in the
        result (``stdout_truncated`` / ``stderr_truncated``: how many of the head it lacks), so
        a caller that takes the output as it arrives keeps its memory bounded."""
        ...

    def check(self, cmd: str, **kw: Any) -> RunResult:
        """``run`` that raises ``CommandFailed`` unless the command exited 0."""
        ...

    def open_exec(self, cmd: str, *, env: dict[str, str] | None = None) -> RemoteProcess:
        """Start ``cmd`` and hand back its process, to stream through its channel."""
        ...


class ShellPool(Protocol):
    """Shells to many nodes within one run: one per node, shared by a fan-out's threads.

    What a run, a preparation or a channel test takes when its caller wants connections reused
    across calls (a ``--matrix`` reuses one pool for every cell). ``ConnectionPool`` implements
    it over SSH."""

    def get(self, node: Node) -> RemoteShell:
        """The node's shell, connecting (or reconnecting a dead one) as needed."""
        ...

    def drop(self, node: Node | str) -> None:
        """Forget and close the node's shell, e.g. after it was powered off; the next
        ``get`` connects anew."""
        ...

    def close_all(self) -> None:
        """Close every shell the pool holds (the pool's owner calls this when done)."""
        ...
