"""One IPMI-over-LAN (RMCP+) session per BMC, over pyghmi, with a hard deadline.

Why not ``pyghmi.ipmi.command.Command`` as shipped (see /work/shared/facts/ipmi.md):
- the stock session shares one UDP socket and one I/O thread among up to 64 BMCs, takes two
  global locks in opposite orders (deadlocks with many threads) and toggles blocking mode on the
  shared socket from several threads; it tops out around 1,500 ops/s and can freeze;
- ``command.select_simplesession()`` (one socket per session, no I/O thread, ~3,300 ops/s) is a
  process-wide switch, and its session has no retransmission and no timeout at all: one lost
  UDP packet during login or a command blocks the caller forever;
- a call to a BMC that restarted hangs ~28 s and leaves the Command dead.

So :class:`LabSession` subclasses pyghmi's *simple* session (for its RMCP+/RAKP/AES code, one
socket per session, nothing global) and adds what it lacks: retransmission of the outstanding
packet after pyghmi's initial timeout (0.5-1 s, +0.5 s per retry, capped), and a hard deadline
(``settings.bmc_timeout``) after which the caller gets :class:`BmcTimeout`. No process-wide
switch is flipped, so other pyghmi users in the process are unaffected. A session that failed
in any way is thrown away and a new one is logged in (the caller does this, through
:func:`attempt_failed`).

Credentials are passed to pyghmi as bytes (with str, a second session to the same BMC hangs and
re-login raises TypeError). Errors are translated into labkit errors here, once, so that every
BMC user classifies "busy", "timeout", "bad password" the same way.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pyghmi.exceptions import IpmiException
from pyghmi.ipmi.private import constants
from pyghmi.ipmi.private import simplesession as _simple

from labkit.errors import NodeError, RetryableError

# Completion codes a BMC uses to say "not now": retried inside the retry window.
RETRYABLE_CODES = {
    0xC0: "node busy",
    0xC3: "timeout while processing command",
    0xC4: "out of space",
    0xCE: "command response could not be provided",
    0xD2: "BMC initialization in progress",
    0xFF: "unspecified error",
}
# Login failures that more attempts will not fix: fail at once.
AUTH_MARKERS = ("Incorrect password", "Unauthorized name", "Unauthorized role",
                "Invalid RAKP4 integrity", "Unauthorized GUID", "Invalid role")
# Login/session failures that a new session may fix.
RETRYABLE_MARKERS = ("Insufficient resources", "Session no longer connected", "timeout",
                     "Invalid Session ID", "Inactive Session ID", "Session Disconnected",
                     "Session failed to initialize")

MAX_RETRANSMIT_INTERVAL = 2.0
STALE_SESSION_AFTER = 3.0  # budget of one command on a reused session before re-login
CANCEL_POLL = 0.1  # a blocking wait looks at its cancel event this often

# What the requests labkit sends are called in an error message, by (netfn, cmd).
COMMAND_NAMES = {(0x00, 0x01): "chassis status", (0x00, 0x02): "chassis control",
                 (0x00, 0x08): "set boot options", (0x00, 0x09): "get boot options",
                 (0x06, 0x01): "get device id", (0x06, 0x3B): "set session privilege"}
CHASSIS_CONTROLS = {0: "power off", 1: "power on", 2: "power cycle", 3: "reset", 4: "diag",
                    5: "soft-off"}
# Completion codes as a user reads them (IPMI 2.0 table 5-2), instead of pyghmi's wording.
READABLE_CODES = {
    0xC1: "command not supported by this BMC",
    0xC7: "request data length invalid",
    0xC9: "parameter out of range",
    0xCC: "invalid data field in request",
    0xD4: "insufficient privilege",
    0xD5: "not possible in the present state",
    0xD6: "command sub-function disabled or unavailable",
}
CC_INSUFFICIENT_PRIVILEGE = 0xD4
CC_NOT_IN_PRESENT_STATE = 0xD5
# Session privilege levels (IPMI 2.0 table 22-28)
PRIVILEGE_NAMES = {1: "callback", 2: "user", 3: "operator", 4: "administrator"}


class BmcError(NodeError):
    """A BMC operation failed for good (bad reply, unsupported command)."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class BmcRetryable(BmcError, RetryableError):
    """Busy, restarting, out of sessions, dropped session: try again with a new session."""


