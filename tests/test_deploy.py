"""Deploy: delta upload, atomic switch, manifest, build step, drift check, rollback, and a
controller SIGKILLed mid-transfer — against fake nodes over real SSH.

Most tests start ssh-only fake nodes in-process (``SshNodes`` below: no BMC, so no power-on wait
and no boot delay); the end-to-end flow also runs against nodes served by a real OpenSSH sshd."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from labkit import deploy as dp
from labkit import inventory as inv
from labkit.config import Settings
from labkit.errors import NodeError, UserError
from labkit.fake.base import ensure_host_key
from labkit.fake.openssh import OpenSshNode, sshd_path
from labkit.fake.ports import free_port
from labkit.fake.sshd import PythonSshNode

REPO = Path(__file__).resolve().parent.parent


# --- a small ssh-only fake lab --------------------------------------------------------------

def _client_key(path: Path) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()


@dataclass
class SshNodes:
    """N fake nodes (PythonSshNode or OpenSshNode) with a key, known_hosts and an inventory."""

    base: Path
    count: int
    kind: str = "python"
    payloads: list[Path] = field(default_factory=list)
    nodes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import logging

        state = self.base / "state"
        state.mkdir(parents=True)
        key = state / "id_ed25519"
        (state / "authorized_keys").write_text(_client_key(key) + "\n")
        known: list[str] = []
        lines = ["nodes:"] if not self.payloads else [
            "payloads:", *[f"  - {p}" for p in self.payloads], "nodes:"]
        cls = OpenSshNode if self.kind == "openssh" else PythonSshNode
        for i in range(1, self.count + 1):
            name = f"node{i}"
            port = free_port()
            host_key = state / f"{name}.host_key"
            pub = ensure_host_key(host_key)
            known.append(f"[127.0.0.1]:{port} {pub.get_name()} {pub.get_base64()}")
            node = cls(name, self.base / "nodes" / name, "127.0.0.1", port, host_key,
                       state / "authorized_keys", logging.getLogger(f"test.{name}"))
            node.start()
            self.nodes[name] = node
            lines.append(f"  {name}: {{ssh: {{host: 127.0.0.1, port: {port}, "
                         f"key_file: {key}, known_hosts: {state / 'known_hosts'}}}}}")
        (state / "known_hosts").write_text("\n".join(known) + "\n")
        self.inventory_path = self.base / "inventory.yaml"
        self.inventory_path.write_text("\n".join(lines) + "\n")

    def inventory(self) -> inv.Inventory:
        return inv.load(self.inventory_path)

    def select(self, sel: str | None = None) -> list[inv.Node]:
        return self.inventory().select(sel)

    def pdir(self, name: str) -> Path:
        """The node's payloads folder on its 'disk'."""
        return self.base / "nodes" / name / "labkit" / "payloads"

    def manifest(self, name: str) -> dict[str, Any]:
        return json.loads((self.pdir(name) / "current" / "MANIFEST").read_text())

    def current(self, name: str) -> str | None:
        link = self.pdir(name) / "current"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def close(self) -> None:
        for n in self.nodes.values():
            n.close()


@pytest.fixture(autouse=True)
def _no_user_ssh_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The developer's ~/.ssh/config must not steer test connections."""
    monkeypatch.setenv("LABKIT_SSH_CONFIG", str(tmp_path / "no-ssh-config"))


@pytest.fixture
def ssh_nodes(tmp_path: Path) -> Iterator[Any]:
    made: list[SshNodes] = []

    def make(count: int = 3, kind: str = "python", payloads: list[Path] | None = None,
             ) -> SshNodes:
        lab = SshNodes(tmp_path / f"lab{len(made)}", count, kind, payloads or [])
        made.append(lab)
        return lab

    yield make
    for lab in made:
        lab.close()


def write_bundle(root: Path, files: dict[str, bytes | str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
    return root


def git_commit(root: Path) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@x", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@x")
    if not (root / ".git").exists():
        subprocess.run(["git", "init", "-q", str(root)], check=True, env=env)
    subprocess.run(["git", "-C", str(root), "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", str(root), "commit", "-q", "-m", "x"], check=True, env=env)
    return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True, env=env,
                          capture_output=True, text=True).stdout.strip()


SETTINGS = Settings(parallel=8, command_timeout=60.0, ssh_timeout=10.0, progress="never")


def run(lab: SshNodes, bundle_root: Path | None, action: str = "deploy",
        sel: str | None = None, build: str | None = dp.PYTHON_CHECK) -> dict[str, Any]:
    bundle = dp.collect_bundle([bundle_root]) if bundle_root else None
    outcomes = dp.Deployer(SETTINGS, bundle, build=build).run(lab.select(sel), action)
    return {o.node: o for o in outcomes}


