"""The controller's SSH layer against fake nodes: host keys, ssh_config, timeouts, pool, wait."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import paramiko
import pytest

from labkit import inventory as inv
from labkit.config import Settings
from labkit.fake.base import ensure_host_key
from labkit.fake.harness import SshNodeSet
from labkit.fake.ports import free_port
from labkit.inventory import Node, SshSpec
from labkit.nodeside import killmarked
from labkit.ssh import (
    ConnectionPool,
    HostKeyError,
    SshAuthError,
    SshClient,
    SshUnreachable,
    fingerprint,
    wait_ssh,
)

SETTINGS = Settings(ssh_timeout=5.0, command_timeout=30.0)


@pytest.fixture
def lab(tmp_path: Path):
    with SshNodeSet(tmp_path, ["node1", "node2"]) as lab:
        yield lab


def node_of(lab: SshNodeSet, name: str = "node1", **spec_changes) -> Node:
    n = inv.load(lab.inventory_path).node(name)
    if spec_changes:
        from dataclasses import replace
        n = replace(n, ssh=replace(n.ssh, **spec_changes))
    return n


def test_unknown_host_key_refused(tmp_path: Path) -> None:
    with SshNodeSet(tmp_path, ["node1"], known=False) as lab:
        with pytest.raises(HostKeyError) as ei:
            SshClient.connect(node_of(lab), SETTINGS)
        msg = str(ei.value)
        assert "node1" in msg and "unknown host key" in msg and "SHA256:" in msg
        assert "\n" not in msg
        assert lab.known_hosts.read_text() == ""


def test_trust_on_first_use_records_then_plain_connect_works(tmp_path: Path) -> None:
    with SshNodeSet(tmp_path, ["node1"], known=False) as lab:
        port = lab.nodes["node1"].port
        SshClient.connect(node_of(lab, trust_on_first_use=True), SETTINGS).close()
        line = lab.known_hosts.read_text()
        assert line.startswith(f"[127.0.0.1]:{port} ssh-ed25519 ")
        # from the settings too, and without adding a second line
        SshClient.connect(node_of(lab), Settings(trust_on_first_use=True)).close()
        SshClient.connect(node_of(lab), SETTINGS).close()
        assert lab.known_hosts.read_text() == line


def test_changed_host_key_refused_with_both_fingerprints(lab: SshNodeSet) -> None:
    real = ensure_host_key(lab.nodes["node1"].host_key_path)
    other = ensure_host_key(lab.state_dir / "impostor_key")
    port = lab.nodes["node1"].port
    lab.known_hosts.write_text(f"[127.0.0.1]:{port} ssh-ed25519 {other.get_base64()}\n")
    for tofu in (False, True):  # TOFU never overrides a changed key
        with pytest.raises(HostKeyError) as ei:
            SshClient.connect(node_of(lab, trust_on_first_use=tofu), SETTINGS)
        msg = str(ei.value)
        assert "node1" in msg and "CHANGED" in msg
        assert fingerprint(other) in msg and fingerprint(real) in msg
        assert fingerprint(real) != fingerprint(other)


def test_bad_key_is_an_auth_error(lab: SshNodeSet, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    ensure_host_key(stranger)
    with pytest.raises(SshAuthError, match="node1.*authentication failed"):
        SshClient.connect(node_of(lab, key_file=stranger), SETTINGS)


def test_ssh_config_alias_user_port_identity(lab: SshNodeSet, tmp_path: Path,
                                              monkeypatch) -> None:
    port = lab.nodes["node1"].port
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Host n1alias\n  HostName 127.0.0.1\n  Port {port}\n  User labuser\n"
                   f"  IdentityFile {lab.key}\n"
                   "Host n1wrongport\n  HostName 127.0.0.1\n  Port 1\n")
    monkeypatch.setenv("LABKIT_SSH_CONFIG", str(cfg))
    alias = Node("node1", None, SshSpec(host="n1alias", known_hosts=lab.known_hosts))
    with SshClient.connect(alias, SETTINGS) as c:
        assert c.target.hostname == "127.0.0.1" and c.target.port == port
        assert c.target.user == "labuser" and c.target.key_files == (lab.key,)
        assert c.run("echo $LABKIT_NODE").stdout == b"node1\n"
    # the inventory's ssh: block wins over ssh_config
    wins = Node("node1", None, SshSpec(host="n1wrongport", port=port, key_file=lab.key,
                                       known_hosts=lab.known_hosts))
    with SshClient.connect(wins, SETTINGS) as c:
        assert c.target.port == port


def test_proxy_jump_through_another_node(lab: SshNodeSet, tmp_path: Path, monkeypatch) -> None:
    p1, p2 = lab.nodes["node1"].port, lab.nodes["node2"].port
    cfg = tmp_path / "ssh_config"
    # the jump host is checked against ITS known_hosts (its Host block), as OpenSSH does
    cfg.write_text(f"Host jumper\n  HostName 127.0.0.1\n  Port {p1}\n  IdentityFile {lab.key}\n"
                   f"  UserKnownHostsFile {lab.known_hosts}\n")
    monkeypatch.setenv("LABKIT_SSH_CONFIG", str(cfg))
    monkeypatch.setenv("HOME", str(tmp_path))
    via = node_of(lab, "node2", proxy_jump="jumper")
    with SshClient.connect(via, SETTINGS) as c:
        assert c.run("echo $LABKIT_NODE").stdout == b"node2\n"
        assert c.target.port == p2


def test_run_timeout_kills_the_remote_process_group(lab: SshNodeSet) -> None:
    node = lab.nodes["node1"]
    with SshClient.connect(node_of(lab), SETTINGS) as c:
        t0 = time.monotonic()
        r = c.run("sleep 1000 & setsid sleep 1001 & echo started; sleep 1002", timeout=1.0)
        assert r.timed_out and r.exit_code is None
        assert r.stdout == b"started\n"
        assert time.monotonic() - t0 < 5
        end = time.monotonic() + 3
        while killmarked.marked([node.marker]) and time.monotonic() < end:
            time.sleep(0.05)
        assert not killmarked.marked([node.marker]), "remote processes survived the timeout"
        assert c.run("echo still usable").ok


def test_cancel_kills_remote_and_raises_keyboardinterrupt(lab: SshNodeSet) -> None:
    node = lab.nodes["node1"]
    cancel = threading.Event()

    def cancel_once_running() -> None:  # the remote sleep runs: now cancel it
        end = time.monotonic() + 10
        while not killmarked.marked([node.marker]) and time.monotonic() < end:
            time.sleep(0.01)
        cancel.set()

    threading.Thread(target=cancel_once_running, daemon=True).start()
    with SshClient.connect(node_of(lab), SETTINGS) as c:
        with pytest.raises(KeyboardInterrupt):
            c.run("sleep 1000", cancel=cancel)
        end = time.monotonic() + 3
        while killmarked.marked([node.marker]) and time.monotonic() < end:
            time.sleep(0.05)
        assert not killmarked.marked([node.marker])


def test_a_kill_that_works_says_nothing_and_one_that_fails_is_logged(
        lab: SshNodeSet, caplog, monkeypatch) -> None:
    """A timed-out run's kill is checked: silent when it ended everything; a warning naming
    the node, the run and why (here: no python3 to run it) when it did not."""
    import labkit.ssh.client as client

    caplog.set_level("WARNING", logger="labkit.ssh")
    with SshClient.connect(node_of(lab), SETTINGS) as c:
        assert c.run("sleep 1000", timeout=0.5).timed_out
        assert not [r for r in caplog.records if "kill" in r.getMessage()], caplog.text
        # a node without a usable python3 (the fake node has one, so name a missing one)
        monkeypatch.setattr(client, "kill_command",
                            lambda run_id: f"exec labkit-no-python3 {run_id}")
        c._kill_run("abc123")
    (rec,) = [r for r in caplog.records if "could not kill" in r.getMessage()]
    msg = rec.getMessage()
    assert "node1" in msg and "abc123" in msg and "exited 127" in msg and "not found" in msg


def test_kill_problem_reads_the_kill_programs_report() -> None:
    from labkit.ssh.client import kill_problem

    ok = b'{"killed": [12, 13], "survivors": []}\n'
    assert kill_problem(0, ok, b"") is None
    left = b'{"killed": [12], "survivors": [13, 14]}\n'
    assert kill_problem(1, left, b"") == "processes 13, 14 survived (exit 1)"
    assert "exited 2: killmarked: bad" in (kill_problem(2, b"", b"killmarked: bad\n") or "")
    assert kill_problem(0, b"", b"") == "the kill exited 0: no output"  # no report: not ok
    assert kill_problem(None, b"", b"") == "the kill did not answer in time"


def test_pool_reuses_one_connection_per_node_across_threads(lab: SshNodeSet) -> None:
    invy = inv.load(lab.inventory_path)
    with ConnectionPool(SETTINGS) as pool:
        got: list[SshClient] = []

        def grab() -> None:
            got.append(pool.get(invy.node("node1")))

        ts = [threading.Thread(target=grab) for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(10)
        assert len(got) == 8 and len({id(c) for c in got}) == 1
        c2 = pool.get(invy.node("node2"))
        assert c2 is not got[0]
        assert c2.run("echo $LABKIT_NODE").stdout == b"node2\n"
        # a dead connection (node power-cycled) is replaced transparently
        lab.nodes["node1"].stop()
        lab.nodes["node1"].start()
        deadline = time.monotonic() + 3
        while got[0].active and time.monotonic() < deadline:
            time.sleep(0.02)
        fresh = pool.get(invy.node("node1"))
        assert fresh is not got[0] and fresh.run("true").ok


def test_wait_ssh_retries_until_the_node_boots(lab: SshNodeSet) -> None:
    node = lab.nodes["node1"]
    node.stop()
    threading.Timer(0.8, node.start).start()
    t0 = time.monotonic()
    wait_ssh(node_of(lab), SETTINGS, time.monotonic() + 10)
    assert 0.7 < time.monotonic() - t0 < 5


def test_wait_ssh_gives_up_naming_the_node(lab: SshNodeSet) -> None:
    """Pure: what the node printed meanwhile is labkit.bringup's to add (tests/test_power.py)."""
    lab.nodes["node1"].stop()
    t0 = time.monotonic()
    with pytest.raises(SshUnreachable) as ei:
        wait_ssh(node_of(lab), SETTINGS, time.monotonic() + 1.0)
    assert time.monotonic() - t0 < 3
    msg = str(ei.value)
    assert msg.startswith("node1: SSH did not come up") and "refused" in msg
    assert "\n" not in msg