class BmcTimeout(BmcRetryable):
    """No (complete) answer before the deadline."""


class BmcAuthError(BmcError):
    """Wrong user or password: retrying cannot help and may lock the account."""


class BmcCancelled(BmcError):
    """The caller gave up (Ctrl-C, SIGTERM): stop waiting on the BMC at once, no retry."""


def where(node: str, host: str, port: int) -> str:
    return f"{node}: BMC {host}:{port}"


def translate(e: BaseException, node: str, host: str, port: int, user: str) -> BaseException:
    """Map a pyghmi/socket exception to a labkit error naming the node; others pass through."""
    if isinstance(e, BmcError):
        return e
    at = where(node, host, port)
    if isinstance(e, IpmiException):
        text = str(e.args[0]) if e.args and e.args[0] else ""
        if any(m in text for m in AUTH_MARKERS):
            return BmcAuthError(f"{at}: login refused for user {user!r} ({text}); "
                                "check the inventory's password source")
        if not text or any(m in text for m in RETRYABLE_MARKERS):
            return BmcRetryable(f"{at}: {text or 'no answer to login'}")
        return BmcError(f"{at}: {text}")
    if isinstance(e, socket.gaierror):
        return BmcError(f"{at}: cannot resolve host ({e.strerror})")
    if isinstance(e, OSError):
        return BmcRetryable(f"{at}: {e.strerror or e}")
    return e


def is_retryable(e: BaseException) -> bool:
    """The retry predicate for every BMC operation (used with labkit.retry.RetryPolicy)."""
    return isinstance(e, RetryableError)


def attempt_failed(e: BaseException, node: str, host: str, port: int, user: str,
                   drop: Callable[[], None]) -> BaseException:
    """What one failed attempt of a BMC command becomes, for both drivers (``PowerClient`` and
    ``labkit.bmc.engine``): the error translated (:func:`translate`) and named by node, and the
    session dropped through ``drop`` unless the BMC answered cleanly with a completion code (a
    session that timed out or broke may be dead without knowing it: log in afresh next time).
    Returns ``e`` itself when there was nothing to translate, so the caller can re-raise it
    with its traceback."""
    err = translate(e, node, host, port, user)
    if not (isinstance(err, BmcError) and err.code is not None):
        drop()
    if isinstance(err, BmcError) and not str(err).startswith(f"{node}: "):
        text = str(err)
        if err.code == CC_INSUFFICIENT_PRIVILEGE:
            text += (f"; BMC user {user!r} may read but not change this node: give it "
                     "operator or administrator privilege on the BMC")
        err = type(err)(f"{where(node, host, port)}: {text}", err.code)
    return err


class Privilege:
    """Settle for the privilege the BMC grants this user, down to USER, for both sessions
    (mixed in before ``_simple.Session``). pyghmi asks for administrator and drops to operator
    only; a BMC refuses a role above the user's limit (RAKP2 status 0x09/0x0A, or 0x80/0x81 to
    Set Session Privilege Level). A read-only (USER) account can then read power state, and a
    power change gets the BMC's own 0xD4, which names the missing privilege, instead of a
    login refusal that blames the password."""

    privlevel: int
    autopriv: bool
    sessioncontext: Any
    rmcptag: int

    def _got_rakp2(self, data: Any) -> Any:
        if (self.sessioncontext in ("EXPECTINGRAKP2", "EXPECTINGRAKP4") and len(data) > 1
                and data[0] == self.rmcptag and data[1] in (0x09, 0x0A)
                and self.privlevel == 3 and self.autopriv):
            self.privlevel = 2
            self.login()  # type: ignore[attr-defined]
            return None
        if len(data) > 1 and data[1] == 0x0A and self.privlevel == 4 and self.autopriv:
            data = bytearray(data)
            data[1] = 0x09  # pyghmi drops to operator on 0x09 only; 0x0A means the same here
        return super()._got_rakp2(data)  # type: ignore[misc]