BASE = {"tool.py": "print('v1')\n", "lib/helper.py": "X = 1\n", "data/blob.bin": b"\0" * 5000,
        "run.sh": "#!/bin/sh\necho hi\n"}


# --- pure logic -----------------------------------------------------------------------------

def test_collect_bundle_rules(tmp_path: Path) -> None:
    a = write_bundle(tmp_path / "a", {"x.py": "1", "__pycache__/x.cpython-311.pyc": "junk",
                                      "sub/y.txt": "y"})
    (a / "run.sh").write_text("#!/bin/sh\n")
    (a / "run.sh").chmod(0o700)
    b = bundle = dp.collect_bundle([a])
    assert sorted(b.files) == ["run.sh", "sub/y.txt", "x.py"]
    assert b.files["run.sh"].mode == 0o755 and b.files["x.py"].mode == 0o644
    single = tmp_path / "single.py"
    single.write_text("2")
    assert "single.py" in dp.collect_bundle([a, single]).files
    clash = write_bundle(tmp_path / "c", {"x.py": "other"})
    with pytest.raises(UserError, match="'x.py' comes from both"):
        dp.collect_bundle([a, clash])
    with pytest.raises(UserError, match="reserved"):
        dp.collect_bundle([write_bundle(tmp_path / "d", {"MANIFEST": "x"})])
    with pytest.raises(UserError, match="no such file"):
        dp.collect_bundle([tmp_path / "nope"])
    assert bundle.digest == dp.collect_bundle([a]).digest
    (a / "x.py").write_text("changed")
    assert bundle.digest != dp.collect_bundle([a]).digest


def test_bundle_paths_precedence(tmp_path: Path) -> None:
    assert dp.bundle_paths(None, []) == [dp.DEFAULT_BUNDLE]
    assert dp.bundle_paths(None, [tmp_path / "inv"]) == [tmp_path / "inv"]
    assert dp.bundle_paths("cfg", [tmp_path / "inv"], base=tmp_path) == [tmp_path / "cfg"]
    assert dp.bundle_paths(["/abs/x", "y"], [], base=tmp_path) == [Path("/abs/x"),
                                                                    tmp_path / "y"]
    assert dp.build_setting(None) == dp.PYTHON_CHECK
    assert dp.build_setting("") is None and dp.build_setting("none") is None
    assert dp.build_setting("make -j4") == "make -j4"


def test_plan_and_check_state_logic(tmp_path: Path) -> None:
    b = dp.collect_bundle([write_bundle(tmp_path / "b", {"a": "1", "b": "2", "c": "3"})])
    entries = {p: f.entry() for p, f in b.files.items()}
    node_files = dict(entries, b={**entries["b"], "sha256": "0" * 64})
    probe = {"current": {"id": "R1", "files": node_files, "suspect": ["c"]}, "previous": None}
    plan = dp.plan_upload(b, probe)
    assert [f.path for f in plan.send] == ["b", "c"]          # changed + suspected on node
    assert plan.link == {"a": ("R1", "a")}
    assert not dp.in_sync(b, probe)
    assert dp.in_sync(b, {"current": {"id": "R1", "files": entries, "suspect": []}})
    # the previous release also serves as a link source (rollback, then deploy forward again)
    probe2 = {"current": {"id": "R1", "files": {}, "suspect": []},
              "previous": {"id": "R0", "files": entries, "suspect": []}}
    assert not dp.plan_upload(b, probe2).send
    hashed = {"current": {"id": "R1", "files": entries, "missing": [], "modified": []}}
    assert dp.check_state(b, hashed)["state"] == "in sync"
    assert dp.check_state(b, {"current": None})["state"] == "missing"
    hashed["current"]["files"] = node_files
    s = dp.check_state(b, hashed)
    assert s["state"] == "stale" and s["stale"] == ["b"]
    hashed["current"]["modified"] = ["a"]
    assert dp.check_state(b, hashed)["state"] == "modified on node"


# --- against fake nodes ---------------------------------------------------------------------

KINDS = ["python", pytest.param("openssh", marks=[
    pytest.mark.interop, pytest.mark.slow,  # the python kind covers it in the inner loop
    pytest.mark.skipif(sshd_path() is None, reason="OpenSSH sshd not installed")])]


