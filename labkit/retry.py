"""THE retry policy. Transient failures (timeouts, 0xC0 node busy, BMC restarting, SSH refused
while booting) are retried with capped exponential backoff and jitter inside one time window;
anything else fails at once. Every part of labkit that retries goes through ``RetryPolicy.call``."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    window: float = 60.0       # total seconds from the first attempt (Ironic: 60 s)
    first_delay: float = 0.5
    max_delay: float = 5.0
    factor: float = 2.0
    jitter: float = 0.25       # +/- fraction of each delay, so many nodes do not retry in step

    def delays(self, rng: random.Random | None = None):
        rng = rng or random
        d = self.first_delay
        while True:
            yield max(0.0, d * (1 + rng.uniform(-self.jitter, self.jitter)))
            d = min(self.max_delay, d * self.factor)

    def clock(self, deadline: float | None = None) -> RetryClock:
        """The policy's decisions for one operation, starting now, without the sleeping: for
        callers that wait in an event loop (labkit.bmc.engine) rather than in time.sleep."""
        return RetryClock(self, deadline)

    def call(self, fn: Callable[[], T], *, retryable: Callable[[BaseException], bool],
             on_retry: Callable[[int, BaseException, float], None] | None = None,
             deadline: float | None = None,
             sleep: Callable[[float], object] = time.sleep) -> T:
        """Run fn until it returns, raises a non-retryable error, or the window is spent (then the
        last error is raised). ``deadline`` (a time.monotonic() value) can shorten the window.
        ``sleep`` waits between attempts: a caller that can be cancelled passes a wait that
        raises when it is (the power client does)."""
        clock = self.clock(deadline)
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except BaseException as e:  # noqa: B036 - filtered right below
                if isinstance(e, (KeyboardInterrupt, SystemExit)) or not retryable(e):
                    raise
                delay = clock.next_delay()
                if delay is None:
                    raise
                if on_retry:
                    on_retry(attempt, e, delay)
                sleep(delay)


class RetryClock:
    """One operation's retry window and backoff (see RetryPolicy.clock)."""

    def __init__(self, policy: RetryPolicy, deadline: float | None = None):
        self.end = time.monotonic() + policy.window
        if deadline is not None:
            self.end = min(self.end, deadline)
        self._delays = policy.delays()

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt, or None when the window is spent."""
        left = self.end - time.monotonic()
        if left <= 0:
            return None
        return min(next(self._delays), left)


class MinInterval:
    """Keeps a minimum gap between commands to one endpoint (real BMCs fall over when hammered;
    Ironic waits 5 s). Thread-safe per key."""

    def __init__(self, seconds: float):
        import threading

        self.seconds = seconds
        self._last: dict[object, float] = {}
        self._lock = threading.Lock()

    def reserve(self, key: object) -> float:
        """Claim the next slot for ``key``; returns the seconds to wait before using it (0.0 when
        it is free now). For callers that wait in an event loop instead of sleeping."""
        if self.seconds <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            ready = self._last.get(key, 0.0) + self.seconds
            slot = max(now, ready)
            self._last[key] = slot
        return slot - now

    def wait(self, key: object) -> None:
        pause = self.reserve(key)
        if pause > 0:
            time.sleep(pause)
