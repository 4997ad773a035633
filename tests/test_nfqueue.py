"""nfqueue.Hold on this host's kernel, in a network namespace of the test's own (so the rule,
the queue and the connections are nobody else's): packets to a TCP service are held (the
client's data is not acknowledged, its retransmissions are held too), delivered in order after
release(), and the rule never outlives the Hold. And once in a guest (slow, vm), where the
migration uses it: its own kernel's modules, a client on the lab LAN through a lan port."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from labkit.payloads import nfqueue

CLONE_NEWNET = 0x40000000
SIOCOUTQ = 0x5411  # bytes in a TCP socket's send queue not yet acknowledged (or sent)
ADDR = "127.0.0.1"
_libc = ctypes.CDLL(None, use_errno=True)

PROBE = f"""
import ctypes, sys
sys.path.insert(0, {os.path.dirname(nfqueue.__file__)!r})
import nfqueue
if ctypes.CDLL(None, use_errno=True).unshare({CLONE_NEWNET}) != 0:
    sys.exit("cannot make a network namespace")
try:
    nfqueue.Hold("127.0.0.1", 9).close()
except Exception as e:
    sys.exit(str(e))
"""


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (a network namespace and iptables rules of the test's own)"
    if not shutil.which("iptables"):
        return "no iptables"
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                       timeout=60)
    return None if r.returncode == 0 else f"NFQUEUE on this kernel: {r.stderr.strip()}"


WHY = _why_not()
on_host = pytest.mark.skipif(WHY is not None, reason=f"nfqueue: {WHY or ''}")


@pytest.fixture
def netns() -> Iterator[None]:
    """This thread (the test's; threads and processes it starts follow) in a fresh network
    namespace with lo up; back in the original one afterwards."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        assert _libc.unshare(CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=30)
            yield
        finally:
            assert _libc.setns(home, CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(home)


def _unacked(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock, SIOCOUTQ, b"\0" * 4))[0]


def _retransmissions(sock: socket.socket) -> int:
    """tcp_info.tcpi_total_retrans: a segment the peer never acknowledged was sent again."""
    return struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104),
                              100)[0]


def _until(cond, timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what or cond}"
        time.sleep(0.01)


def _pair(port: int) -> tuple[socket.socket, socket.socket, socket.socket]:
    """listener, client, server end of one connection on lo (client: no Nagle, so every send
    is its own segment, held one by one)."""
    lst = socket.socket()
    lst.bind((ADDR, port))
    lst.listen(4)
    client = socket.create_connection((ADDR, port), timeout=10)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server, _ = lst.accept()
    server.settimeout(10)
    return lst, client, server


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


@on_host
def test_held_packets_are_not_acknowledged_and_arrive_in_order_after_release(netns) -> None:
    lst, client, server = _pair(7077)
    chunks = [bytes([65 + i]) * (100 + i) for i in range(5)]
    with lst, client, server:
        with nfqueue.Hold(ADDR, 7077) as hold:
            assert nfqueue.rule_present(ADDR, 7077)
            for c in chunks:
                client.send(c)
            _until(lambda: hold.held() >= len(chunks), what="the segments to be held")
            # the client retransmits what was never acknowledged, and that is held as well
            _until(lambda: _retransmissions(client) >= 1 and hold.held() > len(chunks),
                   what="a held retransmission")
            assert _unacked(client) == sum(map(len, chunks))
            server.setblocking(False)
            with pytest.raises(BlockingIOError):
                server.recv(1)
            server.setblocking(True)
            server.settimeout(10)
            held = hold.held()
            hold.release()
            assert not nfqueue.rule_present(ADDR, 7077)
            assert _recv_exactly(server, sum(map(len, chunks))) == b"".join(chunks)
            _until(lambda: _unacked(client) == 0, what="the client's data to be acknowledged")
        stats = hold.stats()
        assert stats["held"] >= held and stats["released"] == stats["held"]
        assert stats["lost"] == 0 and stats["verdict_errors"] == 0
        assert stats["max_hold_ms"] > 0
        # not held any more: new data goes straight through
        client.send(b"after")
        assert _recv_exactly(server, 5) == b"after"


@on_host
def test_a_held_syn_meets_the_socket_that_appears_before_release(netns) -> None:
    """The migration's case: no socket for the service yet (the kernel would answer with a
    reset), the packet is held, the socket appears, release delivers the packet to it."""
    with nfqueue.Hold(ADDR, 7078) as hold:
        client = socket.socket()
        client.setblocking(False)
        assert client.connect_ex((ADDR, 7078)) == errno.EINPROGRESS
        _until(lambda: hold.held() >= 1, what="the SYN to be held")
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind((ADDR, 7078))
        lst.listen(1)
        hold.release()
    with client, lst:
        lst.settimeout(10)
        server, _ = lst.accept()
        with server:
            assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0  # no reset
            client.settimeout(10)
            client.sendall(b"hi")
            server.settimeout(10)
            assert _recv_exactly(server, 2) == b"hi"


