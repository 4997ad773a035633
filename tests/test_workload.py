"""The workload payload: determinism, ground truth vs the tracker, restore at a fixed address.

Runs the payload as the nodes do (``python3 workload.py``, stdin commands, JSON replies), locally:
no SSH needed for the core."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit.payloads import tracker as tr
from labkit.payloads import workload as wlmod

PAYLOADS = Path(wlmod.__file__).parent
PAGE = wlmod.PAGE

pytestmark = pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                                reason="x86_64 Linux only")


class Proc:
    """A payload process driven over stdin/stdout JSON lines."""

    def __init__(self, *args: str):
        self.p = subprocess.Popen([sys.executable, str(PAYLOADS / args[0]), *args[1:]],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.ready = self.line()
        assert self.ready.get("event") == "ready", self.ready

    def line(self) -> dict:
        raw = self.p.stdout.readline()
        if not raw:
            raise AssertionError(f"process ended: {self.p.stderr.read().decode()[-500:]}")
        return json.loads(raw)

    def call(self, cmd: str) -> dict:
        self.p.stdin.write((cmd + "\n").encode())
        self.p.stdin.flush()
        reply = self.line()
        assert reply.get("ok"), reply
        return reply

    def close(self) -> None:
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def run_wl(tmp: Path, *extra: str, name: str = "log") -> tuple[Proc, Path]:
    log = tmp / f"{name}.jsonl"
    return Proc("workload.py", "run", *extra, "--log", str(log)), log


def read_log(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("pattern", ["uniform", "hotset", "sequential"])
def test_same_seed_same_pages(tmp_path, pattern):
    args = ("--size", "4M", "--batch", "40", "--pattern", pattern, "--seed", "7",
            "--hot-fraction", "0.05")
    a, la = run_wl(tmp_path, *args, name="a")
    b, lb = run_wl(tmp_path, *args, name="b")
    c, lc = run_wl(tmp_path, *args[:-3], "8", "--hot-fraction", "0.05", name="c")  # seed 8
    try:
        ra = [a.call("step 5")["pages"] for _ in range(4)]
        rb = [b.call("step 5")["pages"] for _ in range(4)]
        c.call("step 20")
        assert ra == rb
        assert a.call("hash")["sha256"] == b.call("hash")["sha256"]
    finally:
        for p in (a, b, c):
            p.close()
    assert read_log(la) == read_log(lb)
    if pattern != "sequential":
        assert read_log(la) != read_log(lc)  # the seed matters
    steps = read_log(la)
    assert [s["step"] for s in steps] == list(range(1, 21))
    if pattern == "hotset":  # most writes land in the hot 5% (pages 1..51 of 1023)
        hot = sum(1 for s in steps for p in s["pages"] if 1 <= p <= 51)
        assert hot > 0.7 * sum(len(s["pages"]) - 1 for s in steps)
    if pattern == "sequential":
        assert steps[0]["pages"] == [0, *range(1, 41)]


def test_region_is_at_the_fixed_address_and_refuses_collisions():
    p = Proc("workload.py", "run", "--size", "2M", "--slot", "3")
    try:
        addr = p.ready["addr"]
        assert addr == wlmod.BASE + 3 * wlmod.SLOT_SPAN and addr % (2 << 20) == 0
        maps = Path(f"/proc/{p.ready['pid']}/maps").read_text()
        assert f"{addr:x}-{addr + (2 << 20):x} rw-p" in maps
    finally:
        p.close()
    # in this process: map once, then the same address again must fail (never MAP_FIXED over)
    addr = wlmod.slot_address(9)
    mem = wlmod.map_region(addr, 1 << 20)
    try:
        with pytest.raises(wlmod.WorkloadError, match="already in use"):
            wlmod.map_region(addr, 1 << 20)
    finally:
        mem.release()
        wlmod._libc.munmap(addr, 1 << 20)


def test_restore_resumes_and_matches_the_original(tmp_path):
    """Dump a workload mid-run with the agent, restore the image at the same address in a new
    process, run both N more steps: identical state."""
    orig = Proc("workload.py", "run", "--size", "8M", "--batch", "30", "--pattern", "hotset",
                "--seed", "11")
    try:
        orig.call("step 17")
        image = tmp_path / "image.bin"
        dump = subprocess.run([sys.executable, str(PAYLOADS / "agent.py"), "dump", "--pid",
                               str(orig.ready["pid"])], capture_output=True, check=True)
        rs = subprocess.run([sys.executable, str(PAYLOADS / "agent.py"), "restore", "--image",
                             str(image)], input=dump.stdout, capture_output=True, check=True)
        events = [json.loads(x) for x in rs.stdout.splitlines()]
        assert events[-1]["event"] == "verified" and events[-1]["match"], events[-1]
        copy = Proc("workload.py", "restore", "--image", str(image), "--hash")
        try:
            assert copy.ready["addr"] == orig.ready["addr"]
            assert copy.ready["step"] == 17
            assert copy.ready["sha256"] == orig.call("hash")["sha256"]
            orig.call("run-to 60")
            copy.call("run-to 60")
            assert copy.call("hash")["sha256"] == orig.call("hash")["sha256"]
        finally:
            copy.close()
    finally:
        orig.close()


def test_truncated_image_is_refused(tmp_path):
    orig = Proc("workload.py", "run", "--size", "1M")
    try:
        dump = subprocess.run([sys.executable, str(PAYLOADS / "agent.py"), "dump", "--pid",
                               str(orig.ready["pid"])], capture_output=True, check=True)
        image = tmp_path / "img"
        subprocess.run([sys.executable, str(PAYLOADS / "agent.py"), "restore", "--image",
                        str(image)], input=dump.stdout, check=True, capture_output=True)
        image.write_bytes(image.read_bytes()[:-PAGE])
        r = subprocess.run([sys.executable, str(PAYLOADS / "workload.py"), "restore",
                            "--image", str(image)], capture_output=True, timeout=10)
        assert r.returncode == 2
        assert "truncated" in json.loads(r.stdout)["error"]
    finally:
        orig.close()


def _available(backend: str) -> str | None:
    p = Proc("workload.py", "run", "--size", "1M")
    try:
        info = tr.probe(p.ready["pid"])[backend]
    finally:
        p.close()
    return None if info["ok"] else info["reason"]


@pytest.mark.parametrize("backend", ["uffd", "compare", "softdirty"])
@pytest.mark.parametrize("pattern", ["uniform", "hotset", "sequential"])
def test_tracker_matches_ground_truth(tmp_path, backend, pattern):
    """Every round, the tracker's dirty set == the pages the workload logged writing."""
    why = _available(backend)
    if why:
        pytest.skip(f"{backend}: {why}")
    p, log = run_wl(tmp_path, "--size", "16M", "--batch", "300", "--pattern", pattern,
                    "--seed", "5", "--hot-fraction", "0.02")
    addr, size = p.ready["addr"], p.ready["size"]
    t = tr.open_tracker(p.ready["pid"], backend, ranges=[(addr, addr + size)])
    try:
        t.start()
        seen = 0
        for rnd, nsteps in enumerate([1, 3, 7, 2, 12]):
            p.call(f"step {nsteps}")
            got = sorted((a - addr) // PAGE for a in t.scan().pages)
            steps = read_log(log)[seen:seen + nsteps]
            seen += nsteps
            want = sorted({pg for s in steps for pg in s["pages"]})
            assert got == want, f"round {rnd}: {len(got)} tracked vs {len(want)} written"
        p.call("step 0")
        assert list(t.scan().pages) == []  # no step, no write: nothing dirty
    finally:
        t.close()
        p.close()


# --- --ctl: the same commands without stdin (a workload CRIU migrates) ---------------------------
class Ctl:
    """Drives a workload's --ctl file the way criu_driver's wlctl does: write the command (tmp +
    rename), remove any old reply, SIGUSR1, wait for the reply file."""

    def __init__(self, pid: int, path: Path):
        self.pid, self.path = pid, path
        self.reply_path = Path(f"{path}.reply")

    def send(self, line: str) -> None:
        tmp = self.path.with_name(self.path.name + ".w")
        tmp.write_text(line + "\n")
        os.replace(tmp, self.path)
        self.reply_path.unlink(missing_ok=True)
        os.kill(self.pid, signal.SIGUSR1)

    def wait(self, timeout: float = 20.0) -> dict:
        end = time.monotonic() + timeout
        while not self.reply_path.exists():
            if time.monotonic() > end:
                raise AssertionError(f"no reply in {self.reply_path} after {timeout} s")
            if self.exited():
                raise AssertionError(f"workload {self.pid} ended without replying")
            time.sleep(0.01)
        return json.loads(self.reply_path.read_text())

    def call(self, line: str) -> dict:
        self.send(line)
        return self.wait()

    def exited(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in "ZX"
        except FileNotFoundError:
            return True


def _ctl_wl(tmp: Path, *extra: str) -> tuple[Proc, Ctl]:
    path = tmp / "wl.ctl"
    p = Proc("workload.py", "run", *extra, "--stdin", "ignore", "--ctl", str(path))
    return p, Ctl(p.ready["pid"], path)


WL_ARGS = ("--size", "4M", "--batch", "25", "--pattern", "hotset", "--seed", "13")


def test_ctl_answers_as_stdin_does(tmp_path):
    """step / run-to / hash / info / hold over --ctl (stdin ignored) == the same over stdin."""
    ref = Proc("workload.py", "run", *WL_ARGS)
    p, ctl = _ctl_wl(tmp_path, *WL_ARGS)
    try:
        for cmd in ("step 7", "run-to 40", "hash", "hold", "step 3", "hash"):
            want = ref.call(cmd)
            got = ctl.call(cmd)
            assert got == want, cmd
        info = ctl.call("info")
        assert info["pid"] == p.ready["pid"] and info["step"] == 43 and info["timed"] is False
        bad = ctl.call("run-to 5")  # an error is a reply too, and the process lives on
        assert bad == {"ok": False, "error": "already at step 43, past 5"}
        assert ctl.call("quit") == {"ok": True, "step": 43}
        assert p.p.wait(10) == 0
    finally:
        ref.close()
        p.close()


def test_ctl_with_timed_steps_never_breaks_a_step(tmp_path):
    """A timed workload signalled many times while stepping fast: each signal is handled between
    steps (hold stops it), and its state after run-to S is exactly the commanded run's."""
    ref = Proc("workload.py", "run", *WL_ARGS, "--rate", "20000")  # the rate is in the header
    p, ctl = _ctl_wl(tmp_path, *WL_ARGS, "--rate", "20000", "--timed")
    try:
        seen = []
        for _ in range(30):  # interrupt it while it steps
            seen.append(ctl.call("info")["step"])
        assert seen == sorted(seen) and seen[-1] > seen[0], seen  # it kept stepping meanwhile
        held = ctl.call("hold")
        assert held["timed"] is False
        target = held["step"] + 50
        assert ctl.call(f"run-to {target}") == ref.call(f"run-to {target}")
        assert ctl.call("hash") == ref.call("hash")
        again = ctl.call("info")
        assert again["step"] == target  # held: no step since
        assert ctl.call("go")["timed"] is True
        end = time.monotonic() + 20
        while ctl.call("info")["step"] == target:  # it steps again on its own
            assert time.monotonic() < end, "no step after go"
    finally:
        ref.close()
        p.close()


def test_ctl_signal_to_a_stopped_workload_is_answered_once_continued(tmp_path):
    """What the driver does across a migration: send (no wait) while stopped, SIGCONT, wait."""
    p, ctl = _ctl_wl(tmp_path, *WL_ARGS)
    try:
        ctl.call("step 4")
        os.kill(p.ready["pid"], signal.SIGSTOP)
        ctl.send("hash")
        with pytest.raises(AssertionError, match="no reply"):
            ctl.wait(timeout=0.5)  # stopped: nothing can answer
        os.kill(p.ready["pid"], signal.SIGCONT)
        assert ctl.wait()["step"] == 4
    finally:
        os.kill(p.ready["pid"], signal.SIGCONT)
        p.close()


def test_ctl_missing_or_empty_command_file_is_an_error_reply(tmp_path):
    p, ctl = _ctl_wl(tmp_path, *WL_ARGS)
    try:
        os.kill(p.ready["pid"], signal.SIGUSR1)  # no ctl file at all
        assert not ctl.wait()["ok"]
        assert "cannot read" in json.loads(ctl.reply_path.read_text())["error"]
        assert ctl.call("")["error"].startswith("no command in")
        assert ctl.call("step 2")["step"] == 2
        # no fd to the ctl file stays open (CRIU carries nothing of it)
        fds = os.listdir(f"/proc/{p.ready['pid']}/fd")
        targets = [os.readlink(f"/proc/{p.ready['pid']}/fd/{fd}") for fd in fds]
        assert not [t for t in targets if "wl.ctl" in t], targets
    finally:
        p.close()


# --- --tcp-serve: the record stream (issue 12; the protocol's own tests are test_tcpstream.py) ---
def _tcp_client(port: int):
    import socket

    from labkit.payloads import tcpstream as ts
    c = socket.create_connection(("127.0.0.1", port), timeout=10)
    return c, ts.RecordChecker(13)


def _read_records(c, checker, n: int) -> list[dict]:
    out = []
    buf = b""
    while len(out) < n:
        data = c.recv(64 * (n - len(out)) - len(buf))
        assert data, "workload closed the stream"
        buf += data
        while len(buf) >= 64:
            out.append(checker.check(buf[:64]))
            buf = buf[64:]
    return out


def test_tcp_serve_records_follow_steps_and_hold(tmp_path):
    """A record after each commanded step command and each timed step, none while held; the
    chain seed is the workload's --seed; the state lands in the image the agent dumps."""
    from labkit.payloads import tcpstream as ts
    p = Proc("workload.py", "run", *WL_ARGS, "--rate", "2000", "--tcp-serve", "127.0.0.1:0")
    try:
        tcp = p.ready["tcp"]
        assert tcp["listening"] and not tcp["connected"] and tcp["records"] == 0
        c, checker = _tcp_client(tcp["local"][1])
        p.call("step 3")
        p.call("run-to 10")
        assert [(r["rec_no"], r["step"]) for r in _read_records(c, checker, 2)] == \
            [(1, 3), (2, 10)]
        info = p.call("info")["tcp"]
        assert info["connected"] and not info["listening"] and info["records"] == 2
        p.call("go")
        _read_records(c, checker, 20)  # timed steps send records on their own
        held = p.call("hold")
        n = p.call("info")["tcp"]["records"]
        _read_records(c, checker, n - checker.rec_no)  # what was sent before the hold
        assert checker.rec_no == n
        p.call("step 1")  # the next record comes from this step: nothing was sent while held
        nxt = _read_records(c, checker, 1)[0]
        assert nxt["rec_no"] == n + 1 and nxt["step"] == held["step"] + 1
        dump = subprocess.run([sys.executable, str(PAYLOADS / "agent.py"), "dump", "--pid",
                               str(p.ready["pid"])], capture_output=True, check=True)
        image = tmp_path / "image.bin"
        subprocess.run([sys.executable, str(PAYLOADS / "agent.py"), "restore", "--image",
                        str(image)], input=dump.stdout, capture_output=True, check=True)
        st = ts.read_state(image.read_bytes()[:PAGE])
        assert st["rec_no"] == n + 1 and st["chain"] == checker.chain and ts.quiescent(
            image.read_bytes()[:PAGE])
        c.close()
    finally:
        p.close()


def test_tcp_serve_on_a_busy_port_is_an_error_line():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, str(PAYLOADS / "workload.py"), "run", "--size", "1M",
                            "--tcp-serve", f"127.0.0.1:{port}"], capture_output=True, timeout=20,
                           stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    assert "--tcp-serve 127.0.0.1" in json.loads(r.stdout)["error"]
