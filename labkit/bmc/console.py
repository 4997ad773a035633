"""Serial-over-LAN: attach (interactive), capture (timestamped log), expect (wait for a regex).

    with SolConsole(node, settings) as con:
        con.expect(r"login:", timeout=60)
        con.write(b"root\\n")

    capture(node, settings, seconds=20, log="boot.log")
    attach(node, settings)            # raw terminal; ~. at the start of a line leaves

:class:`SolConsole` owns one background thread that runs the SOL session: pyghmi's ``Console``
(sequence numbers, ACKs, retransmission of our output) on a :class:`~labkit.bmc.session.LabSession`
(one socket, no shared I/O thread, hard deadlines) instead of pyghmi's stock session, whose
global event loop and locks do not mix well with other threads. pyghmi's Console never
reconnects; this class does: when activation fails (host off: "SOL is disabled"), the keepalive
finds the payload gone, or the BMC stops answering, it logs out and builds a new session and
Console after a short backoff, until closed. A stale SOL session of another client is taken
over (``force=True``, the default), as real BMCs allow on request.
"""

from __future__ import annotations

import json
import os
import queue
import re
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from pyghmi.ipmi.console import Console as _PyghmiConsole

from labkit.bmc.session import LabSession, open_session, translate
from labkit.config import Settings
from labkit.errors import NodeError
from labkit.inventory import Node

ESCAPE = b"~"
KEEPALIVE_EVERY = 10.0   # seconds of quiet before checking that our SOL payload is still ours
SEND_BUDGET = 20.0       # pyghmi's Console retries one output packet for up to ~15 s
RECONNECT_DELAYS = (0.2, 0.3, 0.5, 1.0)  # short: a boot log starts right after power-on


class _Console(_PyghmiConsole):
    """pyghmi's SOL protocol handling on an already logged-in LabSession, synchronously."""

    def __init__(self, session: LabSession, port: int, handler: Callable[[Any], None],
                 force: bool):
        # Console.__init__ would create a stock (shared, threaded) session: set its fields here.
        self.outputlock = threading.RLock()
        self.keepaliveid = None
        self.connected = False
        self.broken = False
        self.out_handler = handler
        self.remseq = 0
        self.myseq = 0
        self.lastsize = 0
        self.retriedpayload = 0
        self.pendingoutput: list[Any] = []
        self.awaitingack = False
        self.activated = False
        self.force_session = force
        self.port = port
        self.callgotsession = None
        self.ipmi_session = session
        self._got_session({"success": True})  # activate the SOL payload (take over if forced)

    def wait_for_rsp(self, timeout: float) -> None:  # type: ignore[override]
        """Console's ACK waits pump our session instead of pyghmi's global loop."""
        session = self.ipmi_session
        if session is not None:
            session.wait_for_rsp(timeout)


