"""Who holds a node's SOL, and how a console ends: over the fake lab's BMCs (real UDP, the fake
BMC's SOL), through the real ``labkit`` and ``invoke`` programs, interactive runs under a pty.

- a second console on a node whose SOL a live session holds is refused (one line, --take-over);
- ``--take-over`` takes it, and the loser (capture or interactive) is told, says so in one line,
  exits non-zero and does not steal it back; bringup's SOL watch never takes it;
- fatal errors (login refused) end the console at once; ``~.`` acts at once against a dead BMC;
  a capture against a dead BMC fails in the configured timeout;
- ``--log`` that cannot be written is refused before any SOL packet (exit 2)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from labkit.bmc.console import IN_USE, TAKEN_OVER, SolConsole
from labkit.config import Settings

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = Settings(bmc_timeout=1.0, retry_window=3.0, retry_first_delay=0.1, power_wait=15.0)
_bin = Path(sys.executable).with_name("labkit")
LABKIT = [str(_bin)] if _bin.exists() else [sys.executable, "-m", "labkit.cli"]
INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]
ENTRY = {"labkit": LABKIT, "invoke": INVOKE}


def env_for(lab: Any, **extra: str) -> dict[str, str]:
    return {**lab.env, "INVOKE_LABKIT_BMC_TIMEOUT": "1", **extra}


def cli(lab: Any, entry: str, *argv: str, timeout: float = 60, env: dict | None = None,
        prefix: list[str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = subprocess.run([*(prefix or []), *ENTRY[entry], *argv], env=env or env_for(lab),
                       capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - t0


def one_error_line(r: subprocess.CompletedProcess) -> str:
    where = f"rc={r.returncode}\nstdout={r.stdout!r}\nstderr={r.stderr!r}"
    assert "Traceback" not in r.stderr + r.stdout, where
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), where
    return lines[0]


def wait_for(pred: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


class Pty:
    """A command on a real terminal (the interactive console needs one)."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        import pty
        import termios

        self.master, self.slave = pty.openpty()
        self.before = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen(argv, stdin=self.slave, stdout=self.slave,
                                     stderr=self.slave, env=env, close_fds=True,
                                     start_new_session=True)
        self.seen = bytearray()

    def read_until(self, needle: bytes, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while needle not in self.seen and time.monotonic() < end:
            if select.select([self.master], [], [], 0.05)[0]:
                try:
                    self.seen.extend(os.read(self.master, 4096))
                except OSError:  # the child closed the terminal
                    break
        return needle in self.seen

    def drain(self) -> None:
        while select.select([self.master], [], [], 0.05)[0]:
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            if not data:
                return
            self.seen.extend(data)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def restored(self) -> bool:
        import termios

        return termios.tcgetattr(self.slave) == self.before

    def text(self) -> str:
        return self.seen.decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


def booted_lab(make_fake_lab: Any, **kw: Any) -> Any:
    lab = make_fake_lab(count=1, ssh=False, power_delay=(0.1, 0.2), boot_delay=0.2, **kw)
    lab.control.power("node1", "on", now=True)
    lab.wait("node1", phase="up", timeout=15)
    return lab


# -- SOL ownership ---------------------------------------------------------------------------------

def test_second_console_is_refused_by_default_and_the_holder_keeps_it(make_fake_lab, tmp_path):
    lab = booted_lab(make_fake_lab)
    node = lab.inventory().node("node1")
    events: list[str] = []
    with SolConsole(node, SETTINGS, on_event=events.append) as holder:
        assert holder.wait_connected(5)
        # capture, both entry points: refused at once, not after the capture's length
        for entry in ("labkit", "invoke"):
            log = tmp_path / f"{entry}.log"
            r, took = cli(lab, entry, "console", "node1", "--capture", "20", "--log", str(log))
            line = one_error_line(r)
            assert r.returncode == 1, r.stderr
            assert line == f"error: node1: {IN_USE}", line
            assert took < 10, took
        # interactive: the refusal is the one line on the terminal, which comes back as it was
        term = Pty([*LABKIT, "console", "node1"], env_for(lab))
        try:
            assert term.proc.wait(15) == 1
            term.drain()
            assert term.restored()
            lines = [ln for ln in term.text().replace("\r", "").splitlines() if ln.strip()]
            assert lines == [f"error: node1: {IN_USE}"], term.text()
        finally:
            term.close()
        # the holder never noticed: still connected, still the owner, output still reaches it
        assert holder.connected.is_set() and holder.connects == 1 and events == ["SOL connected"]
        holder.write(b"\r")
        assert holder.expect("node1 login:", timeout=10)


def test_take_over_tells_a_capturing_loser_which_does_not_steal_back(make_fake_lab, tmp_path):
    lab = booted_lab(make_fake_lab)
    loser_log, winner_log = tmp_path / "loser.log", tmp_path / "winner.log"
    loser = subprocess.Popen([*LABKIT, "console", "node1", "--capture", "60", "--log",
                              str(loser_log)], env=env_for(lab), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: loser_log.exists() and "SOL connected" in loser_log.read_text(), 15,
                 "the first capture's SOL session")
        r, _ = cli(lab, "invoke", "console", "node1", "--take-over", "--capture", "3", "--log",
                   str(winner_log))
        # the loser ended long before its 60 s, while the winner was still capturing
        assert loser.poll() is not None, "the console that lost SOL is still running"
        out, err = loser.communicate(timeout=5)
    finally:
        if loser.poll() is None:
            loser.kill()
            loser.wait()
    assert loser.returncode == 1
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        f"error: node1: {TAKEN_OVER}; partial log: {loser_log}"], err
    assert out == ""
    assert f"capture ended early (node1: {TAKEN_OVER})" in loser_log.read_text()
    # the winner kept the session for its whole capture: one connection, never dropped
    assert r.returncode == 0, r.stderr
    text = winner_log.read_text()
    assert text.count("SOL connected") == 1 and "SOL dropped" not in text, text
    assert "1 connection(s)" in text.splitlines()[-1], text


