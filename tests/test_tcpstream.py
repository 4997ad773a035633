"""The TCP record stream of ``migrate-test --tcp`` (issue 12) without guests: the protocol
helpers, the workload serving it on loopback to the real client process, the failures the
client must catch (corrupt, skipped, chain, reset, stall), and the stream surviving a copy of
the region onto a fresh one with the same kernel socket handed over (the same-kernel version of
what TCP_REPAIR does across nodes)."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

from labkit.experiment.tcp import place_gaps
from labkit.payloads import tcpstream as ts
from labkit.payloads import workload as wlmod

PAYLOADS = Path(ts.__file__).parent
SEED = 23

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux sockets (SO_RCVLOWAT)")


# --- the protocol helpers -----------------------------------------------------------------------
def _records(seed: int, n: int, rx: tuple[int, bytes] = (0, ts.ZERO16)) -> list[bytes]:
    out, c = [], ts.chain0(seed)
    for i in range(1, n + 1):
        c = ts.chain_next(c, i)
        out.append(ts.encode_record(i, 100 + i, rx[0], rx[1], c))
    return out


def test_record_and_message_layout():
    rec = _records(SEED, 1)[0]
    assert len(rec) == ts.REC_SIZE == 64 and rec[:4] == b"LKR1"
    got = ts.decode_record(rec)
    assert got["rec_no"] == 1 and got["step"] == 101 and got["rx_msgs"] == 0
    assert got["chain"] == ts.chain_at(SEED, 1) != ts.chain_at(SEED + 1, 1)
    msg = ts.encode_message(7)
    assert len(msg) == ts.MSG_SIZE == 32 and ts.decode_message(msg) == 7
    assert ts.STATE_OFF + ts.STATE.size <= wlmod.PAGE
    # the default chain seed is read where the workload header keeps its seed
    assert ts.WORKLOAD_SEED_OFF == wlmod.STEP_OFF + 8


def test_decode_names_what_is_wrong():
    rec = bytearray(_records(SEED, 1)[0])
    rec[20] ^= 1
    with pytest.raises(ts.TcpStreamError, match=r"record \(rec_no field 1\): crc mismatch"):
        ts.decode_record(bytes(rec))
    with pytest.raises(ts.TcpStreamError, match="bad record magic"):
        ts.decode_record(b"XXXX" + bytes(rec[4:]))
    msg = bytearray(ts.encode_message(3))
    msg[20] ^= 0xFF
    with pytest.raises(ts.TcpStreamError, match=r"message \(msg_no field 3\): crc mismatch"):
        ts.decode_message(bytes(msg))
    # a well-formed message whose payload is not the one its number implies
    body = ts.MESSAGE.pack(ts.MSG_MAGIC, 3, ts.msg_payload(4), 0)[:-4]
    forged = body + struct.pack("<I", zlib.crc32(body))
    with pytest.raises(ts.TcpStreamError, match="field 3.: payload mismatch"):
        ts.decode_message(forged)


def test_checker_accepts_the_stream_and_names_each_fault():
    recs = _records(SEED, 50)
    ok = ts.RecordChecker(SEED)
    for r in recs:
        ok.check(r)
    assert ok.rec_no == 50

    skip = ts.RecordChecker(SEED)
    for r in recs[:40]:
        skip.check(r)
    with pytest.raises(ts.TcpStreamError, match="^record 41: expected rec_no 41, got 43$"):
        skip.check(recs[42])

    wrong_seed = ts.RecordChecker(SEED + 1)
    with pytest.raises(ts.TcpStreamError, match="^record 1: chain mismatch$"):
        wrong_seed.check(recs[0])

    # echo checks: rx_msgs beyond what was sent, a wrong digest, going backwards
    cl = ts.RecordChecker(SEED)
    m1, m2 = ts.encode_message(1), ts.encode_message(2)
    cl.sent(m1)
    d1 = ts.digest_next(ts.ZERO16, m1)
    c1, c2, c3 = (ts.chain_at(SEED, i) for i in (1, 2, 3))
    with pytest.raises(ts.TcpStreamError, match="rx_msgs 2 but only 1 messages sent"):
        cl.check(ts.encode_record(1, 0, 2, d1, c1))
    with pytest.raises(ts.TcpStreamError, match="rx_digest mismatch after 1 messages"):
        cl.check(ts.encode_record(1, 0, 1, ts.ZERO16, c1))
    cl.check(ts.encode_record(1, 0, 1, d1, c1))
    cl.sent(m2)
    with pytest.raises(ts.TcpStreamError, match="rx_msgs went back from 1 to 0"):
        cl.check(ts.encode_record(2, 0, 0, ts.ZERO16, c2))
    d2 = ts.digest_next(d1, m2)
    cl.check(ts.encode_record(2, 0, 2, d2, c2))
    cl.check(ts.encode_record(3, 0, 2, d2, c3))
    assert (cl.rec_no, cl.rx_msgs) == (3, 2)


def test_region_state_and_quiescent():
    mem = bytearray(wlmod.PAGE)
    assert not ts.has_state(mem) and ts.quiescent(mem)
    with pytest.raises(ts.TcpStreamError, match="no TCP stream state"):
        ts.read_state(mem)
    svc = ts.TcpService.listen("127.0.0.1", 0, mem, seed=SEED)
    try:
        st = ts.read_state(mem)
        assert st["status"] == ts.LISTENING and st["rec_no"] == 0
        assert st["chain"] == ts.chain0(SEED) and ts.quiescent(mem)
        mem[ts.BUSY_OFF] = 1
        assert not ts.quiescent(bytes(mem[:wlmod.PAGE]))
    finally:
        svc.close()


# --- running things -----------------------------------------------------------------------------
class Lines:
    """JSON lines from a process's stdout, read by a thread so waits have timeouts."""

    def __init__(self, p: subprocess.Popen):
        self.p = p
        self.q: queue.Queue = queue.Queue()
        self.seen: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.p.stdout:
            self.q.put(json.loads(raw))
        self.q.put(None)

    def wait(self, pred, timeout: float = 20.0) -> dict:
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"nothing matched in {timeout} s; seen {self.seen[-5:]}")
            try:
                obj = self.q.get(timeout=left)
            except queue.Empty:
                continue
            if obj is None:
                raise AssertionError(f"process ended; seen {self.seen[-5:]}: "
                                     f"{self.p.stderr.read().decode()[-500:]}")
            self.seen.append(obj)
            if pred(obj):
                return obj

    def event(self, name: str, timeout: float = 20.0) -> dict:
        return self.wait(lambda o: o.get("event") == name, timeout)


