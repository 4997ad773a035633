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

    def call(self, fn: Callable[[], T], *, retryable: Callable[[BaseException], bool],
             on_retry: Callable[[int, BaseException, float], None] | None = None,
             deadline: float | None = None) -> T:
        """Run fn until it returns, raises a non-retryable error, or the window is spent (then the
        last error is raised). ``deadline`` (a time.monotonic() value) can shorten the window."""
        end = time.monotonic() + self.window
        if deadline is not None:
            end = min(end, deadline)
        attempt = 0
        for delay in self.delays():
            attempt += 1
            try:
                return fn()
            except BaseException as e:  # noqa: B036 - filtered right below
                if isinstance(e, (KeyboardInterrupt, SystemExit)) or not retryable(e):
                    raise
                left = end - time.monotonic()
                if left <= 0:
                    raise
                sleep = min(delay, left)
                if on_retry:
                    on_retry(attempt, e, sleep)
                time.sleep(sleep)
        raise AssertionError("unreachable")


class MinInterval:
    """Keeps a minimum gap between commands to one endpoint (real BMCs fall over when hammered;
    Ironic waits 5 s). Thread-safe per key."""

    def __init__(self, seconds: float):
        import threading

        self.seconds = seconds
        self._last: dict[object, float] = {}
        self._lock = threading.Lock()

    def wait(self, key: object) -> None:
        if self.seconds <= 0:
            return
        with self._lock:
            now = time.monotonic()
            ready = self._last.get(key, 0.0) + self.seconds
            slot = max(now, ready)
            self._last[key] = slot
        if slot > now:
            time.sleep(slot - now)