@on_host
def test_the_rule_is_gone_even_when_the_holder_raises(netns) -> None:
    with pytest.raises(ZeroDivisionError):
        with nfqueue.Hold(ADDR, 7079):
            assert nfqueue.rule_present(ADDR, 7079)
            1 / 0  # noqa: B018
    assert not nfqueue.rule_present(ADDR, 7079)
    # and the queue was let go: the next Hold binds it again
    with nfqueue.Hold(ADDR, 7079) as again:
        again.release()
        again.release()  # idempotent
    assert not nfqueue.rule_present(ADDR, 7079)


@on_host
def test_a_taken_queue_fails_cleanly_without_a_rule(netns) -> None:
    with nfqueue.Hold(ADDR, 7080, queue_num=5):
        with pytest.raises(nfqueue.HoldError, match="queue 5: cannot bind"):
            nfqueue.Hold(ADDR, 7081, queue_num=5)
        assert not nfqueue.rule_present(ADDR, 7081, queue_num=5)
    assert not nfqueue.rule_present(ADDR, 7080, queue_num=5)


@on_host
def test_an_iptables_error_is_not_taken_for_an_absent_rule(netns) -> None:
    """Only iptables' "no such rule" (exit 1) means absent; anything else (here a bad address,
    exit 2; on a node a lock timeout) is an error, so cleanup never reports a hold cleared
    that is still there."""
    assert nfqueue.rule_present(ADDR, 7084) is False
    with pytest.raises(nfqueue.HoldError, match="exit 2"):
        nfqueue.rule_present("300.1.1.1", 7084)
    with pytest.raises(nfqueue.HoldError, match="exit 2"):
        nfqueue.clear("300.1.1.1", 7084)


