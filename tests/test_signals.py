"""SIGTERM (a CI runner, systemd) and SIGHUP (a closed terminal) end a task as Ctrl-C does: the
remote commands it started are killed, one line is printed, the exit code is 128 + the signal,
no traceback — through `labkit` and `invoke`, against real OpenSSH nodes, whose sshd (unlike
the fake paramiko one) leaves a dropped client's processes running: exactly where dying on the
spot used to leave them behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from labkit.fake.harness import FakeLabHandle, SshNodeSet, start_fake_lab
from labkit.fake.openssh import sshd_path
from labkit.nodeside import killmarked
from labkit.signals import message

REPO = Path(__file__).resolve().parent.parent
LABKIT = [sys.executable, "-m", "labkit.cli"]
INVOKE = [str(Path(sys.executable).with_name("invoke"))]
X86_LINUX = sys.platform == "linux" and os.uname().machine == "x86_64"
SIGS = [signal.SIGTERM, signal.SIGHUP]

NO_SSHD = "OpenSSH sshd not installed (apt-get install openssh-server)"


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if sshd_path() is None:
        pytest.skip(NO_SSHD)
    with SshNodeSet(tmp_path_factory.mktemp("siglab"), ["node1", "node2"],
                    kind="openssh") as lab:
        yield lab


def running(lab: SshNodeSet) -> list[int]:
    return [p for n in lab.nodes.values() for p in killmarked.marked([n.marker])]


def wait_gone(pids_of: Any, timeout: float) -> list:
    end = time.monotonic() + timeout
    while (left := pids_of()) and time.monotonic() < end:
        time.sleep(0.05)
    return left


def check_interrupted(proc: subprocess.Popen, sig: int, err: str) -> None:
    assert proc.returncode == 128 + sig, f"rc={proc.returncode}\n{err}"
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == message(sig), err  # "interrupted (SIGTERM)"


@pytest.mark.parametrize("prog", ["labkit", "invoke"])
@pytest.mark.parametrize("sig", SIGS, ids=lambda s: s.name)
def test_signal_during_run_kills_remote_commands(nodes: SshNodeSet, sig: int,
                                                 prog: str) -> None:
    env = dict(os.environ, LABKIT_INVENTORY=str(nodes.inventory_path))
    proc = subprocess.Popen([*(LABKIT if prog == "labkit" else INVOKE), "run", "--",
                             "sleep 1000 & setsid sleep 1001 & sleep 1002"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        end = time.monotonic() + 15
        while len(running(nodes)) < 8:  # per node: sh + three sleeps
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < end, "remote commands never started"
            time.sleep(0.05)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    check_interrupted(proc, sig, err)
    assert wait_gone(lambda: running(nodes), 1.0) == [], "remote commands survived the signal"


def sshd_of(node: Any) -> list[int]:
    """The sshd processes serving ``node`` (its listener and the per-connection ones it
    forked), found by the listener's config file in /proc."""
    conf = str(node.conf_dir / "sshd_config").encode()
    parent: dict[int, int] = {}
    listeners = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()  # proctitle: maybe one string
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            st = killmarked.stat(pid)
        except OSError:
            continue
        if st is None or not comm.startswith("sshd"):
            continue
        parent[pid] = st[1]
        if conf in cmdline:
            listeners.append(pid)
    assert listeners, f"no sshd for {node.name}"
    found = set(listeners)
    while more := {p for p, pp in parent.items() if pp in found} - found:
        found |= more
    return sorted(found)


