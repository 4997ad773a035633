"""Secrets audit: every task runs against a fake lab through the real ``labkit`` program while a
background thread samples ``/proc/*/cmdline`` of every process and ``/proc/*/environ`` of every
descendant of this test (the CLI runs, the lab process, everything the fake nodes run) — and
neither the BMC password nor the lab's private keys (client key ``id_ed25519``, node host keys)
may show up in any argv or environment seen, in any task's stdout/stderr (table and --json),
in the lab's logs (``lab.log``, console logs), in results folders, or in error text — also when
the password is refused (fault ``refuse_password``) or simply wrong. Credential files labkit
creates must be mode 0600."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from labkit.pytest_plugin import FakeLabHandle, start_fake_lab

LABKIT = [sys.executable, "-m", "labkit.cli"]
_bin = Path(sys.executable).with_name("labkit")
if _bin.exists():
    LABKIT = [str(_bin)]
X86_LINUX = sys.platform == "linux" and os.uname().machine == "x86_64"


pytestmark = pytest.mark.slow  # every task, twice, under a sampler


# --- what counts as a secret -------------------------------------------------------------

def key_needles(path: Path) -> list[bytes]:
    """Distinctive pieces of an OpenSSH private key file: its base64 body lines, minus the
    first one (the same "openssh-key-v1 ... none none" preamble in every unencrypted ed25519
    key) — any of them in output means key material leaked."""
    lines = [ln.strip() for ln in path.read_bytes().splitlines()
             if ln.strip() and not ln.startswith(b"-----")]
    return [ln for ln in lines[1:] if len(ln) >= 16] + [path.read_bytes().strip()]


class Secrets:
    def __init__(self, lab: FakeLabHandle):
        self.password = lab.password()
        self.needles: dict[str, list[bytes]] = {"BMC password": [self.password]}
        keys = [lab.state_dir / "id_ed25519", *sorted((lab.state_dir / "nodes").glob(
            "*.host_key"))]
        for k in keys:
            self.needles[f"private key {k.name}"] = key_needles(k)
        assert len(self.password) >= 8

    def add(self, label: str, value: bytes) -> None:
        self.needles[label] = [value]

    def find(self, data: bytes | str) -> list[str]:
        if isinstance(data, str):
            data = data.encode(errors="surrogateescape")
        return [label for label, ns in self.needles.items() if any(n in data for n in ns)]


# --- the /proc sampler --------------------------------------------------------------------

class ProcSampler(threading.Thread):
    """Samples every process's argv and our descendants' environments until stopped."""

    def __init__(self, secrets: Secrets):
        super().__init__(daemon=True, name="proc-sampler")
        self.secrets = secrets
        self.stop_event = threading.Event()
        self.leaks: list[str] = []
        self.seen_cmds: set[str] = set()
        self.rounds = 0
        self.me = os.getpid()

    def _children(self) -> set[int]:
        parent: dict[int, int] = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                data = Path(f"/proc/{pid}/stat").read_bytes()
            except OSError:
                continue
            parent[int(pid)] = int(data[data.rfind(b")") + 2:].split()[1])
        ours: set[int] = set()
        for pid in parent:
            p, hops = pid, 0
            while p > 1 and hops < 64:
                p = parent.get(p, 0)
                hops += 1
                if p == self.me:
                    ours.add(pid)
                    break
        return ours

    def sample(self) -> None:
        ours = self._children()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            hit = self.secrets.find(cmd)
            if hit:
                shown = cmd[:80].replace(b"\0", b" ").decode(errors="replace")
                self.leaks.append(f"argv of pid {pid}: {hit}: {shown}")
            if int(pid) in ours:
                self.seen_cmds.add(cmd.replace(b"\0", b" ").decode(errors="replace")[:200])
                try:
                    env = Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:
                    continue
                hit = self.secrets.find(env)
                if hit:
                    self.leaks.append(f"environment of pid {pid}: {hit}")
        self.rounds += 1

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            time.sleep(0.01)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)


# --- the run -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Any:
    handle = start_fake_lab(tmp_path_factory.mktemp("secrets"), count=2, seed=11,
                            power_delay=(0.05, 0.2), boot_delay=0.2)
    yield handle
    handle.stop()


def git_repo_with_upstream(base: Path) -> Path:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x"}

    def git(*a: str, cwd: Path = base) -> None:
        subprocess.run(["git", *a], cwd=cwd, env=env, check=True, capture_output=True)

    git("init", "-q", "--bare", str(base / "up.git"))
    git("clone", "-q", str(base / "up.git"), str(base / "work"))
    (base / "work" / "a.txt").write_text("a\n")
    git("add", "a.txt", cwd=base / "work")
    git("commit", "-q", "-m", "a", cwd=base / "work")
    git("push", "-q", "origin", "HEAD", cwd=base / "work")
    return base / "work"


class Runner:
    def __init__(self, lab: FakeLabHandle, cwd: Path):
        self.lab = lab
        self.cwd = cwd
        self.env = {**lab.env, "INVOKE_LABKIT_LEASE_DIR": str(cwd / "leases"),
                    "INVOKE_LABKIT_RESULTS_DIR": str(cwd / "results"),
                    "INVOKE_LABKIT_POWER_WAIT": "30", "INVOKE_LABKIT_SSH_WAIT": "30",
                    "INVOKE_LABKIT_RETRY_WINDOW": "5", "INVOKE_LABKIT_BMC_TIMEOUT": "3",
                    "INVOKE_LABKIT_CYCLE_DELAY": "0.2",
                    "LABKIT_SSH_CONFIG": str(cwd / "no-ssh-config"),
                    "XDG_CACHE_HOME": str(cwd / "cache")}
        self.log: list[tuple[list[str], subprocess.CompletedProcess]] = []

    def __call__(self, *argv: str, rc: int | None = 0, env: dict[str, str] | None = None,
                 ) -> subprocess.CompletedProcess:
        t0 = time.monotonic()
        r = subprocess.run([*LABKIT, *argv], cwd=self.cwd, env={**self.env, **(env or {})},
                           capture_output=True, text=True, timeout=120)
        self.log.append((list(argv), r))
        print(f"{time.monotonic() - t0:5.1f}s rc={r.returncode} labkit {' '.join(argv)}")
        if rc is not None:
            assert r.returncode == rc, f"labkit {' '.join(argv)} -> {r.returncode}\n" \
                                       f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        return r


@pytest.fixture(scope="module")
def audit(lab: FakeLabHandle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run every task once (most twice: table and --json) under the sampler."""
    cwd = tmp_path_factory.mktemp("secrets-cwd")
    secrets = Secrets(lab)
    wrong = b"Wr0ng-Passw0rd-" + os.urandom(6).hex().encode()
    secrets.add("wrong BMC password", wrong)
    sampler = ProcSampler(secrets)
    sampler.start()
    run = Runner(lab, cwd)
    steps: list[str] = []
    dirtier = None
    try:
        run("lab.status")
        run("lab.status", "--json")
        run("power-status", "--json")
        run("power-on", "--wait=ssh")
        run("power-status")
        run("boot-device", "pxe")
        run("boot-device", "disk", "--persistent", "--json")
        r = run("console", "node1", "--capture", "0.5")
        steps.append(r.stdout)
        run("run", "--", "echo", "hello from $LABKIT_NODE")
        run("run", "--json", "--", "env; ls -la; cat ~/.ssh/authorized_keys 2>/dev/null; true")
        run("deploy")
        run("deploy", "--check", "--json")
        run("deploy", "--json")
        repo = git_repo_with_upstream(tmp_path_factory.mktemp("secrets-git"))
        run("sync", "--dry-run", "--repo", str(repo))
        run("sync", "--dry-run", "--json", "--repo", str(repo))
        run("reserve", "-n", "node1", "--for", "1h", "--note", "secrets audit")
        run("who")
        run("who", "--json")
        run("release", "-n", "node1")
        # dirty-rate of a process that writes memory (the nodes share this machine)
        dirtier = subprocess.Popen([sys.executable, "-c",
                                    "import time\nb = bytearray(8 << 20)\nprint(flush=True)\n"
                                    "while True:\n"
                                    "    for i in range(0, len(b), 4096): b[i] = (b[i] + 1) % 256\n"
                                    "    time.sleep(0.01)\n"], stdout=subprocess.PIPE)
        dirtier.stdout.readline()  # its memory is there
        if X86_LINUX:
            run("dirty-rate", "-n", "node1", "--pid", str(dirtier.pid), "--seconds", "0.5",
                "--json", rc=None)
            run("migrate-test", "--size", "8M", "--rate", "2000", "--max-rounds", "3",
                "--json", rc=None)
        run("power-reset", "--json")
        run("power-cycle", "--wait")
        run("power-soft", "--wait")
        run("power-off", "--wait", "--json")
        # the failing cases: a refused password, and a wrong one
        lab.control.fault("*", refuse_password=True)
        try:
            refused = run("power-status", rc=1)
            refused_json = run("power-on", "--json", rc=1)
        finally:
            lab.control.clear("*")
        wrong_inv = wrong_password_inventory(lab, cwd, wrong)
        wrong_r = run("power-status", "--json", "-i", str(wrong_inv), rc=1)
        wrong_r2 = run("console", "node1", "-i", str(wrong_inv), "--capture", "0.3", rc=None)
    finally:
        if dirtier is not None:
            dirtier.kill()
            dirtier.wait()
        sampler.stop()
    return {"secrets": secrets, "sampler": sampler, "run": run, "cwd": cwd,
            "refused": [refused, refused_json], "wrong": [wrong_r, wrong_r2]}