def _cli_hold(port: int) -> subprocess.Popen:
    """``nfqueue.py hold`` on ADDR:port, holding by the time this returns."""
    proc = subprocess.Popen([sys.executable, nfqueue.__file__, "hold", "--address", ADDR,
                             "--port", str(port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(proc.stdout.readline())["event"] == "holding"
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


@on_host
def test_cli_holds_until_stdin_then_prints_its_stats(netns) -> None:
    lst, client, server = _pair(7082)
    with lst, client, server:
        proc = _cli_hold(7082)
        try:
            client.send(b"held by the cli")
            _until(lambda: _retransmissions(client) >= 1, what="a retransmission (held)")
            assert _unacked(client) == 15
            out, _ = proc.communicate("release\n", timeout=30)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == 0
        stats = json.loads(out)
        assert stats["event"] == "released" and stats["held"] >= 1
        assert stats["released"] == stats["held"]
        assert _recv_exactly(server, 15) == b"held by the cli"
        assert not nfqueue.rule_present(ADDR, 7082)


@on_host
def test_a_hold_left_by_a_killed_holder_is_cleared_when_the_address_is_given_up(netns) -> None:
    """A restore agent SIGKILLed while holding leaves its rule: the service's packets then go
    to a queue nobody reads, and the kernel drops them. ``netmove.py give --port`` (what the
    run's cleanup runs on both nodes) removes it, and packets flow again."""
    from labkit.payloads import netmove

    lst, client, server = _pair(7083)
    with lst, client, server:
        proc = _cli_hold(7083)
        proc.kill()
        proc.wait()
        assert nfqueue.rule_present(ADDR, 7083)  # left behind
        client.send(b"after the kill")
        _until(lambda: _retransmissions(client) >= 1, what="a retransmission (dropped)")
        assert _unacked(client) == 14
        r = subprocess.run([sys.executable, netmove.__file__, "give", "--address", ADDR,
                            "--port", "7083"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [f"removed 1 packet hold rule(s) on {ADDR}:7083", "absent"]
        assert not nfqueue.rule_present(ADDR, 7083)
        assert _recv_exactly(server, 14) == b"after the kill"  # the retransmission got through
        # nothing left: giving it up again says nothing of holds
        r = subprocess.run([sys.executable, netmove.__file__, "give", "--address", ADDR,
                            "--port", "7083"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "hold" not in r.stdout, r


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("iptables"),
                    reason="needs root and iptables (rules in a network namespace of its own)")
def test_criu_locks_left_behind_are_swept_when_the_address_is_given_up(netns) -> None:
    """CRIU's lock rules (netlock, CRIU's own spec) left by a killed driver or criu drop a
    later connection that reuses the client's port. ``netmove.py give --port`` sweeps every
    lock of that service, whatever its peer, and leaves other services' locks alone."""
    from labkit.payloads import netlock, netmove

    port, reused = 7084, 47001
    netlock.lock([(f"{ADDR}:{port}", f"{ADDR}:{reused}"), (f"{ADDR}:{port}", f"{ADDR}:47002")])
    netlock.lock([(f"{ADDR}:7085", f"{ADDR}:{reused}")])  # another service: not ours to touch
    # and a rule of someone else's that only resembles CRIU's (a comment): left alone too
    other = ["INPUT", *netlock.lock_rules(f"{ADDR}:{port}", f"{ADDR}:47003")[0][1:-2],
             "-m", "comment", "--comment", "it's mine", "-j", "DROP"]
    subprocess.run(["iptables", "-w", "-I", *other], check=True, timeout=60)
    assert netlock.stale(ADDR, port) == {f"{ADDR}:{reused}", f"{ADDR}:47002"}
    with socket.socket() as lst:
        lst.bind((ADDR, port))
        lst.listen(4)

        def connect() -> None:
            with socket.socket() as c:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                c.bind((ADDR, reused))
                c.settimeout(1.5)
                c.connect((ADDR, port))
                lst.accept()[0].close()

        with pytest.raises(TimeoutError):
            connect()  # the stale lock drops the SYN
        r = subprocess.run([sys.executable, netmove.__file__, "give", "--address", ADDR,
                            "--port", str(port)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [f"removed 4 CRIU lock rule(s) on {ADDR}:{port}",
                                         "absent"]
        assert netlock.stale(ADDR, port) == set()
        assert netlock.stale(ADDR, 7085) == {f"{ADDR}:{reused}"}
        assert subprocess.run(["iptables", "-w", "-C", *other], timeout=60).returncode == 0
        connect()  # the same client port gets through now


# -- in a guest, on the lab LAN ---------------------------------------------------------------

CONNECT = r"""
import json, socket, time
t0 = time.monotonic()
c = socket.create_connection(("10.77.0.1", 22), timeout=60)
connect_ms = (time.monotonic() - t0) * 1000
banner = c.makefile("rb").readline().decode(errors="replace").strip()
print(json.dumps({"connect_ms": connect_ms, "banner": banner}))
"""


@pytest.mark.slow
@pytest.mark.vm
def test_a_guest_holds_a_lan_clients_syn_and_releases_it(tmp_path) -> None:
    """The guest's kernel (its nfnetlink_queue/xt_NFQUEUE loaded on demand) holds a lan port
    client's connection attempt to the guest's sshd on its LAN address; released, the client
    connects (no reset, no refusal) and reads the banner."""
    from labkit import lanport
    from labkit.fake import vmimage
    from labkit.fake.harness import start_fake_lab

    for why in (vmimage.have_qemu(), lanport.why_not(),
                None if os.geteuid() == 0 else "the guest's user must be root for iptables"):
        if why:
            pytest.skip(why)
    hold_s = 8.0
    lab = start_fake_lab(tmp_path / "lab", count=1, kind="vm", power_delay=(0.05, 0.1))
    try:
        run = [sys.executable, "-m", "labkit.cli"]
        r = subprocess.run([*run, "power-on", "--wait", "ssh"], env=lab.env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        home = lab.state_dir / "nodes" / "node1" / "disk" / "home"  # the guest's /lab/home
        shutil.copy(nfqueue.__file__, home / "nfqueue.py")
        out = home / "hold.out"
        guest = subprocess.Popen(
            [*run, "run", "-n", "node1", "--json", "--",
             f"python3 /lab/home/nfqueue.py hold --address 10.77.0.1 --port 22 "
             f"--seconds {hold_s} >/lab/home/hold.out 2>&1"],
            env=lab.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            _until(lambda: guest.poll() is not None or "holding" in (
                out.read_text() if out.exists() else ""), timeout=120, what="the guest's hold")
            assert guest.poll() is None, guest.stdout.read()
            client = subprocess.run(lanport.LanPort.for_inventory(lab.inventory()).command(
                [sys.executable, "-c", CONNECT]), capture_output=True, text=True, timeout=120)
            report = guest.communicate(timeout=120)[0]
        finally:
            guest.kill()
            guest.wait()
        assert guest.returncode == 0, report
        assert client.returncode == 0, client.stderr
        got = json.loads(client.stdout)
        assert got["banner"].startswith("SSH-2.0-"), got
        stats = json.loads(out.read_text().splitlines()[-1])
        assert stats["event"] == "released" and stats["held"] >= 1, stats
        assert stats["released"] == stats["held"] and stats["verdict_errors"] == 0, stats
        # the client waited for the release (it started after the hold was in place)
        assert got["connect_ms"] > 1000, (got, stats)
    finally:
        lab.stop()
