"""The processes a migrate-test run starts on its nodes, and the error every step of a run raises.

Backend-neutral: the workload, the built-in backend's agents, and whatever a second backend
runs on a node (a CRIU helper, a page server) are all payload programs started in the deployed
payload folder over one SSH exec channel each, answering in JSON lines. Everything started this
way carries the connection's run marker (``LABKIT_RUN``), which is what the run's cleanup kills
by.

A run's processes are its peers (``Peers``): every wait of the run fails at once when one of
them ends without having been told to (``Remote.quit``), with that peer's exit status and last
stderr lines, instead of waiting out a budget of tens of seconds for an answer that cannot
come."""

from __future__ import annotations

import json
import queue
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from labkit.errors import LabkitError
from labkit.inventory import Node
from labkit.ssh.run import CHANNEL_GONE
from labkit.ssh.shell import READ_SIZE

if TYPE_CHECKING:
    import paramiko

    from labkit.experiment.results import Events
    from labkit.ssh import RemoteProcess, RemoteShell
    from labkit.ssh.run import Tail

# After a peer's stdout ends, how long its exit status may take to arrive (OpenSSH sends it
# after the EOF; the fake lab before it). A channel that closes without one sets it at once.
EXIT_STATUS_GRACE = 2.0
# Reading what paramiko holds of a peer's stderr once its EOF is in takes at most this.
STDERR_DRAIN_MAX = 30.0
# A peer that reported an error may still be writing its stderr: wait this long for its end.
ERROR_EXIT_GRACE = 1.0
STDERR_LINES = 3  # of a peer's stderr, the lines a failure quotes (a traceback's last is the one)
# Of a peer's stderr, the bytes kept (its tail): plenty for STDERR_LINES, and a peer that
# writes megabytes there costs the controller no more than this.
STDERR_KEEP = 16 << 10

# Put into a waiting queue when a peer ends: "look at the peers again".
WAKE: dict[str, Any] = {"event": "peer-ended"}


class MigrationFailed(LabkitError):
    """The migration ran but did not verify, a stream was refused, or a peer stopped answering.
    One line that names the node and what the run was waiting for; ``value`` holds the report's
    ``error`` object fields (``step``, ``node``, ``peer``, ``exit_status``, ``stderr``) where
    they are known."""


def payload_dir(node: Node) -> str:
    """Where the deployed payloads (workload, agent, tracker) are on ``node``."""
    from labkit.deploy import remote_workdir

    return f"{remote_workdir(node)}/payloads/current"


def payload_command(node: Node, script: str, args: str) -> str:
    """The shell line that runs payload ``script`` on ``node``: unbuffered (its JSON lines are
    the protocol), and exec'd so the channel's process is the payload itself."""
    return f"cd {shlex.quote(payload_dir(node))} && exec python3 -u {script} {args}"


def how_ended(status: int | None) -> str:
    """A peer's end in words: 'exited with status 1', '... 137 (SIGKILL)', 'connection lost'."""
    if status is None:
        return "ended (connection lost, no exit status)"
    text = f"exited with status {status}"
    if status > 128:
        try:
            text += f" ({signal.Signals(status - 128).name})"
        except ValueError:
            pass
    return text