class ClientProc:
    def __init__(self, port: int, seed: int = SEED, *extra: str):
        self.p = subprocess.Popen(
            [sys.executable, str(PAYLOADS / "tcp_client.py"), "--connect", f"127.0.0.1:{port}",
             "--seed", str(seed), "--send-interval", "0.005", "--connect-timeout", "20", *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = Lines(self.p)

    def status(self) -> dict:
        self.p.stdin.write(b"status\n")
        self.p.stdin.flush()
        return self.out.event("status")

    def wait_records(self, n: int, timeout: float = 20.0) -> dict:
        end = time.monotonic() + timeout
        while True:
            st = self.status()
            if st["records"] >= n:
                return st
            assert time.monotonic() < end, f"only {st['records']} records in {timeout} s: {st}"
            time.sleep(0.02)

    def stop(self) -> tuple[dict, int]:
        self.p.stdin.write(b"stop\n")
        self.p.stdin.flush()
        res = self.out.event("result", 30)
        return res, self.p.wait(10)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


class WorkloadProc:
    def __init__(self, *extra: str):
        self.p = subprocess.Popen(
            [sys.executable, str(PAYLOADS / "workload.py"), "run", "--size", "2M", "--rate",
             "2000", "--batch", "20", "--timed", "--seed", str(SEED),
             "--tcp-serve", "127.0.0.1:0", *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = Lines(self.p)
        self.ready = self.out.event("ready")
        self.port = self.ready["tcp"]["local"][1]

    def call(self, cmd: str) -> dict:
        self.p.stdin.write((cmd + "\n").encode())
        self.p.stdin.flush()
        return self.out.wait(lambda o: "ok" in o)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGCONT)
            self.p.kill()
            self.p.wait()


@pytest.fixture
def procs():
    started: list = []
    yield started
    for p in started:
        p.kill()


def test_workload_serves_the_client_and_the_echo_covers(procs):
    wl = WorkloadProc()
    procs.append(wl)
    assert wl.ready["tcp"]["listening"] and wl.ready["tcp"]["records"] == 0
    cl = ClientProc(wl.port)
    procs.append(cl)
    cl.out.event("connected")
    cl.out.event("first_record")
    first = cl.wait_records(30)
    later = cl.wait_records(first["records"] + 30)
    assert later["msgs_sent"] > first["msgs_sent"]
    info = wl.call("info")["tcp"]
    assert info["connected"] and not info["listening"] and info["error"] is None
    assert info["records"] >= later["records"] and info["rx_msgs"] > 0
    res, rc = cl.stop()
    assert rc == 0 and res["kept"] is True, res
    assert res["resets"] == 0 and res["errors"] == []
    assert res["records"] >= later["records"] and res["bytes"] == 64 * res["records"]
    assert res["msgs_echoed"] == res["msgs_sent"] > 0
    assert 0 < res["max_gap_ms"] < 5000 and res["t_first"] <= res["t_last"]
    # the client closed: the workload's service stops, the workload keeps stepping
    step = wl.call("info")["step"]
    end = time.monotonic() + 20
    while True:
        info = wl.call("info")
        if info["tcp"]["status"] == "stopped" and info["step"] > step:
            break
        assert time.monotonic() < end, info
        time.sleep(0.02)
    assert "peer closed" in info["tcp"]["error"]


def test_a_silent_stall_grows_the_gap_and_the_stream_continues(procs):
    wl = WorkloadProc()
    procs.append(wl)
    cl = ClientProc(wl.port)
    procs.append(cl)
    cl.wait_records(20)
    t0 = time.time()
    os.kill(wl.p.pid, signal.SIGSTOP)
    time.sleep(0.6)  # the stall being measured, not a wait for state
    os.kill(wl.p.pid, signal.SIGCONT)
    t1 = time.time()
    n = cl.status()["records"]
    cl.wait_records(n + 30)
    res, rc = cl.stop()
    assert rc == 0 and res["kept"] is True, res
    assert res["max_gap_ms"] >= 550, res
    g0, g1 = res["gap"]
    assert t0 - 0.5 <= g0 <= t0 + 0.1 and t1 - 0.1 <= g1, (t0, t1, res["gap"])
    assert res["msgs_echoed"] == res["msgs_sent"]
    # every stall is listed with the length max_gap_ms measures, so the stall run.json picks
    # as the freeze's compares with max_gap_ms exactly
    assert max(g[2] for g in res["gaps"]) == res["max_gap_ms"], res["gaps"]
    out = dict(res)
    place_gaps(out, 0.0, freeze=t0 + 0.05, resumed=t1 - 0.05)
    assert out["freeze_gap_ms"] == res["max_gap_ms"], out


def test_kill_9_of_the_workload_is_a_failure(procs):
    wl = WorkloadProc()
    procs.append(wl)
    cl = ClientProc(wl.port)
    procs.append(cl)
    cl.wait_records(10)
    wl.p.kill()
    err = cl.out.event("error")
    assert "closed the connection" in err["error"] or "reset" in err["error"], err
    res, rc = cl.stop()
    assert rc == 1 and res["kept"] is False and res["errors"], res


def test_client_waits_for_a_late_listener_then_never_reconnects(procs):
    with socket.socket() as s:  # a free port, nobody listening yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cl = ClientProc(port)
    procs.append(cl)
    time.sleep(0.3)  # let a few connects be refused first
    mem = bytearray(wlmod.PAGE)
    svc = ts.TcpService.listen("127.0.0.1", port, mem, seed=SEED)
    with Pumper(svc):
        cl.out.event("first_record")
    svc.close()  # ends the connection: the client must not come back
    cl.out.event("error")
    res, rc = cl.stop()
    assert rc == 1 and not res["kept"]
    with socket.socket() as ls:  # nobody connects again to a new listener on the port
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", port))
        ls.listen(1)
        ls.settimeout(0.3)
        with pytest.raises(TimeoutError):
            ls.accept()


# --- the service in-process: faults and the region copy ----------------------------------------
class Pumper:
    """Drives a TcpService the way the workload does (a pump per step, ~200 steps/s)."""

    def __init__(self, svc: ts.TcpService, interval: float = 0.005):
        self.svc, self.interval = svc, interval
        self.halt = threading.Event()
        self.step = 0
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.halt.is_set():
            self.step += 1
            self.svc.pump(self.step)
            self.halt.wait(self.interval)

    def __enter__(self) -> Pumper:
        self.t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.halt.set()
        self.t.join(5)


def _serve(seed: int = SEED) -> tuple[ts.TcpService, bytearray, int]:
    mem = bytearray(wlmod.PAGE)
    svc = ts.TcpService.listen("127.0.0.1", 0, mem, seed=seed)
    return svc, mem, svc.local[1]


def _move(svc: ts.TcpService, mem: bytearray, tamper=None) -> tuple[ts.TcpService, bytearray]:
    """What the migration does, same-kernel: the region copied byte for byte onto a fresh one,
    the connection (here: a dup of the fd, the kernel state unchanged) adopted there, the old
    process's handle gone."""
    new = bytearray(mem)
    if tamper is not None:
        tamper(new)
    sock = socket.socket(fileno=os.dup(svc.sock.fileno()))
    svc.close()
    return ts.TcpService.adopt(sock, new), new


def test_region_copy_and_adopt_continue_the_chain(procs):
    svc, mem, port = _serve()
    cl = ClientProc(port)
    procs.append(cl)
    with Pumper(svc):
        cl.wait_records(30)
    st = ts.read_state(mem)
    assert st["rec_no"] >= 30 and st["rx_msgs"] > 0 and ts.quiescent(mem)
    time.sleep(0.2)  # in flight both ways while "frozen": the client keeps sending
    svc2, mem2 = _move(svc, mem)
    assert svc2.info()["rec_no"] == st["rec_no"] and not svc2.copied_busy
    with Pumper(svc2):
        cl.wait_records(st["rec_no"] + 30)
        res, rc = cl.stop()
    assert rc == 0 and res["kept"] is True, res
    assert res["msgs_echoed"] == res["msgs_sent"] and res["max_gap_ms"] >= 150
    assert ts.read_state(mem2)["rec_no"] >= res["records"]
    svc2.close()


def test_unsent_tail_in_the_region_goes_first_after_the_move(procs):
    """The client stops reading: buffers fill, a record waits in the region's tx_pend. The
    region copy carries it, and the adopted service sends it before the next record."""
    svc, mem, port = _serve()
    cl = ClientProc(port)
    procs.append(cl)
    with Pumper(svc):
        cl.wait_records(5)
    svc.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    os.kill(cl.p.pid, signal.SIGSTOP)
    try:
        for i in range(400_000):
            svc.pump(i)
            if ts.read_state(mem)["tx_pend"]:
                break
        st = ts.read_state(mem)
        assert st["tx_pend"], "send buffer never filled"
        svc2, mem2 = _move(svc, mem)
    finally:
        os.kill(cl.p.pid, signal.SIGCONT)
    with Pumper(svc2):
        cl.wait_records(st["rec_no"] + 10, timeout=30)
        res, rc = cl.stop()
    assert rc == 0 and res["kept"] is True, res
    svc2.close()


def test_messages_folded_but_not_yet_discarded_are_not_counted_twice(procs):
    """A freeze between folding messages into the region and dropping them from the kernel
    queue: after the move they are still queued, and the msg_no check drops them."""

    class FrozenBeforeDiscard(ts.TcpService):
        def _discard(self, n: int) -> None:
            self.skipped = n

    svc, mem, port = _serve()
    cl = ClientProc(port)
    procs.append(cl)
    with Pumper(svc):
        cl.wait_records(10)
    svc.__class__ = FrozenBeforeDiscard
    svc.skipped = 0
    end = time.monotonic() + 10
    while not svc.skipped:
        assert time.monotonic() < end
        svc.receive()
        time.sleep(0.01)
    counted = ts.read_state(mem)["rx_msgs"]
    svc2, mem2 = _move(svc, mem)
    svc2.receive()
    assert ts.read_state(mem2)["rx_msgs"] >= counted
    with Pumper(svc2):
        cl.wait_records(ts.read_state(mem2)["rec_no"] + 20)
        res, rc = cl.stop()
    assert rc == 0 and res["kept"] is True, res
    assert res["msgs_echoed"] == res["msgs_sent"]
    svc2.close()


@pytest.mark.parametrize("fault,want", [
    ("skip", "record {n}: expected rec_no {n}, got {m}"),
    ("chain", "record {n}: chain mismatch"),
])
def test_a_region_not_carried_whole_is_caught(procs, fault, want):
    svc, mem, port = _serve()
    cl = ClientProc(port)
    procs.append(cl)
    with Pumper(svc):
        cl.wait_records(10)
    n = ts.read_state(mem)["rec_no"]

    def tamper(region: bytearray) -> None:
        if fault == "skip":  # the region from a later moment than the socket
            struct.pack_into("<Q16s", region, ts._REC_OFF, n + 2, ts.chain_at(SEED, n + 2))
        else:  # a stale or damaged chain
            region[ts._REC_OFF + 8] ^= 0x55

    svc2, _ = _move(svc, mem, tamper)
    with Pumper(svc2):
        err = cl.out.event("error")
        res, rc = cl.stop()
    assert err["error"] == want.format(n=n + 1, m=n + 3), err
    assert rc == 1 and res["kept"] is False and res["resets"] == 0
    svc2.close()


def test_a_corrupted_record_is_caught(procs):
    ls = socket.create_server(("127.0.0.1", 0))
    cl = ClientProc(ls.getsockname()[1])
    procs.append(cl)
    conn, _ = ls.accept()
    recs = _records(SEED, 6)
    bad = bytearray(recs[4])
    bad[30] ^= 0x10
    conn.sendall(b"".join(recs[:4]) + bytes(bad) + recs[5])
    err = cl.out.event("error")
    assert err["error"] == "record 5: crc mismatch"
    res, rc = cl.stop()
    assert rc == 1 and res["kept"] is False and res["records"] == 6
    conn.close()
    ls.close()


def test_a_reset_is_counted(procs):
    svc, mem, port = _serve()
    cl = ClientProc(port)
    procs.append(cl)
    with Pumper(svc):
        cl.wait_records(10)
    svc.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    svc.close()  # linger 0: an RST, not a FIN
    err = cl.out.event("error")
    assert "connection reset" in err["error"], err
    res, rc = cl.stop()
    assert rc == 1 and res["kept"] is False and res["resets"] == 1, res


def test_a_socket_error_stops_the_service_not_the_caller():
    svc, mem, port = _serve()
    c = socket.create_connection(("127.0.0.1", port))
    for _ in range(100):
        svc.pump(1)
        if svc.sock is not None:
            break
    assert svc.info()["connected"]
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    end = time.monotonic() + 10
    while svc.info()["status"] != "stopped":
        assert time.monotonic() < end
        svc.pump(2)  # never raises
        time.sleep(0.01)
    info = svc.info()
    assert not info["connected"] and info["error"] and svc.fileno() is None
    assert ts.read_state(mem)["status"] == ts.STOPPED and ts.read_state(mem)["err"] != 0


def test_a_bad_client_message_stops_the_service_with_its_number():
    svc, mem, port = _serve()
    c = socket.create_connection(("127.0.0.1", port))
    try:
        bad = bytearray(ts.encode_message(2))
        bad[25] ^= 1
        c.sendall(ts.encode_message(1) + bytes(bad))
        end = time.monotonic() + 10
        while svc.info()["status"] != "stopped":
            assert time.monotonic() < end, svc.info()
            svc.pump(1)
            time.sleep(0.01)
        assert svc.info()["error"] == "message 2: crc mismatch"
        assert ts.read_state(mem)["rx_msgs"] == 1
    finally:
        c.close()
