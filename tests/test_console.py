"""SOL console: the keyboard escape filter and the timestamped log (pure logic), then capture and
expect over the fake lab's BMCs (real UDP sockets, the fake BMC's SOL)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit.bmc.console import IN_USE, EscapeFilter, SolConsole, TimestampedLog, expect
from labkit.bmc.power import PowerClient
from labkit.config import Settings
from labkit.errors import NodeError

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def test_escape_filter_leaves_on_tilde_dot_at_line_start():
    f = EscapeFilter()
    assert f.feed(b"ls\r") == b"ls\r"
    assert f.feed(b"~") == b""           # held back: might be an escape
    assert f.feed(b".rest") == b""
    assert f.quit


def test_escape_filter_passes_tildes_elsewhere():
    f = EscapeFilter()
    assert f.feed(b"cd ~/x\r") == b"cd ~/x\r"   # not at line start
    assert f.feed(b"~~") == b"~"                  # doubled: one literal ~
    assert f.feed(b"\r~x") == b"\r~x"              # ~ + other key: both sent
    assert not f.quit
    f.feed(b"\n~?")
    assert f.help and not f.quit


def test_escape_filter_at_very_start():
    f = EscapeFilter()
    assert f.feed(b"~.") == b"" and f.quit


def test_timestamped_log_stamps_whole_lines():
    buf = io.StringIO()
    log = TimestampedLog(buf)
    log.data(b"Booting ")
    log.data(b"kernel\r\nsecond line\r\n")
    log.event("SOL dropped (x); reconnecting")
    log.data(b"node1 login: ")
    log.close()
    lines = buf.getvalue().splitlines()
    assert re.fullmatch(STAMP + r" \| Booting kernel", lines[0])
    assert re.fullmatch(STAMP + r" \| second line", lines[1])
    assert re.fullmatch(STAMP + r" \[labkit\] SOL dropped \(x\); reconnecting", lines[2])
    assert re.fullmatch(STAMP + r" \| node1 login: ", lines[3])
    assert log.bytes == len(b"Booting kernel\r\nsecond line\r\nnode1 login: ")


# -- over the fake lab -------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = Settings(bmc_timeout=1.0, retry_window=3.0, retry_first_delay=0.1, power_wait=15.0)


@pytest.mark.slow  # a whole boot
def test_capture_sees_the_boot_log_after_power_on(make_fake_lab, tmp_path):
    lab = make_fake_lab(count=1, ssh=False, power_delay=(0.1, 0.3), boot_delay=0.5)
    log = tmp_path / "node1.log"
    cmd = [sys.executable, "-m", "invoke", "--search-root", str(ROOT), "console", "node1",
           "--inventory", str(lab.inventory_path), "--capture", "3", "--log", str(log)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "INVOKE_LABKIT_BMC_TIMEOUT": "1"})
    lab.wait("node1", sol=True, timeout=10)  # our SOL session is up: nothing will be missed
    with PowerClient(SETTINGS) as power:
        power.on(lab.inventory().node("node1"))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.strip() == str(log)
    text = log.read_text()
    lines = text.splitlines()
    assert re.fullmatch(STAMP + r" \[labkit\] capture of node1 for 3 s", lines[0])
    assert any(re.fullmatch(STAMP + r" \| Booting from Hard Disk\.\.\.", ln) for ln in lines)
    assert re.search(STAMP + r" \| node1 login: ", text)
    assert "Linux" in text and "[labkit] capture ended" in lines[-1]
    # boot lines arrive in order, stamped as they came
    stamps = [ln.split(" ", 1)[0] for ln in lines]
    assert stamps == sorted(stamps)


def test_expect_login_prompt_and_type_at_it(make_fake_lab):
    lab = make_fake_lab(count=1, ssh=False, power_delay=(0.1, 0.3), boot_delay=0.3)
    node = lab.inventory().node("node1")
    with SolConsole(node, SETTINGS) as con:
        assert con.wait_connected(5)
        with PowerClient(SETTINGS) as power:
            power.on(node)
        m = con.expect(r"(\S+) login:", timeout=15)
        assert m.group(1) == "node1"
        con.write(b"\r")  # a getty prints its prompt again
        assert con.expect("login:", timeout=5)
    # the one-shot helper, on a booted node: poke it, then wait for the prompt
    m = expect(node, r"login:", timeout=5, settings=SETTINGS, poke=b"\r")
    assert m.group(0) == "login:"
    with pytest.raises(NodeError, match=r"node1: console: 'never-printed' not seen within 0\.5 s"):
        expect(node, "never-printed", timeout=0.5, settings=SETTINGS)


@pytest.mark.slow  # a BMC cold reset and a reconnect
def test_stale_sol_session_is_taken_over_and_a_dropped_one_reconnects(make_fake_lab):
    lab = make_fake_lab(count=1, ssh=False, power_delay=(0.1, 0.2), boot_delay=0.2)
    node = lab.inventory().node("node1")
    # a client that dies without deactivating SOL leaves the payload held
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from labkit import inventory\n"
         "from labkit.bmc.console import SolConsole\n"
         f"n = inventory.load({str(lab.inventory_path)!r}).node('node1')\n"
         "c = SolConsole(n).open(); c.wait_connected(10); print('up', flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "up"
        assert lab.status("node1")["sol"] is True
    finally:
        child.kill()
        child.wait()
    # the BMC cannot tell yet that the holder died: without take-over, refused at once
    with SolConsole(node, SETTINGS) as polite:
        assert not polite.wait_connected(5) and polite.ended.is_set()
        assert polite.fatal == "node1: " + IN_USE
    events: list[str] = []
    with SolConsole(node, SETTINGS, on_event=events.append, keepalive=0.5, force=True) as con:
        assert con.wait_connected(5)  # took the stale payload over
        assert events == ["SOL connected"]
        lab.control.cold_reset("node1")  # the BMC forgets every session
        deadline = time.monotonic() + 10
        while "SOL reconnected" not in events and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "SOL reconnected" in events, events
        assert any(e.startswith("SOL dropped (") for e in events)
        with PowerClient(SETTINGS) as power:
            power.on(node)
        assert con.expect("node1 login:", timeout=15)


def test_interactive_console_on_a_terminal_leaves_with_tilde_dot(make_fake_lab):
    """`console NODE` on a real terminal: raw mode while attached, keys reach the node, ~. at
    the start of a line leaves, and the terminal's settings come back as they were."""
    import pty
    import select as sel
    import termios

    lab = make_fake_lab(count=1, ssh=False, power_delay=(0.1, 0.2), boot_delay=0.2)
    lab.control.power("node1", "on", now=True)
    lab.wait("node1", phase="up", timeout=10)
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(
        [sys.executable, "-m", "invoke", "--search-root", str(ROOT), "console", "node1",
         "--inventory", str(lab.inventory_path)],
        stdin=slave, stdout=slave, stderr=slave, close_fds=True, start_new_session=True)
    seen = bytearray()

    def read_until(needle: bytes, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while needle not in seen and time.monotonic() < end:
            if sel.select([master], [], [], 0.1)[0]:
                seen.extend(os.read(master, 4096))
        return needle in seen

    try:
        assert read_until(b"type ~. at the start of a line to leave", 15), seen
        assert read_until(b"SOL connected", 10), seen
        assert not termios.tcgetattr(slave)[3] & termios.ECHO  # raw mode while attached
        os.write(master, b"\r")
        assert read_until(b"node1 login: ", 10), seen
        os.write(master, b"~.")
        assert proc.wait(10) == 0
        assert read_until(b"console closed", 5)
        assert termios.tcgetattr(slave) == before
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
        os.close(slave)