class Retransmit:
    """Retransmission for pyghmi's simple session, shared by the blocking :class:`LabSession`
    and the event-driven ``labkit.bmc.engine.AsyncSession``: the outstanding packet is resent
    after pyghmi's initial timeout (0.5-1 s, +0.5 s per resend, capped); the give-up rule is
    the owner's deadline, not pyghmi's. Mixed in before ``_simple.Session``."""

    _resend_at: float | None = None
    socket: Any
    incommand: Any
    timeout: float
    lastpayload: Any
    sessioncontext: Any
    nowait: bool
    hasretried: int

    def close(self, logout: bool = True) -> None:
        """Log out (one packet, no wait: frees the BMC's session slot) and close the socket.
        A request still marked in flight is abandoned first: pyghmi would otherwise wait for
        it before sending the logout."""
        sock = self.socket
        if sock is None:
            return
        if logout and getattr(self, "logged", 0):
            self.lastpayload = None
            self.incommand = False
            try:
                self.logout()  # type: ignore[attr-defined]
            except Exception:  # noqa: S110 - best effort, the BMC times the session out anyway
                pass
        # pyghmi registers every logged-in session in a class-level keepalive table that only
        # its own event loop services: drop ours so a closed session is not kept alive.
        with _simple.util.protect(_simple.KEEPALIVE_SESSIONS):
            _simple.Session.keepalive_sessions.pop(self, None)
        self.socket = None
        try:
            sock.close()
        except OSError:
            pass

    def _xmit_packet(self, retry: bool = True, delay_xmit: Any = None,
                     timeout: Any = None) -> None:
        super()._xmit_packet(retry, delay_xmit=delay_xmit, timeout=timeout)  # type: ignore[misc]
        if retry:
            self._resend_at = time.monotonic() + self.timeout

    def _timedout(self) -> None:
        """pyghmi's retransmit logic minus its own give-up rule (our deadline decides)."""
        if not self.lastpayload:
            return
        self.timeout = min(self.timeout + 0.5, MAX_RETRANSMIT_INTERVAL)
        self.nowait = True
        try:
            if self.sessioncontext == "FAILED":
                self.lastpayload = None
            elif self.sessioncontext == "OPENSESSION":
                self.lastpayload = None
                self._open_rmcpplus_request()  # type: ignore[attr-defined]
            elif self.sessioncontext in ("EXPECTINGRAKP2", "EXPECTINGRAKP4"):
                # BMCs dislike a repeated RAKP1/RAKP3: start the login over (pyghmi does too)
                self.lastpayload = None
                self._relog()  # type: ignore[attr-defined]
            else:
                self.hasretried = 1
                self.send_payload()  # type: ignore[attr-defined]
        finally:
            self.nowait = False


def describe(netfn: int, cmd: int, data: tuple[int, ...] | list[int] | bytes = ()) -> str:
    """A request as a user reads it: "chassis control (power off)", "netfn 0x2C cmd 0x01"."""
    name = COMMAND_NAMES.get((netfn, cmd))
    if name is None:
        return f"netfn 0x{netfn:02X} cmd 0x{cmd:02X}"
    if (netfn, cmd) == (0x00, 0x02) and data:
        name += f" ({CHASSIS_CONTROLS.get(data[0] & 0x0F, hex(data[0]))})"
    return name