class SolConsole:
    """A self-reconnecting SOL console to one node. Thread-safe ``write``/``expect``/``close``.

    ``on_data(bytes)`` receives console output as it arrives; ``on_event(str)`` receives
    connection events (connected, dropped + why, reconnecting). After ``keepalive`` quiet
    seconds the session checks that the SOL payload is still ours (and the BMC still there)."""

    def __init__(self, node: Node, settings: Settings | None = None, *, force: bool = True,
                 on_data: Callable[[bytes], None] | None = None,
                 on_event: Callable[[str], None] | None = None,
                 keepalive: float = KEEPALIVE_EVERY):
        if node.bmc is None:
            raise NodeError(f"{node.name}: no bmc: section in the inventory")
        self.node = node
        self.settings = settings or Settings()
        self.force = force
        self.on_data = on_data
        self.on_event = on_event
        self.keepalive = keepalive
        self.connected = threading.Event()
        self.last_error: str | None = None
        self.connects = 0
        self.received = 0                # bytes of console output so far
        self._out: queue.Queue[bytes] = queue.Queue()
        self._buf = bytearray()          # output not yet consumed by expect()
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    # -- public API ------------------------------------------------------------------------------

    def open(self) -> SolConsole:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"sol-{self.node.name}",
                                            daemon=True)
            self._thread.start()
        return self

    def __enter__(self) -> SolConsole:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = 5.0) -> None:
        """Deactivate the SOL payload, log out, stop the thread."""
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def write(self, data: bytes) -> None:
        """Queue bytes for the node's serial input (sent once connected)."""
        if data:
            self._out.put(bytes(data))

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def expect(self, pattern: str | bytes | re.Pattern, timeout: float) -> re.Match:
        """Wait until ``pattern`` (a regex over the decoded output) appears in the output
        received since open() or the previous match; consume through the match and return it.
        NodeError (with the tail of the output) on timeout."""
        rx = pattern if isinstance(pattern, re.Pattern) else re.compile(
            pattern.decode() if isinstance(pattern, bytes) else pattern)
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                text = self._buf.decode("utf-8", errors="replace")
                m = rx.search(text)
                if m:
                    consumed = len(text[:m.end()].encode("utf-8", errors="replace"))
                    del self._buf[:consumed]
                    return m
                left = end - time.monotonic()
                if left <= 0 or self._closed.is_set():
                    tail = text[-200:].replace("\r", "").strip()
                    why = f"; last SOL error: {self.last_error}" if self.last_error else ""
                    raise NodeError(f"{self.node.name}: console: {rx.pattern!r} not seen within "
                                    f"{timeout:g} s{why}; output tail: {tail!r}")
                self._cond.wait(min(left, 0.5))

    # -- the session thread ----------------------------------------------------------------------

    def _event(self, text: str) -> None:
        if self.on_event:
            self.on_event(text)

    def _data(self, data: bytes) -> None:
        with self._cond:
            self._buf += data
            self.received += len(data)
            if len(self._buf) > 1 << 20:  # keep expect() memory bounded: last MiB is enough
                del self._buf[:-(1 << 19)]
            self._cond.notify_all()
        if self.on_data:
            self.on_data(data)

    def _run(self) -> None:
        attempt = 0
        while not self._closed.is_set():
            error = self._session_once()
            self.connected.clear()
            if self._closed.is_set():
                break
            self.last_error = error
            delay = RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)]
            attempt = 0 if error is None else attempt + 1
            self._event(f"SOL dropped ({error or 'closed by BMC'}); reconnecting")
            self._closed.wait(delay)

    def _session_once(self) -> str | None:
        """One session: log in, activate, pump until it breaks or we close. Returns why it
        ended (None when closed by us)."""
        bmc = self.node.bmc
        assert bmc is not None
        s = self.settings
        problem: list[str] = []

        def handler(item: Any) -> None:
            if isinstance(item, dict):
                if "error" in item:
                    problem.append(str(item["error"]))
                elif "info" in item:
                    self._event(str(item["info"]))
            elif item:
                self._data(item if isinstance(item, bytes) else str(item).encode())

        session: LabSession | None = None
        con: _Console | None = None
        try:
            session = open_session(bmc.host, bmc.port, bmc.user.encode(),
                                   bmc.password().reveal(), time.monotonic() + s.bmc_timeout)
            session.deadline = time.monotonic() + s.bmc_timeout
            con = _Console(session, bmc.port, handler, self.force)
            if con.broken or not con.connected:
                return problem[0] if problem else "SOL activation failed"
            self.connects += 1
            self.last_error = None
            self.connected.set()
            self._event("SOL connected" if self.connects == 1 else "SOL reconnected")
            quiet_since = time.monotonic()
            while not self._closed.is_set():
                session.deadline = time.monotonic() + 3600  # idle reading never times out
                before = self.received
                session.wait_for_rsp(0.1)
                if problem or con.broken:
                    return problem[0] if problem else "SOL session broken"
                now = time.monotonic()
                if self.received != before:
                    quiet_since = now
                while not self._out.empty():
                    data = self._out.get_nowait()
                    session.deadline = time.monotonic() + SEND_BUDGET
                    con.send_data(data)
                    if problem or con.broken:
                        return problem[0] if problem else "SOL send failed"
                if now - quiet_since >= self.keepalive:
                    session.deadline = time.monotonic() + s.bmc_timeout
                    rsp = session.raw_command(netfn=6, command=0x4B, data=(1, 1))
                    con._got_payload_instance_info(rsp)
                    if problem or con.broken:
                        return problem[0] if problem else "SOL payload lost"
                    # an empty SOL packet (no data, no ACK): tells a BMC that judges SOL
                    # staleness by SOL traffic that this quiet console is still attended
                    session.send_payload(bytearray(4), payload_type=1, retry=False)
                    quiet_since = time.monotonic()
            return None
        except Exception as e:  # any failure ends this session; the loop builds a new one
            err = translate(e, self.node.name, bmc.host, bmc.port, bmc.user)
            text = str(err) or type(err).__name__
            prefix = f"{self.node.name}: "
            return text[len(prefix):] if text.startswith(prefix) else text
        finally:
            if session is not None:
                session.deadline = time.monotonic() + min(1.0, s.bmc_timeout)
                if con is not None and con.activated and self._closed.is_set():
                    try:
                        con.close()  # deactivate the payload so the next client need not force
                    except Exception:  # noqa: S110 - best effort on the way out
                        pass
                session.close()


# -- logs ------------------------------------------------------------------------------------------

def _stamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TimestampedLog:
    """Writes console output line by line, each line prefixed with the UTC time its first byte
    arrived; labkit's own events are marked ``[labkit]``. Thread-safe."""

    def __init__(self, fh: IO[str]):
        self.fh = fh
        self._partial = ""
        self._started: str | None = None
        self._lock = threading.Lock()
        self.bytes = 0

    def data(self, data: bytes) -> None:
        text = data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
        with self._lock:
            self.bytes += len(data)
            for piece in text.splitlines(keepends=True):
                if not self._partial:
                    self._started = _stamp()
                self._partial += piece
                if piece.endswith("\n"):
                    self.fh.write(f"{self._started} | {self._partial}")
                    self._partial = ""
            self.fh.flush()

    def event(self, text: str) -> None:
        with self._lock:
            self.fh.write(f"{_stamp()} [labkit] {text}\n")
            self.fh.flush()

    def close(self) -> None:
        with self._lock:
            if self._partial:
                self.fh.write(f"{self._started} | {self._partial}\n")
                self._partial = ""
            self.fh.flush()


