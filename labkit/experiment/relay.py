"""The controller's relay between the built-in backend's two agents: the source agent's framed
stream (``payloads/stream.py``) is read here and written into the restore agent's stdin, and
the control frames it carries (round ends, the source hash, errors) are peeked at on the way
through, so the run can wait on them and on the destination's answers in one queue.

Specific to the labkit backend's stream format (FrameScanner). It reads as the channel
benchmark (``channel.py``) does, which measures the same path with raw bytes (``READ_SIZE``
pieces)."""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING, Any, NoReturn

from labkit.experiment import results as res
from labkit.experiment.remote import WAKE, MigrationFailed, Peers, Remote, watch_peers
from labkit.payloads import stream as st
from labkit.ssh.run import CHANNEL_GONE
from labkit.ssh.shell import READ_SIZE

if TYPE_CHECKING:
    import paramiko


# One arrival: ("src", frame type, frame) | ("src-eof" | "src-bad" | "relay-error", 0, info)
# | ("dst", 0, line) | ("peer", 0, {}): some process of the run ended unasked
Item = tuple[str, int, dict[str, Any]]
PEER_ENDED: Item = ("peer", 0, {})


class Pump:
    """One migration stream: source agent -> (relay here) -> restore agent, with one queue of
    everything the run waits for: control frames from the source, JSON lines from the dst,
    and the end of any process of the run (``peers``: the workload too) that was not told to
    quit — a wait fails at once on that, naming the process and quoting its stderr.

    Nothing that arrives is dropped: an event nobody is waiting for yet goes to a backlog, and
    every ``wait`` first takes the oldest matching event from there. The two sides race — the
    destination can answer (``applied``, ``resumed``, ``verified``) before the relay thread has
    queued the source frame that caused it — so "throw away what I am not waiting for" loses
    exactly the event the *next* wait needs, and that wait then hangs."""

    def __init__(self, src: Remote, dst: Remote, events: res.Events, tag: str,
                 peers: Peers | None = None):
        self.src, self.dst, self.events, self.tag = src, dst, events, tag
        self.peers = peers if peers is not None else src.peers
        self.q: queue.Queue[Item] = queue.Queue()
        self.scanner = st.FrameScanner()
        self.bytes = 0
        # round -> (run time the destination said it applied it, its "applied" line)
        self.applied: dict[int, tuple[float, dict[str, Any]]] = {}
        self.backlog: list[Item] = []  # arrived, not yet taken by a wait
        # the source stream ended: ("src-eof" | "src-bad", info)
        self.src_closed: tuple[str, dict[str, Any]] | None = None
        self.dst_closed = False  # the restore agent's stdout ended
        self.relay = threading.Thread(target=self._relay, daemon=True, name=f"relay-{tag}")
        self.relay.start()
        threading.Thread(target=self._dst_lines, daemon=True, name=f"dst-{tag}").start()

    def _relay(self) -> None:
        """Source stdout -> destination stdin. Whatever ends it is queued: the stream's end
        (after the source's exit status is in), a corrupted frame, or the relay's own fault —
        the relay is a peer too, and a wait must not outlive it silently."""
        try:
            self._pass_through()
        except Exception as e:  # noqa: BLE001 - a dead relay must fail the wait, not hang it
            self.q.put(("relay-error", 0, {"error": f"{type(e).__name__}: {e}"}))

    def _pass_through(self) -> None:
        src, dst = self.src.ch, self.dst.ch
        try:
            while True:
                data = src.recv(READ_SIZE)
                if not data:
                    break
                # Queue the control frames *before* the destination can see them, so that its
                # answer to a frame is always queued after the frame itself.
                try:
                    frames = self.scanner.feed(data)
                except st.StreamError as e:
                    self._forward(dst, data)  # the restore agent's own complaint is precise
                    self.q.put(("src-bad", 0, {"error": str(e)}))
                    return
                for ftype, obj in frames:
                    self.q.put(("src", ftype, obj))
                self._forward(dst, data)
                self.bytes += len(data)
        except CHANNEL_GONE as e:
            self.src.stdout_closed()
            self.q.put(("src-eof", 0, {"error": str(e) or "the connection was lost"}))
            return
        self.src.stdout_closed()
        self.q.put(("src-eof", 0, {"boundary": self.scanner.at_boundary}))

    @staticmethod
    def _forward(dst: paramiko.Channel, data: bytes) -> None:
        try:
            dst.sendall(data)
        except CHANNEL_GONE:
            pass  # the restore agent died: its own error line says why

    def _dst_lines(self) -> None:
        while True:
            obj = self.dst.lines.get()
            if obj is WAKE:
                continue
            self.q.put(("dst", 0, obj))
            if obj.get("event") == "eof":
                return

    @staticmethod
    def _matches(item: Item, src_type: int | None, dst_event: str | None,
                 dst_reply: bool) -> bool:
        kind, ftype, obj = item
        if kind == "src":
            return src_type is not None and ftype == src_type
        return (dst_event is not None and obj.get("event") == dst_event) or (
            dst_reply and "ok" in obj)

    def _take(self, src_type: int | None, dst_event: str | None,
              dst_reply: bool) -> dict[str, Any] | None:
        for i, item in enumerate(self.backlog):
            if self._matches(item, src_type, dst_event, dst_reply):
                del self.backlog[i]
                return item[2]
        return None

    def wait(self, timeout: float, what: str, *, src_type: int | None = None,
             dst_event: str | None = None, dst_reply: bool = False) -> dict[str, Any]:
        """The oldest not yet taken event that matches (a source frame of ``src_type``, a
        destination line with ``dst_event`` or, with ``dst_reply``, a command reply); any error
        from either side fails the run, and so does any process of the run ending unasked (at
        once), and the wanted event not coming in time."""
        end = time.monotonic() + timeout
        with watch_peers(self.peers, self.q, PEER_ENDED):
            while True:
                got = self._take(src_type, dst_event, dst_reply)
                if got is not None:
                    return got
                if self.dst_closed:
                    raise self.dst.gone(what)
                if self.src_closed is not None and (src_type is not None
                                                    or not self.src.told_to_quit):
                    self._src_gone(*self.src_closed, what)
                self._check_peers(what)
                left = end - time.monotonic()
                try:
                    item = self.q.get(timeout=max(0.0, left))
                except queue.Empty:
                    raise MigrationFailed(
                        f"timed out after {timeout:.0f}s waiting for {what} (source agent on "
                        f"{self.src.node}, restore agent on {self.dst.node}, stream "
                        f"{self.tag!r}: {self.bytes} bytes relayed; a peer is stuck, or the "
                        "budget (labkit.command_timeout) is too small)",
                        value={"step": what}) from None
                self._note(item, what, src_type=src_type, dst_event=dst_event,
                           dst_reply=dst_reply)

    def _check_peers(self, what: str) -> None:
        """Fail if a process of the run ended unasked — unless it is one of this stream's
        two agents: their own ends (and the error lines before them) reach this queue in
        order, and are reported from there."""
        if self.peers is not None:
            self.peers.check(what, own=(self.src, self.dst))

    def _note(self, item: Item, what: str, *, src_type: int | None,
              dst_event: str | None, dst_reply: bool) -> None:
        """Record one arrival: raise on errors/ends, log it, keep it in the backlog."""
        kind, ftype, obj = item
        now = self.events.now()
        if kind == "peer":
            self._check_peers(what)
            return
        if kind == "relay-error":
            raise MigrationFailed(f"the relay of stream {self.tag!r} ({self.src.node} -> "
                                  f"{self.dst.node}) failed while we waited for {what}: "
                                  f"{obj['error']}", value={"step": what, "peer": "relay"})
        if kind == "src":
            if ftype == st.ERROR:
                raise self.src.failure(what, "failed", str(obj.get("error")))
            if ftype == st.ROUND_END:
                self.events.emit("round-end", stream=self.tag, **_small(obj))
            self.backlog.append(item)
            return
        if kind in ("src-eof", "src-bad"):
            self.src_closed = (kind, obj)
            if kind == "src-eof" and self.src.told_to_quit and src_type is None:
                if "error" in obj:  # the connection died: the stream's end is unknown
                    raise MigrationFailed(f"the connection to {self.src.node} was lost at the "
                                          f"end of stream {self.tag!r}: {obj['error']}",
                                          value={"step": what, "node": self.src.node})
                if obj.get("boundary") is False:
                    raise MigrationFailed(f"stream from {self.src.node} ended in the middle "
                                          "of a frame", value={"step": what,
                                                               "node": self.src.node})
                return  # the source is done (quit); we wait for the destination only
            self._src_gone(kind, obj, what)
        # dst
        ev = obj.get("event")
        if ev == "eof":
            self.dst_closed = True
            raise self.dst.gone(what)
        if ev == "error" or obj.get("ok") is False:
            raise self.dst.failure(what, "failed", str(obj.get("error")))
        if ev == "applied":
            self.applied[int(obj["round"])] = (now, obj)
        if ev:
            self.events.emit(f"dst-{ev}", stream=self.tag, **_small(obj))
        self.backlog.append(item)

    def _src_gone(self, kind: str, obj: dict[str, Any], what: str) -> NoReturn:
        if kind == "src-bad":
            self._drain_dst_errors(what)  # the dst's complaint is the precise one: prefer it
            raise MigrationFailed(f"stream from {self.src.node} is corrupted: {obj['error']}",
                                  value={"step": what, "node": self.src.node})
        raise self.src.gone(what)

    def wait_applied(self, rnd: int, timeout: float) -> None:
        while rnd not in self.applied:
            self.wait(timeout, f"the destination to apply round {rnd}", dst_event="applied")

    def _drain_dst_errors(self, what: str) -> None:
        if self.dst_closed:
            return
        try:
            while True:
                item = self.q.get(timeout=0.5)
                kind, _, obj = item
                if kind == "dst" and (obj.get("event") == "error" or obj.get("ok") is False):
                    raise self.dst.failure(what, "failed", str(obj.get("error")))
                if kind == "dst" and obj.get("event") == "eof":
                    self.dst_closed = True
                    return
                if kind in ("src", "dst"):
                    self.backlog.append(item)
        except queue.Empty:
            return


def _small(obj: dict[str, Any]) -> dict[str, Any]:
    """A peer's message as event fields: its own "event"/"t" must not clobber ours."""
    return {(f"peer_{k}" if k in ("event", "t", "wall") else k): v for k, v in obj.items()
            if k != "ranges"}