@pytest.mark.parametrize("kind", KINDS)
def test_deploy_redeploy_change_one_file(ssh_nodes: Any, tmp_path: Path, kind: str) -> None:
    src = write_bundle(tmp_path / "src", BASE)
    (src / "run.sh").chmod(0o755)
    rev = git_commit(src)
    lab = ssh_nodes(3, kind)

    first = run(lab, src)
    assert all(o.ok for o in first.values()), first
    release = first["node1"].value["release"]
    for name in lab.nodes:
        o = first[name]
        assert o.value["uploaded_files"] == 4 and o.value["state"] == "deployed"
        m = lab.manifest(name)
        assert (m["revision"], m["dirty"], m["release"]) == (rev, False, release)
        assert m["deployed_by"] and m["deployed_at"] and m["labkit_version"]
        cur = lab.pdir(name) / "current"
        assert (cur / "tool.py").read_text() == "print('v1')\n"
        assert os.stat(cur / "run.sh").st_mode & 0o777 == 0o755
        assert not [n for n in os.listdir(lab.pdir(name) / "releases") if n.startswith(".")]

    # what `invoke run -- cat labkit/payloads/current/MANIFEST` would see, over SSH
    from labkit.ssh import SshClient

    with SshClient.connect(lab.select("node2")[0], SETTINGS) as c:
        r = c.run("cat labkit/payloads/current/MANIFEST && ./labkit/payloads/current/run.sh")
    assert r.exit_code == 0 and json.loads(r.stdout.split(b"\nhi")[0])["revision"] == rev

    again = run(lab, src)
    for o in again.values():
        assert o.ok and o.value["uploaded_files"] == 0 and o.value["state"] == "in sync"
        assert o.value["release"] == release

    (src / "tool.py").write_text("print('v2')\n")
    rev2 = git_commit(src)
    third = run(lab, src)
    for name, o in third.items():
        assert o.ok, o.error
        assert o.value["uploaded_files"] == 1 and o.value["linked"] == 3
        assert o.value["previous"] == release != o.value["release"]
        assert lab.manifest(name)["revision"] == rev2
        new, old = lab.pdir(name) / "current", lab.pdir(name) / "previous"
        assert (new / "tool.py").read_text() == "print('v2')\n"
        assert (old / "tool.py").read_text() == "print('v1')\n"
        # unchanged files are copied on the node, not uploaded again, and share no inode
        # with the previous release (an edit in one must never reach the other)
        assert os.stat(new / "lib/helper.py").st_ino != os.stat(old / "lib/helper.py").st_ino
        assert (new / "lib/helper.py").read_bytes() == (old / "lib/helper.py").read_bytes()


def test_check_states(ssh_nodes: Any, tmp_path: Path) -> None:
    src = write_bundle(tmp_path / "src", BASE)
    lab = ssh_nodes(4)
    assert all(o.ok for o in run(lab, src, sel="node1,node2,node3").values())
    (lab.pdir("node2") / "current" / "lib" / "helper.py").write_text("X = 2  # hotfix\n")
    (lab.pdir("node3") / "current" / "data" / "blob.bin").unlink()
    checked = run(lab, src, "check")
    assert checked["node1"].ok and checked["node1"].value["state"] == "in sync"
    assert checked["node2"].value["state"] == "modified on node"
    assert checked["node2"].value["modified"] == ["lib/helper.py"]
    assert checked["node3"].value["state"] == "modified on node"
    assert checked["node4"].value["state"] == "missing"
    assert not any(checked[n].ok for n in ("node2", "node3", "node4"))
    (src / "tool.py").write_text("print('v2')\n")
    stale = run(lab, src, "check", sel="node1")["node1"]
    assert not stale.ok and stale.value["state"] == "stale" and stale.value["stale"] == ["tool.py"]
    assert "stale" in stale.error
    # check changed nothing; a deploy repairs the node edited in place (re-uploads that file,
    # does not link the edited copy into the new release)
    assert lab.manifest("node2")["files"]["lib/helper.py"]["size"] == len("X = 1\n")
    fixed = run(lab, src, sel="node2")["node2"]
    assert fixed.ok and fixed.value["uploaded_files"] == 2  # tool.py (changed) + helper.py
    assert (lab.pdir("node2") / "current/lib/helper.py").read_text() == "X = 1\n"
    assert run(lab, src, "check", sel="node2")["node2"].value["state"] == "in sync"