def test_take_over_ends_an_interactive_console_with_one_line(make_fake_lab):
    lab = booted_lab(make_fake_lab)
    node = lab.inventory().node("node1")
    term = Pty([*INVOKE, "console", "node1"], env_for(lab))
    try:
        assert term.read_until(b"SOL connected", 15), term.text()
        # the most aggressive library client: force=True, quick keepalive
        with SolConsole(node, SETTINGS, force=True, keepalive=0.3) as winner:
            assert winner.wait_connected(5)
            assert term.proc.wait(10) == 1
            term.drain()
            assert term.restored()
            assert f"error: node1: {TAKEN_OVER}" in term.text(), term.text()
            assert "Traceback" not in term.text()
            tail = term.text().split("SOL connected", 1)[1]
            assert "reconnect" not in tail and "console closed" not in tail, tail
            # the winner holds it: a keepalive later it is still the owner, output reaches it
            winner.write(b"\r")
            assert winner.expect("node1 login:", timeout=10)
            assert winner.connects == 1 and winner.fatal is None
    finally:
        term.close()


def test_library_loser_ends_and_the_winner_keeps_sol(make_fake_lab):
    """Two library consoles that would both take over: the second wins, the first ends with
    TAKEN_OVER (ended, fatal) instead of reconnecting with force and taking it back. The first
    never runs its keepalive check here: the BMC's "SOL deactivating" packet is what tells it."""
    lab = booted_lab(make_fake_lab)
    node = lab.inventory().node("node1")
    first_events: list[str] = []
    with SolConsole(node, SETTINGS, force=True, keepalive=3600,
                    on_event=first_events.append) as first:
        assert first.wait_connected(5)
        with SolConsole(node, SETTINGS, force=True, keepalive=0.3) as second:
            assert second.wait_connected(5)
            assert first.ended.wait(5), first_events
            assert first.fatal == f"node1: {TAKEN_OVER}"
            assert first_events == ["SOL connected"], first_events
            with pytest.raises(Exception, match=TAKEN_OVER):
                first.expect("never", timeout=30)  # at once, not after 30 s
            second.write(b"\r")
            assert second.expect("node1 login:", timeout=10)
            assert second.connects == 1
        # the winner handed SOL back on close; the loser did not deactivate it on its way out
    assert lab.status("node1")["sol"] is False