class Remote:
    """A payload process on a node, over one SSH exec channel: stdout read by a thread into
    a queue (JSON lines) unless ``raw`` (then the caller reads the channel, e.g. a relay, and
    calls ``stdout_closed`` at its end), stdin written by us, stderr read by a thread of its
    own as it comes (the last STDERR_KEEP bytes kept, for error messages).

    Its end is known once its stdout has ended and its exit status is in (``ended``,
    ``exit_status``); ``on_end`` callbacks run then, with everything it wrote to stderr
    already read."""

    def __init__(self, client: RemoteShell, node: str, cmd: str, label: str, *,
                 raw: bool = False, env: dict[str, str] | None = None,
                 peers: Peers | None = None):
        from labkit.ssh.run import Tail  # here: importing this module loads no paramiko

        self.client = client
        self.node = node
        self.label = label
        self.cmd = cmd
        self.peers = peers
        self.proc: RemoteProcess = client.open_exec(cmd, env=env)
        self.ch: paramiko.Channel = self.proc.channel
        self.raw = raw
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self._lock = threading.Lock()  # one writer on stdin at a time
        self._end_lock = threading.Lock()
        self._err_lock = threading.Lock()  # the tail: written by its reader, read by waiters
        self._err: Tail = Tail(STDERR_KEEP)
        self.ended = threading.Event()
        self._closing = False  # stdout_closed has begun (under _end_lock)
        self.exit_status: int | None = None
        self.told_to_quit = False  # its end is expected: not a failure
        self.error_line: str | None = None  # the last error it reported on stdout
        self._on_end: list[Callable[[Remote], None]] = []
        if peers is not None:
            peers.add(self)
        self._err_reader = threading.Thread(target=self._read_stderr, daemon=True,
                                            name=f"{label}-err")
        self._err_reader.start()
        if not raw:
            threading.Thread(target=self._read_lines, daemon=True,
                             name=f"{label}-out").start()

    def _read_lines(self) -> None:
        buf = b""
        error = None
        try:
            while True:
                data = self.ch.recv(READ_SIZE)
                if not data:
                    break
                *lines, buf = (buf + data).split(b"\n")  # one pass: a line at a time copied the rest
                for line in lines:
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        obj = {"event": "text", "text": line.decode(errors="replace")}
                    if isinstance(obj, dict) and (obj.get("event") == "error"
                                                  or obj.get("ok") is False):
                        self.error_line = str(obj.get("error"))
                    self.lines.put(obj)
        except CHANNEL_GONE as e:
            error = str(e) or "the connection was lost"
        self.stdout_closed()
        self.lines.put({"event": "eof", **({"error": error} if error else {})})

    def _read_stderr(self) -> None:
        """Read its stderr for its whole life, keeping the tail. Continuously, not when a
        failure wants its lines: paramiko grants the peer window only for what is read, and
        stdout and stderr share that window, so stderr left unread would stall the channel
        (and the peer, blocked writing it) after a couple of MiB."""
        while True:
            try:
                data = self.ch.recv_stderr(READ_SIZE)
            except TimeoutError:  # a raw channel's consumer set a timeout: not our end
                continue
            except CHANNEL_GONE:
                return
            if not data:  # EOF (it comes with stdout's) or the channel closed
                return
            with self._err_lock:
                self._err.add(data)

    def stdout_closed(self) -> None:
        """Its stdout ended (the reader thread's or a raw channel's consumer's call): wait a
        moment for the exit status and the end of stderr, and tell the ``on_end``
        callbacks. Idempotent."""
        with self._end_lock:
            closing, self._closing = self._closing, True
        if closing:  # the reader thread and a waiter's gone() can both get here: one ends it
            self.ended.wait(EXIT_STATUS_GRACE + STDERR_DRAIN_MAX)
            return
        end = time.monotonic() + EXIT_STATUS_GRACE
        if self.ch.status_event.wait(EXIT_STATUS_GRACE):
            code = self.ch.recv_exit_status()
            self.exit_status = None if code == -1 else code
        # stderr's EOF arrives with stdout's: once it is in, all that is left is to read what
        # paramiko holds (up to a window), so wait for that — a failure quotes the last lines,
        # and a busy controller can take seconds over a full window. After a raw consumer's
        # error the EOF may never come: then only what the grace allows.
        if self.ch.eof_received or self.ch.closed:
            self._err_reader.join(STDERR_DRAIN_MAX)
        else:
            self._err_reader.join(max(0.0, end - time.monotonic()))
        with self._end_lock:
            self.ended.set()
            callbacks = list(self._on_end)
        for cb in callbacks:
            cb(self)

    def on_end(self, callback: Callable[[Remote], None]) -> None:
        """Call ``callback(self)`` when the process has ended (at once if it has)."""
        with self._end_lock:
            if not self.ended.is_set():
                self._on_end.append(callback)
                return
        callback(self)

    def send(self, line: str) -> None:
        with self._lock:
            try:
                self.ch.sendall((line + "\n").encode())
            except CHANNEL_GONE as e:
                raise self.failure(f"sending it {line!r}", f"is gone ({str(e) or 'connection lost'})",
                                   doing=f"we sent it {line!r}") from None

    def quit(self, line: str = "quit") -> None:
        """Tell it to end: from now on its end is not a failure of the run."""
        self.told_to_quit = True
        self.send(line)

    def stderr_lines(self, n: int = STDERR_LINES) -> list[str]:
        """The last ``n`` non-blank lines the process wrote to stderr (of its kept tail: a
        line cut by the tail's start is not quoted)."""
        with self._err_lock:
            data, cut = self._err.value(), self._err.dropped > 0
        lines = data.decode(errors="replace").splitlines()
        if cut and len(lines) > 1:
            lines = lines[1:]
        return [ln for ln in lines if ln.strip()][-n:]

    def stderr_tail(self) -> str:
        """The last stderr lines as one line of text (for a message)."""
        lines = self.stderr_lines()
        return ("stderr: " + " | ".join(lines)) if lines else "no stderr"

    def failure(self, what: str, how: str, reason: str | None = None, *,
                doing: str | None = None) -> MigrationFailed:
        """The run's error naming this peer: ``<node>: <label> <how> while we waited for
        <what>: <reason>`` (default reason: its last stderr lines), with the report fields."""
        if not self.ended.is_set():
            # it said why on stdout and is likely exiting: its stderr (a separate stream,
            # not ordered with stdout) is the rest of the story
            self.ended.wait(ERROR_EXIT_GRACE)
        lines = self.stderr_lines()
        if reason is None:
            reason = self.stderr_tail()
        return MigrationFailed(
            f"{self.node}: {self.label} {how} while {doing or f'we waited for {what}'}: "
            f"{reason}",
            value={"step": what, "node": self.node, "peer": self.label,
                   "exit_status": self.exit_status, "stderr": lines})

    def gone(self, what: str) -> MigrationFailed:
        """The error for this peer having ended (unasked) while the run waited for ``what``:
        how it ended, and its own reason (the error it reported, else its stderr)."""
        if not self.ended.is_set():
            self.stdout_closed()
        reason = None
        if self.error_line:
            reason = self.error_line
            tail = self.stderr_lines()
            if tail and not any(self.error_line in ln for ln in tail):
                reason += f" ({self.stderr_tail()})"
        return self.failure(what, how_ended(self.exit_status), reason)

    def next(self, timeout: float, what: str) -> dict[str, Any]:
        """Its next JSON line. Fails at once if it (or, with ``peers``, any other process of
        the run) ends unasked, or reports an error; after ``timeout`` if nothing comes."""
        end = time.monotonic() + timeout
        with watch_peers(self.peers, self.lines, WAKE):
            while True:
                if self.peers is not None:
                    self.peers.check(what, own=(self,))
                if self.ended.is_set() and self.lines.empty():
                    raise self.gone(what)  # its last line (or eof) went to an earlier wait
                try:
                    obj = self.lines.get(timeout=max(0.0, end - time.monotonic()))
                except queue.Empty:
                    raise MigrationFailed(
                        f"{self.node}: {self.label}: no answer within {timeout:.0f}s "
                        f"waiting for {what}",
                        value={"step": what, "node": self.node, "peer": self.label,
                               "stderr": self.stderr_lines()}) from None
                if obj is WAKE:
                    continue
                if obj.get("event") == "eof":
                    raise self.gone(what)
                if obj.get("event") == "error" or obj.get("ok") is False:
                    raise self.failure(what, "failed", str(obj.get("error")))
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


