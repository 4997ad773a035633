"""tcp_repair: a live connection leaves one process and goes on in another, byte-exact.

Same-kernel variant, on this host's loopback: the server end lives in a child process, which
is SIGSTOPped (as the agent freezes the workload); this test process plays the agent (finds
the socket by its local address, takes it with pidfd_getfd, saves it, closes it silently), and
a *second* child process rebuilds it and carries on. What it proves: the saved state is
complete (both queues, the sent/unsent split, sequence numbers, options, window), the rebuilt
socket is the same connection to the peer (no RST, no FIN, nothing lost, duplicated or
reordered, in either direction). What it does not: a move between two kernels or machines
(different clocks — TCP_TIMESTAMP's offset — and the address move), which the guest tests
(test_tcp_labkit.py) cover.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from labkit.payloads import tcp_repair as tr

PAYLOADS = Path(tr.__file__).parent

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0 or not tr.check()["ok"],
    reason="TCP_REPAIR needs Linux and CAP_NET_ADMIN (run as root)")


# Position-dependent bytes: any loss, duplicate or reorder changes what is read. Source text,
# because both child processes need the same function.
PATTERN = textwrap.dedent("""
    import hashlib

    def pattern(start, n, salt):
        out = bytearray()
        block = start // 32
        while len(out) < start - (start // 32) * 32 + n:
            out += hashlib.sha256(salt + block.to_bytes(8, "little")).digest()
            block += 1
        off = start - (start // 32) * 32
        return bytes(out[off:off + n])
""")
_ns: dict = {}
exec(PATTERN, _ns)  # noqa: S102 - the same function the children run
pattern = _ns["pattern"]


# first owner: accept, fill the pipe towards the client (which does not read yet) until the
# socket takes no more, never read what the client sends; report and wait
OWNER = PATTERN + textwrap.dedent("""
    import json, socket, sys
    lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen(1)
    print(json.dumps({"port": lst.getsockname()[1]}), flush=True)
    conn, _ = lst.accept(); lst.close()
    conn.setblocking(False)
    sent = 0
    while True:
        try:
            sent += conn.send(pattern(sent, 4096, b"srv"))
        except BlockingIOError:
            break
    print(json.dumps({"sent": sent}), flush=True)
    sys.stdin.read()
""")

# second owner: rebuild from the saved state on stdin, then continue the stream from where the
# first owner stopped and read everything the client sent (before and after the move)
HEIR = PATTERN + textwrap.dedent("""
    import hashlib, json, socket, sys
    sys.path.insert(0, sys.argv[1])
    import tcp_repair
    req = json.loads(sys.stdin.readline())
    sock = tcp_repair.restore(req["state"])
    info = tcp_repair.tcp_info(sock)
    print(json.dumps({"restored": True, "state": info["state"]}), flush=True)
    sock.sendall(pattern(req["sent"], req["more"], b"srv"))
    want, got = req["client_total"], bytearray()
    while len(got) < want:
        data = sock.recv(65536)
        if not data:
            break
        got += data
    print(json.dumps({"received": len(got), "sha256": hashlib.sha256(got).hexdigest()}),
          flush=True)
    sys.stdin.read()
""")


@contextlib.contextmanager
def dropped(port: int):
    """Packets to 127.0.0.1:port dropped while the connection has no owner: what the agent's
    "drop" freeze handling does (an address no host has). Without it, the peer's answer to a
    zero-window probe that lands in the gap meets no socket and the kernel resets the
    connection — a race of the test's own making, not of the move."""
    rule = ["INPUT", "-d", "127.0.0.1", "-p", "tcp", "--dport", str(port), "-j", "DROP"]
    subprocess.run(["iptables", "-w", "-I", *rule], check=True, capture_output=True, timeout=60)
    try:
        yield
    finally:
        subprocess.run(["iptables", "-w", "-D", *rule], check=True, capture_output=True,
                       timeout=60)


def sockets_of(port: int) -> str:
    """Both ends of the connection as ``ss -tinoem`` sees them (windows, RTO, backoff, queues):
    what a stalled move's failure message needs."""
    if not shutil.which("ss"):
        return "no ss here to show the sockets"
    r = subprocess.run(["ss", "-tinoem", f"( sport = :{port} or dport = :{port} )"],
                       capture_output=True, text=True, timeout=10)
    return f"ss says:\n{r.stdout}{r.stderr}"


def wait_stopped(pid: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
        time.sleep(0.001)
    raise AssertionError(f"pid {pid} did not stop")


@pytest.mark.skipif(not shutil.which("iptables"), reason="needs iptables (the drop during the "
                    "move)")
def test_connection_moves_between_processes() -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    heir = None
    moving = None
    client = socket.socket()
    try:
        port = json.loads(owner.stdout.readline())["port"]
        client.connect(("127.0.0.1", port))
        before = pattern(0, 100_000, b"cli")
        client.sendall(before)  # lands in the owner's receive queue: it never reads
        sent = json.loads(owner.stdout.readline())["sent"]
        assert sent > 0

        heir = subprocess.Popen([sys.executable, "-c", HEIR, str(PAYLOADS)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        os.kill(owner.pid, signal.SIGSTOP)
        wait_stopped(owner.pid)
        moving = dropped(port)
        moving.__enter__()
        sock = tr.take_socket(owner.pid, "127.0.0.1", port)
        state = tr.save(sock)
        s = tr.summary(state)
        assert s["recv_queue"] == len(before)  # everything the client sent, unread
        assert s["send_queue"] > 0 and s["unsent"] > 0  # the pipe is full: some never left
        assert s["mss"] > 0 and s["sack"] and s["tstamp"]
        assert base64.b64decode(state["inq"]) == before
        json.dumps(state)  # crosses the stream as JSON

        # the first owner's socket goes away silently: repair mode is still on
        sock.close()
        owner.kill()
        owner.wait(10)

        more = 50_000
        after = pattern(len(before), 30_000, b"cli")
        heir.stdin.write(json.dumps({"state": state, "sent": sent, "more": more,
                                     "client_total": len(before) + len(after)}) + "\n")
        heir.stdin.flush()
        line = json.loads(heir.stdout.readline())
        assert line == {"restored": True, "state": tr.TCP_ESTABLISHED}
        moving.__exit__(None, None, None)
        moving = None

        # the client never noticed: still established, no FIN/RST came in
        assert tr.tcp_info(client)["state"] == tr.TCP_ESTABLISHED
        client.sendall(after)
        want = sent + more
        got = bytearray()
        client.settimeout(20)
        while len(got) < want:
            try:
                data = client.recv(1 << 20)
            except TimeoutError:  # once in CI (2026-12-01): say what both ends' TCP holds
                pytest.fail(f"stalled for 20 s after {len(got)} of {want} bytes; "
                            f"{sockets_of(port)}")
            assert data, f"EOF after {len(got)} of {want} bytes"
            got += data
        assert bytes(got) == pattern(0, want, b"srv")  # byte-exact across the move
        rep = json.loads(heir.stdout.readline())
        assert rep == {"received": len(before) + len(after),
                       "sha256": hashlib.sha256(before + after).hexdigest()}
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.recv(1)  # no more data, and no EOF or reset either
    finally:
        if moving is not None:
            moving.__exit__(None, None, None)
        client.close()
        for p in (owner, heir):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait(10)


def test_the_rebuilt_connection_does_not_fall_back_to_536_byte_segments() -> None:
    """The segment size is fixed at connect: a rebuild that left it to the options (which come
    after connect) sent 524-byte segments (the 536 default) where the connection had used
    65483 on loopback, and bulk data after a move crawled. It starts from the saved clamp
    (capped at 32767, what TCP_MAXSEG accepts: loopback's 65495 gives 32755; an Ethernet
    path's 1460 is kept whole), less at most 40 bytes of options."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    client = socket.create_connection(lst.getsockname())
    server, _ = lst.accept()
    lst.close()
    rebuilt = None
    try:
        server.sendall(b"x" * 100_000)  # the path is used: the kernel knows its segment size
        got = 0
        while got < 100_000:
            got += len(client.recv(1 << 20))
        state = tr.save(server)
        tr.close_silently(server)
        rebuilt = tr.restore(state)
        mss = rebuilt.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        assert mss >= min(state["mss"], tr.USER_MSS_RANGE[1]) - 40 > 536, (mss, state["mss"])
        rebuilt.sendall(b"after the move")  # and it is still the same connection
        assert client.recv(100) == b"after the move"
    finally:
        client.close()
        for sock in (server, rebuilt):
            if sock is not None:
                sock.close()


def test_find_socket_names_what_is_missing() -> None:
    with pytest.raises(tr.RepairError, match=r"no established TCP connection on "
                                             r"127\.0\.0\.1:1"):
        tr.find_socket(os.getpid(), "127.0.0.1", 1)


def test_kernel_refusal_is_named() -> None:
    """A window the kernel must refuse (rcv_wup after rcv_nxt) is reported by option name."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    client = socket.create_connection(lst.getsockname())
    server, _ = lst.accept()
    lst.close()  # the rebuilt socket binds the same port
    try:
        state = tr.save(server)
        state["window"]["rcv_wup"] = (state["inq_seq"] + (1 << 30)) & 0xFFFFFFFF
        tr.close_silently(server)
        with pytest.raises(tr.RepairError, match=r"^TCP_REPAIR_WINDOW: Invalid argument$"):
            tr.restore(state)
    finally:
        for s in (client, lst):
            s.close()