def check_reply(rsp: dict[str, Any] | None, netfn: int, cmd: int,
                data: tuple[int, ...] | list[int] | bytes = ()) -> bytes:
    """The data of an IPMI response, or the labkit error its completion code stands for:
    BmcRetryable (busy & co.), BmcTimeout (pyghmi gave up), BmcError; a pyghmi error text
    without a code becomes IpmiException for :func:`translate`. The message names the request
    (``data`` is the request's, for the chassis control operand) and says what the code means
    in words, the code itself in parentheses."""
    code = rsp.get("code", 0) if rsp else 0
    if rsp and "error" in rsp and not code:
        raise IpmiException(rsp["error"])
    what = describe(netfn, cmd, data)
    if code == 0xFFFF:  # pyghmi's own "gave up waiting" marker
        raise BmcTimeout(f"timeout waiting for the answer to {what}")
    if code:
        assert rsp is not None
        text = (READABLE_CODES.get(code) or RETRYABLE_CODES.get(code)
                or constants.ipmi_completion_codes.get(code) or rsp.get("error") or "error")
        msg = f"{what} refused: {text} (completion code 0x{code:02X})"
        if code in RETRYABLE_CODES:
            raise BmcRetryable(msg, code)
        raise BmcError(msg, code)
    return bytes(rsp.get("data", b"")) if rsp else b""


class LabSession(Privilege, Retransmit, _simple.Session):
    """pyghmi's simple (one socket, no I/O thread) RMCP+ session plus retransmission and a hard
    deadline. Not thread-safe: one thread at a time (the power client holds a lock per BMC).

    ``deadline`` (time.monotonic()) bounds login and each later call; the owner moves it forward
    before every operation. ``cancel`` (set from another thread, e.g. on Ctrl-C) ends any wait
    within CANCEL_POLL seconds with BmcCancelled."""

    def __init__(self, host: str, port: int, user: bytes, password: bytes, deadline: float,
                 cancel: threading.Event | None = None):
        self.deadline = deadline
        self.cancel = cancel
        self._resend_at = None
        self.socket = None
        try:
            super().__init__(bmc=host, userid=user, password=password, port=port)
        except BaseException:
            self.close()
            raise
        # pyghmi registers every session in a class-level keepalive table that only its own
        # event loop services; we keep sessions alive by using them, so drop the reference.
        with _simple.util.protect(_simple.KEEPALIVE_SESSIONS):
            _simple.Session.keepalive_sessions.pop(self, None)

    # -- the event loop pyghmi's simple session is missing --------------------------------------

    def wait_for_rsp(self, timeout: float | None = None, callout: bool = True) -> None:
        """Wait for a packet (or until ``timeout``); retransmit when the outstanding request is
        overdue; raise BmcTimeout at the deadline. pyghmi calls this in all its wait loops."""
        if self.cancel is not None and self.cancel.is_set():
            raise BmcCancelled("interrupted")
        now = time.monotonic()
        left = self.deadline - now
        if left <= 0:
            phase = "command" if self.logged else "login"
            raise BmcTimeout(f"timeout: no answer to {phase} before the deadline")
        wait = left if timeout is None else max(0.0, min(left, timeout))
        if self.lastpayload is not None and self._resend_at is not None:
            wait = max(0.0, min(wait, self._resend_at - now))
        if self.cancel is not None:
            wait = min(wait, CANCEL_POLL)
        if self.socket is None:
            raise BmcTimeout("session closed")
        ready = select.select([self.socket], [], [], wait)[0]
        if ready:
            self.process_pktqueue()
        elif (self.lastpayload is not None and self._resend_at is not None
              and time.monotonic() >= self._resend_at):
            self._timedout()

    def awaitresponse(self, retry: bool) -> None:  # replaces a 30 s select with no retransmit
        while retry and self.lastresponse is None and self.logged:
            self.wait_for_rsp()

    # -- commands --------------------------------------------------------------------------------

    def command(self, netfn: int, cmd: int, data: tuple[int, ...] | list[int] = ()) -> bytes:
        """One request/response; returns the response data. A non-zero completion code raises
        BmcRetryable (busy & co.) or BmcError."""
        return check_reply(self.raw_command(netfn=netfn, command=cmd, data=data), netfn, cmd,
                           data)


def open_session(host: str, port: int, user: bytes, password: bytes, deadline: float,
                 cancel: threading.Event | None = None) -> LabSession:
    """Log in to one BMC or raise (pyghmi's IpmiException for refusals, BmcTimeout,
    BmcCancelled when ``cancel`` is set meanwhile)."""
    return LabSession(host, port, user, password, deadline, cancel)