def default_log_path(settings: Settings, node: str) -> Path:
    """results/<UTC time>-console-<node>/console.log (the results folder convention)."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path(settings.results_dir) / f"{stamp}-console-{node}" / "console.log"


def capture(node: Node, settings: Settings, seconds: float, log: str | os.PathLike | None = None,
            *, force: bool = True) -> Path:
    """Record ``seconds`` of the node's console (reconnecting as needed) to a timestamped log;
    returns the log path. A ``run.json`` beside a default-located log records what was run."""
    path = Path(log) if log else default_log_path(settings, node.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = _stamp()
    with path.open("w", encoding="utf-8") as fh:
        out = TimestampedLog(fh)
        out.event(f"capture of {node.name} for {seconds:g} s")
        con = SolConsole(node, settings, force=force, on_data=out.data, on_event=out.event)
        how = "ended"
        try:
            with con:
                time.sleep(seconds)
        except KeyboardInterrupt:
            how = "interrupted"
            raise
        finally:
            out.close()
            out.event(f"capture {how}: {out.bytes} bytes, {con.connects} connection(s)"
                      + (f", last error: {con.last_error}" if con.last_error else ""))
    if not log:
        (path.parent / "run.json").write_text(json.dumps({
            "task": "console", "node": node.name, "seconds": seconds, "started": started,
            "bytes": out.bytes, "connections": con.connects, "log": path.name}, indent=2) + "\n")
    if con.connects == 0:
        # nothing was recorded and retrying will not help (bad credentials, BMC down): fail
        raise NodeError(f"{node.name}: console capture never got an SOL session"
                        + (f" ({con.last_error})" if con.last_error else "") + f"; log: {path}")
    return path


def expect(node: Node, pattern: str | re.Pattern, timeout: float,
           settings: Settings | None = None, *, force: bool = True,
           poke: bytes = b"") -> re.Match:
    """Open the node's console and wait for ``pattern`` in its output (e.g. r"login:").
    ``poke`` is typed once connected (b"\\r" makes a getty print its prompt again)."""
    with SolConsole(node, settings, force=force) as con:
        con.write(poke)
        return con.expect(pattern, timeout)


# -- interactive -----------------------------------------------------------------------------------

class EscapeFilter:
    """ssh-style escapes on the keyboard stream: ``~.`` at the start of a line leaves,
    ``~~`` sends one ``~``, ``~?`` shows help; anything else after ``~`` is sent as typed."""

    def __init__(self) -> None:
        self.line_start = True
        self.pending = False
        self.quit = False
        self.help = False

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        for b in data:
            c = bytes((b,))
            if self.pending:
                self.pending = False
                if c == b".":
                    self.quit = True
                    return bytes(out)
                if c == b"?":
                    self.help = True
                    continue
                out += ESCAPE if c == ESCAPE else ESCAPE + c
            elif self.line_start and c == ESCAPE:
                self.pending = True
                continue
            else:
                out += c
            self.line_start = c in (b"\r", b"\n")
        return bytes(out)


def attach(node: Node, settings: Settings, *, force: bool = True,
           stdin: IO[bytes] | None = None, stdout: IO[bytes] | None = None) -> None:
    """Interactive console: raw terminal, output to stdout, ``~.`` to leave; the terminal's
    settings are restored however this ends."""
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    fd = stdin.fileno()
    saved = None

    def leave(signum: int, frame: object) -> None:  # SIGTERM/SIGHUP: still restore the tty
        raise SystemExit(128 + signum)

    old_handlers = ({sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
                    if threading.current_thread() is threading.main_thread() else {})
    if os.isatty(fd):
        import termios
        import tty

        saved = termios.tcgetattr(fd)
        tty.setraw(fd)

    def note(text: str) -> None:
        sys.stderr.write(f"\r\n[labkit] {node.name}: {text}\r\n")
        sys.stderr.flush()

    def show(data: bytes) -> None:
        stdout.write(data)
        stdout.flush()

    keys = EscapeFilter()
    con = SolConsole(node, settings, force=force, on_data=show, on_event=note)
    note("opening console; type ~. at the start of a line to leave, ~? for help")
    try:
        con.open()
        while not keys.quit:
            ready = select.select([fd], [], [], 0.2)[0]
            if not ready:
                continue
            data = os.read(fd, 1024)
            if not data:  # EOF on a pipe: leave like ~.
                break
            send = keys.feed(data)
            if keys.help:
                keys.help = False
                note("~. leave   ~~ send ~   ~? this help")
            con.write(send)
    finally:
        con.close()
        if saved is not None:
            import termios

            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        note("console closed")
