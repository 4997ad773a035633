"""The processes a migrate-test run starts on its nodes, and the error every step of a run raises.

Backend-neutral: the workload, the built-in backend's agents, and whatever a second backend
runs on a node (a CRIU helper, a page server) are all payload programs started in the deployed
payload folder over one SSH exec channel each, answering in JSON lines. Everything started this
way carries the connection's run marker (``LABKIT_RUN``), which is what the run's cleanup kills
by."""

from __future__ import annotations

import json
import queue
import shlex
import threading
import time
from typing import TYPE_CHECKING, Any

from labkit.errors import LabkitError
from labkit.inventory import Node

if TYPE_CHECKING:
    import paramiko

    from labkit.ssh import RemoteProcess, RemoteShell


class MigrationFailed(LabkitError):
    """The migration ran but did not verify, a stream was refused, or a peer stopped answering.
    One line that names the node and what the run was waiting for."""


def payload_dir(node: Node) -> str:
    """Where the deployed payloads (workload, agent, tracker) are on ``node``."""
    from labkit.deploy import remote_workdir

    return f"{remote_workdir(node)}/payloads/current"


def payload_command(node: Node, script: str, args: str) -> str:
    """The shell line that runs payload ``script`` on ``node``: unbuffered (its JSON lines are
    the protocol), and exec'd so the channel's process is the payload itself."""
    return f"cd {shlex.quote(payload_dir(node))} && exec python3 -u {script} {args}"


class Remote:
    """A payload process on a node, over one SSH exec channel: stdout read by a thread into
    a queue (JSON lines) unless ``raw`` (then the caller reads the channel, e.g. a relay),
    stdin written by us, stderr kept for error messages."""

    def __init__(self, client: RemoteShell, node: str, cmd: str, label: str, *,
                 raw: bool = False,
                 env: dict[str, str] | None = None):
        self.client = client
        self.node = node
        self.label = label
        self.cmd = cmd
        self.proc: RemoteProcess = client.open_exec(cmd, env=env)
        self.ch: paramiko.Channel = self.proc.channel
        self.raw = raw
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self._lock = threading.Lock()
        self._err = b""
        if not raw:
            threading.Thread(target=self._read_lines, daemon=True,
                             name=f"{label}-out").start()

    def _read_lines(self) -> None:
        buf = b""
        try:
            while True:
                data = self.ch.recv(65536)
                if not data:
                    break
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        obj = {"event": "text", "text": line.decode(errors="replace")}
                    self.lines.put(obj)
        except OSError as e:
            self.lines.put({"event": "eof", "error": str(e)})
            return
        self.lines.put({"event": "eof"})

    def send(self, line: str) -> None:
        with self._lock:
            try:
                self.ch.sendall((line + "\n").encode())
            except OSError as e:
                raise MigrationFailed(f"{self.node}: {self.label} is gone ({e}); "
                                      f"{self.stderr_tail()}") from None

    def stderr_tail(self) -> str:
        """The last lines the process wrote to stderr (all of it is kept: a traceback's last
        line is the useful one)."""
        err = b""
        try:
            while self.ch.recv_stderr_ready():
                err += self.ch.recv_stderr(65536)
        except OSError:
            pass
        self._err += err
        lines = [ln for ln in self._err.decode(errors="replace").splitlines() if ln.strip()]
        return ("stderr: " + " | ".join(lines[-3:])) if lines else "no stderr"

    def next(self, timeout: float, what: str) -> dict[str, Any]:
        try:
            obj = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise MigrationFailed(f"{self.node}: {self.label}: no answer within {timeout:.0f}s "
                                  f"waiting for {what}") from None
        if obj.get("event") == "eof":
            time.sleep(0.05)  # let the dying process's last stderr line arrive
            raise MigrationFailed(f"{self.node}: {self.label} exited while we waited for {what}"
                                  f" ({self.stderr_tail()})")
        if obj.get("event") == "error" or obj.get("ok") is False:
            raise MigrationFailed(f"{self.node}: {self.label}: {obj.get('error')}")
        return obj

    def call(self, line: str, timeout: float) -> dict[str, Any]:
        """Send a command and return its one-line JSON reply."""
        self.send(line)
        return self.next(timeout, repr(line))

    def kill(self) -> None:
        try:
            self.proc.kill()
        finally:
            try:
                self.proc.close()
            except Exception:  # noqa: BLE001 - cleanup must go on
                pass
