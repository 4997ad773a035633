"""PythonSshNode over real sockets and processes: exec, SFTP, power-off semantics."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from labkit import inventory as inv
from labkit.config import Settings
from labkit.fake.harness import SshNodeSet, start_with_pid
from labkit.fake.sshd import _Proc
from labkit.nodeside import killmarked
from labkit.ssh import SshClient

SETTINGS = Settings(ssh_timeout=5.0, command_timeout=30.0)


@pytest.fixture
def lab(tmp_path: Path):
    with SshNodeSet(tmp_path, ["node1"]) as lab:
        yield lab


def connect(lab: SshNodeSet, name: str = "node1") -> SshClient:
    return SshClient.connect(inv.load(lab.inventory_path).node(name), SETTINGS)


def wait_for(pred, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_exec_streams_exit_code_stdin_env_cwd(lab: SshNodeSet) -> None:
    root = lab.nodes["node1"].root
    with connect(lab) as c:
        r = c.run("echo out; echo err >&2; pwd; echo $HOME $LABKIT_NODE $FOO; exit 7",
                  env={"FOO": "a b"})
        assert r.exit_code == 7 and not r.timed_out
        assert r.stdout.decode().splitlines() == ["out", str(root), f"{root} node1 a b"]
        assert r.stderr == b"err\n"
        data = os.urandom(3 * 1024 * 1024)
        r = c.run("sha256sum", input=data)
        import hashlib
        assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
        seen = []
        r = c.run("for i in 1 2 3; do echo $i; done", on_stdout=seen.append)
        assert b"".join(seen) == b"1\n2\n3\n" and r.ok


def test_many_concurrent_sessions(lab: SshNodeSet) -> None:
    with connect(lab) as c:
        results: list[bytes] = []

        def one(i: int) -> None:
            results.append(c.run(f"echo {i}").stdout)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(int(r) for r in results) == list(range(24))
    # and many connections at once
    clients = [connect(lab) for _ in range(12)]
    try:
        assert all(c.run("true").ok for c in clients)
    finally:
        for c in clients:
            c.close()


def test_sftp_operations(lab: SshNodeSet) -> None:
    root = lab.nodes["node1"].root
    with connect(lab) as c:
        c.put_bytes(b"hello", "dir-less.txt", 0o640)
        assert (root / "dir-less.txt").read_bytes() == b"hello"
        assert stat.S_IMODE((root / "dir-less.txt").stat().st_mode) == 0o640
        assert c.get_bytes("dir-less.txt") == b"hello"
        assert not list(root.glob("*labkit-tmp*")), "atomic put leaves no temp file"
        s = c.sftp()
        s.mkdir("rel")
        s.mkdir(str(root / "abs"))
        assert (root / "rel").is_dir() and (root / "abs").is_dir()
        c.put_bytes(b"v1", "rel/a")
        s.symlink("rel/a", "link")
        assert s.readlink("link") == "rel/a" and os.readlink(root / "link") == "rel/a"
        c.put_bytes(b"v2", "rel/b")
        s.posix_rename("rel/b", "rel/a")  # over an existing file: allowed
        assert (root / "rel/a").read_bytes() == b"v2"
        c.put_bytes(b"x", "rel/c")
        with pytest.raises(IOError):
            s.rename("rel/c", "rel/a")  # plain SFTP rename must not clobber
        s.chmod("rel/c", 0o700)
        assert stat.S_IMODE(s.stat("rel/c").st_mode) == 0o700
        assert s.lstat("link").st_mode is not None and stat.S_ISLNK(s.lstat("link").st_mode)
        assert sorted(s.listdir("rel")) == ["a", "c"]
        s.remove("rel/c")
        assert not (root / "rel/c").exists()
        with pytest.raises(IOError):
            s.stat("nope")
        c.put_file(root / "rel/a", "copy")
        assert (root / "copy").read_bytes() == b"v2"


@pytest.mark.slow  # 64 MiB over SFTP
def test_64mib_transfer(lab: SshNodeSet) -> None:
    data = os.urandom(64 * 1024 * 1024)
    with connect(lab) as c:
        t0 = time.monotonic()
        c.put_bytes(data, "big")
        put = time.monotonic() - t0
        t0 = time.monotonic()
        assert c.get_bytes("big") == data
        get = time.monotonic() - t0
        t0 = time.monotonic()
        with c.open_exec("cat > streamed") as p:
            view = memoryview(data)
            for i in range(0, len(data), 1 << 20):
                p.channel.sendall(view[i:i + (1 << 20)])
            p.channel.shutdown_write()
            assert p.wait(60) == 0
        stream = time.monotonic() - t0
    print(f"\n64 MiB to a PythonSshNode (same process): sftp put {64 / put:.0f} MiB/s, "
          f"get {64 / get:.0f} MiB/s, exec stream {64 / stream:.0f} MiB/s")
    assert (lab.nodes["node1"].root / "streamed").stat().st_size == len(data)
    assert put < 20 and get < 20 and stream < 20


def test_closed_channel_kills_process_group(lab: SshNodeSet) -> None:
    node = lab.nodes["node1"]
    with connect(lab) as c:
        p = c.open_exec("sleep 1000 & sleep 1001; wait")
        assert wait_for(lambda: len(killmarked.marked([node.marker])) >= 3)
        p.close()  # no kill: the node must notice the channel went away
        assert wait_for(lambda: not killmarked.marked([node.marker])), "processes survived"


def test_stop_refuses_and_kills_everything_then_start_again(lab: SshNodeSet) -> None:
    node = lab.nodes["node1"]
    with connect(lab) as c:
        c.put_bytes(b"survives", "disk.txt")
        # a plain child, a setsid'd one, and a double-forked daemon: none may survive power-off
        r = c.run("sleep 1000 >/dev/null 2>&1 & setsid sleep 1001 >/dev/null 2>&1 & "
                  "( setsid sh -c 'sleep 1002 >/dev/null 2>&1 &' & ) ; echo started")
        assert r.stdout == b"started\n"
        assert wait_for(lambda: len(killmarked.marked([node.marker])) >= 3)
        busy = c.open_exec("sleep 1003")
        key_before = node.host_key_path.read_bytes()
        node.stop()
        assert not node.up
        assert wait_for(lambda: not killmarked.marked([node.marker]), 3), "processes survived stop()"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", node.port), timeout=2)
        assert wait_for(lambda: busy.channel.closed or not c.active, 3)
    node.stop()  # idempotent
    node.start()
    node.start()  # idempotent
    assert node.up
    with connect(lab) as c:
        assert c.get_bytes("disk.txt") == b"survives"
        assert c.run("echo back").stdout == b"back\n"
    assert node.host_key_path.read_bytes() == key_before  # same key: known_hosts still valid


def _pids_running(argv: bytes) -> list[int]:
    """Pids whose whole command line is ``argv`` (NUL-separated): for processes that carry no
    marker any more."""
    out = []
    for pid in killmarked.pids():
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == argv and killmarked.alive(pid):
                out.append(pid)
        except OSError:
            pass
    return out


def test_stop_kills_a_session_leader_that_dropped_its_marker(lab: SshNodeSet) -> None:
    """A session's process that exec'd with an empty environment carries no marker: stop()
    still ends it, through the process it holds (not by a recorded pid)."""
    node = lab.nodes["node1"]
    argv = b"sleep\0001004.5\0"
    with connect(lab) as c:
        c.open_exec("exec env -i sleep 1004.5")
        assert wait_for(lambda: len(_pids_running(argv)) == 1)
        node.stop()
        assert wait_for(lambda: not _pids_running(argv), 3), "the unmarked leader survived"
    node.start()


def test_a_reaped_session_process_is_never_signalled() -> None:
    """Once a session's process is reaped its pid is free, and may be taken by anyone (here,
    on purpose, by a process in a session of its own, so that its group id is that pid too):
    killing the session's group must then signal nothing."""
    p = _Proc(["true"], start_new_session=True)
    assert p.reap() == 0
    victim = start_with_pid(p.pid, ["sleep", "60"], start_new_session=True)
    if victim is None:
        pytest.skip("cannot choose pids here (needs root and /proc/sys/kernel/ns_last_pid)")
    try:
        p.kill_group()
        assert not p.running()
        with pytest.raises(subprocess.TimeoutExpired):  # SIGKILL would end it at once
            victim.wait(timeout=0.5)
    finally:
        victim.kill()
        victim.wait()


def test_session_process_group_is_killed_while_unreaped() -> None:
    """kill_group ends the whole group, also while the leader is an unreaped zombie (its pid,
    and so its group id, still belong to it)."""
    p = _Proc(["sh", "-c", "sleep 1005 & echo $!; exit 0"], stdout=subprocess.PIPE,
              start_new_session=True)
    child = int(p.stdout.readline())
    p.stdout.close()
    assert wait_for(lambda: killmarked.stat(p.pid)[0] == "Z")  # leader exited, not reaped
    p.kill_group()
    assert wait_for(lambda: not killmarked.alive(child))
    assert p.reap() == 0
    assert p.returncode == 0 and not p.running()
