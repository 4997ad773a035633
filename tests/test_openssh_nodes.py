"""The same exec / sftp / kill / run flow against fake nodes served by a real OpenSSH sshd, so
the controller side is checked against an independent SSH implementation (and OpenSshNode
keeps the FakeNode contract). Skipped where sshd is not installed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit import inventory as inv
from labkit.config import Settings
from labkit.fake.harness import SshNodeSet, start_fake_lab
from labkit.fake.openssh import sshd_path
from labkit.fake.sshd_watchdog import descendants
from labkit.nodeside import killmarked
from labkit.ssh import HostKeyError, SshClient

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(sshd_path() is None, reason="OpenSSH sshd not installed "
                       "(apt-get install openssh-server)"),
]
SETTINGS = Settings(ssh_timeout=10.0, command_timeout=30.0)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with SshNodeSet(tmp_path_factory.mktemp("osshlab"), ["node1", "node2"],
                    kind="openssh") as lab:
        yield lab


def connect(lab: SshNodeSet, name: str = "node1") -> SshClient:
    return SshClient.connect(inv.load(lab.inventory_path).node(name), SETTINGS)


def gone(marker: bytes, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while killmarked.marked([marker]) and time.monotonic() < end:
        time.sleep(0.05)
    return not killmarked.marked([marker])


def test_exec_cwd_env_exit_stdin(lab: SshNodeSet) -> None:
    root = lab.nodes["node1"].root
    with connect(lab) as c:
        r = c.run("pwd; echo $HOME $LABKIT_NODE $FOO; echo e >&2; exit 4", env={"FOO": "x y"})
        assert r.exit_code == 4 and r.stderr == b"e\n"
        assert r.stdout.decode().splitlines() == [str(root), f"{root} node1 x y"]
        assert c.run("wc -c", input=b"z" * 100000).stdout.strip() == b"100000"


def test_sftp_put_get_rename_symlink(lab: SshNodeSet) -> None:
    root = lab.nodes["node1"].root
    data = os.urandom(4 * 1024 * 1024 + 7)
    with connect(lab) as c:
        c.put_bytes(data, "blob", 0o600)  # relative: lands in the node root (cwd)
        assert (root / "blob").read_bytes() == data
        assert c.get_bytes("blob") == data
        s = c.sftp()
        s.mkdir("d")
        s.symlink("blob", "d/link")
        assert s.readlink("d/link") == "blob"
        c.put_bytes(b"new", "blob")  # atomic replace over an existing file
        assert (root / "blob").read_bytes() == b"new"


def test_timeout_kills_process_group(lab: SshNodeSet) -> None:
    node = lab.nodes["node1"]
    with connect(lab) as c:
        r = c.run("sleep 1000 & setsid sleep 1001 & sleep 1002", timeout=1.0)
        assert r.timed_out
    assert gone(node.marker), "remote processes survived the timeout"


def test_stop_kills_everything_refuses_and_restarts(lab: SshNodeSet) -> None:
    node = lab.nodes["node2"]
    with connect(lab, "node2") as c:
        c.put_bytes(b"disk", "kept")
        c.run("sleep 1000 >/dev/null 2>&1 & setsid sleep 1001 >/dev/null 2>&1 & true")
        busy = c.open_exec("sleep 1002")
        end = time.monotonic() + 5
        while len(killmarked.marked([node.marker])) < 3 and time.monotonic() < end:
            time.sleep(0.05)
        assert len(killmarked.marked([node.marker])) >= 3
        node.stop()
        assert not node.up
        assert gone(node.marker), "processes survived stop()"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", node.port), timeout=2)
        busy.close()
    node.start()
    with connect(lab, "node2") as c:
        assert c.get_bytes("kept") == b"disk"


def test_changed_key_refused_by_openssh_node_too(lab: SshNodeSet, tmp_path: Path) -> None:
    from labkit.fake.base import ensure_host_key

    other = ensure_host_key(tmp_path / "other")
    kh = tmp_path / "kh"
    kh.write_text(f"[127.0.0.1]:{lab.nodes['node1'].port} ssh-ed25519 {other.get_base64()}\n")
    from dataclasses import replace

    n = inv.load(lab.inventory_path).node("node1")
    with pytest.raises(HostKeyError, match="CHANGED"):
        SshClient.connect(replace(n, ssh=replace(n.ssh, known_hosts=kh)), SETTINGS)


def test_cli_run_against_openssh_nodes(lab: SshNodeSet) -> None:
    env = dict(os.environ, LABKIT_INVENTORY=str(lab.inventory_path))
    p = subprocess.run([sys.executable, "-m", "labkit.cli", "run", "--json", "--",
                        "echo $LABKIT_NODE"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    import json

    assert [d["stdout"] for d in json.loads(p.stdout)] == ["node1\n", "node2\n"]


def _started(pid: int) -> bytes | None:
    """A process's start time (stat field 22), None once it is gone or a zombie: with the pid,
    an identity that a recycled pid cannot fake."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    return None if fields[0] in (b"Z", b"X") else fields[19]


def test_sigkilled_lab_leaves_no_sshd_or_session_behind(tmp_path_factory) -> None:
    """The lab dies without a word (SIGKILL): each OpenSSH node's watchdog must power it off by
    itself — sshd, the connection it forked for a client that is still connected, and every
    session process, setsid'd ones included."""
    lab = start_fake_lab(tmp_path_factory.mktemp("osshkill"), count=1, sshd="openssh",
                         power_on=True)
    try:
        marker = lab.node_marker("node1")
        with SshClient.connect(inv.load(lab.inventory_path).node("node1"), SETTINGS) as c:
            c.run("setsid sleep 1001 >/dev/null 2>&1 & true")
            busy = c.open_exec("sleep 1002")  # its connection stays open through the kill
            end = time.monotonic() + 10
            while len(killmarked.marked([marker])) < 2 and time.monotonic() < end:
                time.sleep(0.02)
            assert len(killmarked.marked([marker])) >= 2
            tree = {pid: _started(pid) for pid in descendants(lab.pid)}
            cmds = [Path(f"/proc/{p}/cmdline").read_bytes() for p in tree]
            assert sum(b"sshd" in c for c in cmds) >= 2, cmds  # listener + a connection
            os.kill(lab.pid, signal.SIGKILL)
            os.waitpid(lab.pid, 0)
            end = time.monotonic() + 5
            while time.monotonic() < end:
                left = [p for p, t in tree.items() if t is not None and _started(p) == t]
                if not left and not killmarked.marked([marker]):
                    break
                time.sleep(0.05)
            assert not left, [Path(f"/proc/{p}/cmdline").read_bytes() for p in left]
            assert not killmarked.marked([marker]), "session processes survived the lab"
            busy.close()
    finally:
        lab.stop()
