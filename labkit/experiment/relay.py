"""The controller's relay between the built-in backend's two agents: the source agent's framed
stream (``payloads/stream.py``) is read here and written into the restore agent's stdin, and
the control frames it carries (round ends, the source hash, errors) are peeked at on the way
through, so the run can wait on them and on the destination's answers in one queue.

Specific to the labkit backend's stream format (FrameScanner). ``RELAY_CHUNK`` is shared with
the channel benchmark (``channel.py``), which measures the same path with raw bytes."""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING, Any, NoReturn

from labkit.experiment import results as res
from labkit.experiment.remote import MigrationFailed, Remote
from labkit.payloads import stream as st

if TYPE_CHECKING:
    import paramiko

RELAY_CHUNK = 1 << 20

# One arrival: ("src", frame type, frame) | ("src-eof" | "src-bad", 0, info) | ("dst", 0, line)
Item = tuple[str, int, dict[str, Any]]


class Pump:
    """One migration stream: source agent -> (relay here) -> restore agent, with one queue of
    everything the run waits for: control frames from the source, JSON lines from the dst.

    Nothing that arrives is dropped: an event nobody is waiting for yet goes to a backlog, and
    every ``wait`` first takes the oldest matching event from there. The two sides race — the
    destination can answer (``applied``, ``resumed``, ``verified``) before the relay thread has
    queued the source frame that caused it — so "throw away what I am not waiting for" loses
    exactly the event the *next* wait needs, and that wait then hangs."""

    def __init__(self, src: Remote, dst: Remote, events: res.Events, tag: str):
        self.src, self.dst, self.events, self.tag = src, dst, events, tag
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
        src, dst = self.src.ch, self.dst.ch
        try:
            while True:
                data = src.recv(RELAY_CHUNK)
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
        except OSError as e:
            self.q.put(("src-eof", 0, {"error": str(e)}))
            return
        self.q.put(("src-eof", 0, {"boundary": self.scanner.at_boundary}))

    @staticmethod
    def _forward(dst: paramiko.Channel, data: bytes) -> None:
        try:
            dst.sendall(data)
        except OSError:
            pass  # the restore agent died: its own error line says why

    def _dst_lines(self) -> None:
        while True:
            obj = self.dst.lines.get()
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
        from either side fails the run, and so does the wanted event not coming in time."""
        end = time.monotonic() + timeout
        while True:
            got = self._take(src_type, dst_event, dst_reply)
            if got is not None:
                return got
            if self.dst_closed:
                raise MigrationFailed(f"{self.dst.node}: restore agent exited while we waited "
                                      f"for {what} ({self.dst.stderr_tail()})")
            if self.src_closed is not None and src_type is not None:
                self._src_gone(*self.src_closed, what)
            left = end - time.monotonic()
            try:
                item = self.q.get(timeout=max(0.0, left))
            except queue.Empty:
                raise MigrationFailed(
                    f"timed out after {timeout:.0f}s waiting for {what} (source agent on "
                    f"{self.src.node}, restore agent on {self.dst.node}, stream "
                    f"{self.tag!r}: {self.bytes} bytes relayed; a peer is stuck, or the "
                    "budget (labkit.command_timeout) is too small)") from None
            self._note(item, what, src_type=src_type, dst_event=dst_event, dst_reply=dst_reply)

    def _note(self, item: Item, what: str, *, src_type: int | None,
              dst_event: str | None, dst_reply: bool) -> None:
        """Record one arrival: raise on errors/ends, log it, keep it in the backlog."""
        kind, ftype, obj = item
        now = self.events.now()
        if kind == "src":
            if ftype == st.ERROR:
                raise MigrationFailed(f"{self.src.node}: source agent: {obj.get('error')}")
            if ftype == st.ROUND_END:
                self.events.emit("round-end", stream=self.tag, **_small(obj))
            self.backlog.append(item)
            return
        if kind in ("src-eof", "src-bad"):
            self.src_closed = (kind, obj)
            if kind == "src-eof" and src_type is None and (dst_event or dst_reply):
                return  # the source is done (quit); we wait for the destination only
            self._src_gone(kind, obj, what)
        # dst
        ev = obj.get("event")
        if ev == "eof":
            self.dst_closed = True
            raise MigrationFailed(f"{self.dst.node}: restore agent exited while we waited "
                                  f"for {what} ({self.dst.stderr_tail()})")
        if ev == "error" or obj.get("ok") is False:
            raise MigrationFailed(f"{self.dst.node}: restore refused: {obj.get('error')}")
        if ev == "applied":
            self.applied[int(obj["round"])] = (now, obj)
        if ev:
            self.events.emit(f"dst-{ev}", stream=self.tag, **_small(obj))
        self.backlog.append(item)

    def _src_gone(self, kind: str, obj: dict[str, Any], what: str) -> NoReturn:
        self._drain_dst_errors()  # the dst's complaint is the precise one: prefer it
        if kind == "src-bad":
            raise MigrationFailed(f"stream from {self.src.node} is corrupted: {obj['error']}")
        raise MigrationFailed(f"{self.src.node}: source agent exited while we waited "
                              f"for {what} ({self.src.stderr_tail()})")

    def wait_applied(self, rnd: int, timeout: float) -> None:
        while rnd not in self.applied:
            self.wait(timeout, f"the destination to apply round {rnd}", dst_event="applied")

    def _drain_dst_errors(self) -> None:
        if self.dst_closed:
            return
        try:
            while True:
                item = self.q.get(timeout=0.5)
                kind, _, obj = item
                if kind == "dst" and (obj.get("event") == "error" or obj.get("ok") is False):
                    raise MigrationFailed(f"{self.dst.node}: restore refused: {obj.get('error')}")
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