def test_rollback(ssh_nodes: Any, tmp_path: Path) -> None:
    src = write_bundle(tmp_path / "src", BASE)
    lab = ssh_nodes(2)
    r1 = run(lab, src)["node1"].value["release"]
    assert not run(lab, None, "rollback")["node1"].ok  # nothing to roll back to yet
    (src / "tool.py").write_text("print('v2')\n")
    v2_mtime = (src / "tool.py").stat().st_mtime_ns
    r2 = run(lab, src)["node1"].value["release"]
    (src / "tool.py").write_text("print('v3')\n")  # same size: only the timestamp tells
    assert (src / "tool.py").stat().st_mtime_ns != v2_mtime  # (a deploy ran in between)
    out = run(lab, src)
    r3 = out["node1"].value["release"]
    assert out["node1"].value["pruned"] == [r1]  # keep current + previous only
    assert sorted(os.listdir(lab.pdir("node1") / "releases")) == sorted([r2, r3])
    back = run(lab, None, "rollback")
    for name in lab.nodes:
        assert back[name].ok and back[name].value["release"] == r2
        assert lab.current(name) == r2
        assert (lab.pdir(name) / "current/tool.py").read_text() == "print('v2')\n"
    # forward again: v3's files are still on the node (as `previous`): nothing to upload
    fwd = run(lab, src)["node1"]
    assert fwd.ok and fwd.value["uploaded_files"] == 0
    assert (lab.pdir("node1") / "current/tool.py").read_text() == "print('v3')\n"


def test_build_step_failure_leaves_current(ssh_nodes: Any, tmp_path: Path) -> None:
    src = write_bundle(tmp_path / "src", BASE)
    lab = ssh_nodes(2)
    r1 = run(lab, src)["node1"].value["release"]
    (src / "lib/helper.py").write_text("def broken(:\n")
    bad = run(lab, src)
    for name, o in bad.items():
        assert not o.ok and "python check: lib/helper.py" in o.error
        assert lab.current(name) == r1
        assert not [n for n in os.listdir(lab.pdir(name) / "releases") if n.startswith(".")]
    (src / "lib/helper.py").write_text("X = 3\n")
    failing = run(lab, src, build="echo compiling; echo boom >&2; exit 3")["node1"]
    assert not failing.ok and "exited 3" in failing.error and "boom" in failing.error
    assert lab.current("node1") == r1
    good = run(lab, src, build="test -f lib/helper.py && echo $LABKIT_RELEASE > BUILT")["node1"]
    assert good.ok and lab.current("node1") == good.value["release"]
    assert (lab.pdir("node1") / "current/BUILT").read_text().strip() == good.value["release"]


@pytest.mark.slow  # fault: the controller killed mid-transfer
def test_sigkill_controller_mid_deploy(ssh_nodes: Any, tmp_path: Path) -> None:
    src = write_bundle(tmp_path / "src", BASE)
    lab = ssh_nodes(3)
    r1 = run(lab, src)["node1"].value["release"]
    # a big (sparse: free to create) file makes the transfer last seconds
    big = write_bundle(tmp_path / "big", BASE)
    with open(big / "huge.bin", "wb") as f:
        f.truncate(512 << 20)
    big_inv = tmp_path / "big-inventory.yaml"
    big_inv.write_text(f"payloads: [{big}]\n" + lab.inventory_path.read_text())
    cmd = [sys.executable, "-m", "labkit.cli", "deploy", "-i", str(big_inv)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)

    def receiving() -> bool:
        for name in lab.nodes:
            inc = [p for p in (lab.pdir(name) / "releases").glob(".incoming-*")]
            if not inc or not (inc[0] / "huge.bin").exists() or \
                    (inc[0] / "huge.bin").stat().st_size < (4 << 20):
                return False
        return True

    end = time.monotonic() + 60
    while not receiving():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < end, "transfer never started on every node"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for name in lab.nodes:  # every node still runs the previous, complete release
        assert lab.current(name) == r1
        assert (lab.pdir(name) / "current/tool.py").read_text() == "print('v1')\n"
        assert not (lab.pdir(name) / "current/huge.bin").exists()
    (src / "tool.py").write_text("print('v2')\n")
    # the node ends the agent when the session drops (SIGKILL, or it sees EOF and cleans up
    # itself); once it is gone, a half-filled .incoming-* that is still there stays until the
    # next deploy removes it and says so
    from labkit.nodeside import killmarked

    end = time.monotonic() + 40
    while any(killmarked.marked([n.marker]) for n in lab.nodes.values()):
        assert time.monotonic() < end, "agent processes outlived the dropped session"
        time.sleep(0.05)
    left = {n: sorted(p.name for p in (lab.pdir(n) / "releases").glob(".incoming-*"))
            for n in lab.nodes}
    nxt = run(lab, src)
    for name, o in nxt.items():
        assert o.ok, o.error
        assert sorted(o.value["cleaned"]) == left[name]
        if left[name]:
            assert f"cleaned {left[name][0]}" in o.value["state"]
        assert not list((lab.pdir(name) / "releases").glob(".incoming-*"))
        assert (lab.pdir(name) / "current/tool.py").read_text() == "print('v2')\n"
        assert lab.current(name) != r1


