"""ProxyCommand and ProxyJump as OpenSSH has them, against fake nodes over real sockets and real
proxy processes; HOME and the ssh config are temporary, never the real ~/.ssh."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit import inventory as inv
from labkit.config import Settings
from labkit.fake.harness import SshNodeSet
from labkit.inventory import Node, SshSpec
from labkit.ssh import HostKeyError, SshClient, SshError, SshUnreachable, resolve

SETTINGS = Settings(ssh_timeout=5.0, command_timeout=30.0)

# A ProxyCommand of our own: logs its pid and arguments, connects, then relays stdin/stdout
# (or, with --fdpass, hands the connected socket back over stdout and exits).
RELAY = r'''
import json, os, select, socket, sys
args = sys.argv[1:]
fdpass = "--fdpass" in args
args = [a for a in args if a != "--fdpass"]
host, port, log = args[0], int(args[1]), args[2]
with open(log, "a") as f:
    f.write(json.dumps([os.getpid()] + args[:2] + args[3:]) + "\n")
s = socket.create_connection((host, port))
if fdpass:
    socket.send_fds(socket.socket(fileno=1), [b"\0"], [s.fileno()])
    sys.exit(0)
while True:
    r, _, _ = select.select([0, s], [], [])
    if 0 in r:
        data = os.read(0, 65536)
        if not data:
            s.shutdown(socket.SHUT_WR)
            break
        s.sendall(data)
    if s in r:
        data = s.recv(65536)
        if not data:
            break
        os.write(1, data)
'''


@pytest.fixture
def lab(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    with SshNodeSet(tmp_path, ["node1", "node2", "node3"]) as lab:
        yield lab


@pytest.fixture
def relay(tmp_path: Path) -> tuple[str, Path]:
    """(the command's start, its log)."""
    script = tmp_path / "relay.py"
    script.write_text(RELAY)
    return f"{sys.executable} {script}", tmp_path / "relay.log"


def config(tmp_path: Path, monkeypatch, text: str) -> Path:
    cfg = tmp_path / "ssh_config"
    cfg.write_text(text)
    monkeypatch.setenv("LABKIT_SSH_CONFIG", str(cfg))
    return cfg


def alias(lab: SshNodeSet, host: str, **spec) -> Node:
    return Node("node1", None, SshSpec(host=host, key_file=lab.key, known_hosts=lab.known_hosts,
                                       **spec))


def pid_gone(pid: int, timeout: float = 5.0) -> bool:
    """Gone or reaped elsewhere: not a process of ours any more (a zombie counts as alive)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X") and time.monotonic() > end - timeout / 2:
            return False  # a zombie nobody reaps
        time.sleep(0.02)
    return False


def test_proxycommand_is_used_with_openssh_tokens_and_ended_with_the_connection(
        lab: SshNodeSet, tmp_path: Path, monkeypatch, relay) -> None:
    cmd, log = relay
    port = lab.nodes["node1"].port
    cfg = config(tmp_path, monkeypatch,
                 f"Host n1proxy\n  HostName 127.0.0.1\n  Port {port}\n  User labuser\n"
                 f"  ProxyCommand {cmd} %h %p {log} n=%n r=%r pct=100%% 'q w'\n")
    with SshClient.connect(alias(lab, "n1proxy"), SETTINGS) as c:
        assert c.run("echo $LABKIT_NODE").stdout == b"node1\n"
        assert c.target.proxy_source == f"{cfg}:5"
        pid, *args = json.loads(log.read_text())
        # %h is HostName, %n the name as given, %p/%r the final port and user; the shell
        # sees the quotes; the known_hosts name is still the HostName's
        assert args == ["127.0.0.1", str(port), "n=n1proxy", "r=labuser", "pct=100%", "q w"]
        assert c.target.known_hosts_name == f"[127.0.0.1]:{port}"
    assert pid_gone(int(pid)), "the ProxyCommand outlived its connection"


def test_proxycommand_failure_says_why_in_one_line(lab: SshNodeSet, tmp_path: Path,
                                                   monkeypatch) -> None:
    port = lab.nodes["node1"].port
    cfg = config(tmp_path, monkeypatch,
                 f"Host n1\n  HostName 127.0.0.1\n  Port {port}\n"
                 "  ProxyCommand sh -c 'echo \"bastion: no route to lab\" >&2; exit 3'\n")
    with pytest.raises(SshUnreachable) as ei:
        SshClient.connect(alias(lab, "n1"), SETTINGS)
    msg = str(ei.value)
    assert "\n" not in msg
    assert f"{cfg}:4" in msg and "exited 3" in msg and "bastion: no route to lab" in msg


def test_proxycommand_unknown_token_is_refused_naming_the_line(lab: SshNodeSet, tmp_path: Path,
                                                               monkeypatch) -> None:
    marker = tmp_path / "started"
    cfg = config(tmp_path, monkeypatch,
                 f"Host n1\n  HostName 127.0.0.1\n\n  ProxyCommand touch {marker}; nc %h %u\n")
    with pytest.raises(SshError) as ei:
        SshClient.connect(alias(lab, "n1"), SETTINGS)
    assert f"{cfg}:4" in str(ei.value) and "%u" in str(ei.value)
    assert not marker.exists()


def test_proxyusefdpass(lab: SshNodeSet, tmp_path: Path, monkeypatch, relay) -> None:
    cmd, log = relay
    config(tmp_path, monkeypatch,
           f"Host n2\n  HostName 127.0.0.1\n  Port {lab.nodes['node2'].port}\n"
           f"  ProxyUseFdpass yes\n  ProxyCommand {cmd} --fdpass %h %p {log}\n")
    with SshClient.connect(alias(lab, "n2"), SETTINGS) as c:
        assert c.run("echo $LABKIT_NODE").stdout == b"node2\n"
        assert log.exists()


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed")
def test_proxycommand_ssh_w_through_a_jump_node(lab: SshNodeSet, tmp_path: Path,
                                                 monkeypatch) -> None:
    """The classic: ``ProxyCommand ssh -W %h:%p bastion`` with the real OpenSSH client."""
    p1, p2 = lab.nodes["node1"].port, lab.nodes["node2"].port
    inner = tmp_path / "inner_config"
    inner.write_text(f"Host bastion\n  HostName 127.0.0.1\n  Port {p1}\n  IdentityFile {lab.key}\n"
                     f"  UserKnownHostsFile {lab.known_hosts}\n  BatchMode yes\n")
    config(tmp_path, monkeypatch,
           f"Host n2\n  HostName 127.0.0.1\n  Port {p2}\n"
           f"  ProxyCommand sh -c 'touch {tmp_path}/used; exec ssh -F {inner} -W %h:%p bastion'\n")
    with SshClient.connect(alias(lab, "n2"), SETTINGS) as c:
        assert c.run("echo $LABKIT_NODE").stdout == b"node2\n"
    assert (tmp_path / "used").exists()


def test_which_proxy_applies_follows_openssh(tmp_path: Path, monkeypatch, relay) -> None:
    """First of ProxyJump/ProxyCommand wins; ``ProxyCommand none`` counts, ``ProxyJump none``
    does not hide a later ProxyCommand (checked against ``ssh -G`` of OpenSSH 9.2); the
    inventory's proxy_jump wins over both."""
    monkeypatch.setenv("HOME", str(tmp_path))
    config(tmp_path, monkeypatch,
           "Host a\n  ProxyJump j1\nHost b\n  ProxyCommand none\nHost c\n  ProxyJump none\n"
           "Host d\n  ProxyCommand nc %h %p\n  ProxyJump j2\nHost *\n  ProxyCommand cat\n"
           "  ProxyJump jstar\n")
    got = {h: (t.proxy_jump, t.proxy_command)
           for h in "abcde" for t in [resolve(Node(h, None, SshSpec(host=h)), SETTINGS)]}
    assert got == {"a": ("j1", None), "b": (None, None), "c": (None, "cat"),
                   "d": (None, "nc d 22"), "e": (None, "cat")}
    if shutil.which("ssh"):  # the same picks as the OpenSSH client on this machine
        for h, (jump, command) in got.items():
            out = subprocess.run(["ssh", "-G", "-F", str(tmp_path / "ssh_config"), h],
                                 capture_output=True, text=True, timeout=30).stdout
            opts = dict(ln.split(" ", 1) for ln in out.splitlines() if " " in ln)
            assert opts.get("proxyjump") == jump, h
            assert (opts.get("proxycommand") is None) == (command is None), h
    inv_wins = resolve(Node("d", None, SshSpec(host="d", proxy_jump="none")), SETTINGS)
    assert (inv_wins.proxy_jump, inv_wins.proxy_command) == (None, None)


def test_jump_host_is_checked_against_its_own_known_hosts(lab: SshNodeSet, tmp_path: Path,
                                                          monkeypatch) -> None:
    p1 = lab.nodes["node1"].port
    lines = lab.known_hosts.read_text().splitlines(keepends=True)
    jump_known = tmp_path / "jump_known_hosts"
    jump_known.write_text(lines[0])  # node1's key only
    lab.known_hosts.write_text(lines[1])  # the target's file: node2's key only
    cfg = f"Host jumper\n  HostName 127.0.0.1\n  Port {p1}\n  IdentityFile {lab.key}\n"
    config(tmp_path, monkeypatch, cfg + f"  UserKnownHostsFile {jump_known}\n")
    via = inv.load(lab.inventory_path).node("node2")
    from dataclasses import replace
    via = replace(via, ssh=replace(via.ssh, known_hosts=lab.known_hosts, proxy_jump="jumper"))
    with SshClient.connect(via, SETTINGS) as c:
        assert c.run("echo $LABKIT_NODE").stdout == b"node2\n"
    # and when the jump host's own file does not know it, that file is named
    jump_known.write_text("")
    with pytest.raises(HostKeyError) as ei:
        SshClient.connect(via, SETTINGS)
    assert "via jumper" in str(ei.value) and str(jump_known) in str(ei.value)
    assert str(lab.known_hosts) not in str(ei.value)
    # StrictHostKeyChecking accept-new in the jump's block: recorded in ITS file only
    before = lab.known_hosts.read_text()
    config(tmp_path, monkeypatch, cfg + f"  UserKnownHostsFile {jump_known}\n"
           "  StrictHostKeyChecking accept-new\n")
    with SshClient.connect(via, SETTINGS) as c:
        assert c.run("echo $LABKIT_NODE").stdout == b"node2\n"
    assert jump_known.read_text().startswith(f"[127.0.0.1]:{p1} ")
    assert lab.known_hosts.read_text() == before


def test_jump_list_runs_first_to_last_each_hop_by_its_own_block(
        lab: SshNodeSet, tmp_path: Path, monkeypatch, relay) -> None:
    """``ProxyJump a,b``: a is reached as its block says (here through its ProxyCommand), b
    through a (b's own ProxyCommand is replaced by the list, as with ``ssh -J``), the target
    through b."""
    cmd, log = relay
    p1, p2 = lab.nodes["node1"].port, lab.nodes["node2"].port
    config(tmp_path, monkeypatch,
           f"Host hopa\n  HostName 127.0.0.1\n  Port {p1}\n  IdentityFile {lab.key}\n"
           f"  UserKnownHostsFile {lab.known_hosts}\n  ProxyCommand {cmd} %h %p {log} hopa\n"
           f"Host hopb\n  HostName 127.0.0.1\n  Port {p2}\n  IdentityFile {lab.key}\n"
           f"  UserKnownHostsFile {lab.known_hosts}\n  ProxyCommand false\n")
    n3 = inv.load(lab.inventory_path).node("node3")
    from dataclasses import replace
    n3 = replace(n3, ssh=replace(n3.ssh, proxy_jump="hopa,hopb"))
    with SshClient.connect(n3, SETTINGS) as c:
        assert c.run("echo $LABKIT_NODE").stdout == b"node3\n"
    assert json.loads(log.read_text())[1:] == ["127.0.0.1", str(p1), "hopa"]
    # a hop's own ProxyJump applies when it is the only hop
    config(tmp_path, monkeypatch,
           f"Host hopa\n  HostName 127.0.0.1\n  Port {p1}\n  IdentityFile {lab.key}\n"
           f"  UserKnownHostsFile {lab.known_hosts}\n"
           f"Host hopb\n  HostName 127.0.0.1\n  Port {p2}\n  IdentityFile {lab.key}\n"
           f"  UserKnownHostsFile {lab.known_hosts}\n  ProxyJump hopa\n")
    n3 = replace(n3, ssh=replace(n3.ssh, proxy_jump="hopb"))
    with SshClient.connect(n3, SETTINGS) as c:
        assert c.run("echo $LABKIT_NODE").stdout == b"node3\n"


def test_proxyjump_loop_is_an_error_not_a_hang(lab: SshNodeSet, tmp_path: Path,
                                              monkeypatch) -> None:
    config(tmp_path, monkeypatch, "Host loopy\n  ProxyJump loopy\n")
    with pytest.raises(SshError, match="ProxyJump loop"):
        SshClient.connect(alias(lab, "loopy"), SETTINGS)


def test_no_proxy_process_left_after_a_failed_connect(lab: SshNodeSet, tmp_path: Path,
                                                      monkeypatch, relay) -> None:
    """The host key is refused after the proxy connected: the proxy still ends."""
    cmd, log = relay
    config(tmp_path, monkeypatch,
           f"Host n1\n  HostName 127.0.0.1\n  Port {lab.nodes['node1'].port}\n"
           f"  ProxyCommand {cmd} %h %p {log}\n")
    lab.known_hosts.write_text("")
    with pytest.raises(HostKeyError):
        SshClient.connect(alias(lab, "n1"), SETTINGS)
    assert pid_gone(json.loads(log.read_text())[0])
    assert os.environ["HOME"].startswith(str(tmp_path))


def test_inventory_only_jump_host_error_says_where_its_key_goes(lab: SshNodeSet,
                                                               tmp_path: Path,
                                                               monkeypatch) -> None:
    """A jump host is checked as ``ssh -J`` checks it (OpenSSH passes no -o to the hop), so the
    node's known_hosts in the inventory does not vouch for it, even when it holds the key: the
    error says so and names the file to add the key to; once there, the lab works."""
    monkeypatch.setenv("LABKIT_SSH_CONFIG", str(tmp_path / "no_ssh_config"))
    p1 = lab.nodes["node1"].port
    hop = f"127.0.0.1:{p1}"
    via = inv.load(lab.inventory_path).node("node2")
    from dataclasses import replace
    via = replace(via, ssh=replace(via.ssh, proxy_jump=hop))
    assert f"[127.0.0.1]:{p1} " in lab.known_hosts.read_text()  # the inventory's file has it
    user_known = Path(os.environ["HOME"]) / ".ssh" / "known_hosts"
    with pytest.raises(HostKeyError) as ei:
        SshClient.connect(via, SETTINGS)
    msg = str(ei.value)
    assert f"jump host {hop} is checked as `ssh {hop}`" in msg and "\n" not in msg
    assert f"add the key to {user_known}" in msg
    user_known.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(lab.key, user_known.parent / "id_ed25519")  # the hop's key: ~/.ssh's too
    user_known.write_text(lab.known_hosts.read_text().splitlines(keepends=True)[0])
    with SshClient.connect(via, SETTINGS) as c:
        assert c.run("echo $LABKIT_NODE").stdout == b"node2\n"
