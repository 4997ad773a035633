#!/usr/bin/env python3
"""The client of ``migrate-test --tcp``: connects once to the workload's record stream, checks
every byte of it, sends its own numbered messages and checks that the workload's echo covers
them, and reports whether the connection was kept across the migration.

python3 stdlib only (runs on the controller inside a lan port, or anywhere):
    python3 tcp_client.py --connect ADDR:PORT --seed N [--send-interval 0.01] [--drain 5]
                          [--connect-timeout 30]

stdout, one JSON object a line, flushed each:
    {"event": "connected", "t": wall, "local": [...], "peer": [...]}
    {"event": "first_record", "t": wall}               the stream is flowing
    {"event": "error", "error": ..., "t": wall}         as soon as a check fails (once per error)
    {"event": "status", ...}                            on a "status" line on stdin
    {"event": "result", "kept", "bytes", "records", "max_gap_ms", "gap": [t0, t1],
     "gaps": [[t0, t1, ms], ...] (every stall >= 50 ms; ms is its length as
     max_gap_ms measures it, on the monotonic clock), "resets", "errors": [...], "msgs_sent", "msgs_echoed", "max_echo_ms", "t_first", "t_last"}
stdin: "stop" or EOF -> stop sending, drain up to --drain s for the echo to cover every sent
message, print the result, exit 0 if kept else 1. "status" -> a status line.

Why it looks like this:
- The connect is retried only until it first succeeds (the workload may not be listening yet);
  after that it never reconnects: a second connection would hide exactly the failure the test
  is for.
- One thread sends (a message every --send-interval, so data is in flight both ways at the
  freeze); the main thread reads and checks. The gap between consecutive record arrivals is
  the stall the client saw; its longest is reported with its wall-clock ends so a plot can put
  it beside the migration's downtime.
- kept = no error, no reset, every record valid and in order, and the echo covering every
  message sent by the end.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import socket
import sys
import threading
import time

if __package__:
    from . import tcpstream as ts
else:  # run as a script: siblings live next to this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tcpstream as ts  # type: ignore[no-redef]

MAX_ERRORS = 20
GAP_LOGGED = 0.05  # s: a stall this long is listed in "gaps" (records come every ~10 ms)
GAPS_KEPT = 200


class Client:
    def __init__(self, sock: socket.socket, seed: int, send_interval: float):
        self.sock = sock
        self.send_interval = send_interval
        self.checker = ts.RecordChecker(seed)
        self.lock = threading.Lock()  # checker.digests, sent_at, msgs_sent, errors, resets
        self.out_lock = threading.Lock()
        self.stop_sending = threading.Event()
        self.stopped = threading.Event()  # stdin said stop (or EOF)
        self.sent_at: list[float] = [0.0]  # monotonic send time of message k at [k]
        self.msgs_sent = 0
        self.echoed = 0
        self.max_echo = 0.0
        self.bytes = 0
        self.records = 0
        self.errors: list[str] = []
        self.resets = 0
        self.eof = False
        self.dead = False  # the connection is unusable: nothing more to read
        self.verifying = True  # false after a check failed: the stream is out of step
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.last_mono: float | None = None
        self.max_gap = 0.0
        self.gap: list[float] | None = None
        self.gaps: list[list[float]] = []
        self.buf = bytearray()  # a partial record carried between reads

    # -- output ---------------------------------------------------------------------------
    def emit(self, obj: dict) -> None:
        with self.out_lock:
            sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
            sys.stdout.flush()

    def fail(self, text: str, *, reset: bool = False) -> None:
        with self.lock:
            if reset:
                self.resets += 1
            if len(self.errors) < MAX_ERRORS:
                self.errors.append(text)
        self.emit({"event": "error", "error": text, "t": time.time()})

    def net_error(self, where: str, e: OSError) -> None:
        reset = e.errno in ts.RESET_ERRNOS
        self.dead = True
        self.stop_sending.set()
        self.fail(f"{where}: {'connection reset' if reset else 'error'} "
                  f"({errno.errorcode.get(e.errno or 0, e.errno)}: {e.strerror})", reset=reset)

    # -- sending --------------------------------------------------------------------------
    def sender(self) -> None:
        nxt = time.monotonic()
        while not self.stop_sending.is_set():
            with self.lock:
                n = self.msgs_sent + 1
                msg = ts.encode_message(n)
                # counted before the send: a record may echo it before sendall returns
                self.checker.sent(msg)
                self.sent_at.append(time.monotonic())
                self.msgs_sent = n
            try:
                self.sock.sendall(msg)
            except OSError as e:
                if not self.dead:
                    self.net_error(f"send of message {n}", e)
                return
            nxt += self.send_interval
            delay = nxt - time.monotonic()
            if delay < -1.0:
                nxt = time.monotonic()  # starved: do not burst to catch up
            self.stop_sending.wait(max(delay, 0))

    # -- receiving ------------------------------------------------------------------------
    def on_data(self, data: bytes) -> None:
        now_m, now = time.monotonic(), time.time()
        buf = self.buf
        self.bytes += len(data)
        buf += data
        n = len(buf) // ts.REC_SIZE
        if not n:
            return
        if self.t_first is None:
            self.t_first = now
            self.emit({"event": "first_record", "t": now})
        elif self.last_mono is not None:
            gap = now_m - self.last_mono
            if gap > self.max_gap:
                self.max_gap = gap
                self.gap = [self.t_last, now]
            if gap >= GAP_LOGGED and len(self.gaps) < GAPS_KEPT:
                # every stall, not just the longest: a run freezes its source more than once
                # (the criu backend's stop-and-copy baseline), and each freeze has its own
                self.gaps.append([self.t_last, now, round(gap * 1000, 3)])
        self.last_mono, self.t_last = now_m, now
        for i in range(n):
            rec = bytes(buf[i * ts.REC_SIZE:(i + 1) * ts.REC_SIZE])
            self.records += 1
            if not self.verifying:
                continue
            with self.lock:
                try:
                    got = self.checker.check(rec)
                except ts.TcpStreamError as e:
                    err = str(e)
                else:
                    err = None
                    rx = got["rx_msgs"]
                    for k in range(self.echoed + 1, rx + 1):
                        self.max_echo = max(self.max_echo, now_m - self.sent_at[k])
                    self.echoed = max(self.echoed, rx)
            if err is not None:
                self.verifying = False
                self.fail(err)
        del buf[:n * ts.REC_SIZE]

    def read_until(self, done, deadline: float | None) -> None:
        """Read and check records until done() or the deadline (monotonic) or the end."""
        while not self.dead and not done():
            timeout = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            if timeout <= 0:
                return
            r, _, _ = select.select([self.sock], [], [], timeout)
            if not r:
                continue
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as e:
                self.net_error("recv", e)
                return
            if not data:
                self.eof = self.dead = True
                self.stop_sending.set()
                self.fail(f"server closed the connection after record {self.records}")
                return
            self.on_data(data)

    def status(self) -> dict:
        with self.lock:
            return {"bytes": self.bytes, "records": self.records,
                    "max_gap_ms": round(self.max_gap * 1000, 3), "gap": self.gap,
                    "gaps": list(self.gaps), "resets": self.resets, "errors": list(self.errors),
                    "msgs_sent": self.msgs_sent, "msgs_echoed": self.echoed,
                    "max_echo_ms": round(self.max_echo * 1000, 3), "t_first": self.t_first,
                    "t_last": self.t_last}

    def result(self) -> dict:
        st = self.status()
        if self.buf:
            st["errors"].append(f"{len(self.buf)} bytes of a partial record at the end")
        if st["msgs_echoed"] < st["msgs_sent"] and not st["errors"]:
            st["errors"].append(f"echo covers {st['msgs_echoed']} of {st['msgs_sent']} "
                                "messages sent")
        if not st["records"] and not st["errors"]:
            st["errors"].append("no record received")
        st["kept"] = not st["errors"] and st["resets"] == 0
        return {"event": "result", **st}


def stdin_watcher(cl: Client) -> None:
    """stop / EOF ends the run; status prints where it stands (for a controller that waits)."""
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "stop":
            break
        if cmd == "status":
            cl.emit({"event": "status", **cl.status()})
    cl.stopped.set()


def connect(host: str, port: int, timeout: float) -> socket.socket:
    """Retry until the first success or the timeout: the workload may not be listening yet."""
    end = time.monotonic() + timeout
    last: OSError | None = None
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise OSError(last.errno if last else errno.ETIMEDOUT,
                          f"no connection to {host}:{port} in {timeout:g} s"
                          + (f" (last: {last.strerror or last})" if last else ""))
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(min(left, 2.0))
        try:
            s.connect((host, port))
        except OSError as e:
            s.close()
            last = e
            time.sleep(min(0.05, max(end - time.monotonic(), 0)))
            continue
        s.settimeout(None)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tcp_client.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--connect", required=True, metavar="ADDR:PORT")
    ap.add_argument("--seed", type=int, required=True, help="the workload's --seed")
    ap.add_argument("--send-interval", type=float, default=0.01)
    ap.add_argument("--drain", type=float, default=5.0,
                    help="after stop: seconds to wait for the echo to cover every message")
    ap.add_argument("--connect-timeout", type=float, default=30.0)
    a = ap.parse_args(argv)
    host, _, port = a.connect.rpartition(":")
    try:
        sock = connect(host, int(port), a.connect_timeout)
    except (OSError, ValueError) as e:
        print(json.dumps({"event": "result", "kept": False, "bytes": 0, "records": 0,
                          "max_gap_ms": 0, "gap": None, "resets": 0,
                          "errors": [f"connect: {e}"], "msgs_sent": 0, "msgs_echoed": 0,
                          "max_echo_ms": 0, "t_first": None, "t_last": None},
                         sort_keys=True), flush=True)
        return 1
    cl = Client(sock, a.seed, a.send_interval)
    cl.emit({"event": "connected", "t": time.time(), "local": list(sock.getsockname()),
             "peer": list(sock.getpeername())})
    threading.Thread(target=stdin_watcher, args=(cl,), daemon=True).start()
    sender = threading.Thread(target=cl.sender, daemon=True)
    sender.start()
    cl.read_until(cl.stopped.is_set, None)
    cl.stop_sending.set()
    sender.join(5)
    # drain: the echo must catch up with every message sent (the sender has stopped)
    cl.read_until(lambda: cl.echoed >= cl.msgs_sent, time.monotonic() + a.drain)
    if cl.dead and not cl.stopped.is_set():
        cl.stopped.wait()  # report only when asked: the controller reads the result at stop
    res = cl.result()
    try:
        sock.close()
    except OSError:
        pass
    cl.emit(res)
    return 0 if res["kept"] else 1


if __name__ == "__main__":
    sys.exit(main())
