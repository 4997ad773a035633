"""The one fan-out and the one retry policy: pure logic, no lab needed."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest

from labkit.errors import LabkitError, RetryableError
from labkit.fanout import fan_out, format_table, report
from labkit.retry import MinInterval, RetryPolicy
from labkit.secrets import Secret, scrub


class N:
    def __init__(self, name: str):
        self.name = name


def test_fan_out_keeps_order_and_isolates_failures():
    nodes = [N(f"n{i}") for i in range(10)]

    def act(n):
        if n.name == "n3":
            raise LabkitError("n3 exploded")
        if n.name == "n7":
            raise ValueError("bad value")
        return {"power": "on"}

    out = fan_out(nodes, act, parallel=4)
    assert [o.node for o in out] == [n.name for n in nodes]
    assert [o.ok for o in out].count(False) == 2
    assert out[3].error == "n3 exploded"
    assert out[7].error == "ValueError: bad value"
    assert out[0].value == {"power": "on"}


def test_fan_out_is_bounded_and_parallel():
    live = 0
    peak = 0
    lock = threading.Lock()

    def act(n):
        nonlocal live, peak
        with lock:
            live += 1
            peak = max(peak, live)
        time.sleep(0.05)
        with lock:
            live -= 1

    t0 = time.monotonic()
    fan_out([N(str(i)) for i in range(20)], act, parallel=5)
    assert peak == 5
    assert time.monotonic() - t0 < 20 * 0.05 / 2  # clearly parallel


def test_report_json_and_exit_codes():
    out = fan_out([N("a"), N("b")], lambda n: {"power": "off"} if n.name == "a" else 1 / 0)
    buf = io.StringIO()
    assert report(out, as_json=True, out=buf) == 1
    data = json.loads(buf.getvalue())
    assert data[0] == {"node": "a", "ok": True, "error": None, "seconds": data[0]["seconds"],
                       "power": "off"}
    assert data[1]["ok"] is False and "ZeroDivisionError" in data[1]["error"]
    ok = fan_out([N("a")], lambda n: {})
    assert report(ok, out=io.StringIO()) == 0
    table = format_table(out, ["power"])
    assert "FAILED" in table and "1 failed" in table


def test_errors_are_scrubbed_of_secrets():
    Secret(b"topsecretpw")
    out = fan_out([N("a")], lambda n: (_ for _ in ()).throw(LabkitError("auth with topsecretpw")))
    assert "topsecretpw" not in out[0].error
    assert scrub("x topsecretpw y") == "x ******** y"


def test_retry_retries_retryable_until_success():
    calls = []

    def fn():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise RetryableError("busy")
        return "done"

    p = RetryPolicy(window=5, first_delay=0.01, max_delay=0.02)
    assert p.call(fn, retryable=lambda e: isinstance(e, RetryableError)) == "done"
    assert len(calls) == 3


def test_retry_gives_up_at_window_and_not_on_fatal():
    p = RetryPolicy(window=0.2, first_delay=0.02, max_delay=0.05)
    t0 = time.monotonic()
    with pytest.raises(RetryableError):
        p.call(lambda: (_ for _ in ()).throw(RetryableError("busy")),
               retryable=lambda e: isinstance(e, RetryableError))
    assert 0.15 < time.monotonic() - t0 < 1.0
    n = 0

    def fatal():
        nonlocal n
        n += 1
        raise LabkitError("bad password")

    with pytest.raises(LabkitError):
        p.call(fatal, retryable=lambda e: isinstance(e, RetryableError))
    assert n == 1


def test_min_interval_spaces_calls_per_key():
    gap = MinInterval(0.05)
    t = []
    for _ in range(3):
        gap.wait("bmc1")
        t.append(time.monotonic())
    assert t[2] - t[0] >= 0.095
    t0 = time.monotonic()
    gap.wait("bmc2")
    assert time.monotonic() - t0 < 0.03