def wrong_password_inventory(lab: FakeLabHandle, cwd: Path, wrong: bytes) -> Path:
    """The lab's inventory with the BMC password file swapped for a wrong one."""
    folder = cwd / "wrong"
    folder.mkdir()
    pw = folder / "wrong-password"
    pw.write_bytes(wrong + b"\n")
    pw.chmod(0o600)
    text = lab.inventory_path.read_text()
    text = text.replace("password_file: bmc-password", f"password_file: {pw}")
    text = text.replace("key_file: id_ed25519", f"key_file: {lab.state_dir / 'id_ed25519'}")
    text = text.replace("known_hosts: known_hosts", f"known_hosts: {lab.state_dir / 'known_hosts'}")
    text = text.replace("state_dir: .", f"state_dir: {lab.state_dir}")
    path = folder / "inventory.yaml"
    path.write_text(text)
    return path


# --- the checks ----------------------------------------------------------------------------

def test_no_secret_in_any_argv_or_environment(audit: dict[str, Any]) -> None:
    s: ProcSampler = audit["sampler"]
    assert s.leaks == []
    # the sampler really saw the work: CLI runs and node-side commands
    assert s.rounds > 50
    assert any("labkit" in c and "deploy" in c for c in s.seen_cmds), sorted(s.seen_cmds)[:20]
    assert any("/bin/sh -c" in c for c in s.seen_cmds)


