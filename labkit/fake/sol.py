"""Serial-over-LAN, BMC side, without blocking.

pyghmi's ``ServerConsole.send_data`` runs a nested event loop until the client ACKs (up to
~12 s), so calling it from a request handler stalls every BMC of the process. Here console
output is only *queued* (``write``); ``flush`` — called by the serving loop every iteration —
sends at most one packet in flight, retransmits on timeout, and declares the link dead after a
few unanswered retransmits so a crashed client cannot pin the SOL payload forever.

When another session ends this payload (a take-over), the holder is told the way a real BMC
tells it: one SOL packet whose status byte has the "SOL deactivating" bit set
(:meth:`SolLink.notify_deactivated`). A client that misses it still finds out from its
keepalive (Get Payload Instance Info names another session, or none)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

SOL_PAYLOAD = 1
MAX_CHUNK = 200          # bytes of console data per packet (below the 256 we advertise)
RETRY_AFTER = 0.7        # seconds before an unacknowledged packet is sent again
MAX_TRIES = 6            # ... and after this many sends the client is considered gone
MAX_BUFFER = 256 * 1024  # console output kept while the client is slow; oldest dropped
NACK = 0x40
SOL_DEACTIVATING = 0x10  # BMC-to-console status bit (IPMI 2.0, table 15-2)


class SolLink:
    """One active SOL payload instance, bound to one RMCP+ session."""

    def __init__(self, session: Any, on_input: Callable[[bytes], None]):
        self.session = session
        self.on_input = on_input
        self.out = bytearray()
        self.myseq = 0
        self.inflight: bytes | None = None
        self.sent_at = 0.0
        self.tries = 0
        self.remseq = 0
        self.dead = False
        self.closed = False
        self.last_rx = time.monotonic()
        self.activated_at = self.last_rx

    # --- from the client ------------------------------------------------------------------
    def received(self, payload: bytes | bytearray | dict) -> None:
        """SOL payload from the client: data to echo/deliver and/or an ACK for our packet."""
        if isinstance(payload, dict) or len(payload) < 4 or self.closed:
            return
        self.last_rx = time.monotonic()
        newseq = payload[0] & 0x0F
        ackseq = payload[1] & 0x0F
        accepted = payload[2]
        status = payload[3]
        if newseq:
            data = bytes(payload[4:])
            fresh = newseq != self.remseq
            self.remseq = newseq
            self._send(bytes((0, newseq, len(data), 0)))  # ACK everything, always
            if fresh and data:
                self.on_input(data)
        if self.inflight is not None and ackseq and ackseq == self.myseq:
            if status & NACK and accepted < len(self.inflight):
                self.out[:0] = self.inflight[accepted:]
            self.inflight = None
            self.tries = 0

    # --- to the client --------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.closed:
            return
        self.out += data
        if len(self.out) > MAX_BUFFER:
            del self.out[: len(self.out) - MAX_BUFFER]

    def flush(self, now: float) -> None:
        if self.closed or self.dead:
            return
        if self.inflight is not None:
            if now - self.sent_at < RETRY_AFTER:
                return
            if self.tries >= MAX_TRIES:
                self.dead = True
                return
            self._send_data(self.inflight, now)
            return
        if self.out:
            chunk = bytes(self.out[:MAX_CHUNK])
            del self.out[:MAX_CHUNK]
            self.myseq = self.myseq % 15 + 1
            self.inflight = chunk
            self.tries = 0
            self._send_data(chunk, now)

    def _send_data(self, chunk: bytes, now: float) -> None:
        self.sent_at = now
        self.tries += 1
        self._send(bytes((self.myseq, 0, 0, 0)) + chunk)

    def _send(self, payload: bytes) -> None:
        self.session.send_payload(bytearray(payload), payload_type=SOL_PAYLOAD, retry=False)

    def notify_deactivated(self) -> None:
        """Tell the client its payload is being ended by someone else: an ACK-only packet
        (sequence 0, no data) carrying the deactivating status, sent once like real BMCs."""
        if not self.closed and not getattr(self.session, "closed", False):
            self._send(bytes((0, 0, 0, SOL_DEACTIVATING)))

    def close(self) -> None:
        self.closed = True
        self.out.clear()
        self.inflight = None
        if getattr(self.session, "sol_handler", None) == self.received:
            self.session.sol_handler = None

    def stale(self, now: float, idle: float) -> bool:
        """Gone for good: retransmits unanswered, session closed, or silent for ``idle`` s
        (longer than any client's keepalive interval)."""
        return (self.dead or self.closed or getattr(self.session, "closed", False)
                or now - self.last_rx > idle)
