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
reconnects; this class does when the cause is transient: activation refused because the host
is off ("SOL is disabled"), the BMC stops answering or restarted, our payload vanished. It logs
out and builds a new session and Console after a short backoff, until closed.

One node has one SOL payload, so who holds it is a decision, never a side effect:
- a node whose SOL another live session holds is refused (:data:`IN_USE`) unless the console
  was opened with ``force=True`` (``--take-over``), which ends that session's payload first;
- the side that loses its payload to someone else (the BMC says "SOL deactivating", or the
  keepalive finds another session owning it) ends with :data:`TAKEN_OVER` and does not
  reconnect: reconnecting would steal it back, and the two would take turns every few seconds;
- a reconnect takes the payload back only from our own earlier session (a BMC that still
  believes our dead session holds it), never from another one;
- fatal errors (login refused, unknown user, insufficient privilege, SOL not offered) end the
  console at once; ``fatal`` says why and ``ended`` is set.
"""

from __future__ import annotations

import errno
import json
import math
import os
import queue
import re
import select
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from pyghmi.ipmi.console import Console as _PyghmiConsole
from pyghmi.ipmi.private import constants

from labkit.bmc.session import (
    RETRYABLE_CODES,
    BmcAuthError,
    BmcError,
    BmcTimeout,
    LabSession,
    translate,
)
from labkit.config import Settings
from labkit.errors import NodeError, UserError
from labkit.inventory import Node

ESCAPE = b"~"
KEEPALIVE_EVERY = 10.0   # seconds of quiet before checking that our SOL payload is still ours
SEND_BUDGET = 20.0       # pyghmi's Console retries one output packet for up to ~15 s
RECONNECT_DELAYS = (0.2, 0.3, 0.5, 1.0)  # short: a boot log starts right after power-on
STOP_POLL = 0.1          # how often a waiting session looks whether its console was closed
GREET_AFTER = 0.5        # an interactive console says how to leave if not connected by then
CLOSE_BUDGET = 0.5       # seconds to hand our payload back on the way out (~. must be quick)
SOL_DEACTIVATING = 0x10  # BMC-to-console status bit: the BMC is ending this payload

IN_USE = "console in use by another session; to take it over: --take-over"
TAKEN_OVER = "console taken over by another session"


class _Ended(Exception):
    """Why one SOL session ended. ``fatal``: another session will not help (do not
    reconnect); ``login``: no IPMI session could be logged in (the BMC did not answer)."""

    def __init__(self, text: str, *, fatal: bool = False, login: bool = False):
        super().__init__(text)
        self.text = text
        self.fatal = fatal
        self.login = login


class _Stop(Exception):
    """The console was closed while its session waited: leave at once."""


class _SolSession(LabSession):
    """A LabSession whose waits (login, commands, SOL sends) end within :data:`STOP_POLL`
    of the console being closed: ``~.`` must not wait out a login to a dead BMC."""

    def __init__(self, host: str, port: int, user: bytes, password: bytes, deadline: float,
                 stop: threading.Event):
        self.stop = stop
        self.closing = False  # set for the goodbye (deactivate, logout): it must still run
        super().__init__(host, port, user, password, deadline)

    def wait_for_rsp(self, timeout: float | None = None, callout: bool = True) -> None:
        if self.stop.is_set() and not self.closing:
            raise _Stop()
        super().wait_for_rsp(STOP_POLL if timeout is None else min(timeout, STOP_POLL), callout)


class _Console(_PyghmiConsole):
    """pyghmi's SOL data path (sequence numbers, ACKs, retransmits) on an already logged-in
    LabSession, synchronously; activation and the "is it still ours" check are done here, so
    that every outcome is classified (transient, in use, taken over, fatal)."""

    def __init__(self, session: LabSession, port: int, handler: Callable[[Any], None]):
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
        self.force_session = False
        self.port = port
        self.callgotsession = None
        self.ipmi_session = session
        self.session = session  # kept: pyghmi clears ipmi_session when the console breaks

    def activate(self, force: bool) -> None:
        """Activate the SOL payload; with ``force``, end another session's payload first (the
        BMC tells that session). Raises :class:`_Ended`."""
        session = self.session
        for attempt in (0, 1):
            rsp = session.raw_command(netfn=6, command=0x48, data=(1, 1, 192, 0, 0, 0))
            code = rsp.get("code", 0)
            if not code and "error" in rsp:
                raise _Ended(str(rsp["error"]))
            if code == 0x80 and force and attempt == 0:
                session.raw_command(netfn=6, command=0x49, data=(1, 1, 0, 0, 0, 0))
                continue
            if code == 0x80:
                raise _Ended(IN_USE, fatal=True)
            if code == 0x81:  # many BMCs while the host is off: wait for it
                raise _Ended("SOL is disabled")
            if code in RETRYABLE_CODES:
                raise _Ended(f"SOL activation: {RETRYABLE_CODES[code]} (0x{code:02X})")
            if code:
                text = {0x82: "maximum SOL session count reached",
                        0x83: "payload cannot be activated with encryption",
                        0x84: "payload cannot be activated without encryption"}.get(code) or \
                    constants.ipmi_completion_codes.get(code) or "refused"
                raise _Ended(f"SOL activation refused: {text} (completion code 0x{code:02X})",
                             fatal=True)
            break
        data = bytes(rsp["data"])
        if len(data) < 10:
            raise _Ended("SOL activation: short reply from the BMC", fatal=True)
        self.maxoutcount = data[4] | (data[5] << 8)
        sol_port = data[8] | (data[9] << 8)
        if sol_port not in (self.port, struct.unpack("<H", struct.pack(">H", self.port))[0]):
            raise _Ended(f"SOL on another UDP port ({sol_port}) is not supported", fatal=True)
        self.activated = True
        session.sol_handler = self._got_sol_payload
        self.connected = True

    def owner(self) -> int | None:
        """The session id that holds SOL instance 1 (0: nobody), None if the BMC cannot say."""
        rsp = self.session.raw_command(netfn=6, command=0x4B, data=(1, 1))
        if rsp.get("code") or "error" in rsp or len(rsp.get("data", b"")) < 4:
            return None
        return struct.unpack("<I", bytes(rsp["data"][:4]))[0]

    def _got_sol_payload(self, payload: Any) -> None:
        """The BMC's "SOL deactivating" status ends us (someone took the payload); pyghmi
        only looks at that bit on a NACK of our own output."""
        if not isinstance(payload, dict) and len(payload) >= 4 \
                and payload[3] & SOL_DEACTIVATING:
            self.activated = False
            self._print_error({"error": TAKEN_OVER, "taken_over": True})
            return
        super()._got_sol_payload(payload)

    def wait_for_rsp(self, timeout: float) -> None:  # type: ignore[override]
        """Console's ACK waits pump our session instead of pyghmi's global loop."""
        self.session.wait_for_rsp(timeout)


class SolConsole:
    """A self-reconnecting SOL console to one node. Thread-safe ``write``/``expect``/``close``.

    ``force``: take the payload over when another session holds it (module docstring).
    ``retry_login``: False ends the console (``fatal``) when the BMC does not answer a login
    before the first connection (a capture must not wait out its length against a dead BMC).
    ``on_data(bytes)`` receives console output as it arrives; ``on_event(str)`` receives
    connection events (connected, dropped + why, reconnecting). After ``keepalive`` quiet
    seconds the session checks that the SOL payload is still ours (and the BMC still there).
    When the console ends on its own, ``fatal`` says why and ``ended`` is set."""

    def __init__(self, node: Node, settings: Settings | None = None, *, force: bool = False,
                 on_data: Callable[[bytes], None] | None = None,
                 on_event: Callable[[str], None] | None = None,
                 keepalive: float = KEEPALIVE_EVERY, retry_login: bool = True):
        if node.bmc is None:
            raise NodeError(f"{node.name}: no bmc: section in the inventory")
        self.node = node
        self.where = f"{node.bmc.host}:{node.bmc.port}"
        self.settings = settings or Settings()
        self.force = force
        self.retry_login = retry_login
        self.on_data = on_data
        self.on_event = on_event
        self.keepalive = keepalive
        self.connected = threading.Event()
        self.ended = threading.Event()    # the session thread stopped on its own (see fatal)
        self.fatal: str | None = None     # "node1: why" when the console ended on its own
        self.last_error: str | None = None
        self.connects = 0
        self.received = 0                # bytes of console output so far
        self._held: int | None = None    # session id of our last session that held the payload
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
        """Hand the SOL payload back (only if it is still ours), log out, stop the thread.
        Prompt whatever the BMC does: a wait in progress ends within :data:`STOP_POLL`."""
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
        """True once connected; False at the timeout or at once when the console ended."""
        end = time.monotonic() + timeout
        while not self.connected.is_set():
            left = end - time.monotonic()
            if left <= 0 or self.ended.is_set():
                return False
            self.connected.wait(min(left, STOP_POLL))
        return True

    def expect(self, pattern: str | bytes | re.Pattern, timeout: float) -> re.Match:
        """Wait until ``pattern`` (a regex over the decoded output) appears in the output
        received since open() or the previous match; consume through the match and return it.
        NodeError (with the tail of the output) on timeout, at once if the console ended."""
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
                if self.fatal:
                    raise NodeError(self.fatal)
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
        try:
            while not self._closed.is_set():
                try:
                    self._session_once()
                    break  # closed by us
                except _Stop:
                    break
                except _Ended as end:
                    self.connected.clear()
                    if self._closed.is_set():
                        break
                    self.last_error = end.text
                    if end.fatal or (end.login and not self.retry_login and not self.connects):
                        self.fatal = f"{self.node.name}: {end.text}"
                        break
                    delay = RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)]
                    attempt += 1
                    self._event(f"SOL dropped ({end.text}); reconnecting")
                    self._closed.wait(delay)
                    continue
                finally:
                    self.connected.clear()
                attempt = 0
        finally:
            self.ended.set()
            with self._cond:
                self._cond.notify_all()

    def _ended(self, e: BaseException, *, login: bool) -> _Ended:
        """A failure of the session as an :class:`_Ended`, one line without the node name."""
        if isinstance(e, (_Ended, _Stop)):
            return e  # type: ignore[return-value]
        bmc = self.node.bmc
        assert bmc is not None
        err = translate(e, self.node.name, bmc.host, bmc.port, bmc.user)
        text = str(err) or type(err).__name__
        prefix = f"{self.node.name}: "
        text = text[len(prefix):] if text.startswith(prefix) else text
        if login and isinstance(err, BmcTimeout):
            text = (f"BMC {bmc.host}:{bmc.port} did not answer the login within "
                    f"{self.settings.bmc_timeout:g} s (labkit.bmc_timeout)")
        elif not text.startswith("BMC "):
            text = f"BMC {bmc.host}:{bmc.port}: {text}"
        fatal = isinstance(err, BmcAuthError) or (isinstance(err, BmcError)
                                                   and err.code is not None
                                                   and err.code not in RETRYABLE_CODES)
        return _Ended(text, fatal=fatal, login=login)

    def _session_once(self) -> None:
        """One session: log in, activate, pump until it breaks or we close. Returns when
        closed by us; raises :class:`_Ended` (why it ended) or :class:`_Stop`."""
        bmc = self.node.bmc
        assert bmc is not None
        s = self.settings
        problem: list[dict[str, Any]] = []

        def handler(item: Any) -> None:
            if isinstance(item, dict):
                if "error" in item:
                    err = item["error"]
                    problem.append(err if isinstance(err, dict) else {**item, "error": str(err)})
                elif "info" in item:
                    self._event(str(item["info"]))
            elif item:
                self._data(item if isinstance(item, bytes) else str(item).encode())

        def check() -> None:
            if problem:
                p = problem[0]
                raise _Ended(p["error"], fatal=bool(p.get("taken_over")))
            if con is not None and con.broken:
                raise _Ended("SOL session broken")

        session: _SolSession | None = None
        con: _Console | None = None
        try:
            try:
                session = _SolSession(bmc.host, bmc.port, bmc.user.encode(),
                                      bmc.password().reveal(), time.monotonic() + s.bmc_timeout,
                                      self._closed)
            except Exception as e:
                raise self._ended(e, login=True) from None
            session.deadline = time.monotonic() + s.bmc_timeout
            con = _Console(session, bmc.port, handler)
            force = self.force and not self.connects
            if self._held is not None:
                # a reconnect: the payload may still be held by our own earlier session (take
                # it back), by nobody (activate), or by someone else (they took it: stop here)
                owner = con.owner()
                if owner == self._held:
                    force = True
                elif owner:
                    raise _Ended(TAKEN_OVER, fatal=True)
            try:
                con.activate(force)
            except _Ended as end:
                if end.text == IN_USE and self.connects:
                    raise _Ended(TAKEN_OVER, fatal=True) from None
                raise
            self._held = session.sessionid
            self.connects += 1
            self.last_error = None
            self.connected.set()
            self._event("SOL connected" if self.connects == 1 else "SOL reconnected")
            quiet_since = time.monotonic()
            while not self._closed.is_set():
                session.deadline = time.monotonic() + 3600  # idle reading never times out
                before = self.received
                session.wait_for_rsp(0.1)
                check()
                now = time.monotonic()
                if self.received != before:
                    quiet_since = now
                while not self._out.empty():
                    data = self._out.get_nowait()
                    session.deadline = time.monotonic() + SEND_BUDGET
                    con.send_data(data)
                    check()
                if now - quiet_since >= self.keepalive:
                    session.deadline = time.monotonic() + s.bmc_timeout
                    owner = con.owner()
                    check()
                    if owner == 0:
                        con.activated = False
                        raise _Ended("SOL payload ended by the BMC")
                    if owner is not None and owner != session.sessionid:
                        con.activated = False
                        raise _Ended(TAKEN_OVER, fatal=True)
                    # an empty SOL packet (no data, no ACK): tells a BMC that judges SOL
                    # staleness by SOL traffic that this quiet console is still attended
                    session.send_payload(bytearray(4), payload_type=1, retry=False)
                    quiet_since = time.monotonic()
        except (_Ended, _Stop):
            raise
        except Exception as e:  # any other failure ends this session; _run decides what next
            check()  # pyghmi may fail on a console it was just told is gone: that comes first
            raise self._ended(e, login=False) from None
        finally:
            if session is not None:
                self._goodbye(session, con)

    def _goodbye(self, session: _SolSession, con: _Console | None) -> None:
        """Deactivate the payload if it is still ours (never someone else's: that would end
        the session that took it over), then log out; within :data:`CLOSE_BUDGET`."""
        session.closing = True
        session.deadline = time.monotonic() + min(CLOSE_BUDGET, self.settings.bmc_timeout)
        try:
            if con is not None and con.activated and self._closed.is_set() \
                    and con.owner() == session.sessionid:
                session.raw_command(netfn=6, command=0x49, data=(1, 1, 0, 0, 0, 0))
        except Exception:  # noqa: S110 - best effort on the way out; the BMC times it out
            pass
        session.close()


# -- logs ------------------------------------------------------------------------------------------

def _stamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TimestampedLog:
    """Writes console output line by line, each line prefixed with the UTC time its first byte
    arrived; labkit's own events are marked ``[labkit]``. Thread-safe. A failed write (disk
    full) is kept in ``error`` instead of raised: it happens on the SOL thread, and the
    capture that owns the log ends on it."""

    def __init__(self, fh: IO[str]):
        self.fh = fh
        self._partial = ""
        self._started: str | None = None
        self._lock = threading.Lock()
        self.bytes = 0
        self.error: OSError | None = None

    def _write(self, text: str) -> None:
        if self.error is not None:
            return
        try:
            self.fh.write(text)
            self.fh.flush()
        except OSError as e:
            self.error = e

    def data(self, data: bytes) -> None:
        text = data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
        with self._lock:
            self.bytes += len(data)
            lines = []
            for piece in text.splitlines(keepends=True):
                if not self._partial:
                    self._started = _stamp()
                self._partial += piece
                if piece.endswith("\n"):
                    lines.append(f"{self._started} | {self._partial}")
                    self._partial = ""
            self._write("".join(lines))

    def event(self, text: str) -> None:
        with self._lock:
            self._write(f"{_stamp()} [labkit] {text}\n")

    def close(self) -> None:
        with self._lock:
            if self._partial:
                self._write(f"{self._started} | {self._partial}\n")
                self._partial = ""


def default_log_path(settings: Settings, node: str) -> Path:
    """results/<UTC time>-console-<node>/console.log (the results folder convention)."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path(settings.results_dir) / f"{stamp}-console-{node}" / "console.log"