@pytest.mark.slow  # a whole boot with SSH
def test_bringup_watch_leaves_a_held_console_alone(make_fake_lab):
    """power-on --wait ssh watches the console while it boots, but only if nobody holds it: a
    console already attached keeps its SOL session (the watch records nothing, the bringup
    still succeeds)."""
    lab = make_fake_lab(count=1, power_delay=(0.1, 0.2), boot_delay=0.3)
    node = lab.inventory().node("node1")
    events: list[str] = []
    with SolConsole(node, SETTINGS, on_event=events.append, keepalive=0.3) as holder:
        assert holder.wait_connected(5)
        r, _ = cli(lab, "labkit", "power-on", "-n", "node1", "--wait", "ssh", timeout=120)
        assert r.returncode == 0, r.stderr
        assert holder.expect("node1 login:", timeout=10)  # the holder saw the whole boot
        assert holder.connects == 1 and events == ["SOL connected"], events


def test_take_over_from_the_bringup_watch_ends_the_watch(make_fake_lab, tmp_path):
    """The other way round: a console --take-over while bringup watches the boot; the watch
    lets go (it is best effort) and does not take the console back."""
    from labkit.bringup import BootWatch

    lab = booted_lab(make_fake_lab)
    node = lab.inventory().node("node1")
    watch = BootWatch(node, SETTINGS)
    try:
        con = watch._con
        assert con is not None and con.wait_connected(5)
        log = tmp_path / "c.log"
        r, _ = cli(lab, "labkit", "console", "node1", "--take-over", "--capture", "2",
                   "--log", str(log))
        assert r.returncode == 0, r.stderr
        assert con.ended.is_set() and con.fatal == f"node1: {TAKEN_OVER}"
        text = log.read_text()
        assert text.count("SOL connected") == 1 and "SOL dropped" not in text, text
    finally:
        watch.close()


# -- errors end the console at once ----------------------------------------------------------------

