"""The fake lab's single event loop: every BMC socket, the control socket, all timers (power
landing, boot log lines, SOL retransmits) run on ONE thread.

Why our own loop instead of pyghmi's ``Bmc.listen()``: pyghmi's server mode runs through the
client library's global I/O thread, which toggles blocking mode on shared sockets from two
threads (a recvfrom can then block forever) and routes packets by client address across all
BMCs of the process. With one thread owning every socket and every session object, no pyghmi
state is ever touched concurrently, and a handler can never block the others. Work that may
block (a fake node starting or stopping) goes to worker threads and reports back through
``call_soon_threadsafe``."""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("labkit.fake.loop")


class Timer:
    """Handle for a scheduled call; ``cancel()`` is cheap and safe from the loop thread."""

    __slots__ = ("when", "fn", "args", "cancelled")

    def __init__(self, when: float, fn: Callable[..., Any], args: tuple):
        self.when = when
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """selectors + a timer heap + a thread-safe call queue. Exceptions in callbacks are logged
    and swallowed: garbage from the network must never stop the lab."""

    def __init__(self, tick: float = 0.05):
        self.sel = selectors.DefaultSelector()
        self.tick = tick
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._calls: deque[tuple[Callable[..., Any], tuple]] = deque()
        self._tickers: list[Callable[[float], None]] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
        self.running = False
        self.thread: threading.Thread | None = None
        self.errors = 0

    # --- scheduling -----------------------------------------------------------------------
    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
        t = Timer(time.monotonic() + max(0.0, delay), fn, args)
        heapq.heappush(self._timers, (t.when, next(self._seq), t))
        return t

    def call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        self._calls.append((fn, args))
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # buffer full: the loop is awake anyway

    def run_in_loop(self, fn: Callable[..., Any], *args: Any, timeout: float = 10.0) -> Any:
        """Run fn on the loop thread and return its result (for other threads, e.g. tests)."""
        if threading.current_thread() is self.thread:
            return fn(*args)
        done = threading.Event()
        box: dict[str, Any] = {}

        def call() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as e:  # handed back to the caller
                box["error"] = e
            done.set()

        self.call_soon_threadsafe(call)
        if not done.wait(timeout):
            raise TimeoutError("fake lab loop did not answer")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def add_ticker(self, fn: Callable[[float], None]) -> None:
        """fn(now) runs once per loop iteration (at least every ``tick`` seconds)."""
        self._tickers.append(fn)

    def add_reader(self, sock: socket.socket, callback: Callable[[], None]) -> None:
        self.sel.register(sock, selectors.EVENT_READ, callback)

    def remove_reader(self, sock: socket.socket) -> None:
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    # --- running --------------------------------------------------------------------------
    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _guard(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self.errors += 1
            if self.errors <= 50 or self.errors % 1000 == 0:
                log.exception("callback %s failed (error #%d)", getattr(fn, "__qualname__", fn),
                              self.errors)

    def run(self) -> None:
        self.running = True
        self.thread = threading.current_thread()
        while self.running:
            now = time.monotonic()
            timeout = self.tick
            if self._timers:
                timeout = min(timeout, max(0.0, self._timers[0][0] - now))
            if self._calls:
                timeout = 0.0
            try:
                events = self.sel.select(timeout)
            except InterruptedError:
                events = []
            for key, _ in events:
                self._guard(key.data)
            while self._calls:
                fn, args = self._calls.popleft()
                self._guard(fn, *args)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, t = heapq.heappop(self._timers)
                if not t.cancelled:
                    self._guard(t.fn, *t.args)
            for ticker in self._tickers:
                self._guard(ticker, now)

    def stop(self) -> None:
        def _stop() -> None:
            self.running = False
        self.call_soon_threadsafe(_stop)

    def start_thread(self, name: str = "fake-lab-loop") -> threading.Thread:
        th = threading.Thread(target=self.run, name=name, daemon=True)
        th.start()
        while self.thread is None:
            time.sleep(0.001)
        return th
