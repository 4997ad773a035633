"""The workload payload: determinism, ground truth vs the tracker, restore at a fixed address.

Runs the payload as the nodes do (``python3 workload.py``, stdin commands, JSON replies), locally:
no SSH needed for the core."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