def test_wrong_password_ends_the_interactive_console_at_once(make_fake_lab):
    lab = booted_lab(make_fake_lab)
    lab.control.fault("node1", refuse_password=True)
    for entry in ("labkit", "invoke"):
        term = Pty([*ENTRY[entry], "console", "node1"], env_for(lab))
        try:
            assert term.proc.wait(15) == 1, term.text()  # today: retries forever
            term.drain()
            assert term.restored()
            lines = [ln for ln in term.text().replace("\r", "").splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: node1: BMC "), lines
            assert "login refused" in lines[0] and "Traceback" not in term.text()
        finally:
            term.close()
    # and a capture: at once, not after its length
    r, took = cli(lab, "labkit", "console", "node1", "--capture", "30")
    assert r.returncode == 1 and "login refused" in one_error_line(r) and took < 10, r.stderr


def test_tilde_dot_acts_at_once_against_an_unreachable_bmc(make_fake_lab):
    lab = booted_lab(make_fake_lab)
    lab.control.fault("node1", down=True)
    # the default login budget (10 s): ~. must not wait for it
    term = Pty([*LABKIT, "console", "node1"], {**lab.env, "INVOKE_LABKIT_BMC_TIMEOUT": "10"})
    try:
        assert term.read_until(b"type ~. at the start of a line to leave", 15), term.text()
        t0 = time.monotonic()
        term.write(b"~.")
        rc = term.proc.wait(10)
        took = time.monotonic() - t0
        term.drain()
        assert rc == 1, term.text()  # left without ever having a console: not a success
        assert took < 1.0, took
        assert "node1: console left without an SOL session" in term.text(), term.text()
        assert term.restored() and "Traceback" not in term.text()
    finally:
        term.close()


@pytest.mark.parametrize("entry", ["labkit", "invoke"])
def test_capture_against_an_unreachable_bmc_fails_in_the_timeout(make_fake_lab, tmp_path, entry):
    lab = make_fake_lab(count=1, ssh=False)
    lab.control.fault("node1", down=True)
    log = tmp_path / "c.log"
    r, took = cli(lab, entry, "console", "node1", "--capture", "30", "--log", str(log),
                  env=env_for(lab, INVOKE_LABKIT_BMC_TIMEOUT="2"))
    line = one_error_line(r)
    assert r.returncode == 1
    assert line.startswith("error: node1: BMC 127.0.0.1:") and "did not answer" in line, line
    assert "2 s" in line, line
    assert 2 <= took < 8, took  # the configured timeout (+ start-up), not the 30 s capture


# -- --log that cannot be written ------------------------------------------------------------------

def _bad_logs(tmp: Path) -> list[tuple[str, str, list[str], list[str]]]:
    """(id, path, extra argv before, words in the error)."""
    folder = tmp / "a-folder"
    folder.mkdir()
    fifo = tmp / "a-fifo"
    os.mkfifo(fifo)
    ro_dir = tmp / "read-only"
    ro_dir.mkdir()
    ro_dir.chmod(0o555)
    ro_file = tmp / "read-only.log"
    ro_file.write_text("keep me\n")
    ro_file.chmod(0o444)
    cases = [
        ("folder", str(folder), [], ["is a folder"]),
        ("missing-parent", str(tmp / "no" / "such" / "c.log"), [], ["does not exist"]),
        ("fifo", str(fifo), [], ["not a regular file"]),
        ("read-only-folder", str(ro_dir / "c.log"), [], ["no permission"]),
        ("read-only-file", str(ro_file), [], ["no permission"]),
    ]
    if os.path.exists("/dev/full"):
        cases.append(("dev-full", "/dev/full", [], ["cannot be written"]))
    return cases


def test_unwritable_log_is_refused_before_any_sol_session(make_fake_lab, tmp_path):
    lab = make_fake_lab(count=1, ssh=False)
    cases = _bad_logs(tmp_path)
    # root may write anywhere: run without the capability that lets it, as a user would
    prefix = ["setpriv", "--bounding-set=-dac_override"] if os.geteuid() == 0 else []
    if prefix and subprocess.run([*prefix, "true"]).returncode != 0:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE")
    runs = [(cid, entry, path, words) for cid, path, _, words in cases
            for entry in ("labkit", "invoke")]
    runs += [(cid, entry, None, words) for cid, words in
             [("nan", ["--capture", "nan"]), ("inf", ["--capture", "inf"]),
              ("log-without-capture", ["--log"])] for entry in ("labkit", "invoke")]
    before = lab.status("node1")

    def one(run: tuple) -> tuple[tuple, subprocess.CompletedProcess]:
        cid, entry, path, _ = run
        if cid == "nan":
            argv = ["console", "node1", "--capture", "nan"]
        elif cid == "inf":
            argv = ["console", "node1", "--capture", "inf"]
        elif cid == "log-without-capture":
            argv = ["console", "node1", "--log", str(tmp_path / "x.log")]
        else:
            argv = ["console", "node1", "--capture", "5", "--log", path]
        r, _ = cli(lab, entry, *argv, timeout=30, prefix=prefix)
        return run, r

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(one, runs))
    for (cid, entry, path, words), r in results:
        line = one_error_line(r)
        assert r.returncode == 2, (cid, entry, r.stderr)
        for w in [*words, *([path] if path else [])]:
            assert w in line, (cid, entry, line)
    # nothing was started: not one packet reached the BMC, no file appeared where refused
    after = lab.status("node1")
    assert after["stats"]["rx"] == before["stats"]["rx"] and not after["sol"]
    assert not (tmp_path / "read-only" / "c.log").exists()
    assert not (tmp_path / "no").exists() and not (tmp_path / "x.log").exists()
    assert (tmp_path / "read-only.log").read_text() == "keep me\n"