def check_seconds(seconds: float) -> float:
    """--capture: a finite number of seconds >= 0 (nan would sleep forever or crash)."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        raise UserError(f"--capture: expected seconds, got {seconds!r}") from None
    if not math.isfinite(value) or value < 0:
        raise UserError(f"--capture: seconds must be a finite number >= 0, got {seconds}")
    return value


def open_log(path: Path, header: str, *, what: str = "--log") -> tuple[IO[str], TimestampedLog]:
    """Open the capture log and write its first line, or refuse (UserError, one line naming
    the path) before any SOL session: a folder, a FIFO (would block), a missing folder, no
    permission, a full device. A file this call created is removed again when it fails."""
    try:
        st: os.stat_result | None = path.stat()
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UserError(f"{what} {path}: {e.strerror}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise UserError(f"{what} {path}: is a folder, not a file")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            raise UserError(f"{what} {path}: not a regular file (FIFO or socket)")
    elif not path.parent.is_dir():
        raise UserError(f"{what} {path}: folder {path.parent} does not exist")
    fh: IO[str] | None = None
    try:
        fh = path.open("w", encoding="utf-8")
        out = TimestampedLog(fh)
        out.event(header)
        if out.error is not None:
            raise out.error
        return fh, out
    except OSError as e:
        if fh is not None:
            _close_quietly(fh)
            if st is None:
                path.unlink(missing_ok=True)
        why = e.strerror or str(e)
        if e.errno in (errno.EACCES, errno.EPERM):
            why = "no permission to write it"
        raise UserError(f"{what} {path}: cannot be written ({why})") from None


def _close_quietly(fh: IO[str]) -> None:
    """Close a log whose last write already failed (closing flushes, and fails again)."""
    try:
        fh.close()
    except OSError:
        try:
            fh.buffer.raw.close()  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            pass


def capture(node: Node, settings: Settings, seconds: float, log: str | os.PathLike | None = None,
            *, force: bool = False) -> Path:
    """Record ``seconds`` of the node's console (reconnecting after transient drops) to a
    timestamped log; returns the log path. A ``run.json`` beside a default-located log records
    what was run. The log is opened (or refused, UserError) before any SOL packet is sent.

    Ends early with NodeError, the partial log kept: the BMC does not answer a login
    (``bmc_timeout``), login refused, SOL in use by another session (unless ``force``),
    taken over by another session, the log cannot be written."""
    seconds = check_seconds(seconds)
    header = f"capture of {node.name} for {seconds:g} s"
    if log:
        path = Path(log)
        fh, out = open_log(path, header)
    else:
        path = default_log_path(settings, node.name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"labkit.results_dir {settings.results_dir}: cannot create "
                            f"{path.parent} ({e.strerror})") from None
        fh, out = open_log(path, header, what="console log")
    started = _stamp()
    try:
        con = SolConsole(node, settings, force=force, retry_login=False, on_data=out.data,
                         on_event=out.event)
        how = "ended"
        try:
            with con:
                end = time.monotonic() + seconds
                while out.error is None:
                    left = end - time.monotonic()
                    if left <= 0 or con.ended.wait(min(left, 0.2)):
                        break
        except KeyboardInterrupt:
            how = "interrupted"
            raise
        finally:
            out.close()
            if con.fatal:
                how = f"ended early ({con.fatal})"
            out.event(f"capture {how}: {out.bytes} bytes, {con.connects} connection(s)"
                      + (f", last error: {con.last_error}"
                         if con.last_error and not con.fatal else ""))
    finally:
        _close_quietly(fh)
    if out.error is not None:
        raise NodeError(f"{node.name}: console log {path}: write failed "
                        f"({out.error.strerror or out.error}); capture stopped")
    if not log:
        (path.parent / "run.json").write_text(json.dumps({
            "task": "console", "node": node.name, "seconds": seconds, "started": started,
            "bytes": out.bytes, "connections": con.connects, "log": path.name,
            **({"error": con.fatal} if con.fatal else {})}, indent=2) + "\n")
    if con.fatal:
        raise NodeError(f"{con.fatal}" + (f"; partial log: {path}" if con.connects else ""))
    if con.connects == 0:
        # nothing was recorded over the whole capture (e.g. SOL stayed disabled): fail
        raise NodeError(f"{node.name}: console capture never got an SOL session"
                        + (f" ({con.last_error})" if con.last_error else "") + f"; log: {path}")
    return path


def expect(node: Node, pattern: str | re.Pattern, timeout: float,
           settings: Settings | None = None, *, force: bool = False,
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


def attach(node: Node, settings: Settings, *, force: bool = False,
           stdin: IO[bytes] | None = None, stdout: IO[bytes] | None = None) -> None:
    """Interactive console: raw terminal, output to stdout, ``~.`` to leave (at once, whatever
    the BMC is doing); the terminal's settings are restored however this ends.

    Transient drops reconnect. Raises NodeError (the caller exits non-zero) when the console
    ends on its own (:class:`SolConsole` ``fatal``: login refused, in use, taken over) or when
    the user leaves while there is no SOL session because of an error.

    SIGTERM/SIGHUP (and SIGINT, which raw mode keeps from the keyboard) are labkit.signals':
    Interrupted is raised like Ctrl-C, so :func:`_attach`'s ``finally`` restores the terminal and
    leaves the SOL session, and inside a task the one ``interrupted (SIG...)`` line and exit
    128 + signal follow; a second signal does not cut that short."""
    from labkit import signals

    with signals.handled():
        _attach(node, settings, force, stdin or sys.stdin.buffer, stdout or sys.stdout.buffer)


def _attach(node: Node, settings: Settings, force: bool, stdin: IO[bytes],
            stdout: IO[bytes]) -> None:
    """:func:`attach`'s body, run while the signals are handled."""
    fd = stdin.fileno()
    saved = None

    if os.isatty(fd):
        import termios
        import tty

        saved = termios.tcgetattr(fd)
        tty.setraw(fd)

    def note(text: str) -> None:
        sys.stderr.write(f"\r\n[labkit] {node.name}: {text}\r\n")
        sys.stderr.flush()

    greeted = threading.Event()

    def event(text: str) -> None:
        # the how-to-leave line comes with the first event (or after GREET_AFTER seconds
        # without one), so that a refusal (in use, wrong password) is the one line shown
        if not greeted.is_set():
            greeted.set()
            text += "; type ~. at the start of a line to leave, ~? for help"
        note(text)

    def show(data: bytes) -> None:
        stdout.write(data)
        stdout.flush()

    keys = EscapeFilter()
    con = SolConsole(node, settings, force=force, on_data=show, on_event=event)
    connected_at_exit = False
    greet_at = time.monotonic() + GREET_AFTER
    try:
        con.open()
        while not keys.quit and not con.ended.is_set():
            ready = select.select([fd], [], [], STOP_POLL)[0]
            if not greeted.is_set() and time.monotonic() >= greet_at:
                event(f"connecting to BMC {con.where}")
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
        connected_at_exit = con.connected.is_set()
    finally:
        con.close()
        if saved is not None:
            import termios

            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        if greeted.is_set() and not con.fatal:
            note("console closed")
    if con.fatal:
        if greeted.is_set():
            sys.stderr.write("\r\n")
        raise NodeError(con.fatal)
    if not connected_at_exit:
        raise NodeError(f"{node.name}: console left without an SOL session"
                        + (f" (last error: {con.last_error})" if con.last_error else ""))
