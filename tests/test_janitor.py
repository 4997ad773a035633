"""Leftovers of a SIGKILLed controller on REAL sshd nodes (OpenSshNode), and the janitor that
cleans them (labkit/janitor.py).

A real sshd does not kill a session's processes when the connection drops: after a controller
SIGKILL during migrate-test's stop-and-copy phase the source workload stays frozen (SIGSTOPped,
so it never reads the EOF on its stdin) for ever. The next migrate-test must find it by its
LABKIT_CTL marker (the dead controller's host:pid:start), kill it, and say so — and never touch a
process of a live controller or one without our marker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from labkit.config import Settings
from labkit.fake.openssh import sshd_path
from labkit.janitor import controller_alive, sweep
from labkit.pytest_plugin import FakeLabHandle, start_fake_lab
from labkit.ssh import SshClient, controller_tag, proc_start_time

LABKIT = [sys.executable, "-m", "labkit.cli"]
_bin = Path(sys.executable).with_name("labkit")
if _bin.exists():
    LABKIT = [str(_bin)]
X86_LINUX = sys.platform == "linux" and os.uname().machine == "x86_64"
HOST = socket.gethostname()
SETTINGS = Settings(ssh_timeout=10.0, command_timeout=30.0)

pytestmark = pytest.mark.skipif(sshd_path() is None,
                                reason="needs OpenSSH's sshd (openssh-server) for real-sshd nodes")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Any:
    handle = start_fake_lab(tmp_path_factory.mktemp("janitor"), count=2, sshd="openssh",
                            power_delay=(0.05, 0.2), boot_delay=0.2)
    handle.power_on_all()
    yield handle
    handle.stop()


def env_for(lab: FakeLabHandle) -> dict[str, str]:
    return {**lab.env, "LABKIT_SSH_CONFIG": "/nonexistent",
            "XDG_CACHE_HOME": str(lab.state_dir / "cache"),
            "INVOKE_LABKIT_RESULTS_DIR": str(lab.state_dir / "results"),
            "INVOKE_LABKIT_POWER_WAIT": "30", "INVOKE_LABKIT_SSH_WAIT": "30"}


def marked(prefix: str, exact: bool = False,
           under: Path | None = None) -> dict[int, dict[str, Any]]:
    """Processes (the nodes are local) whose LABKIT_CTL starts with ``prefix`` (or, ``exact``,
    is it); with ``under``, only those of nodes whose root lies there (this test's lab, not
    whatever else runs on the machine)."""
    want = f"LABKIT_CTL={prefix}".encode()
    root = f"LABKIT_NODE_ROOT={Path(under).resolve()}".encode() if under else None
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if root is not None and not any(e.startswith(root) for e in env):
            continue
        if any(e == want if exact else e.startswith(want) for e in env):
            node = next((e.split(b"=", 1)[1].decode() for e in env
                         if e.startswith(b"LABKIT_NODE=")), "?")
            found[int(pid)] = {"cmd": cmd, "state": state.decode(), "node": node}
    return found


def dead_tag() -> str:
    """The tag of a controller that has just exited."""
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                         stdin=subprocess.PIPE)
    start = proc_start_time(p.pid)  # it lives until its stdin closes
    p.communicate(timeout=30)
    return f"{HOST}:{p.pid}:{start}"


def sshd_session_of(pid: int) -> int | None:
    """The sshd process serving `pid`'s session: its nearest ancestor that is sshd."""
    while pid > 1:
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
            cmd = Path(f"/proc/{ppid}/cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            return None
        if cmd.startswith(b"sshd"):
            return ppid
        pid = ppid
    return None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


def kill_at_stop_and_copy(lab: FakeLabHandle, cwd: Path
                          ) -> tuple[int, dict[int, dict], set[int]] | None:
    """Start migrate-test; SIGKILL it once the pre-copy source agent has quit and left the
    workload frozen (stop-and-copy phase). Returns (controller pid, its marked processes, the
    sshd processes serving their sessions), or None if the run ended before that point."""
    args = ["migrate-test", "--size", "16M", "--rate", "3000", "--steps-per-round", "0",
            "--max-rounds", "6", "--json"]
    proc = subprocess.Popen([*LABKIT, *args], env=env_for(lab), cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    prefix = f"{HOST}:{proc.pid}:"
    end = time.monotonic() + 60
    try:
        while proc.poll() is None and time.monotonic() < end:
            procs = marked(prefix)
            frozen = [p for p, i in procs.items() if "workload.py" in i["cmd"]
                      and i["state"] == "T"]
            precopy = [p for p, i in procs.items() if "agent.py source" in i["cmd"]
                       and "--tracker none" not in i["cmd"]]
            if frozen and not precopy:
                sessions = {sshd_session_of(p) for p in procs} - {None}
                proc.send_signal(signal.SIGKILL)
                proc.communicate(timeout=30)
                return proc.pid, procs, sessions
            time.sleep(0.003)
        return None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


@pytest.mark.slow  # a migrate-test killed, then another
@pytest.mark.skipif(not X86_LINUX, reason="migrate-test payloads are x86_64 Linux only")
def test_sigkill_leftovers_cleaned_on_real_sshd(lab: FakeLabHandle, tmp_path: Path) -> None:
    for _attempt in range(3):
        got = kill_at_stop_and_copy(lab, tmp_path)
        if got is not None:
            break
    else:
        pytest.fail("never caught a migrate-test in its stop-and-copy phase")
    ctl_pid, seen, sessions = got
    prefix = f"{HOST}:{ctl_pid}:"
    # sshd ends the sessions of the dead controller, but a real sshd leaves their processes
    # alone: once every one of those sessions has ended, the frozen workload is still there,
    # marked with the dead controller
    assert sessions, f"no sshd session found for {seen}"
    end = time.monotonic() + 30
    while any(alive(s) for s in sessions):
        assert time.monotonic() < end, "sshd never ended the dead controller's sessions"
        time.sleep(0.05)
    left = marked(prefix)
    wl = [p for p, i in left.items() if "workload.py" in i["cmd"]]
    assert wl, f"nothing of the killed controller survived (seen then: {seen})"
    assert left[wl[0]]["node"] == "node1"

    r = subprocess.run([*LABKIT, "migrate-test", "--size", "8M", "--rate", "2000",
                        "--max-rounds", "3", "--json"], env=env_for(lab), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["ok"] is True
    line = next((ln for ln in r.stderr.splitlines()
                 if ln.startswith("node1: cleaned leftovers of an interrupted run:")), None)
    assert line, r.stderr
    assert f"workload pid {wl[0]}" in line, line
    assert line in out["leftovers_cleaned"]
    events = [json.loads(ln) for ln in
              (Path(out["folder"]) / "events.jsonl").read_text().splitlines()]
    cleaned = [e for e in events if e["event"] == "leftovers-cleaned" and e["node"] == "node1"]
    assert cleaned and wl[0] in [p["pid"] for p in cleaned[0]["processes"]]
    assert all(p["controller"].startswith(prefix) for p in cleaned[0]["processes"])
    assert marked(prefix) == {}, "leftovers of the dead controller survived the next run"
    assert marked(f"{HOST}:", under=lab.state_dir) == {}, "the next run left processes behind"


def test_sweep_spares_live_foreign_and_unmarked(lab: FakeLabHandle, monkeypatch) -> None:
    monkeypatch.setenv("LABKIT_SSH_CONFIG", "/nonexistent")
    node = lab.inventory().node("node2")
    root = lab.state_dir / "nodes" / "node2"
    dead = dead_tag()
    reused = f"{controller_tag().rsplit(':', 1)[0]}:1"  # our pid, another start time: dead
    foreign = "elsewhere.example:1:1"                    # another host: not ours to judge
    assert controller_alive(controller_tag(), HOST) is True
    assert controller_alive(dead, HOST) is False
    assert controller_alive(reused, HOST) is False
    assert controller_alive(foreign, HOST) is None
    for tag in (dead, controller_tag(), foreign):
        d = root / "labkit" / "tmp" / tag
        d.mkdir(parents=True)
        (d / "image.bin").write_bytes(b"x" * 4096)
    sleep = "sleep 60 & sleep 60; wait"
    with SshClient.connect(node, SETTINGS) as c:
        procs = {
            "live": c.open_exec(sleep),  # carries our own, live, tag
            "dead": c.open_exec(f"exec env LABKIT_CTL={dead} /bin/sh -c '{sleep}'"),
            "reused": c.open_exec(f"exec env LABKIT_CTL={reused} /bin/sh -c '{sleep}'"),
            "foreign": c.open_exec(f"exec env LABKIT_CTL={foreign} /bin/sh -c '{sleep}'"),
            "unmarked": c.open_exec(f"exec env -u LABKIT_CTL -u LABKIT_RUN /bin/sh -c "
                                    f"'echo $$ > unmarked.pid; {sleep}'"),
        }
        try:
            def started() -> bool:  # every one runs (sh and its two sleeps)
                upid = root / "unmarked.pid"
                return (all(len(marked(t, exact=True)) >= 3
                            for t in (dead, reused, foreign, controller_tag()))
                        and upid.exists() and upid.read_text().strip() != "")

            end = time.monotonic() + 30
            while not started():  # before the sweep looks
                assert time.monotonic() < end, "the test's processes never all started"
                time.sleep(0.02)
            cleaned = sweep(c, controller_host=HOST, workdir="labkit", grace=0.5)
            # the sweep returns once its victims are gone: no wait here
            by_tag = {t: list(marked(t, exact=True)) for t in (dead, reused, foreign)}
            gone = {c_["controller"] for c_ in cleaned if c_["kind"] == "process"}
            assert gone == {dead, reused}, cleaned
            assert by_tag[dead] == [] and by_tag[reused] == []
            assert len(by_tag[foreign]) >= 2
            assert len(marked(controller_tag(), exact=True)) >= 3  # the live run: sh + 2 sleeps
            upid = int((root / "unmarked.pid").read_text())
            assert os.path.exists(f"/proc/{upid}")
            assert all(c_["pid"] != upid for c_ in cleaned if c_["kind"] == "process")
            removed = [c_["path"] for c_ in cleaned if c_["kind"] == "files"]
            assert [os.path.basename(p) for p in removed] == [dead]
            assert not (root / "labkit" / "tmp" / dead).exists()
            assert (root / "labkit" / "tmp" / controller_tag() / "image.bin").exists()
            assert (root / "labkit" / "tmp" / foreign / "image.bin").exists()
            # nothing left to clean: a second sweep reports nothing
            assert sweep(c, controller_host=HOST, workdir="labkit", grace=0.5) == []
        finally:
            for p in procs.values():
                p.kill()
                p.close()
            try:  # the unmarked one leads its own session's group: end it and its sleeps
                os.killpg(int((root / "unmarked.pid").read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