class Peers:
    """The processes one run started. A wait of the run watches its queue through
    ``watching``: when any of them ends without having been told to quit, a ``WAKE`` item
    is put there and ``check`` raises that peer's failure (the first to end is blamed: what
    dies after it usually dies of it). Each such end is logged once as a ``peer-exit`` event.
    ``close`` (the run's cleanup) ends the watching: what cleanup kills is not news."""

    def __init__(self, events: Events | None = None):
        self.events = events
        self._lock = threading.Lock()
        self.remotes: list[Remote] = []
        self.dead: list[Remote] = []  # ended unasked, in the order they ended
        self._waiting: list[tuple[queue.Queue[Any], Any]] = []
        self.closed = False

    def add(self, rem: Remote) -> None:
        with self._lock:
            self.remotes.append(rem)
        rem.on_end(self._ended)

    def _ended(self, rem: Remote) -> None:
        with self._lock:
            if self.closed or rem.told_to_quit:
                return
            self.dead.append(rem)
            waiting = list(self._waiting)
        if self.events is not None:
            self.events.emit("peer-exit", node=rem.node, peer=rem.label,
                             exit_status=rem.exit_status, stderr=rem.stderr_lines())
        for q, item in waiting:
            q.put(item)

    def check(self, what: str, own: tuple[Remote, ...] = ()) -> None:
        """Raise the failure of the first peer that ended unasked, if one did — unless that
        one is among ``own``: the caller reads their ends in order from its own queue, after
        the last thing they said."""
        with self._lock:
            dead = self.dead[0] if self.dead and not self.closed else None
        if dead is not None and not any(dead is o for o in own):
            raise dead.gone(what)

    @contextmanager
    def watching(self, q: queue.Queue[Any], item: Any) -> Iterator[None]:
        """While inside, a peer's unasked end puts ``item`` into ``q``."""
        entry = (q, item)
        with self._lock:
            self._waiting.append(entry)
        try:
            yield
        finally:
            with self._lock:
                self._waiting.remove(entry)

    def retire(self, rem: Remote) -> None:
        """The run needs nothing more from ``rem``: its end (past or future) is no failure."""
        with self._lock:
            rem.told_to_quit = True
            self.dead = [d for d in self.dead if d is not rem]

    def close(self) -> None:
        with self._lock:
            self.closed = True


@contextmanager
def watch_peers(peers: Peers | None, q: queue.Queue[Any], item: Any) -> Iterator[None]:
    """``peers.watching(q, item)``, or nothing for a process that belongs to no run."""
    if peers is None:
        yield
        return
    with peers.watching(q, item):
        yield
