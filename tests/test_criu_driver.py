"""labkit/payloads/criu_driver.py, the node side of the criu backend (criu-protocol.md).

Here (anywhere): the image decoders, verify/memhash over a real stopped process against images
built the way CRIU lays them out (a parent chain), and the serve loop's commands that need no
CRIU. In two QEMU guests (Debian 6.1 kernel, CRIU 3.17.1; skipped with the reason elsewhere):
the whole serve chain over SSH, as the controller drives it. Recipe: docs/criu-recipe.md."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import selectors
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from labkit.payloads import criu_driver as cd

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "labkit/payloads/criu_driver.py"
PAGE = cd.PAGE


def wait_for(cond, timeout: float, what: str, interval: float = 0.02) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------ images (runs anywhere)

def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _field(num: int, v: int | bytes) -> bytes:
    if isinstance(v, bytes):
        return _varint(num << 3 | 2) + _varint(len(v)) + v
    return _varint(num << 3) + _varint(v)


def _image(magics: list[int], *entries: bytes) -> bytes:
    data = b"".join(m.to_bytes(4, "little") for m in magics)
    return data + b"".join(len(e).to_bytes(4, "little") + e for e in entries)


def _pagemap(pages_id: int, *entries: tuple[int, int, int | None]) -> bytes:
    """flags None: an old-style entry, in_parent=1 and no flags."""
    msgs = [_field(1, pages_id)]
    for vaddr, nr, flags in entries:
        msg = _field(1, vaddr) + _field(2, nr)
        msg += _field(3, 1) if flags is None else _field(4, flags)
        msgs.append(msg)
    return _image([cd.IMG_COMMON, cd.PAGEMAP_MAGIC], *msgs)


def test_stats_dump_decodes_as_crit_does() -> None:
    dump = (_field(2, 544666) + _field(4, 3514074) + _field(5, 19996) + _field(6, 5597)
            + _field(7, 11565))
    data = _image([cd.IMG_SERVICE, cd.STATS_MAGIC], _field(1, dump))
    st = cd.parse_stats(data)["dump"]
    assert st == {"frozen_time": 544666, "memwrite_time": 3514074, "pages_scanned": 19996,
                  "pages_skipped_parent": 5597, "pages_written": 11565}


def test_stats_restore_and_unknown_fields() -> None:
    data = _image([cd.IMG_SERVICE, cd.STATS_MAGIC],
                  _field(2, _field(4, 250000) + _field(5, 17000) + _field(99, 1)))
    assert cd.parse_stats(data) == {"restore": {"restore_time": 250000,
                                                "pages_restored": 17000, "field99": 1}}


def test_pstree_packed_and_unpacked_threads() -> None:
    packed = _field(1, 422) + _field(2, 0) + _field(3, 422) + _field(4, 422) \
        + _field(5, _varint(422) + _varint(423) + _varint(424))
    child = _field(1, 430) + _field(2, 422) + _field(5, 430)
    procs = cd.parse_pstree(_image([cd.IMG_COMMON, cd.PSTREE_MAGIC], packed, child))
    assert procs[0] == {"pid": 422, "ppid": 0, "pgid": 422, "sid": 422,
                        "threads": [422, 423, 424]}
    assert procs[1]["pid"] == 430 and procs[1]["threads"] == [430]


def test_pagemap_flags_and_old_in_parent() -> None:
    data = _pagemap(7, (0x7F0000000000, 3, cd.PE_PRESENT), (0x7F0000003000, 2, None),
                    (0x7F0000005000, 1, cd.PE_LAZY | cd.PE_PRESENT))
    assert cd.parse_pagemap(data) == (7, [(0x7F0000000000, 3, cd.PE_PRESENT),
                                          (0x7F0000003000, 2, cd.PE_PARENT),
                                          (0x7F0000005000, 1, cd.PE_LAZY | cd.PE_PRESENT)])
    with pytest.raises(ValueError):
        cd.parse_pagemap(_image([cd.IMG_COMMON, cd.PAGEMAP_MAGIC]))  # no head
    with pytest.raises(ValueError):
        cd.parse_pagemap(_image([cd.IMG_COMMON, cd.PSTREE_MAGIC], _field(1, 1)))


@pytest.mark.parametrize("data", [b"", b"\x19\x43\x56\x54", b"XXXXYYYY",
                                  _image([cd.IMG_COMMON, cd.PSTREE_MAGIC])[:-1] + b"\x05"])
def test_bad_images_are_value_errors(data: bytes) -> None:
    with pytest.raises(ValueError):
        cd.parse_pstree(data)


def test_criu_reason_is_the_first_error_line() -> None:
    log = """(00.000000) Version: 3.17.1 (gitid 0)
