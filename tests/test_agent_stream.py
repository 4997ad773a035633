"""The framed page stream and the restore agent's refusal of bad streams.

A valid stream is produced by the real source side (``agent.py dump`` of a running workload);
each case mutates it the way a flaky hop, a bug or a dying process would, and the restore agent
(``--live``: the migration path) must exit 1 with a clear error and never resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from labkit.payloads import stream as st

PAYLOADS = Path(st.__file__).parent

pytestmark = pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                                reason="x86_64 Linux only")


def split_frames(data: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i < len(data):
        ftype, length, _seq, _crc = st.parse_header(data[i:i + st.HEADER_SIZE])
        out.append((ftype, data[i + st.HEADER_SIZE:i + st.HEADER_SIZE + length]))
        i += st.HEADER_SIZE + length
    return out


def join_frames(frames: list[tuple[int, bytes]]) -> bytes:
    """Re-frame with consistent sequence numbers and CRCs (to forge 'valid-looking' frames)."""
    return b"".join(st.pack_header(t, len(p), i, zlib.crc32(p)) + p
                    for i, (t, p) in enumerate(frames))


@pytest.fixture(scope="module")
def stream():
    wl = subprocess.Popen([sys.executable, str(PAYLOADS / "workload.py"), "run", "--size", "1M",
                           "--seed", "3"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    ready = json.loads(wl.stdout.readline())
    try:
        wl.stdin.write(b"step 5\n")
        wl.stdin.flush()
        wl.stdout.readline()
        r = subprocess.run([sys.executable, str(PAYLOADS / "agent.py"), "dump", "--pid",
                            str(ready["pid"]), "--chunk-pages", "64"],
                           capture_output=True, check=True)
        env = {**os.environ, "LABKIT_AGENT_CORRUPT": "truncate:final"}
        cut = subprocess.run([sys.executable, str(PAYLOADS / "agent.py"), "dump", "--pid",
                              str(ready["pid"]), "--chunk-pages", "64"], capture_output=True,
                             env=env)
        hooked = subprocess.run([sys.executable, str(PAYLOADS / "agent.py"), "dump", "--pid",
                                 str(ready["pid"]), "--chunk-pages", "64"], capture_output=True,
                                env={**os.environ, "LABKIT_AGENT_CORRUPT": "round:0"})
    finally:
        wl.stdin.close()
        wl.wait(5)
    return {"good": r.stdout, "hook-truncate": cut.stdout, "hook-corrupt": hooked.stdout}


def restore(data: bytes) -> tuple[int, list[dict]]:
    r = subprocess.run([sys.executable, str(PAYLOADS / "agent.py"), "restore", "--live"],
                       input=data, capture_output=True, timeout=30)
    return r.returncode, [json.loads(x) for x in r.stdout.splitlines() if x.strip()]


def test_good_stream_restores_and_verifies(stream):
    frames = split_frames(stream["good"])
    kinds = [t for t, _ in frames]
    assert kinds[0] == st.HELLO and kinds[-3:] == [st.ROUND_END, st.VERIFY, st.BYE]
    assert kinds.count(st.PAGES) == 4  # 256 pages in chunks of 64
    code, events = restore(stream["good"])
    assert code == 0, events
    names = [e.get("event") for e in events]
    assert "resumed" in names
    v = next(e for e in events if e.get("event") == "verified")
    assert v["match"] and v["source_sha256"] == v["restored_sha256"]


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x40
    return bytes(b)


def _mutations(good: bytes) -> dict[str, tuple[bytes, str]]:
    frames = split_frames(good)
    first_pages = next(i for i, (t, _) in enumerate(frames) if t == st.PAGES)
    off = sum(st.HEADER_SIZE + len(p) for _, p in frames[:first_pages])  # start of PAGES #1
    end_idx = next(i for i, (t, _) in enumerate(frames) if t == st.ROUND_END)
    end_off = sum(st.HEADER_SIZE + len(p) for _, p in frames[:end_idx])

    def forged(fn) -> bytes:
        fr = [list(f) for f in frames]
        fn(fr)
        return join_frames([tuple(f) for f in fr])

    def bad_trailer(fr):
        obj = json.loads(fr[end_idx][1])
        obj["pages"] += 1
        fr[end_idx][1] = json.dumps(obj).encode()

    def bad_data_good_crc(fr):
        p = bytearray(fr[first_pages][1])
        p[-100] ^= 1
        fr[first_pages][1] = bytes(p)

    def outside(fr):
        p = bytearray(fr[first_pages][1])
        p[8:16] = (0x7000_0000_0000).to_bytes(8, "little")  # first run's start address
        fr[first_pages][1] = bytes(p)

    def source_error(fr):
        fr.insert(end_idx, [st.ERROR, json.dumps({"error": "disk on fire"}).encode()])

    return {
        "flipped page byte": (_flip(good, off + st.HEADER_SIZE + 5000), "CRC mismatch"),
        "flipped run table byte": (_flip(good, off + st.HEADER_SIZE + 9), "CRC mismatch"),
        "bad magic": (_flip(good, off), "bad frame magic"),
        "bad version": (_flip(good, off + 2), "version"),
        "huge length": (good[:off + 4] + b"\xff\xff\xff\x7f" + good[off + 8:], "exceeds"),
        "truncated mid-frame": (good[:off + 3000], "truncated"),
        "truncated mid-header": (good[:off + 7], "truncated"),
        "truncated before trailer": (good[:end_off], "truncated"),
        "truncated before BYE": (good[:len(good) - st.HEADER_SIZE - len(frames[-1][1])],
                                 "truncated"),
        "frame dropped": (good[:off] + good[off + st.HEADER_SIZE + len(frames[first_pages][1]):],
                          "sequence"),
        "frame duplicated": (good[:off + st.HEADER_SIZE + len(frames[first_pages][1])]
                             + good[off:], "sequence"),
        "trailer page count forged": (forged(bad_trailer), "round 0 refused"),
        "data changed, CRC recomputed": (forged(bad_data_good_crc), "SHA-256"),
        "run outside the region": (forged(outside), "outside the region"),
        "source reported an error": (forged(source_error), "disk on fire"),
        "empty stream": (b"", "truncated"),
    }


CASES = [
    "flipped page byte", "flipped run table byte", "bad magic", "bad version", "huge length",
    "truncated mid-frame", "truncated mid-header", "truncated before trailer",
    "truncated before BYE", "frame dropped", "frame duplicated", "trailer page count forged",
    "data changed, CRC recomputed", "run outside the region", "source reported an error",
    "empty stream"]


@pytest.mark.parametrize("case", CASES)
def test_bad_stream_is_refused(stream, case):
    data, needle = _mutations(stream["good"])[case]
    code, events = restore(data)
    assert code == 1, (case, events)
    assert events and events[-1]["event"] == "error", events
    assert needle in events[-1]["error"], events[-1]
    # refused: the agent never goes on as the workload ("serving"); and unless the damage is
    # after the validated final round, it never even resumed
    names = {e.get("event") for e in events}
    assert "serving" not in names
    if case != "truncated before BYE":
        assert not names & {"resumed", "verified"}, names


@pytest.mark.parametrize("hook, needle", [("hook-truncate", "truncated"),
                                          ("hook-corrupt", "CRC mismatch")])
def test_agent_test_hooks(stream, hook, needle):
    code, events = restore(stream[hook])
    assert code == 1 and needle in events[-1]["error"]


def test_frame_scanner_sees_control_frames_in_any_split(stream):
    good = stream["good"]
    for step in (1, 7, 4096, 1 << 20):
        sc = st.FrameScanner()
        seen = []
        for i in range(0, len(good), step):
            seen += [t for t, _ in sc.feed(good[i:i + step])]
        assert seen == [st.HELLO, st.ROUND_END, st.VERIFY, st.BYE]
        assert sc.at_boundary and sc.page_bytes > 1 << 20


def test_runs_helpers():
    pages = [0x1000, 0x2000, 0x3000, 0x5000, 0x9000, 0xA000]
    runs = st.pages_to_runs(pages, 4096)
    assert runs == [(0x1000, 3), (0x5000, 1), (0x9000, 2)]
    chunks = list(st.split_runs(runs, max_pages=2, max_runs=1024, page=4096))
    assert chunks == [[(0x1000, 2)], [(0x3000, 1), (0x5000, 1)], [(0x9000, 2)]]
    assert list(st.split_runs([(0, 10)], 100, 1, 4096)) == [[(0, 10)]]