class Lines:
    """A stream of the process read into a list of lines as they come (a thread)."""

    def __init__(self, stream: Any):
        import threading

        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(stream), daemon=True)
        self.thread.start()

    def wait_for(self, pred: Any, proc: subprocess.Popen, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not pred(self.lines):
            assert time.monotonic() < end, f"{what}: never came ({self.lines[-5:]})"
            if proc.poll() is not None:
                return
            time.sleep(0.01)

    def text(self) -> str:
        self.thread.join(15)
        return "".join(self.lines)


class HeldCleanup:
    """``labkit run`` on both nodes, interrupted by ``sig`` while node1's sshd is frozen (once
    the command runs everywhere), so that its kill by marker cannot finish: on return node2's
    processes are gone (the cleanup is under way) and node1's 3 are held. ``thaw()`` lets the
    cleanup go on. Deterministic by state: nothing here waits a fixed time."""

    def __init__(self, nodes: SshNodeSet, sig: int):
        self.nodes = nodes
        env = dict(os.environ, LABKIT_INVENTORY=str(nodes.inventory_path))
        self.proc = subprocess.Popen([*LABKIT, "run", "--", "sleep 1000 & echo up; sleep 1001"],
                                     env=env, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.out, self.err = Lines(self.proc.stdout), Lines(self.proc.stderr)
        self.frozen: list[int] = []
        try:
            self.out.wait_for(lambda ls: {"node1| up\n", "node2| up\n"} <= set(ls), self.proc,
                              15, "both nodes' output")
            end = time.monotonic() + 15
            while len(running(nodes)) < 6:  # per node: sh + two sleeps
                assert self.proc.poll() is None, "the run ended early"
                assert time.monotonic() < end, "the commands never started"
                time.sleep(0.01)
            self.frozen = sshd_of(nodes.nodes["node1"])
            for pid in self.frozen:
                os.kill(pid, signal.SIGSTOP)
            self.proc.send_signal(sig)
            assert wait_gone(lambda: killmarked.marked([nodes.nodes["node2"].marker]), 10) == [], \
                "the first signal did not start the cleanup"
            assert len(killmarked.marked([nodes.nodes["node1"].marker])) == 3  # held
            assert self.proc.poll() is None
        except BaseException:
            self.close()
            raise

    def repeat(self, sig: int) -> None:
        """Send ``sig`` again and wait until it was handled (its line) or the run ended."""
        seen = sum(ln.startswith("interrupted again") for ln in self.err.lines)
        self.proc.send_signal(sig)
        self.err.wait_for(lambda ls: sum(ln.startswith("interrupted again") for ln in ls) > seen,
                          self.proc, 10, "the repeated signal's line")

    def thaw(self) -> None:
        for pid in self.frozen:
            os.kill(pid, signal.SIGCONT)
        self.frozen = []

    def close(self) -> None:
        self.thaw()
        self.proc.kill()
        self.proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT],
                         ids=lambda s: s.name)
def test_second_signal_does_not_cut_the_cleanup_short(nodes: SshNodeSet, sig: int) -> None:
    """A closed terminal often sends SIGHUP twice, Ctrl-C twice is a habit: the second signal
    lands INSIDE the first one's cleanup and must leave it running to the end. Raised, it
    unwound through the connection pool and closed node1's connection under its kill: all of
    node1's processes stayed."""
    held = HeldCleanup(nodes, sig)
    try:
        held.repeat(sig)
        held.thaw()
        held.proc.wait(timeout=30)
    finally:
        held.close()
    text = held.err.text()
    check_interrupted(held.proc, sig, text)
    assert text.count("interrupted again: finishing the cleanup first") == 1, text
    assert wait_gone(lambda: running(nodes), 1.0) == [], "the second signal cut the cleanup short"


def test_third_ctrl_c_abandons_the_cleanup_but_machine_signals_never_do(nodes: SshNodeSet) -> None:
    """However many SIGHUP/SIGTERM come (a terminal, then systemd), the cleanup runs to the end;
    a person pressing Ctrl-C a third time gets out at once, told what may be left."""
    held = HeldCleanup(nodes, signal.SIGHUP)
    try:
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGHUP):
            held.repeat(sig)
            assert held.proc.poll() is None, held.err.text()
        held.repeat(signal.SIGINT)  # the run ends: it waits for no cleanup
        assert held.proc.wait(timeout=10) == 128 + signal.SIGHUP  # the first signal's code
        assert len(killmarked.marked([nodes.nodes["node1"].marker])) == 3  # abandoned
    finally:
        held.close()
        killmarked.kill([nodes.nodes["node1"].marker])
    text = held.err.text()
    assert text.strip().splitlines()[-1] == ("cleanup abandoned: commands the task started may "
                                             "still be running on the nodes"), text
    assert "Traceback" not in text, text


def test_on_cancel_outside_a_task_calls_back_raises_once_and_restores() -> None:
    """Library code (the power tasks' BMC client, the console) reacts to the signals through
    ``on_cancel``/``handled``: outside a task they handle SIGTERM for their own body — the
    callback runs, Interrupted is raised once, a second signal only calls back — and put the
    handler back after."""
    import threading

    from labkit import signals

    before = signal.getsignal(signal.SIGTERM)
    called = threading.Event()
    calls = []
    with pytest.raises(signals.Interrupted) as info:
        with signals.on_cancel(lambda: (calls.append(1), called.set())):
            os.kill(os.getpid(), signal.SIGTERM)
            called.wait(5)  # the handler runs on the main thread, between two bytecodes
    assert info.value.signo == signal.SIGTERM and calls == [1]
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("sig", SIGS, ids=lambda s: s.name)
def test_signal_ends_the_interactive_console_like_any_task(make_fake_lab: Any, sig: int) -> None:
    """``labkit console NODE`` on a terminal, then SIGTERM/SIGHUP: the terminal comes back as
    it was, the SOL session is left, and the task ends as every task does: one
    ``interrupted (SIG...)`` line, exit 128 + signal (it used to exit silently)."""
    from test_console_session import LABKIT as CONSOLE_CLI
    from test_console_session import Pty, booted_lab
    from test_console_session import env_for as console_env

    lab = booted_lab(make_fake_lab)
    term = Pty([*CONSOLE_CLI, "console", "node1"], console_env(lab))
    try:
        assert term.read_until(b"SOL connected", 15), term.text()
        term.proc.send_signal(sig)
        assert term.proc.wait(10) == 128 + sig, term.text()
        term.drain()
        assert term.restored()
    finally:
        term.close()
    text = term.text()
    assert "Traceback" not in text, text
    assert "console closed" in text, text
    assert text.strip().splitlines()[-1] == message(sig), text


