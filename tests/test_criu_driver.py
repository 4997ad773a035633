"""labkit/payloads/criu_driver.py: its parsing here (anywhere), and the whole iterative pre-copy
chain for real between two QEMU guests (Debian 6.1 kernel, CRIU 3.17.1), where QEMU, a kernel
with modules and CRIU are installed. Recipe and numbers: docs/criu-recipe.md."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from labkit.payloads import criu_driver as cd

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "labkit/payloads/criu_driver.py"


# ------------------------------------------------------------------ parsing (runs anywhere)

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
    # criu's console output (no timestamps, sometimes "pid: " in front)
    assert cd.criu_reason("1234: Error (criu/cr-dump.c:10): Dumping FAILED.") == \
        "Dumping FAILED. (criu/cr-dump.c:10)"


def test_parse_check() -> None:
    # what a Debian 6.1 guest prints: probes of optional features fail, the verdict is good
    out = ("Error (criu/util.c:642): exited, status=1\n"
           "Error (criu/tun.c:85): tun: Unable to create tun: No such file or directory\n"
           "Looks good.\n")
    assert cd.parse_check(0, out) == (True, "Looks good.")
    # lo down: the feature probes cannot open a socket
    bad = "Error (criu/net.c:3179): Unable to create socket: Network is unreachable\n"
    assert cd.parse_check(1, bad) == (False, "Unable to create socket: Network is "
                                             "unreachable (criu/net.c:3179)")
    assert cd.parse_check(1, "") == (False, "criu check exited 1")


def test_cli_prints_one_json_line_and_fails_with_a_reason(tmp_path: Path) -> None:
    """No criu on PATH (or a restore from a folder with no images): exit 1, one JSON line with
    the reason, never a traceback."""
    env = {"PATH": "/nonexistent", "CRIU": str(tmp_path / "no-criu")}
    p = subprocess.run([sys.executable, "-I", "-S", str(DRIVER), "check"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1, p.stderr
    res = json.loads(p.stdout)
    assert res["ok"] is False and "not installed" in res["reason"]
    p = subprocess.run([sys.executable, "-I", "-S", str(DRIVER), "restore", "--base",
                        str(tmp_path), "--round", "3"], capture_output=True, text=True,
                       timeout=30)
    res = json.loads(p.stdout)
    assert p.returncode == 1 and res["ok"] is False and "no images" in res["reason"]
    p = subprocess.run([sys.executable, "-I", "-S", str(DRIVER), "predump", "--pid", "1"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2  # usage


def test_pids_in_use_names_the_taker() -> None:
    import os
    taken = cd.pids_in_use([{"pid": os.getpid(), "threads": [os.getpid()]}])
    assert len(taken) == 1 and taken[0].startswith(f"{os.getpid()} (")


# ------------------------------------------------------------------ two guests (slow)

DIRTY = r'''
import mmap, os, sys, time, zlib
npages = 16384
m = mmap.mmap(-1, npages * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_NOHUGEPAGE)  # a THP dirties 512 pages per written byte
for p in range(npages):
    m[p * 4096] = 1
crc = i = 0
t0 = time.monotonic()
print("ready", os.getpid(), flush=True)
while True:
    p = (i * 7919) % npages
    old = m[p * 4096: p * 4096 + 16]
    m[p * 4096 + 8: p * 4096 + 16] = i.to_bytes(8, "little")
    crc = zlib.crc32(old + m[p * 4096: p * 4096 + 16], crc)
    i += 1
    if i % 500 == 0:
        print(f"step {i} crc {crc:08x}", flush=True)
    d = t0 + i / 250 - time.monotonic()
    if d > 0:
        time.sleep(d)
'''


def reference_crc(steps: int, npages: int = 16384) -> str:
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
        return why
    if shutil.which("criu") is None:
        return "criu not installed (apt-get install criu)"
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "OpenSSH client not installed"
    return None


@pytest.fixture(scope="module")
def guests(tmp_path_factory):
    why = _guest_skip()
    if why:
        pytest.skip(why)
    from labkit.fake.vm import VmNode, VmSpec
    base = tmp_path_factory.mktemp("criu-guests")
    key = base / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (base / "authorized_keys").write_bytes((base / "key.pub").read_bytes())
    import socket
    ports = []
    for _ in range(3):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
        s.close()
    nodes, consoles = [], []
    try:
        for i in (1, 2):
            root = base / f"n{i}"
            root.mkdir()
            out = bytearray()
            n = VmNode(f"criu-t{i}", root, "127.0.0.1", ports[i - 1], root / "hostkey",
                       base / "authorized_keys", logging.getLogger(f"criu-t{i}"), index=i,
                       spec=VmSpec(lan_port=ports[2]), cache=base / "cache")
            n.console = out.extend
            (root / "disk" / "w").mkdir(parents=True)
            shutil.copy(DRIVER, root / "disk" / "w" / "criu_driver.py")
            (root / "disk" / "w" / "dirty.py").write_text(DIRTY)
            n.start()
            nodes.append(n)
            consoles.append(out)
        end = time.monotonic() + 300
        for out in consoles:
            while b"labkit-boot:" not in out:
                if time.monotonic() > end:
                    pytest.fail("guest did not boot in 300 s")
                time.sleep(0.2)

        def run(i: int, cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
            return subprocess.run(
                ["ssh", "-i", str(key), "-p", str(ports[i - 1]), "-o", "BatchMode=yes",
                 "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                 "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=30", "root@127.0.0.1", cmd],
                capture_output=True, text=True, timeout=timeout)

        for i in (1, 2):  # sshd is up a moment after the boot line
            if not _wait(lambda i=i: run(i, "true", 60).returncode == 0, 120):
                pytest.fail(f"no ssh into guest {i}")
        yield run
    finally:
        for n in nodes:
            n.stop()


def _wait(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.5)
    return False


def _drv(run, i: int, args: str) -> dict:
    p = run(i, f"python3 -I -S /lab/w/criu_driver.py {args}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["ok"], res
    return res


@pytest.mark.slow
def test_iterative_migration_between_two_guests(guests) -> None:
    run = guests
    for i in (1, 2):
        check = _drv(run, i, "check")
        assert check["mem_track"] and check["version"]
    start = run(1, "mkdir -p /tmp/w && cd /tmp/w && (setsid python3 /lab/w/dirty.py "
                   "</dev/null >/tmp/w/out 2>&1 &) && sleep 3 && head -1 /tmp/w/out")
    pid = int(start.stdout.split()[1])
    base, port = "/tmp/mig", 2700
    rounds = []
    for r in (1, 2, 3):
        _drv(run, 2, f"page-server --base {base} --round {r} --port {port} "
                     f"--address 10.77.0.2")
        rounds.append(_drv(run, 1, f"predump --pid {pid} --base {base} --round {r} "
                                   f"--page-server 10.77.0.2:{port}"))
    # round 1 sends everything, the next ones only what was dirtied meanwhile
    assert rounds[0]["pages_written"] >= 16384
    assert rounds[1]["pages_written"] < rounds[0]["pages_written"] / 2
    assert rounds[1]["pages_skipped_parent"] > 8000
    _drv(run, 2, f"page-server --base {base} --round 4 --port {port} --address 10.77.0.2")
    dump = _drv(run, 1, f"dump --pid {pid} --base {base} --round 4 "
                        f"--page-server 10.77.0.2:{port}")
    assert dump["left_stopped"]
    # the final images (no pages: those went to the page server) and the output file
    tar = run(1, f"cp /tmp/w/out {base}/4/out.file && tar -C {base}/4 -cf - . | base64 -w0")
    assert tar.returncode == 0
    put = run(2, f"mkdir -p /tmp/w && echo {tar.stdout.strip()} | base64 -d | "
                 f"tar -C {base}/4 -mxf - && mv {base}/4/out.file /tmp/w/out")
    assert put.returncode == 0, put.stderr
    restored = _drv(run, 2, f"restore --base {base} --round 4 --leave-stopped")
    assert restored["pid"] == pid and restored["stopped"]
    _drv(run, 2, f"resume --pid {pid}")
    _drv(run, 1, f"kill --pid {pid}")
    assert run(1, f"test -e /proc/{pid}").returncode != 0

    def line():
        out = run(2, "tail -n 1 /tmp/w/out").stdout.split()
        return (int(out[1]), out[3]) if len(out) == 4 and out[0] == "step" else (0, "")

    before = line()[0]
    assert _wait(lambda: line()[0] >= before + 1000, 60), "no progress on dst"
    step, crc = line()
    assert crc == reference_crc(step)