def test_no_secret_in_task_output(audit: dict[str, Any]) -> None:
    secrets: Secrets = audit["secrets"]
    leaks = []
    for argv, r in audit["run"].log:
        for name, text in (("stdout", r.stdout), ("stderr", r.stderr)):
            hit = secrets.find(text)
            if hit:
                leaks.append(f"labkit {' '.join(argv)} {name}: {hit}")
    assert leaks == []
    assert len(audit["run"].log) >= 25


def test_failures_are_clean_and_name_the_node(audit: dict[str, Any]) -> None:
    secrets: Secrets = audit["secrets"]
    for r in audit["refused"] + audit["wrong"]:
        text = r.stdout + r.stderr
        assert "Traceback" not in text
        assert secrets.find(text) == []
        assert "node1" in text
    refused = audit["refused"][0]
    assert "failed" in refused.stdout + refused.stderr


def test_no_secret_in_logs_or_results(audit: dict[str, Any], lab: FakeLabHandle) -> None:
    secrets: Secrets = audit["secrets"]
    files = [lab.state_dir / "lab.log", *sorted((lab.state_dir / "console").glob("*"))]
    results = audit["cwd"] / "results"
    assert results.is_dir()  # console --capture (and migrate-test) wrote results folders
    files += [p for p in results.rglob("*") if p.is_file()]
    leaks = [f"{p}: {hit}" for p in files if (hit := secrets.find(p.read_bytes()))]
    assert leaks == []
    assert any(p.suffix == ".log" for p in results.rglob("*"))


def test_credential_files_are_0600(audit: dict[str, Any], lab: FakeLabHandle) -> None:
    creds = [lab.state_dir / "bmc-password", lab.state_dir / "id_ed25519",
             *sorted((lab.state_dir / "nodes").glob("*.host_key"))]
    assert len(creds) == 2 + len(lab.nodes)
    # and anything else under the state folder that holds a private key
    for p in lab.state_dir.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.stat().st_size < 1 << 20 \
                and b"PRIVATE KEY" in p.read_bytes() and p not in creds:
            creds.append(p)
    bad = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in creds
           if stat.S_IMODE(p.stat().st_mode) != 0o600}
    assert bad == {}
    sock = lab.state_dir / "control.sock"
    assert stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0


def test_console_capture_with_a_wrong_password_fails(audit: dict[str, Any]) -> None:
    """A wrong password will not fix itself: the capture must fail (exit 1, one line naming
    the node), not record 0 bytes and exit 0."""
    r = audit["wrong"][1]
    assert r.returncode == 1, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "node1" in r.stderr