def test_refused_connection_is_retryable_and_names_the_node(tmp_path: Path) -> None:
    n = Node("ghost", None, SshSpec(host="127.0.0.1", port=free_port(),
                                    known_hosts=tmp_path / "kh"))
    with pytest.raises(SshUnreachable, match="^ghost: .*refused"):
        SshClient.connect(n, SETTINGS)


def test_secrets_never_logged(lab: SshNodeSet, caplog) -> None:
    caplog.set_level("DEBUG")
    with SshClient.connect(node_of(lab), SETTINGS) as c:
        c.run("true")
    key_text = lab.key.read_text()
    body = "".join(key_text.splitlines()[1:-1])[:40]
    assert body not in caplog.text
    assert isinstance(paramiko.PKey.from_path(str(lab.key)), paramiko.PKey)


def test_package_reexports_every_name_and_types_cost_no_paramiko() -> None:
    """``from labkit.ssh import X`` works for every name; typing against the remote shell, or
    importing deploy and the janitor, does not load paramiko (a connection does)."""
    import subprocess
    import sys

    import labkit.ssh as ssh

    for name in ssh.__all__:
        assert getattr(ssh, name) is not None, name
    with pytest.raises(AttributeError):
        ssh.console_tail  # noqa: B018 - the fake-lab console helpers left production code
    code = ("import sys, labkit.ssh, labkit.deploy, labkit.janitor\n"
            "from labkit.ssh import RemoteShell, RunResult\n"
            "assert 'paramiko' not in sys.modules, 'paramiko imported'\n"
            "from labkit.ssh import SshClient\n"
            "assert 'paramiko' in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