def edit_in_place(path: Path, data: bytes) -> None:
    """What a quick fix on a node looks like to the file system: the same inode rewritten,
    size kept, mtime put back (``cp -p``, ``rsync -t``, an editor that restores it)."""
    st = path.stat()
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


def test_an_edit_keeping_size_and_mtime_is_repaired_by_deploy(ssh_nodes: Any,
                                                               tmp_path: Path) -> None:
    """Today: --check saw it, deploy said "in sync" and left it."""
    src = write_bundle(tmp_path / "src", BASE)
    lab = ssh_nodes(1)
    r1 = run(lab, src)["node1"].value["release"]
    helper = lab.pdir("node1") / "current/lib/helper.py"
    edit_in_place(helper, b"X = 2\n")
    assert run(lab, src, "check")["node1"].value["modified"] == ["lib/helper.py"]
    fixed = run(lab, src)["node1"]
    assert fixed.ok and fixed.value["state"] == "deployed", fixed.value
    assert fixed.value["uploaded_files"] == 1 and fixed.value["release"] != r1
    assert (lab.pdir("node1") / "current/lib/helper.py").read_text() == "X = 1\n"
    assert run(lab, src, "check")["node1"].value["state"] == "in sync"


def test_rollback_restores_previous_byte_for_byte_after_an_edit_in_current(
        ssh_nodes: Any, tmp_path: Path) -> None:
    """Today: current and previous shared hard-linked files, so the edit was in both."""
    src = write_bundle(tmp_path / "src", BASE)
    lab = ssh_nodes(1)
    r1 = run(lab, src)["node1"].value["release"]
    (src / "tool.py").write_text("print('v2')\n")
    assert run(lab, src)["node1"].ok
    for rel in ("lib/helper.py", "data/blob.bin"):
        edit_in_place(lab.pdir("node1") / "current" / rel,
                      b"X = 9\n" if rel.endswith(".py") else b"\1" * 5000)
    back = run(lab, None, "rollback")["node1"]
    assert back.ok and lab.current("node1") == r1
    cur = lab.pdir("node1") / "current"
    for rel, data in BASE.items():
        want = data.encode() if isinstance(data, str) else data
        assert (cur / rel).read_bytes() == want, rel
    # and every pair of releases on the node shares no inode at all
    rels = [d for d in (lab.pdir("node1") / "releases").iterdir() if not d.name.startswith(".")]
    inodes = [{(f.stat().st_dev, f.stat().st_ino) for f in d.rglob("*") if f.is_file()}
              for d in rels]
    assert len(rels) == 2 and not inodes[0] & inodes[1]


@dataclass
class HookedDeployer(dp.Deployer):
    """A Deployer that calls ``before_stage(n)`` right before its n-th stage command, after
    the node was probed: the window in which an edit on the node is invisible to the probe.
    Records what each stage command was planned to send."""

    before_stage: Callable[[int], None] | None = None
    sent: list[list[str]] = field(default_factory=list)

    def _stage(self, client: Any, node: inv.Node, workdir: str,
               plan: dp.Plan) -> dict[str, Any]:
        self.sent.append([f.path for f in plan.send])
        if self.before_stage:
            self.before_stage(len(self.sent))
        return super()._stage(client, node, workdir, plan)


def test_an_edit_between_probe_and_stage_is_resent_once(ssh_nodes: Any,
                                                         tmp_path: Path) -> None:
    """An edit the probe cannot see because it happens after the probe: the stage agent finds
    the kept file no longer as built (by stat, then by hash), refuses it, and the deployer
    sends exactly that file the second time. A second mismatch in that second stage is an
    error, not a third round."""
    src = write_bundle(tmp_path / "src", BASE)
    lab = ssh_nodes(1)
    run(lab, src)
    cur = lab.pdir("node1") / "current"
    edits: dict[int, tuple[str, bytes]] = {}

    def edit(n: int) -> None:  # an ordinary edit on the node, through `current`
        if n in edits:
            rel, data = edits[n]
            (cur / rel).write_bytes(data)

    (src / "tool.py").write_text("print('v2')\n")
    edits.update({1: ("lib/helper.py", b"X = 2\n")})
    d = HookedDeployer(SETTINGS, dp.collect_bundle([src]), before_stage=edit)
    out = d.run(lab.select(), "deploy")[0]
    assert out.ok, out.error
    assert d.sent == [["tool.py"], ["lib/helper.py", "tool.py"]]
    assert out.value["uploaded_files"] == 2 and out.value["uploaded"].startswith("2 files")
    assert out.value["linked"] == 2  # run.sh and data/blob.bin still copied on the node
    r2 = out.value["release"]
    assert lab.current("node1") == r2
    assert (cur / "lib/helper.py").read_text() == "X = 1\n"
    assert (cur / "tool.py").read_text() == "print('v2')\n"
    assert run(lab, src, "check")["node1"].value["state"] == "in sync"

    (src / "tool.py").write_text("print('v3')\n")
    edits.clear()
    edits.update({1: ("lib/helper.py", b"X = 3\n"), 2: ("data/blob.bin", b"\1" * 5000)})
    d = HookedDeployer(SETTINGS, dp.collect_bundle([src]), before_stage=edit)
    out = d.run(lab.select(), "deploy")[0]
    assert d.sent == [["tool.py"], ["lib/helper.py", "tool.py"]]  # two rounds, no third
    assert not out.ok
    assert out.error == ("1 kept file changed on the node since its release was built "
                         "(data/blob.bin); nothing switched"), out.error
    assert lab.current("node1") == r2
    assert not [n for n in os.listdir(lab.pdir("node1") / "releases") if n.startswith(".")]


