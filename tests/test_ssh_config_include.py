"""``Include`` in ssh_config, followed as OpenSSH follows it: relative to ~/.ssh, globs in sorted
order, conditional inside Host/Match blocks, loops and depth refused. Checked against ``ssh -G``
where OpenSSH is installed; HOME is temporary, never the real ~/.ssh."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from labkit.config import Settings
from labkit.errors import LabkitError
from labkit.fake.harness import SshNodeSet
from labkit.inventory import Node, SshSpec
from labkit.ssh import SshClient, SshError, resolve

SETTINGS = Settings(ssh_timeout=5.0, command_timeout=30.0)
SSH = shutil.which("ssh")


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setenv("LABKIT_SSH_CONFIG", str(home / ".ssh" / "config"))
    return home


def write(home: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = home / ".ssh" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return home / ".ssh" / "config"


def ours(host: str) -> dict[str, str | None]:
    t = resolve(Node(host, None, SshSpec(host=host)), SETTINGS)
    return {"user": t.user, "hostname": t.hostname, "port": str(t.port),
            "proxyjump": t.proxy_jump}


def openssh(cfg: Path, host: str) -> dict[str, str | None]:
    p = subprocess.run([SSH, "-G", "-F", str(cfg), host], capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL, env=os.environ)
    assert p.returncode == 0, p.stderr
    opts = dict(ln.split(" ", 1) for ln in p.stdout.splitlines() if " " in ln)
    return {k: opts.get(k) for k in ("user", "hostname", "port", "proxyjump")}


LAYOUT = {
    # top-level Include first, as many configs start; then one inside a Host block, then one
    # inside a Match block; what follows an Include goes on under the including block
    "config": "Include conf.d/*.conf\n"
              "Host web*\n  Include web.inc\n  User web-after\n  Port 2201\n"
              "Match originalhost db*\n  Include ~/.ssh/db.inc\n"
              "Host *\n  User fallback\n",
    "conf.d/20-late.conf": "Host alpha\n  HostName late.example\n  User late\n",
    "conf.d/10-early.conf": "Host alpha\n  HostName early.example\n"
                            "Host beta\n  ProxyJump jumper\n",
    "conf.d/ignored.txt": "Host alpha\n  User wrong-glob\n",
    # top lines apply under the includer's Host; a Host here holds only inside it (web* AND
    # webx) and ends with this file
    "web.inc": "HostName web.example\nHost webx\n  User webx-only\nHost beta\n  User never\n",
    "db.inc": "User dbuser\nPort 5432\n",
}


@pytest.mark.parametrize("host", ["alpha", "beta", "web1", "webx", "db1", "other"])
def test_include_follows_openssh(home: Path, host: str) -> None:
    cfg = write(home, LAYOUT)
    want = {
        "alpha": {"user": "late", "hostname": "early.example", "port": "22", "proxyjump": None},
        "beta": {"user": "fallback", "hostname": "beta", "port": "22", "proxyjump": "jumper"},
        "web1": {"user": "web-after", "hostname": "web.example", "port": "2201",
                 "proxyjump": None},
        "webx": {"user": "webx-only", "hostname": "web.example", "port": "2201",
                 "proxyjump": None},
        "db1": {"user": "dbuser", "hostname": "db1", "port": "5432", "proxyjump": None},
        "other": {"user": "fallback", "hostname": "other", "port": "22", "proxyjump": None},
    }[host]
    assert ours(host) == want
    if SSH:
        assert openssh(cfg, host) == want


def test_an_included_host_block_ends_with_its_file(home: Path) -> None:
    """After ``Include x`` at top level, the including file is back at top level even though x
    ended inside ``Host zzz``."""
    cfg = write(home, {"config": "Include x\nUser top\n", "x": "Host zzz\n  User z\n"})
    assert ours("a")["user"] == "top" and ours("zzz")["user"] == "z"
    if SSH:
        assert openssh(cfg, "a")["user"] == "top" and openssh(cfg, "zzz")["user"] == "z"


def test_include_of_nothing_and_of_an_absolute_path(home: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.conf"
    elsewhere.write_text("Host a\n  Port 2222\n")
    cfg = write(home, {"config": f"Include nothing/* missing.conf\nInclude {elsewhere}\n"})
    assert ours("a")["port"] == "2222"
    if SSH:
        assert openssh(cfg, "a")["port"] == "2222"


@pytest.mark.parametrize("case", ["self", "cycle", "deep"])
def test_include_loops_and_depth_are_refused_naming_the_line(home: Path, case: str) -> None:
    files = {"self": {"config": "Host a\n  User x\nInclude config\n"},
             "cycle": {"config": "Include one\n", "one": "\nInclude two\n", "two": "Include one\n"},
             "deep": {"config": "Include d1\n",
                      **{f"d{i}": f"Include d{i + 1}\n" for i in range(1, 18)}, "d18": ""},
             }[case]
    cfg = write(home, files)
    with pytest.raises(LabkitError) as ei:
        ours("a")
    msg = str(ei.value)
    where = {"self": f"{cfg}:3", "cycle": f"{home}/.ssh/two:1", "deep": f"{home}/.ssh/d16:1"}
    assert msg.startswith(where[case] + ": ") and "\n" not in msg
    if SSH:  # OpenSSH refuses each of them too
        p = subprocess.run([SSH, "-G", "-F", str(cfg), "a"], capture_output=True, text=True,
                           timeout=30, stdin=subprocess.DEVNULL)
        assert p.returncode != 0 and "recursive" in p.stderr


def test_sixteen_levels_are_fine(home: Path) -> None:
    cfg = write(home, {"config": "Include d1\n",
                       **{f"d{i}": f"Include d{i + 1}\n" for i in range(1, 16)},
                       "d16": "Host a\n  User deep\n"})
    assert ours("a")["user"] == "deep"
    if SSH:
        assert openssh(cfg, "a")["user"] == "deep"


def test_world_writable_include_is_refused_as_openssh_does(home: Path) -> None:
    cfg = write(home, {"config": "Host a\n  Include other\n", "other": "User o\n"})
    (home / ".ssh" / "other").chmod(0o666)
    with pytest.raises(LabkitError) as ei:
        ours("a")
    assert str(ei.value).startswith(f"{cfg}:2: ") and "permissions" in str(ei.value)
    if SSH:
        p = subprocess.run([SSH, "-G", "-F", str(cfg), "a"], capture_output=True, text=True,
                           timeout=30, stdin=subprocess.DEVNULL)
        assert p.returncode != 0 and "Bad owner or permissions" in p.stderr


def test_bad_line_in_an_included_file_is_named(home: Path) -> None:
    write(home, {"config": "Include broken\n", "broken": "Host a\n  Port\n"})
    with pytest.raises(LabkitError) as ei:
        ours("a")
    assert str(ei.value).startswith(f"{home}/.ssh/broken:2: cannot parse ssh config")


def test_node_reached_through_a_block_in_an_included_file(home: Path, tmp_path: Path) -> None:
    """End to end over a real socket; an error in the included ProxyCommand names ITS line."""
    with SshNodeSet(tmp_path, ["node1"]) as lab:
        write(home, {"config": "Include lab.d/*\n",
                     "lab.d/nodes": f"Host n1\n  HostName 127.0.0.1\n"
                                    f"  Port {lab.nodes['node1'].port}\n"
                                    f"  IdentityFile {lab.key}\n"
                                    f"  UserKnownHostsFile {lab.known_hosts}\n"
                                    f"Host n1bad\n  ProxyCommand nc %h %u\n"})
        with SshClient.connect(Node("node1", None, SshSpec(host="n1")), SETTINGS) as c:
            assert c.run("echo $LABKIT_NODE").stdout == b"node1\n"
        with pytest.raises(SshError) as ei:
            SshClient.connect(Node("node1", None, SshSpec(host="n1bad")), SETTINGS)
        assert f"{home}/.ssh/lab.d/nodes:7" in str(ei.value)
