"""Keys as OpenSSH uses them: an encrypted key_file authenticates through the copy of it in a
real ssh-agent (matched by public key: the .pub beside it, or the key file's own public part),
and without one the error names the key file in one line. IdentitiesOnly and IdentityAgent
from ssh_config. Passphrases never reach argv: the keys are written in-process and ssh-add
reads the passphrase through SSH_ASKPASS."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from labkit import inventory as inv
from labkit.config import Settings
from labkit.fake.harness import SshNodeSet
from labkit.fake.openssh import sshd_path
from labkit.inventory import Node
from labkit.ssh import SshAuthError, SshClient

pytestmark = pytest.mark.skipif(
    not (shutil.which("ssh-agent") and shutil.which("ssh-add")),
    reason="ssh-agent/ssh-add not installed (openssh-client)")
SETTINGS = Settings(ssh_timeout=10.0, command_timeout=30.0)
PASSPHRASE = b"correct horse 7f3a"


def write_key(path: Path, kind: str = "ed25519", *, encrypted: bool = True,
              pub: bool = True) -> str:
    """A private key file (OpenSSH format for ed25519, legacy PEM for rsa) and its .pub;
    returns the public line."""
    key = ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else \
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fmt = serialization.PrivateFormat.OpenSSH if kind == "ed25519" else \
        serialization.PrivateFormat.TraditionalOpenSSL
    enc = serialization.BestAvailableEncryption(PASSPHRASE) if encrypted else \
        serialization.NoEncryption()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, enc))
    path.chmod(0o600)
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()
    if pub:
        path.with_name(path.name + ".pub").write_text(line + " test\n")
    return line


class Agent:
    """A real ssh-agent on a socket of its own, ended (by its pid) at the end of the test."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lk-agent-", dir="/tmp"))  # AF_UNIX: short
        self.sock = self.dir / "agent.sock"
        self.proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(self.sock)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 10
        while not self.sock.exists():
            assert self.proc.poll() is None and time.monotonic() < end, "ssh-agent did not start"
            time.sleep(0.02)

    def add(self, key: Path) -> None:
        askpass = self.dir / "askpass"
        secret = self.dir / "secret"
        secret.write_bytes(PASSPHRASE)
        secret.chmod(0o600)
        askpass.write_text(f"#!/bin/sh\ncat {secret}\n")
        askpass.chmod(0o700)
        env = dict(os.environ, SSH_AUTH_SOCK=str(self.sock), SSH_ASKPASS=str(askpass),
                   SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
        p = subprocess.run(["ssh-add", str(key)], env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def agent(monkeypatch):
    a = Agent()
    monkeypatch.setenv("SSH_AUTH_SOCK", str(a.sock))
    yield a
    a.close()


@pytest.fixture(params=["python", "openssh"])
def lab(request, tmp_path: Path, monkeypatch):
    if request.param == "openssh" and sshd_path() is None:
        pytest.skip("OpenSSH sshd not installed (apt-get install openssh-server)")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setenv("LABKIT_SSH_CONFIG", str(tmp_path / "no_ssh_config"))
    with SshNodeSet(tmp_path, ["node1"], kind=request.param) as lab:
        yield lab


def authorize(lab: SshNodeSet, line: str) -> None:
    with open(lab.authorized_keys, "a") as f:
        f.write(line + "\n")


def with_key(lab: SshNodeSet, key: Path) -> Node:
    n = inv.load(lab.inventory_path).node("node1")
    return replace(n, ssh=replace(n.ssh, key_file=key))


@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_encrypted_key_file_uses_the_agents_copy(lab: SshNodeSet, agent: Agent, tmp_path: Path,
                                                 kind: str) -> None:
    key = tmp_path / f"id_{kind}_enc"
    authorize(lab, write_key(key, kind))
    agent.add(key)
    with SshClient.connect(with_key(lab, key), SETTINGS) as c:
        assert c.run("echo $LABKIT_NODE").stdout == b"node1\n"
    if kind == "ed25519":  # OpenSSH's format carries its public key in clear: no .pub needed
        key.with_name(key.name + ".pub").unlink()
        with SshClient.connect(with_key(lab, key), SETTINGS) as c:
            assert c.run("true").ok


def test_encrypted_key_without_agent_is_one_line_naming_the_file(lab: SshNodeSet,
                                                                 tmp_path: Path) -> None:
    key = tmp_path / "id_enc"
    authorize(lab, write_key(key))
    with pytest.raises(SshAuthError) as ei:
        SshClient.connect(with_key(lab, key), SETTINGS)
    msg = str(ei.value)
    assert f"{key} (encrypted; load it into ssh-agent" in msg and "\n" not in msg
    assert PASSPHRASE.decode() not in msg


def test_encrypted_key_not_in_the_agent_says_so(lab: SshNodeSet, agent: Agent,
                                                tmp_path: Path) -> None:
    key, other = tmp_path / "id_enc", tmp_path / "id_other"
    authorize(lab, write_key(key, "rsa", pub=False))
    write_key(other)
    agent.add(other)  # the agent holds a key, not this one
    with pytest.raises(SshAuthError) as ei:
        SshClient.connect(with_key(lab, key), SETTINGS)
    msg = str(ei.value)
    assert f"{key} (encrypted and not in ssh-agent, and no .pub beside it" in msg
    assert f"ssh-add {key}" in msg


def test_identities_only_and_identity_agent_from_ssh_config(lab: SshNodeSet, agent: Agent,
                                                            tmp_path: Path,
                                                            monkeypatch) -> None:
    mine, agents = tmp_path / "id_mine", tmp_path / "id_agents"
    write_key(mine, encrypted=False)  # not authorized
    authorize(lab, write_key(agents))
    agent.add(agents)
    cfg = tmp_path / "ssh_config"
    monkeypatch.setenv("LABKIT_SSH_CONFIG", str(cfg))
    n = with_key(lab, mine)
    cfg.write_text("Host *\n  IdentitiesOnly no\n")
    SshClient.connect(n, SETTINGS).close()  # the agent's key is offered after the file's
    cfg.write_text("Host *\n  IdentitiesOnly yes\n")
    with pytest.raises(SshAuthError):
        SshClient.connect(n, SETTINGS)
    cfg.write_text("Host *\n  IdentityAgent none\n")
    with pytest.raises(SshAuthError):
        SshClient.connect(n, SETTINGS)
    monkeypatch.delenv("SSH_AUTH_SOCK")
    cfg.write_text(f"Host *\n  IdentityAgent {agent.sock}\n")
    SshClient.connect(n, SETTINGS).close()


def test_cli_run_with_encrypted_key(lab: SshNodeSet, tmp_path: Path) -> None:
    key = tmp_path / "id_enc"
    authorize(lab, write_key(key))
    lab.inventory_path.write_text(lab.inventory_text().replace(str(lab.key), str(key)))
    env = dict(os.environ, LABKIT_INVENTORY=str(lab.inventory_path))
    env.pop("SSH_AUTH_SOCK", None)
    cmd = [sys.executable, "-m", "labkit.cli", "run", "--json", "--", "echo $LABKIT_NODE"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    [out] = json.loads(p.stdout)
    assert f"{key} (encrypted; load it into ssh-agent" in out["error"]
    a = Agent()
    try:
        a.add(key)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                           env=dict(env, SSH_AUTH_SOCK=str(a.sock)))
        assert p.returncode == 0, p.stderr
        assert [d["stdout"] for d in json.loads(p.stdout)] == ["node1\n"]
    finally:
        a.close()