def test_rollback_refuses_a_previous_release_edited_on_the_node(ssh_nodes: Any,
                                                                 tmp_path: Path) -> None:
    """--rollback swaps symlinks; a previous release edited since it was built (size and
    mtime kept) is refused, named, and nothing is switched."""
    src = write_bundle(tmp_path / "src", BASE)
    lab = ssh_nodes(1)
    r1 = run(lab, src)["node1"].value["release"]
    (src / "tool.py").write_text("print('v2')\n")
    r2 = run(lab, src)["node1"].value["release"]
    edit_in_place(lab.pdir("node1") / "previous/lib/helper.py", b"X = 9\n")
    back = run(lab, None, "rollback")["node1"]
    assert not back.ok
    assert back.error == (f"previous release {r1} has 1 file modified on the node since it was "
                          "built (lib/helper.py); not rolled back: deploy instead"), back.error
    assert back.value["modified"] == ["lib/helper.py"]
    assert lab.current("node1") == r2


def test_a_failed_agent_reads_like_every_other_failed_command(
        ssh_nodes: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node whose python3 cannot run the agent: ``stage failed: exit code N: <last stderr
    line>``, the words every other task uses (it was ``failed (exit N)``)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text("#!/bin/sh\necho 'some noise' >&2\n"
                                     "echo 'sh: 1: python3: not found' >&2\nexit 127\n")
    (bin_dir / "python3").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")  # the nodes' PATH too
    src = write_bundle(tmp_path / "src", BASE)
    lab = ssh_nodes(1)
    out = run(lab, src)["node1"]  # the python check runs PATH's python3
    assert not out.ok
    assert out.error == ("stage failed: exit code 127: sh: 1: python3: not found "
                         "(is python3 installed on the node?)"), out.error


def test_a_source_changed_after_hashing_is_not_streamed(ssh_nodes: Any,
                                                        tmp_path: Path) -> None:
    """The node seals what it receives by stat and trusts it from then on, so bytes the
    MANIFEST does not promise must never reach it: a payload file edited between the bundle's
    hashing and its transfer (same size) stops that node's deploy, nothing switched."""
    src = write_bundle(tmp_path / "src", BASE)
    lab = ssh_nodes(1)
    r1 = run(lab, src)["node1"].value["release"]
    (src / "tool.py").write_text("print('v2')\n")
    bundle = dp.collect_bundle([src])
    (src / "tool.py").write_text("print('v3')\n")  # after hashing, before sending
    out = dp.Deployer(SETTINGS, bundle).run(lab.select(), "deploy")[0]
    assert not out.ok
    assert out.error == f"{src / 'tool.py'} changed while being deployed; nothing switched, " \
                        "deploy again", out.error
    assert lab.current("node1") == r1
    assert (lab.pdir("node1") / "current/tool.py").read_text() == "print('v1')\n"


def test_uploaded_counts_read_in_the_singular(ssh_nodes: Any, tmp_path: Path) -> None:
    src = write_bundle(tmp_path / "src", {"only.py": "x = 1\n"})
    lab = ssh_nodes(1, payloads=[src])
    r = subprocess.run([sys.executable, "-m", "labkit.cli", "deploy", "-i",
                        str(lab.inventory_path)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "bundle: 1 file," in r.stderr and "1 file," in r.stdout
    assert "1 files" not in r.stdout + r.stderr


def test_cli_deploy_check_json(ssh_nodes: Any, tmp_path: Path) -> None:
    src = write_bundle(tmp_path / "src", BASE)
    lab = ssh_nodes(2, payloads=[src])
    cli = [sys.executable, "-m", "labkit.cli", "deploy", "-i", str(lab.inventory_path)]

    def go(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cli, *extra], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60)

    r = go("--check", "--json")
    assert r.returncode == 1 and {o["state"] for o in json.loads(r.stdout)} == {"missing"}
    r = go()
    assert r.returncode == 0, r.stderr
    assert "release" in r.stdout and "deployed" in r.stdout and "bundle: 4 files" in r.stderr
    r = go("--check", "-n", "node1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["state"] == "in sync"
    r = go("--check", "--rollback")
    assert r.returncode == 2 and "exclude" in r.stderr
    r = go("-n", "nosuch")
    assert r.returncode == 2


def test_leftovers_reported_by_check_and_cleaned_by_unchanged_redeploy(
        ssh_nodes: Any, tmp_path: Path) -> None:
    """What a node that lost power mid-transfer looks like: a half-filled .incoming-* and a
    stray temp symlink. --check reports them and leaves them; a deploy (even one with nothing
    to upload) removes them under the node's lock and says so."""
    src = write_bundle(tmp_path / "src", BASE)
    lab = ssh_nodes(1)
    r1 = run(lab, src)["node1"].value["release"]
    half = lab.pdir("node1") / "releases" / ".incoming-20000101T000000Z-deadbeef"
    write_bundle(half, {"tool.py": "print('half"})
    (lab.pdir("node1") / ".current.tmp-999").symlink_to(f"releases/{half.name}")
    checked = run(lab, src, "check")["node1"]
    assert checked.ok and checked.value["state"] == "in sync"
    assert sorted(checked.value["leftovers"]) == [".current.tmp-999", half.name]
    assert half.exists()
    again = run(lab, src)["node1"]
    assert again.ok and again.value["uploaded_files"] == 0 and again.value["release"] == r1
    assert sorted(again.value["cleaned"]) == [".current.tmp-999", half.name]
    assert "in sync; cleaned" in again.value["state"]
    assert not half.exists() and not (lab.pdir("node1") / ".current.tmp-999").is_symlink()


def test_parse_sh_probe() -> None:
    man = {"files": {"a.py": {"sha256": "1", "size": 1, "mode": "644"},
                     "d/b": {"sha256": "2", "size": 2, "mode": "755"},
                     "gone": {"sha256": "3", "size": 3, "mode": "644"}},
           "revision": "abc", "dirty": False}
    text = "\n".join([
        "@leftover .incoming-x", "@release current R2", "@manifest current",
        json.dumps(man, indent=1), "", "@end", "@new current", "./d/b", "@files current",
        "./a.py", "./d/b", "./MANIFEST", "./.labkit-stat", "@release previous R1",
        "@done", ""])
    p = dp.parse_sh_probe(text)
    assert p["leftovers"] == [".incoming-x"]
    assert p["current"]["id"] == "R2" and p["current"]["revision"] == "abc"
    assert p["current"]["suspect"] == ["d/b", "gone"]    # edited after build + missing
    assert p["previous"]["error"]                       # no MANIFEST: never a link source
    assert dp.parse_sh_probe("") == {"leftovers": [], "cleaned": [], "current": None,
                                     "previous": None}
    with pytest.raises(NodeError, match="cut short"):
        dp.parse_sh_probe("@release current R2\n@manifest current\n{")


@pytest.mark.slow  # end to end: power on, wait for SSH, deploy
def test_fake_lab_end_to_end(make_fake_lab: Any) -> None:
    """Acceptance 1, deploy part, on the full fake lab (BMC + SSH): power on, `labkit deploy`
    of the default bundle (labkit's own payloads), every node on the same revision per its
    MANIFEST read over SSH; a power cycle keeps the deployed release (it is the node's disk)."""
    lab = make_fake_lab(count=2, power_on=True)
    cli = [sys.executable, "-m", "labkit.cli"]
    r = subprocess.run([*cli, "deploy", "--json"], env=lab.env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout
    rows = json.loads(r.stdout)
    assert {o["state"] for o in rows} == {"deployed"}
    from labkit.ssh import SshClient

    manifests = []
    for node in lab.inventory().select(None):
        with SshClient.connect(node, SETTINGS) as c:
            res = c.run("cat labkit/payloads/current/MANIFEST")
        assert res.exit_code == 0
        manifests.append(json.loads(res.stdout))
    assert len({(m["revision"], m["dirty"], m["digest"]) for m in manifests}) == 1
    assert set(manifests[0]["files"]) >= {"__init__.py"}
    lab.control.power("node1", "off", now=True)
    lab.wait("node1", phase="off")
    lab.control.power("node1", "on", now=True)
    lab.wait("node1", phase="up")
    r = subprocess.run([*cli, "deploy", "--check", "--json"], env=lab.env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {o["state"] for o in json.loads(r.stdout)} == {"in sync"}


# --- payloads the controller cannot ship as they are: named, exit 2, nothing deployed ---------

def test_payload_tree_special_files_and_links_are_refused(tmp_path: Path) -> None:
    """Each of these was silently left out of the release (or, for the outside link, shipped
    without anyone asking); now each is a UserError naming the path."""
    import socket

    def bundle_with(name: str, make: Any) -> Path:
        root = write_bundle(tmp_path / name, {"ok.py": "x = 1\n"})
        make(root)
        return root

    cases = {
        "fifo": (lambda r: os.mkfifo(r / "pipe"), "pipe", "a FIFO"),
        "dangling": (lambda r: (r / "gone.py").symlink_to(r / "nowhere.py"), "gone.py",
                     "dangling symlink"),
        "outside": (lambda r: (r / "secret").symlink_to(tmp_path / "outside.txt"), "secret",
                    "outside the payload folder"),
        "dirlink": (lambda r: (r / "lib").symlink_to(write_bundle(r / "real", {"m.py": "1"})),
                    "lib", "symlink to a folder"),
        "to-device": (lambda r: (r / "null").symlink_to("/dev/null"), "null", "outside"),
    }
    (tmp_path / "outside.txt").write_text("not for the nodes\n")
    for name, (make, bad, words) in cases.items():
        root = bundle_with(name, make)
        with pytest.raises(UserError) as e:
            dp.collect_bundle([root], cache=None)
        assert f"{root / bad}" in str(e.value) and words in str(e.value), (name, str(e.value))
        assert "\n" not in str(e.value)
    # a socket too (bound, so the file exists), and a single-file payload that is a FIFO
    root = bundle_with("sock", lambda r: None)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(root / "s.sock"))
        with pytest.raises(UserError, match="s.sock: a socket cannot be deployed"):
            dp.collect_bundle([root], cache=None)
    finally:
        s.close()
    try:  # a device node (root in most containers may make one; skip that line if not)
        dev = bundle_with("dev", lambda r: os.mknod(r / "null", 0o600 | stat.S_IFCHR,
                                                     os.makedev(1, 3)))
    except PermissionError:
        dev = None
    if dev:
        with pytest.raises(UserError, match="null: a device cannot be deployed"):
            dp.collect_bundle([dev], cache=None)
    os.mkfifo(tmp_path / "lone-fifo")
    with pytest.raises(UserError, match="lone-fifo: a FIFO"):
        dp.collect_bundle([tmp_path / "lone-fifo"], cache=None)
    # links that stay inside the tree and point at files are fine: the content is shipped
    ok = bundle_with("inside", lambda r: (r / "alias.py").symlink_to(r / "ok.py"))
    assert dp.collect_bundle([ok], cache=None).files["alias.py"].size == len("x = 1\n")


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists(),
                    reason="needs root and setpriv to run the controller as another user "
                           "(root reads every file whatever its mode)")
@pytest.mark.parametrize("what", ["file", "folder"])
def test_unreadable_payload_refused_through_both_clis(what: str) -> None:
    """Today: an unreadable file gave a traceback half-way through the deploy; an unreadable
    folder was silently left out of the release. Run as nobody, so permissions apply."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="labkit-unreadable-"))
    lab = None
    try:
        base.chmod(0o755)
        src = write_bundle(base / "src", {**BASE, "secret/key.py": "K = 1\n"})
        lab = SshNodes(base / "lab", 1, payloads=[src])
        subprocess.run(["chown", "-R", "65534:65534", str(base)], check=True)
        bad = src / "lib/helper.py" if what == "file" else src / "secret"
        bad.chmod(0)
        env = dict(os.environ, HOME=str(base), XDG_CACHE_HOME=str(base / "cache"))
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        for argv in ([str(Path(sys.executable).with_name("labkit")), "deploy"],
                     [str(Path(sys.executable).with_name("invoke")), "-r", str(REPO),
                      "deploy"]):
            r = subprocess.run([*as_nobody, *argv, "-i", str(lab.inventory_path)], env=env,
                               cwd=base, capture_output=True, text=True, timeout=60)
            assert r.returncode == 2, r.stdout + r.stderr
            assert r.stderr.count("\n") == 1 and str(bad) in r.stderr, r.stderr
            assert "cannot read" in r.stderr and "Traceback" not in r.stderr
            assert not lab.pdir("node1").exists()  # nothing deployed, nothing started
    finally:
        if lab:
            lab.close()
        shutil.rmtree(base, ignore_errors=True)
