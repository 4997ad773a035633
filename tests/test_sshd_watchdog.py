"""The OpenSSH node's power supply (labkit/fake/sshd_watchdog.py), run as the program it is,
with a stand-in for sshd: it must power off — its child's whole tree and everything carrying
the node's marker — when its lifeline closes, when whoever holds the lifeline dies, and when
its child exits by itself. No sshd needed; test_openssh_nodes.py covers the real one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from labkit.fake.openssh import WATCHDOG
from labkit.fake.sshd_watchdog import descendants
from labkit.nodeside import killmarked


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
