"""The OpenSSH node's power supply (labkit/fake/sshd_watchdog.py), run as the program it is,
with a stand-in for sshd: it must power off — its child's whole tree and everything carrying
the node's marker — when its lifeline closes, when whoever holds the lifeline dies, and when
its child exits by itself. No sshd needed; test_openssh_nodes.py covers the real one."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from labkit.fake import sshd_watchdog
from labkit.fake.openssh import WATCHDOG, OpenSshNode
from labkit.fake.sshd_watchdog import descendants
from labkit.nodeside import killmarked

REPO = Path(__file__).resolve().parent.parent


def wait_for(pred, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def marked_sleeper(marker: str) -> subprocess.Popen:
    """A process of "the node" that left sshd's tree (its own session, not our descendant
    from the watchdog's point of view): only the marker finds it."""
    name, value = marker.split("=", 1)
    return subprocess.Popen(["sleep", "1000"], env={**os.environ, name: value},
                            start_new_session=True)


def watchdog(marker: str, *command: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-I", "-S", str(WATCHDOG), "--marker", marker,
                             "--", *command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            start_new_session=True)


def gone(pid: int) -> bool:
    return not killmarked.alive(pid)


def test_closed_lifeline_kills_the_tree_and_the_marked(tmp_path: Path) -> None:
    marker = f"LABKIT_TEST_WATCHDOG={tmp_path}"
    stray = marked_sleeper(marker)
    try:
        wd = watchdog(marker, "/bin/sh", "-c", "sleep 1002 & exec sleep 1001")
        assert wait_for(lambda: len(descendants(wd.pid)) == 2)
        tree = descendants(wd.pid)
        out, _ = wd.communicate(timeout=10)  # closes its stdin: power off
        report = json.loads(out)
        assert wd.returncode == 0 and report["survivors"] == []
        assert set(tree) | {stray.pid} <= set(report["killed"])
        stray.wait(timeout=5)
        assert all(gone(p) for p in tree)
    finally:
        stray.kill()
        stray.wait()


