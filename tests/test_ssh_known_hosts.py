"""known_hosts as OpenSSH reads it: markers, hashed names, patterns, lines that cannot be parsed,
and the ssh_config settings around it (UserKnownHostsFile lists, HostKeyAlias,
StrictHostKeyChecking). Fake nodes over real sockets; a temporary HOME."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from labkit import inventory as inv
from labkit.config import Settings
from labkit.fake.base import ensure_host_key
from labkit.fake.harness import SshNodeSet
from labkit.inventory import Node, SshSpec
from labkit.ssh import HostKeyError, SshClient

SETTINGS = Settings(ssh_timeout=5.0, command_timeout=30.0)
KEYGEN = shutil.which("ssh-keygen")


@pytest.fixture
def lab(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setenv("LABKIT_SSH_CONFIG", str(tmp_path / "no_ssh_config"))
    with SshNodeSet(tmp_path, ["node1"]) as lab:
        yield lab


def node(lab: SshNodeSet, **changes) -> Node:
    n = inv.load(lab.inventory_path).node("node1")
    return replace(n, ssh=replace(n.ssh, **changes))


def other_key(tmp_path: Path, name: str) -> str:
    return ensure_host_key(tmp_path / name).get_base64()


def hashed(name: str) -> str:
    import paramiko
    return paramiko.HostKeys.hash_host(name)


def test_markers_and_hashed_names_keep_working(lab: SshNodeSet, tmp_path: Path) -> None:
    """One @cert-authority or @revoked line used to fail every node with a padding error."""
    good = lab.known_hosts.read_text().split()
    name = good[0]
    lab.known_hosts.write_text(
        "# lab hosts\n"
        f"@cert-authority *.example.com ssh-ed25519 {other_key(tmp_path, 'ca')}\n"
        f"@revoked * ssh-ed25519 {other_key(tmp_path, 'old')}\n"
        f"@revoked {hashed('gone.example.com')} ssh-ed25519 {other_key(tmp_path, 'gone')}\n"
        f"{hashed(name)} {good[1]} {good[2]}\n")
    with SshClient.connect(node(lab), SETTINGS) as c:
        assert c.run("echo $LABKIT_NODE").stdout == b"node1\n"


@pytest.mark.parametrize("hash_it", [False, True])
def test_revoked_key_is_refused_naming_file_and_line(lab: SshNodeSet, hash_it: bool) -> None:
    name, kind, key = lab.known_hosts.read_text().split()
    revoked_name = hashed(name) if hash_it else "[127.0.0.1]:*"
    lab.known_hosts.write_text(f"{name} {kind} {key}\n\n@revoked {revoked_name} {kind} {key}\n")
    for tofu in (False, True):
        with pytest.raises(HostKeyError) as ei:
            SshClient.connect(node(lab, trust_on_first_use=tofu), SETTINGS)
        msg = str(ei.value)
        assert "REVOKED" in msg and f"{lab.known_hosts}:3" in msg and "\n" not in msg


def test_host_known_only_through_a_ca_says_which_line(lab: SshNodeSet, tmp_path: Path) -> None:
    lab.known_hosts.write_text(
        f"@cert-authority [127.0.0.1]:* ssh-ed25519 {other_key(tmp_path, 'ca')}\n")
    with pytest.raises(HostKeyError) as ei:
        SshClient.connect(node(lab), SETTINGS)
    msg = str(ei.value)
    assert "unknown host key" in msg and f"{lab.known_hosts}:1" in msg
    assert "cert-authority" in msg


def test_unparsable_lines_are_skipped_and_named_when_they_matter(lab: SshNodeSet) -> None:
    name, kind, key = lab.known_hosts.read_text().split()
    bad = (f"{name} {kind} !!not-base64!!\n"
           f"otherhost {kind} {key[:-8]}\n"
           f"@bogus-marker {name} {kind} {key}\n"
           f"{name} ssh-rsa {key}\n")  # type and key disagree
    lab.known_hosts.write_text(bad)
    with pytest.raises(HostKeyError) as ei:
        SshClient.connect(node(lab), SETTINGS)
    msg = str(ei.value)
    for line in (1, 3, 4):
        assert f"{lab.known_hosts}:{line} cannot be parsed" in msg
    assert f"{lab.known_hosts}:2" not in msg  # another host's: does not matter here
    lab.known_hosts.write_text(bad + f"{name} {kind} {key}\n")  # the rest is still used
    SshClient.connect(node(lab), SETTINGS).close()


PATTERN_CASES = [
    ("web*.example.com,!web9.example.com", ["web1.example.com", "web9.example.com",
                                            "WEB1.example.com", "db.example.com"]),
    ("[10.0.0.1]:22??", ["[10.0.0.1]:2222", "[10.0.0.1]:222", "10.0.0.1"]),
    ("10.0.0.?,host-[ab]", ["10.0.0.1", "10.0.0.12", "host-[ab]", "host-a"]),
    ("*", ["anything", "[x]:1"]),
    ("!bad,*", ["bad", "good"]),
]


@pytest.mark.skipif(KEYGEN is None, reason="ssh-keygen not installed (openssh-client)")
def test_host_patterns_match_as_ssh_keygen_matches(tmp_path: Path) -> None:
    from labkit.ssh.hostkeys import host_matches

    key = ensure_host_key(tmp_path / "k")
    for patterns, names in PATTERN_CASES + [(hashed("h.example.com"), ["h.example.com", "h"])]:
        f = tmp_path / "kh"
        f.write_text(f"{patterns} ssh-ed25519 {key.get_base64()}\n")
        for n in names:
            p = subprocess.run([KEYGEN, "-F", n, "-f", str(f)], capture_output=True, text=True)
            assert host_matches(patterns, n) == (p.returncode == 0), (patterns, n)


def test_parse_reports_without_crashing_on_any_line(tmp_path: Path) -> None:
    from labkit.ssh.hostkeys import parse_known_hosts

    text = "\n".join(["@", "@revoked", "@revoked host", "host", "host ssh-ed25519",
                      "|1|bad|hash ssh-ed25519 AAAA", "host ssh-ed25519 AAAAC3Nz", "\x00\x01"])
    lines, bad = parse_known_hosts(text, tmp_path / "kh")
    assert lines == [] and [b.lineno for b in bad] == list(range(1, 9))


def test_config_known_hosts_list_alias_and_accept_new(lab: SshNodeSet, tmp_path: Path,
                                                      monkeypatch) -> None:
    port = lab.nodes["node1"].port
    first, second = tmp_path / "kh1", tmp_path / "kh2"
    first.write_text("")
    name, kind, key = lab.known_hosts.read_text().split()
    second.write_text(f"labnode1 {kind} {key}\n")  # under the alias only
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Host n1\n  HostName 127.0.0.1\n  Port {port}\n  IdentityFile {lab.key}\n"
                   f"  UserKnownHostsFile {first} {second}\n  HostKeyAlias labnode1\n")
    monkeypatch.setenv("LABKIT_SSH_CONFIG", str(cfg))
    n1 = Node("node1", None, SshSpec(host="n1"))
    with SshClient.connect(n1, SETTINGS) as c:
        assert c.run("echo $LABKIT_NODE").stdout == b"node1\n"
    # StrictHostKeyChecking accept-new: recorded in the FIRST file, under the alias
    second.write_text("")
    with pytest.raises(HostKeyError):
        SshClient.connect(n1, SETTINGS)
    cfg.write_text(cfg.read_text() + "  StrictHostKeyChecking accept-new\n")
    SshClient.connect(n1, SETTINGS).close()
    assert first.read_text() == f"labnode1 {kind} {key}\n"
    # and "yes" in the config beats the settings' trust_on_first_use
    first.write_text("")
    cfg.write_text(cfg.read_text().replace("accept-new", "yes"))
    with pytest.raises(HostKeyError):
        SshClient.connect(n1, Settings(ssh_timeout=5.0, trust_on_first_use=True))


def test_cli_run_names_a_revoked_key_in_one_line(lab: SshNodeSet, tmp_path: Path) -> None:
    name, kind, key = lab.known_hosts.read_text().split()
    lab.known_hosts.write_text(f"{name} {kind} {key}\n@revoked * {kind} {key}\n")
    env = dict(os.environ, LABKIT_INVENTORY=str(lab.inventory_path))
    p = subprocess.run([sys.executable, "-m", "labkit.cli", "run", "--json", "--", "true"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    [out] = json.loads(p.stdout)
    assert "REVOKED" in out["error"] and f"{lab.known_hosts}:2" in out["error"]


def test_same_size_rewrite_within_one_tick_is_seen(tmp_path: Path) -> None:
    """``ssh-keygen -R`` then re-adding a key of the same type: same file, same size, and (one
    timestamp tick, or mtime set back) the same mtime. A long-lived process must see it."""
    from labkit.ssh.hostkeys import check_host_key, known_key_types
    from labkit.ssh.target import Target

    old, new = ensure_host_key(tmp_path / "old"), ensure_host_key(tmp_path / "new")
    kh = tmp_path / "known_hosts"
    kh.write_text(f"node.lab ssh-ed25519 {old.get_base64()}\n")
    target = Target(node="n", hostname="node.lab", port=22, user="u", key_files=(),
                    known_hosts=kh, trust_on_first_use=False)
    check_host_key(target, old)  # parsed and cached
    assert known_key_types(target) == ["ssh-ed25519"]
    before = kh.stat()
    with open(kh, "r+") as f:  # in place: same inode
        f.write(f"node.lab ssh-ed25519 {new.get_base64()}\n")
    os.utime(kh, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = kh.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == \
        (before.st_ino, before.st_size, before.st_mtime_ns)
    check_host_key(target, new)  # the stale cache said CHANGED
    with pytest.raises(HostKeyError, match="CHANGED"):
        check_host_key(target, old)


def test_known_key_types_reads_under_the_known_hosts_lock(tmp_path: Path) -> None:
    """The cache is shared by every connecting thread: reading it waits for a check (or a
    trust-on-first-use append) in progress."""
    import threading

    from labkit.ssh import hostkeys
    from labkit.ssh.target import Target

    target = Target(node="n", hostname="h", port=22, user="u", key_files=(),
                    known_hosts=tmp_path / "kh", trust_on_first_use=False)
    done = threading.Event()
    reader = threading.Thread(target=lambda: (hostkeys.known_key_types(target), done.set()))
    with hostkeys._known_lock:
        reader.start()
        assert not done.wait(0.3), "read the cache while another thread held the lock"
    reader.join(5)
    assert done.is_set()