def test_ignored_sighup_stays_ignored(nodes: SshNodeSet) -> None:
    """Under ``nohup`` SIGHUP is ignored on purpose: labkit does not take it back."""
    env = dict(os.environ, LABKIT_INVENTORY=str(nodes.inventory_path))
    proc = subprocess.Popen(["nohup", *LABKIT, "run", "-n", "node1", "--",
                             "while [ ! -e stop ]; do sleep 0.05; done; echo done"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 15
        while not killmarked.marked([nodes.nodes["node1"].marker]):
            assert time.monotonic() < end, "the remote command never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGHUP)
        (nodes.nodes["node1"].root / "stop").touch()
        out, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
        (nodes.nodes["node1"].root / "stop").unlink(missing_ok=True)
    assert proc.returncode == 0, err
    assert "node1| done" in out


# --- deploy and migrate-test on a whole lab of OpenSSH nodes ---------------------------------

BIG = 32 << 20


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if sshd_path() is None:
        pytest.skip(NO_SSHD)
    handle = start_fake_lab(tmp_path_factory.mktemp("sigfull"), count=2, sshd="openssh",
                            power_delay=(0.05, 0.2), boot_delay=0.2, power_on=True)
    yield handle
    handle.stop()


def env_for(lab: FakeLabHandle, **extra: str) -> dict[str, str]:
    return {**lab.env, "LABKIT_SSH_CONFIG": "/nonexistent",
            "XDG_CACHE_HOME": str(lab.state_dir / "cache"),
            "INVOKE_LABKIT_RESULTS_DIR": str(lab.state_dir / "results"),
            "INVOKE_LABKIT_POWER_WAIT": "30", "INVOKE_LABKIT_SSH_WAIT": "30", **extra}


def payloads(lab: FakeLabHandle, node: str) -> Path:
    return (lab.state_dir / "nodes" / node).resolve() / "labkit" / "payloads"


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGS, ids=lambda s: s.name)
def test_signal_during_deploy(lab: FakeLabHandle, sig: int) -> None:
    tag = f"sig{int(sig)}"
    root = lab.state_dir / "bundles" / tag
    root.mkdir(parents=True)
    (root / "tool.py").write_text(f"print({tag!r})\n")
    with open(root / "huge.bin", "wb") as f:
        f.truncate(BIG)
    inv = lab.state_dir / f"inventory-{tag}.yaml"
    inv.write_text(f"payloads: [{root}]\n" + lab.inventory_path.read_text())
    proc = subprocess.Popen([*LABKIT, "deploy", "--json"],
                            env=env_for(lab, LABKIT_INVENTORY=str(inv)), cwd=lab.state_dir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < end:  # a node is receiving the big file
        if any(p.stat().st_size > 0 for n in lab.nodes
               for p in (payloads(lab, n) / "releases").glob(".incoming-*/huge.bin")):
            break
        time.sleep(0.002)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    if not (proc.returncode == 0 and all(o["ok"] for o in json.loads(out))):
        check_interrupted(proc, sig, err)
    assert wait_gone(lab.processes, 5.0) == [], "deploy's node side survived the signal"
    for n in lab.nodes:  # a whole release or none: the next deploy repairs the rest
        cur = payloads(lab, n) / "current"
        if cur.is_symlink():
            assert (cur / "tool.py").exists()


@pytest.mark.slow
@pytest.mark.skipif(not X86_LINUX, reason="migrate-test payloads are x86_64 Linux only")
@pytest.mark.parametrize("sig", SIGS, ids=lambda s: s.name)
def test_signal_during_migrate_test(lab: FakeLabHandle, sig: int, tmp_path: Path) -> None:
    proc = subprocess.Popen([*LABKIT, "migrate-test", "--size", "32M", "--rate", "3000",
                             "--steps-per-round", "0", "--max-rounds", "6", "--json"],
                            env=env_for(lab), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 60
    while not any("workload.py" in p for p in lab.processes()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the workload never started"
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    check_interrupted(proc, sig, err)
    assert wait_gone(lab.processes, 5.0) == [], "migrate-test's processes survived the signal"
    events = [json.loads(line) for f in (lab.state_dir / "results").glob("*/events.jsonl")
              for line in f.read_text().splitlines()]
    assert any(e.get("event") == "interrupted" for e in events), events[-5:]