(00.120000) Warn  (criu/files-reg.c:1234): something harmless
(00.130000) Error (criu/files-reg.c:2097): File w/dirty.out has bad mode 0100644 (expect 0100600)
(00.140000) Error (criu/cr-restore.c:2458): Restoring FAILED.
"""
    assert cd.criu_reason(log) == ("File w/dirty.out has bad mode 0100644 (expect 0100600) "
                                   "(criu/files-reg.c:2097)")
    assert cd.criu_reason("all fine\n") is None
    assert cd.criu_reason("1234: Error (criu/cr-dump.c:10): Dumping FAILED.") == \
        "Dumping FAILED. (criu/cr-dump.c:10)"


def test_parse_check() -> None:
    out = ("Error (criu/util.c:642): exited, status=1\n"
           "Error (criu/tun.c:85): tun: Unable to create tun: No such file or directory\n"
           "Looks good.\n")
    assert cd.parse_check(0, out) == (True, "Looks good.")
    bad = "Error (criu/net.c:3179): Unable to create socket: Network is unreachable\n"
    assert cd.parse_check(1, bad) == (False, "Unable to create socket: Network is "
                                             "unreachable (criu/net.c:3179)")
    assert cd.parse_check(1, "") == (False, "criu check exited 1")


def test_pids_in_use_names_the_taker() -> None:
    taken = cd.pids_in_use([{"pid": os.getpid(), "threads": [os.getpid()]}])
    assert len(taken) == 1 and taken[0].startswith(f"{os.getpid()} (")


# ------------------------------------------------- verify / memhash on a real stopped process

NPAGES = 64
HOLDER = r"""
import ctypes, mmap, sys
n = int(sys.argv[1])
m = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(n):
    m[i * 4096:(i + 1) * 4096] = bytes([i % 251 + 1]) * 4000 + i.to_bytes(96, "little")
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def stopped_holder():
    """A process with NPAGES private pages of known content at a known address, stopped."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(NPAGES)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        addr = int(p.stdout.readline())
        p.send_signal(signal.SIGSTOP)
        wait_for(lambda: cd.proc_state(p.pid) == "T", 10, "the holder to stop")
        yield p.pid, addr
    finally:
        p.kill()
        p.wait()


def _mem(pid: int, addr: int, n: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.seek(addr)
        return f.read(n * PAGE)


def _build_chain(base: Path, pid: int, addr: int) -> tuple[str, set[int]]:
    """Three rounds laid out as CRIU does: 1 holds every page (some stale: later rounds
    rewrote them), 2 and 3 hold what changed and point at their parent for the rest.
    Returns the top dir and the page indexes the image holds (25..28 are lazy: not held)."""
    live = _mem(pid, addr, NPAGES)
    page = [live[i * PAGE:(i + 1) * PAGE] for i in range(NPAGES)]
    stale = b"\xee" * PAGE
    d1, d2, d3 = (base / str(i) for i in (1, 2, 3))
    for d in (d1, d2, d3):
        d.mkdir(parents=True)
    (d2 / "parent").symlink_to("../1")
    (d3 / "parent").symlink_to("../2")
    # round 1: all present; 3, 4, 10..14 hold what later rounds replaced
    (d1 / f"pagemap-{pid}.img").write_bytes(_pagemap(1, (addr, NPAGES, cd.PE_PRESENT)))
    (d1 / "pages-1.img").write_bytes(b"".join(
        stale if i in (3, 4, *range(10, 15)) else page[i] for i in range(NPAGES)))
    # round 2: 10..14 present (pages id 7), the rest in the parent
    v = lambda i: addr + i * PAGE  # noqa: E731
    (d2 / f"pagemap-{pid}.img").write_bytes(_pagemap(
        7, (v(0), 10, cd.PE_PARENT), (v(10), 5, cd.PE_PRESENT), (v(15), 49, cd.PE_PARENT)))
    (d2 / "pages-7.img").write_bytes(b"".join(page[10:15]))
    # round 3: 3, 4 present; 5..24 in the parent (which splits them 5..9 → 1, 10..14 here in
    # 2, 15..24 → 1); 25..28 lazy; 29..63 an old-style in_parent entry
    (d3 / f"pagemap-{pid}.img").write_bytes(_pagemap(
        3, (v(3), 2, cd.PE_PRESENT), (v(0), 3, cd.PE_PARENT), (v(5), 20, cd.PE_PARENT),
        (v(25), 4, cd.PE_LAZY), (v(29), 35, None)))
    (d3 / "pages-3.img").write_bytes(page[3] + page[4])
    (d3 / "pstree.img").write_bytes(_image([cd.IMG_COMMON, cd.PSTREE_MAGIC],
                                           _field(1, pid) + _field(5, pid)))
    return str(d3), set(range(NPAGES)) - {25, 26, 27, 28}


def _expected(pid: int, addr: int, held: set[int]) -> str:
    """The protocol's hash, written out: per run of consecutive held pages (in chunks of at
    most CHUNK_PAGES), pid + vaddr + npages (8 bytes LE each), then the pages."""
    live = _mem(pid, addr, NPAGES)
    runs: list[list[int]] = []
    for i in sorted(held):
        if runs and runs[-1][0] + runs[-1][1] == i and runs[-1][1] < cd.CHUNK_PAGES:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    h = hashlib.sha256()
    for i, n in runs:
        h.update(struct.pack("<QQQ", pid, addr + i * PAGE, n) + live[i * PAGE:(i + n) * PAGE])
    return h.hexdigest()


def test_verify_follows_the_parent_chain_and_memhash_agrees(tmp_path, stopped_holder) -> None:
    pid, addr = stopped_holder
    top, held = _build_chain(tmp_path, pid, addr)
    res = cd.verify_images(top, [pid])
    assert res["pages"] == len(held) == 60
    assert res["sha256"] == res["memory_sha256"] == _expected(pid, addr, held)
    ranges = json.loads(base64.b64decode(res["ranges_b64"]))
    assert ranges == {str(pid): [[addr, 25], [addr + 29 * PAGE, 35]]}
    assert cd.image_ranges(top, [pid]) == ranges  # what restore replies, before verify
    # src side: the same construction over the same pages of the live process
    assert cd.memhash(ranges) == {"sha256": res["sha256"], "pages": 60}
    # the one-shot CLI says the same in one JSON line
    p = subprocess.run([sys.executable, "-I", "-S", str(DRIVER), "verify", "--base",
                        str(tmp_path), "--round", "3", "--pid", str(pid)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout)["sha256"] == res["sha256"]


def test_verify_names_the_first_changed_page(tmp_path, stopped_holder) -> None:
    pid, addr = stopped_holder
    top, held = _build_chain(tmp_path, pid, addr)
    for i in (40, 12):  # one page from round 1, one from round 2's pages
        with open(f"/proc/{pid}/mem", "r+b", buffering=0) as f:
            f.seek(addr + i * PAGE + 100)
            f.write(b"X")
    with pytest.raises(cd.StepFailed) as e:
        cd.verify_images(top, [pid])
    assert f"pid {pid} at {addr + 12 * PAGE:#x} first, 2 page(s) differ of 60" in e.value.reason
    extra = e.value.extra
    assert extra["address"] == hex(addr + 12 * PAGE) and extra["pages_differ"] == 2
    assert extra["memory_sha256"] == _expected(pid, addr, held) != extra["sha256"]


def test_verify_refuses_a_broken_chain(tmp_path, stopped_holder) -> None:
    pid, addr = stopped_holder
    top, _ = _build_chain(tmp_path, pid, addr)
    (Path(top) / "parent").unlink()
    with pytest.raises(cd.StepFailed, match="in-parent but no parent images dir"):
        cd.verify_images(top, [pid])
    (Path(top) / "parent").symlink_to("../2")
    # round 2 loses the pages 10..14 that round 3 asks it for
    (tmp_path / "2" / f"pagemap-{pid}.img").write_bytes(
        _pagemap(7, (addr, 10, cd.PE_PARENT), (addr + 15 * PAGE, 49, cd.PE_PARENT)))
    with pytest.raises(cd.StepFailed, match=f"page {addr + 10 * PAGE:#x} is marked in-parent"):
        cd.verify_images(top, [pid])


# ------------------------------------------------------------------ the serve loop, locally

class Session:
    """A serve driver over a pipe (locally) or over ssh (in a guest): one line in, one JSON
    line out, with a deadline."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None):
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.p.stdout, selectors.EVENT_READ)
        self.buf = b""

    def line(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or not self.sel.select(left):
                if time.monotonic() >= end:
                    raise AssertionError(f"no reply in {timeout:g} s")
                continue
            data = os.read(self.p.stdout.fileno(), 1 << 20)
            if not data:
                raise AssertionError(f"driver ended: {self.p.stderr.read().decode()[-2000:]}")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def write(self, line: str) -> None:
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def send(self, line: str, timeout: float = 120.0) -> dict:
        self.write(line)
        return self.line(timeout)

    def ok(self, line: str, timeout: float = 120.0) -> dict:
        res = self.send(line, timeout)
        assert res["ok"], res
        return res

    def close(self, timeout: float = 60.0) -> int:
        self.p.stdin.close()
        rc = self.p.wait(timeout)
        self.p.stdout.close()
        self.p.stderr.close()
        return rc


@pytest.fixture
def local(tmp_path):
    env = {**os.environ, "LABKIT_RUN": "marker-of-the-run", "CRIU_DRIVER_PID_PLACEMENT": "off"}
    s = Session([sys.executable, "-u", str(DRIVER), "serve", "--base", str(tmp_path / "base"),
                 "--role", "src"], env=env)
    yield s
    if s.p.poll() is None:
        s.close()


def test_cli_prints_one_json_line_and_fails_with_an_error(tmp_path: Path) -> None:
    env = {"PATH": "/nonexistent", "CRIU": str(tmp_path / "no-criu")}
    p = subprocess.run([sys.executable, "-I", "-S", str(DRIVER), "check"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1, p.stderr
    res = json.loads(p.stdout)
    assert res["ok"] is False and "not installed" in res["error"]
    p = subprocess.run([sys.executable, "-I", "-S", str(DRIVER), "restore", "--base",
                        str(tmp_path), "--round", "3"], capture_output=True, text=True,
                       timeout=30)
    res = json.loads(p.stdout)
    assert p.returncode == 1 and res["ok"] is False and "no images" in res["error"]
    p = subprocess.run([sys.executable, "-I", "-S", str(DRIVER), "predump", "--pid", "1"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and p.stdout == ""  # usage


def test_serve_answers_every_line_and_never_exits_on_a_bad_one(local, tmp_path) -> None:
    hello = local.ok("hello")
    assert hello["pid"] == local.p.pid and hello["base"] == str(tmp_path / "base")
    assert "127.0.0.1" not in hello["addresses"] and hello["kernel"] == os.uname().release
    for bad, cmd in (("bogus --x", "bogus"), ("spawn --log /x", "spawn"),
                     ('"unclosed', None), ("hello --help", "hello"),
                     ("serve --base /x --role src", "serve"), ("resume --pid 999999999", "resume"),
                     ("restore --round 1", "restore"), ("memhash --ranges-b64 !!", "memhash")):
        res = local.send(bad)
        assert res["ok"] is False and res["cmd"] == cmd, res
        assert res["error"] and "\n" not in res["error"] and "Traceback" not in res["error"]
    local.p.stdin.write(b"hello \xff\xfe\n")
    local.p.stdin.flush()
    res = local.line(30)
    assert res["ok"] is False and "unrecognized arguments" in res["error"]
    assert local.ok("logs")["logs"] == {}
    assert local.ok("quit")["cmd"] == "quit"
    assert local.close() == 0


def test_spawn_detaches_strips_labkit_env_and_reports_its_first_line(local, tmp_path) -> None:
    cmd = ('echo \'{"ready": true}\'; echo "$LABKIT_RUN|$HOME" >&2; '
           f'echo $$ > {tmp_path}/sh.pid; exec sleep 300')
    res = local.ok(f"spawn --log {tmp_path}/out.log --cwd {tmp_path} --command-b64 "
                   f"{base64.b64encode(cmd.encode()).decode()} --wait-line 10")
    pid = res["pid"]
    try:
        assert res["first_line"] == {"ready": True}
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(stat[3]) == pid  # own session
        assert int(stat[1]) != local.p.pid  # double-forked: not the driver's child
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not [e for e in env if e.startswith(b"LABKIT_")]
        assert Path(f"/proc/{pid}/cwd").resolve() == tmp_path.resolve()
        assert Path(f"/proc/{pid}/fd/0").resolve() == Path("/dev/null")
        wait_for(lambda: (tmp_path / "out.log").read_text().count("\n") >= 2, 10, "stderr")
        assert (tmp_path / "out.log").read_text().splitlines()[1] == f"|{os.environ['HOME']}"
        sh_pid = tmp_path / "sh.pid"
        wait_for(lambda: sh_pid.exists() and sh_pid.read_text().endswith("\n"), 10, "sh.pid")
        assert int(sh_pid.read_text()) == pid  # the pid is the shell's
        killed = local.ok(f"kill --pid {pid}")
        assert killed["killed"] == [pid] and not Path(f"/proc/{pid}").exists()  # reaped
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # a command that ends before its first line: ok:false naming it; one that cannot start
    res = local.send(f"spawn --log {tmp_path}/o2 --cwd {tmp_path} --command-b64 "
                     f"{base64.b64encode(b'echo -n oops; exit 3').decode()} --wait-line 10")
    assert res["ok"] is False and "ended before writing a line" in res["error"]
    assert "oops" in res["error"]
    res = local.send(f"spawn --log {tmp_path}/nodir/o --cwd {tmp_path} --command-b64 eA==")
    assert res["ok"] is False and "does not exist" in res["error"]


def test_pack_unpack_carries_images_and_files(tmp_path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "2").mkdir(parents=True)
    (src / "1").mkdir()
    (src / "2" / "core-9.img").write_bytes(b"core")
    (src / "2" / "dump.log").write_text("a log: not packed")
    (src / "2" / "restore.pid").write_text("1")
    (src / "2" / "parent").symlink_to("../1")
    data = tmp_path / "w" / "data.out"
    data.parent.mkdir()
    data.write_bytes(b"x" * 1000)
    os.chmod(data, 0o640)
    os.utime(data, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    drv = cd.Driver(str(src), "src")
    pack = cd.run_command(cd.build_parser(str(src)).parse_args(
        ["pack", "--round", "2", "--file", str(data)]), drv)
    assert pack["ok"], pack
    assert sorted(pack["members"]) == sorted(["images/core-9.img", "images/parent",
                                              "files" + str(data)])
    data.write_bytes(b"changed on dst")  # unpack puts the frozen copy back
    dd = cd.Driver(str(dst), "dst")
    up = cd.run_command(cd.build_parser(str(dst)).parse_args(
        ["unpack", "--round", "2", "--tar-b64", pack["tar_b64"]]), dd)
    assert up["ok"], up
    assert up["images"] == 1 and up["files"] == [str(data)]
    assert (dst / "2" / "core-9.img").read_bytes() == b"core"
    assert os.readlink(dst / "2" / "parent") == "../1"
    st = data.stat()
    assert data.read_bytes() == b"x" * 1000 and st.st_mode & 0o777 == 0o640
    assert st.st_mtime_ns == 1_600_000_000_123_456_789
    shutil.rmtree(data.parent)  # dst lacks the folder: named
    up = cd.run_command(cd.build_parser(str(dst)).parse_args(
        ["unpack", "--round", "2", "--tar-b64", pack["tar_b64"]]), dd)
    assert up["ok"] is False and f"its folder {data.parent} does not exist" in up["error"]


WLCTL_FAKE = r"""
import json, os, signal, sys, time
ctl = sys.argv[1]
def on_usr1(*_):
    line = open(ctl).read().strip()
    with open(ctl + ".reply.tmp", "w") as f:
        json.dump({"got": line, "pid": os.getpid()}, f)
    os.rename(ctl + ".reply.tmp", ctl + ".reply")
signal.signal(signal.SIGUSR1, on_usr1)
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


def test_wlctl_signals_and_reads_the_reply(local, tmp_path) -> None:
    ctl = tmp_path / "ctl"
    p = subprocess.Popen([sys.executable, "-c", WLCTL_FAKE, str(ctl)], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        b64 = base64.b64encode(b"run-to 5").decode()
        res = local.ok(f"wlctl --pid {p.pid} --ctl {ctl} --line-b64 {b64}")
        assert res["reply"] == {"got": "run-to 5", "pid": p.pid}
        # stopped: the signal waits for SIGCONT (no-wait, resume, then wait)
        p.send_signal(signal.SIGSTOP)
        wait_for(lambda: cd.proc_state(p.pid) == "T", 10, "stop")
        b64 = base64.b64encode(b"hash").decode()
        assert "reply" not in local.ok(f"wlctl --pid {p.pid} --ctl {ctl} --line-b64 {b64} "
                                       "--no-wait")
        assert not (tmp_path / "ctl.reply").exists()  # the old reply is gone
        local.ok(f"resume --pid {p.pid}")
        assert local.ok(f"wlctl-wait --ctl {ctl}")["reply"]["got"] == "hash"
    finally:
        p.kill()
        p.wait()


def test_workspace_copies_the_release_once(tmp_path) -> None:
    rel = tmp_path / "releases" / "r1"
    rel.mkdir(parents=True)
    (rel / "workload.py").write_text("print(1)\n")
    os.chmod(rel / "workload.py", 0o755)
    s = Session(["sh", "-c", f"cd {rel} && exec {sys.executable} -u {DRIVER} serve "
                 f"--base {tmp_path}/b --role dst"])
    try:
        res = s.ok(f"workspace --path {tmp_path}/ws/run1.work")
        assert res == {**res, "path": f"{tmp_path}/ws/run1.work", "copied": True}
        copied = tmp_path / "ws" / "run1.work" / "workload.py"
        assert copied.read_text() == "print(1)\n" and copied.stat().st_mode & 0o777 == 0o755
        assert s.ok(f"workspace --path {tmp_path}/ws/run1.work")["copied"] is False
        s.ok("cleanup")
        assert copied.exists() and not (tmp_path / "b").exists()  # cleanup leaves P alone
    finally:
        s.close()


def test_sigterm_runs_the_safety_net(tmp_path) -> None:
    """A dst driver told to stop before quit removes BASE (its restored trees: in guests)."""
    s = Session([sys.executable, "-u", str(DRIVER), "serve", "--base", str(tmp_path / "b"),
                 "--role", "dst"])
    s.ok("hello")
    (tmp_path / "b" / "1").mkdir()
    s.p.send_signal(signal.SIGTERM)
    assert s.p.wait(30) == 0
    assert not (tmp_path / "b").exists()
    assert b"session ended without quit (signal 15)" in s.p.stderr.read()
    s.close()


# ------------------------------------------------------------------ TCP (issue 12; here, real sockets)

def test_lock_rules_are_criu_s_own() -> None:
    """The match spec of criu/netfilter.c IPTABLES_CONN_CMD: a restore deletes what the driver
    inserted on dst only if they are the same rule."""
    assert cd.netlock.lock_rules("10.77.0.200:7077", "10.77.0.250:40000") == [
        ["INPUT", "--protocol", "tcp", "-m", "mark", "!", "--mark", "0xc114",
         "--source", "10.77.0.250", "--sport", "40000", "--destination", "10.77.0.200",
         "--dport", "7077", "-j", "DROP"],
        ["OUTPUT", "--protocol", "tcp", "-m", "mark", "!", "--mark", "0xc114",
         "--source", "10.77.0.200", "--sport", "7077", "--destination", "10.77.0.250",
         "--dport", "40000", "-j", "DROP"]]
    with pytest.raises(cd.StepFailed):
        cd._split_conn("10.77.0.200:7077")


CONNECTOR = """
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(s.getsockname()[1], flush=True)
time.sleep(600)
"""


def _repair_allowed() -> str | None:
    if os.geteuid() != 0:
        return "TCP_REPAIR and pidfd_getfd of another process need root"
    return None


@pytest.fixture
def connected():
    """(peer process, its port, our accepted socket): an established connection whose one end
    lives in another process, as the workload's does for the driver."""
    ls = socket.create_server(("127.0.0.1", 0))
    p = subprocess.Popen([sys.executable, "-c", CONNECTOR, str(ls.getsockname()[1])],
                         stdout=subprocess.PIPE, text=True)
    try:
        port = int(p.stdout.readline())
        conn, _ = ls.accept()
        conn.settimeout(1.5)
        yield p, port, conn, ls.getsockname()[1]
        conn.close()
    finally:
        ls.close()
        p.kill()
        p.wait()


@pytest.mark.skipif(_repair_allowed() is not None, reason=str(_repair_allowed()))
@pytest.mark.parametrize("quiet", [True, False])
def test_a_killed_copy_is_silent_only_in_repair_mode(connected, quiet: bool) -> None:
    """kill's reason to quiet the sockets: the same process killed with its socket in repair
    mode sends nothing (the peer's read times out), without it the peer sees the close."""
    p, port, conn, lport = connected
    (c,) = cd.tcp_connections([p.pid])
    assert (c["local"], c["peer"]) == (f"127.0.0.1:{port}", f"127.0.0.1:{lport}")
    assert cd.sock_state(p.pid, c["fd"]) == {"repair": False, "reuseaddr": 0}
    if quiet:
        assert cd.quiet_sockets([p.pid]) == []
        assert cd.sock_state(p.pid, c["fd"])["repair"] is True
    p.kill()
    p.wait()
    if quiet:
        with pytest.raises(TimeoutError):
            conn.recv(1)
    else:
        try:
            assert conn.recv(1) == b""  # FIN
        except ConnectionResetError:
            pass  # or a RST: either way the peer was told


@pytest.mark.skipif(_repair_allowed() is not None, reason=str(_repair_allowed()))
def test_unlock_turns_repair_off_and_puts_reuseaddr_back(connected) -> None:
    """What CRIU's dump leaves with --leave-stopped (repair on, SO_REUSEADDR forced) undone by
    the driver before the source runs again; the connection carries data afterwards."""
    p, port, conn, lport = connected
    (c,) = cd.tcp_connections([p.pid])
    cd._repair(p.pid, c["fd"], True)
    assert cd.sock_state(p.pid, c["fd"])["repair"] is True
    drv = cd.Driver(None, "src")
    drv.tcp[p.pid] = [{**c, "reuseaddr": 1}]
    drv.locked.add((c["local"], c["peer"]))
    done = drv.unlock(p.pid)
    assert f"repair off {c['local']}-{c['peer']}" in done
    assert cd.sock_state(p.pid, c["fd"]) == {"repair": False, "reuseaddr": 1}
    assert drv.tcp == {} and drv.locked == set()
    conn.sendall(b"x")  # the connection works: the peer's kernel acks it
    with socket.socket(fileno=cd._dup(p.pid, c["fd"])) as theirs:
        theirs.settimeout(2)
        assert theirs.recv(1) == b"x"


# ------------------------------------------------------------------ two guests (slow)

# 64 MiB of private memory (CRIU's pagemap chain; MAP_SHARED would go to shmem images) with
# THP off for it (a huge page is one soft-dirty bit for 512 pages), 250 writes/s, a running
# crc of what it reads and writes (a never-migrated reference predicts it), and a file open for
# writing beside its stdout (CRIU checks both files' sizes on restore: they must travel).
DIRTY = r'''
import json, mmap, os, sys, time, zlib
npages = int(sys.argv[1])
m = mmap.mmap(-1, npages * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_NOHUGEPAGE)
for p in range(npages):
    m[p * 4096] = 1
data = open("data.out", "a")
crc = i = 0
t0 = time.monotonic()
print(json.dumps({"ready": os.getpid()}), flush=True)
while True:
    p = (i * 7919) % npages
    old = m[p * 4096: p * 4096 + 16]
    m[p * 4096 + 8: p * 4096 + 16] = i.to_bytes(8, "little")
    crc = zlib.crc32(old + m[p * 4096: p * 4096 + 16], crc)
    i += 1
    if i % 250 == 0:
        print(f"step {i} crc {crc:08x}", flush=True)
        data.write(f"{i}\n")
        data.flush()
    d = t0 + i / 250 - time.monotonic()
    if d > 0:
        time.sleep(d)
'''


def reference_crc(steps: int, npages: int) -> str:
    """What DIRTY prints at ``steps`` when never migrated."""
    mem: dict[int, bytes] = {}
    crc = 0
    head = b"\1" + b"\0" * 7
    for i in range(steps):
        p = (i * 7919) % npages
        old = head + mem.get(p, b"\0" * 8)
        mem[p] = i.to_bytes(8, "little")
        crc = zlib.crc32(old + head + mem[p], crc)
    return f"{crc:08x}"


def _guest_skip() -> str | None:
    from labkit.fake import vmimage
    why = vmimage.have_qemu()
    if why:
        return f"guest nodes: {why}"
    if shutil.which("criu") is None:
        return "criu not installed (apt-get install criu)"
    if shutil.which("ssh") is None:
        return "OpenSSH client not installed"
    return None


BOOT = 150.0


def _labkit(lab, *args: str, timeout: float = 300.0) -> str:
    r = subprocess.run([sys.executable, "-m", "labkit.cli", *args], env=lab.env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"labkit {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


class Guests:
    """Two powered-on guests with the payloads deployed; ssh to them as the controller does."""

    def __init__(self, lab):
        self.lab = lab

    def ssh_argv(self, node: str, command: str) -> list[str]:
        host, port = self.lab.ssh(node)
        st = self.lab.state_dir
        return ["ssh", "-i", str(st / "id_ed25519"), "-p", str(port), "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={st / 'known_hosts'}",
                "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR", host, command]

    def sh(self, node: str, command: str, timeout: float = 60.0) -> str:
        p = subprocess.run(self.ssh_argv(node, command), capture_output=True, text=True,
                           timeout=timeout)
        assert p.returncode == 0, f"{node}: {command}: {p.returncode}\n{p.stdout}{p.stderr}"
        return p.stdout

    def serve(self, node: str, base: str, role: str) -> Session:
        # LABKIT_RUN as the controller's channel has it: spawn must not pass it on
        return Session(self.ssh_argv(node, f"cd labkit/payloads/current && LABKIT_RUN=t "
                                           f"exec python3 -u criu_driver.py serve --base {base} "
                                           f"--role {role}"))


@pytest.fixture(scope="module")
def guests(tmp_path_factory):
    why = _guest_skip()
    if why:
        pytest.skip(why)
    from labkit.fake.harness import start_fake_lab
    lab = start_fake_lab(tmp_path_factory.mktemp("criu-lab"), count=2, kind="vm",
                         power_delay=(0.05, 0.1))
    try:
        _labkit(lab, "power-on", "--wait", "ssh", timeout=BOOT * 2)
        _labkit(lab, "deploy")
        yield Guests(lab)
    finally:
        lab.stop()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _spawn_dirty(src: Session, work: str, npages: int) -> dict:
    cmd = f"exec python3 -u -c {shlex.quote(DIRTY)} {npages}"
    return src.ok(f"spawn --log {work}/spawn.log --cwd {work} --command-b64 {_b64(cmd)} "
                  f"--wait-line 60")


@pytest.mark.slow
@pytest.mark.vm
def test_serve_chain_between_two_guests(guests) -> None:
    """The controller's sequence: 2 pre-dump rounds + the final dump over the page server,
    pack/unpack with the files open for writing, restore, verify == memhash, resume on dst;
    the process then goes on on dst exactly as a never-migrated one would."""
    run = f"chain{os.getpid()}"
    src = guests.serve("node1", f"/tmp/labkit-criu/{run}-node1", "src")
    dst = guests.serve("node2", f"/tmp/labkit-criu/{run}-node2", "dst")
    pid = None
    try:
        for s in (src, dst):
            assert s.ok("hello")["criu"]
            check = s.ok("check", 120)
            assert check["mem_track"] and check["version"]
        lan = [a for a in dst.ok("hello")["addresses"] if a.startswith("10.77.")][0]
        work = f"/tmp/labkit-criu/{run}.work"
        for s in (src, dst):
            assert s.ok(f"workspace --path {work}")["path"] == work
        spawned = _spawn_dirty(src, work, 16384)
        pid = spawned["pid"]
        assert spawned["first_line"] == {"ready": pid}
        # spawn: own session, no LABKIT_*, in the upper half of pid_max
        pid_max, sid, nlabkit = guests.sh("node1", (
            f"cat /proc/sys/kernel/pid_max; cut -d' ' -f6 /proc/{pid}/stat; "
            f"tr '\\0' '\\n' </proc/{pid}/environ | grep -c ^LABKIT_ || true")).split()
        assert int(sid) == pid and int(nlabkit) == 0
        assert int(pid_max) // 2 <= pid < int(pid_max)
        rounds = []
        for r in (1, 2):
            ps = dst.ok(f"page-server --round {r} --address {lan} --port 0")
            assert ps["port"] > 0 and ps["pid"]
            rounds.append(src.ok(f"predump --pid {pid} --round {r} "
                                 f"--page-server {lan}:{ps['port']}", 300))
        assert rounds[0]["pages_written"] >= 16384
        assert rounds[1]["pages_written"] < rounds[0]["pages_written"] / 2
        ps = dst.ok(f"page-server --round 3 --address {lan}")
        dump = src.ok(f"dump --pid {pid} --round 3 --page-server {lan}:{ps['port']}", 300)
        assert dump["left_stopped"] and dump["tree"] == [pid]
        paths = sorted(f["path"] for f in dump["files"])
        assert paths == [f"{work}/data.out", f"{work}/spawn.log"]
        pack = src.ok("pack --round 3 " + " ".join(f"--file {p}" for p in paths))
        assert not [m for m in pack["members"] if "pages-" in m]  # those went to dst already
        up = dst.ok(f"unpack --round 3 --tar-b64 {pack['tar_b64']}")
        assert sorted(up["files"]) == paths
        # the final image's pages, from its own pagemaps: src hashes them while dst restores
        ranges = dst.ok("ranges --round 3")
        t0 = time.monotonic()
        src.write(f"memhash --ranges-b64 {ranges['ranges_b64']}")
        restored = dst.ok("restore --round 3", 300)
        assert restored["pid"] == pid and restored["stopped"] and restored["pids"] == [pid]
        dst_hash = dst.ok(f"memhash --ranges-b64 {ranges['ranges_b64']}", 300)
        src_hash = src.line(300)
        both = time.monotonic() - t0
        verify = dst.ok(f"verify --round 3 --pid {pid}", 300)  # the images' bytes, page by page
        assert src_hash["ok"], src_hash
        assert verify["pages"] >= 16384 and verify["sha256"] == verify["memory_sha256"]
        assert verify["ranges_b64"] == ranges["ranges_b64"]  # the chain holds what it lists
        image = dst.ok(f"imagehash --round 3 --ranges-b64 {ranges['ranges_b64']}", 300)
        assert (src_hash["sha256"], src_hash["pages"]) == (verify["sha256"], verify["pages"]) \
            == (dst_hash["sha256"], dst_hash["pages"]) == (image["sha256"], image["pages"])
        print(f"\nverify {verify['pages']} pages: {verify['wall_s']} s; memhash on src: "
              f"{src_hash['wall_s']} s; both {both:.3f} s; dump {dump['wall_s']} s; "
              f"restore {restored['wall_s']} s; pre-dump rounds "
              f"{[(r['pages_written'], r['wall_s']) for r in rounds]}")
        dst.ok(f"resume --pid {pid}")
        src.ok(f"kill --pid {pid}")
        # a second restore of the same image: its pid is taken now (by the restored process)
        again = dst.send("restore --round 3", 120)
        assert again["ok"] is False and f"{pid} (python3)" in again["error"]

        def last() -> tuple[int, str]:
            out = guests.sh("node2", f"tail -n 1 {work}/spawn.log").split()
            return (int(out[1]), out[3]) if len(out) == 4 and out[0] == "step" else (0, "")

        before = last()[0]
        wait_for(lambda: last()[0] >= before + 500, 60, "progress on dst", interval=0.5)
        step, crc = last()
        assert crc == reference_crc(step, 16384)
        logs = dst.ok("logs")["logs"]
        assert {"1/page-server.log", "3/restore.log"} <= set(logs)
        for s in (src, dst):
            assert s.ok("cleanup")["bytes"] > 0
            s.ok("quit")
            assert s.close() == 0
        assert guests.sh("node1", f"test -e /proc/{pid} && echo alive || echo gone") == "gone\n"
    finally:
        for s in (src, dst):
            if s.p.poll() is None:
                s.close()
        if pid:
            guests.sh("node2", f"kill -9 {pid} 2>/dev/null; rm -rf /tmp/labkit-criu; true")


@pytest.mark.slow
@pytest.mark.vm
def test_eof_safety_net_and_a_corrupted_page(guests) -> None:
    """A changed page in the restored process fails verify naming its address; then both
    sessions end without quit: the source runs on (unfrozen), dst has nothing left, BASE is
    gone on both."""
    run = f"net{os.getpid()}"
    sbase, dbase = f"/tmp/labkit-criu/{run}-node1", f"/tmp/labkit-criu/{run}-node2"
    src = guests.serve("node1", sbase, "src")
    dst = guests.serve("node2", dbase, "dst")
    pid = None
    try:
        lan = [a for a in dst.ok("hello")["addresses"] if a.startswith("10.77.")][0]
        work = f"/tmp/labkit-criu/{run}.work"
        for s in (src, dst):
            s.ok(f"workspace --path {work}")
        pid = _spawn_dirty(src, work, 1024)["pid"]
        ps = dst.ok(f"page-server --round 1 --address {lan}")
        dump = src.ok(f"dump --pid {pid} --round 1 --page-server {lan}:{ps['port']}", 300)
        pack = src.ok("pack --round 1 " + " ".join(f"--file {f['path']}" for f in dump["files"]))
        dst.ok(f"unpack --round 1 --tar-b64 {pack['tar_b64']}")
        assert dst.ok("restore --round 1", 300)["stopped"]
        ranges = json.loads(base64.b64decode(dst.ok(f"verify --round 1 --pid {pid}")
                                             ["ranges_b64"]))
        vaddr, npages = ranges[str(pid)][-1]
        bad = vaddr + (npages - 1) * PAGE + 123
        guests.sh("node2", f"python3 -c \"f = open('/proc/{pid}/mem', 'r+b', 0); f.seek({bad}); "
                           f"b = f.read(1); f.seek({bad}); f.write(bytes([b[0] ^ 0xFF]))\"")
        res = dst.send(f"verify --round 1 --pid {pid}", 300)
        assert res["ok"] is False, res
        page = bad - bad % PAGE
        assert f"pid {pid} at {page:#x} first, 1 page(s) differ" in res["error"], res
        assert src.close() == 0 and dst.close() == 0  # EOF: no quit
        state = guests.sh("node1", f"cut -d' ' -f3 /proc/{pid}/stat; test -e {sbase} && "
                                   "echo base || echo nobase").split()
        assert state[0] in ("R", "S") and state[1] == "nobase"
        n0 = len(guests.sh("node1", f"cat {work}/data.out").split())
        wait_for(lambda: len(guests.sh("node1", f"cat {work}/data.out").split()) > n0, 30,
                 "the source to go on after the safety net", interval=0.5)
        left = guests.sh("node2", f"test -e /proc/{pid} && echo alive || echo gone; "
                                  f"test -e {dbase} && echo base || echo nobase; "
                                  "pgrep -f '^criu page-server' || true").split()
        assert left == ["gone", "nobase"]
    finally:
        for s in (src, dst):
            if s.p.poll() is None:
                s.close()
        if pid:
            guests.sh("node1", f"kill -9 {pid} 2>/dev/null; rm -rf /tmp/labkit-criu; true")
            guests.sh("node2", f"kill -9 {pid} 2>/dev/null; rm -rf /tmp/labkit-criu; true")