def test_dead_lifeline_holder_powers_off(tmp_path: Path) -> None:
    """The lab is SIGKILLed: the kernel closes the lifeline for it."""
    marker = f"LABKIT_TEST_WATCHDOG={tmp_path}"
    stray = marked_sleeper(marker)
    holder_code = (
        "import subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-I', '-S', {str(WATCHDOG)!r}, '--marker', "
        f"{marker!r}, '--', 'sleep', '1001'], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
        "sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", holder_code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        wd_pid = int(holder.stdout.readline())
        assert wait_for(lambda: len(descendants(wd_pid)) == 1)
        (sshd,) = descendants(wd_pid)
        holder.kill()
        holder.wait()
        assert wait_for(lambda: gone(wd_pid) and gone(sshd)), "the watchdog outlived its lab"
        stray.wait(timeout=5)
    finally:
        stray.kill()
        stray.wait()
        holder.kill()
        holder.wait()


def test_child_exit_sweeps_the_marked(tmp_path: Path) -> None:
    marker = f"LABKIT_TEST_WATCHDOG={tmp_path}"
    stray = marked_sleeper(marker)
    try:
        wd = watchdog(marker, "sleep", "1001")
        assert wait_for(lambda: len(descendants(wd.pid)) == 1)
        (sshd,) = descendants(wd.pid)
        os.kill(sshd, signal.SIGKILL)  # sshd dies on its own; its sessions would live on
        stray.wait(timeout=5)
        out, _ = wd.communicate(timeout=10)
        assert stray.pid in json.loads(out)["killed"]
        assert wd.returncode == 0
    finally:
        stray.kill()
        stray.wait()


def test_signal_powers_off(tmp_path: Path) -> None:
    """SIGTERM to the watchdog is an order to power off, like a closed lifeline."""
    marker = f"LABKIT_TEST_WATCHDOG={tmp_path}"
    stray = marked_sleeper(marker)
    try:
        wd = watchdog(marker, "/bin/sh", "-c", "sleep 1002 & exec sleep 1001")
        assert wait_for(lambda: len(descendants(wd.pid)) == 2)
        tree = descendants(wd.pid)
        wd.send_signal(signal.SIGTERM)
        assert wd.stdout.readline().startswith(b'{"killed"')  # reported with the lifeline open
        wd.communicate(timeout=10)
        assert wd.returncode == 0
        stray.wait(timeout=5)
        assert all(gone(p) for p in tree)
    finally:
        stray.kill()
        stray.wait()


def test_signal_right_after_reaping_sshd_signals_no_reaped_pid(tmp_path: Path) -> None:
    """A signal that lands just after the watchdog reaped sshd (here: sent by a wrapper around
    os.waitpid, the moment it returns sshd's exit) must not make it take sshd for alive: its pid
    is free by then — here already reused, on purpose, by an unrelated process that must
    survive — and waiting for it again would fail."""
    marker = f"LABKIT_TEST_WATCHDOG={tmp_path}"
    victim_file = tmp_path / "victim"
    code = textwrap.dedent(f"""
        import os, signal, subprocess, sys
        from labkit.fake import sshd_watchdog
        from labkit.fake.harness import start_with_pid

        real_waitpid = os.waitpid
        done = []

        def waitpid(pid, options):
            got = real_waitpid(pid, options)
            if got[0] == pid and not done:
                done.append(pid)
                victim = start_with_pid(pid, ["sleep", "60"], start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                with open({str(victim_file)!r}, "w") as f:
                    f.write(str(victim.pid if victim else ""))
                os.kill(os.getpid(), signal.SIGTERM)
            return got

        os.waitpid = waitpid
        sys.exit(sshd_watchdog.main(["--marker", {marker!r}, "--", "sleep", "0.2"]))
        """)
    with open(tmp_path / "err", "wb") as errf:  # the lifeline stays open: sshd exits first
        wd = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=errf, cwd=REPO)
    try:
        out = wd.stdout.read()
        wd.wait(timeout=30)
    finally:
        wd.stdin.close()
        wd.stdout.close()
    err = (tmp_path / "err").read_bytes()
    victim = int(victim_file.read_text() or 0)
    try:
        assert b"Traceback" not in err, err.decode()
        assert wd.returncode == 0 and json.loads(out)["survivors"] == []
        if victim:
            assert killmarked.alive(victim), "the watchdog signalled a reaped sshd's pid"
    finally:
        if victim and killmarked.alive(victim):
            os.kill(victim, signal.SIGKILL)


def _node(tmp_path: Path) -> OpenSshNode:
    return OpenSshNode("node1", tmp_path / "node1", "127.0.0.1", 1, tmp_path / "host_key",
                       tmp_path / "authorized_keys", logging.getLogger("test.openssh"))


@pytest.mark.parametrize("report", [b'{"killed": [1', b"[1, 2]\n", b'{"killed": "all"}\n',
                                    b"\xff\n"])
def test_unreadable_report_sweeps_by_marker_and_signals_no_pid(
        tmp_path: Path, report: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenSshNode.stop() when the watchdog's report is cut off or not a report: the watchdog
    has been reaped by then, so its pid may name a stranger already — nothing is signalled by
    pid (power_off is only for a watchdog that is still our unreaped child); the node's marked
    processes are swept from here instead, and stop() does not raise."""
    node = _node(tmp_path)
    stray = marked_sleeper(node.marker.decode())
    fake = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.stdin.read(); sys.stdout.buffer.write({report!r})"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    node._proc = fake  # stands in for the watchdog start() would have run
    by_pid: list[int] = []
    monkeypatch.setattr(sshd_watchdog, "power_off",
                        lambda pid, *a, **k: by_pid.append(pid) or ([], []))
    try:
        node.stop()
        assert by_pid == [], "signalled the reaped watchdog's pid"
        assert fake.returncode == 0
        stray.wait(timeout=5)
    finally:
        stray.kill()
        stray.wait()
