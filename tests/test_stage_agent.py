"""Deploy's node side run here, against a temp workdir, the way a node runs it: the stage agent
(labkit/nodeside/stage.py, shipped as ``python3 -I -S -c``) and the read-only probe
(labkit/nodeside/probe.sh, shipped as the command's own shell text). No SSH in between: what
the controller sends is written to the agent's stdin by the test."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from labkit import nodeside
from labkit.deploy import parse_sh_probe

ACK_EVERY = 4096


def sh(command: str, home: Path, stdin: bytes = b"", timeout: float = 30) -> tuple[int, bytes]:
    r = subprocess.run(["/bin/sh", "-c", command], input=stdin, capture_output=True,
                       cwd=home, env={"PATH": os.environ["PATH"], "HOME": str(home)},
                       timeout=timeout)
    assert not r.stderr or r.returncode != 0, r.stderr
    return r.returncode, r.stdout


def agent(home: Path, op: str, *args: str, stdin: bytes = b"") -> tuple[int, dict[str, Any],
                                                                         list[int]]:
    """(exit code, JSON answer, acked byte counts) of one stage-agent operation on ``home``'s
    workdir ``~/labkit``, shipped exactly as deploy ships it."""
    code, out = sh(nodeside.command("stage", op, "~/labkit", *args), home, stdin)
    lines = out.split(b"\n")
    acks = [int(ln.split()[1]) for ln in lines if ln.startswith(b"@ack ")]
    rest = b"\n".join(ln for ln in lines if not ln.startswith(b"@ack "))
    return code, json.loads(rest), acks


def probe(home: Path) -> dict[str, Any]:
    code, out = sh(nodeside.shell("probe", "~/labkit"), home)
    assert code == 0
    return parse_sh_probe(out.decode())


def entry(data: bytes, mode: str = "644") -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "mode": mode}


def stage_input(release: str, files: dict[str, bytes], link: dict[str, list[str]] | None = None,
                build: str | None = None, every: dict[str, bytes] | None = None,
                lock_wait: float = 5.0) -> bytes:
    """What the Deployer streams: the plan line, then the bytes of every file it sends."""
    every = every if every is not None else files
    plan = {"release": release, "lock_wait": lock_wait, "fsync": True, "ack_every": ACK_EVERY,
            "build": build, "build_timeout": 30, "link": link or {},
            "send": [{"path": p, "size": len(d), "mode": "644"} for p, d in files.items()],
            "manifest": {"format": 1, "release": release, "deployed_by": "test@here",
                         "files": {p: entry(d) for p, d in every.items()}}}
    return json.dumps(plan).encode() + b"\n" + b"".join(files.values())


def payloads(home: Path) -> Path:
    return home / "labkit" / "payloads"


def current(home: Path, name: str = "current") -> str | None:
    link = payloads(home) / name
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


V1 = {"tool.py": b"print('v1')\n", "lib/helper.py": b"X = 1\n", "blob.bin": os.urandom(20000)}


def test_stage_probe_restage_rollback(tmp_path: Path) -> None:
    code, res, acks = agent(tmp_path, "stage", "5", stdin=stage_input("R1", V1))
    assert code == 0, res
    assert res["release"] == "R1" and res["previous"] is None and res["cleaned"] == []
    total = sum(len(d) for d in V1.values())
    assert acks and acks == sorted(acks) and acks[-1] <= total and acks[0] >= ACK_EVERY
    assert current(tmp_path) == "R1"
    rel = payloads(tmp_path) / "releases" / "R1"
    assert (rel / "tool.py").read_bytes() == V1["tool.py"]
    assert json.loads((rel / "MANIFEST").read_text())["release"] == "R1"
    assert (rel / ".labkit-stat").is_file()

    seen = probe(tmp_path)
    assert seen["current"]["id"] == "R1" and seen["current"]["suspect"] == []
    assert set(seen["current"]["files"]) == set(V1) and seen["leftovers"] == []
    code, hashed, _ = agent(tmp_path, "probe", "0", "hash")
    assert code == 0 and hashed["current"]["modified"] == [] and hashed["releases"] == ["R1"]

    # the next release sends one file and copies the others from R1
    v2 = {**V1, "tool.py": b"print('v2')\n"}
    link = {p: ["R1", p] for p in V1 if p != "tool.py"}
    code, res, _ = agent(tmp_path, "stage", "5",
                         stdin=stage_input("R2", {"tool.py": v2["tool.py"]}, link, every=v2))
    assert code == 0, res
    assert (res["release"], res["previous"]) == ("R2", "R1")
    r1, r2 = payloads(tmp_path) / "releases" / "R1", payloads(tmp_path) / "releases" / "R2"
    assert os.stat(r2 / "blob.bin").st_ino != os.stat(r1 / "blob.bin").st_ino  # a copy
    assert (r2 / "blob.bin").read_bytes() == V1["blob.bin"]
    assert (payloads(tmp_path) / "current" / "tool.py").read_bytes() == v2["tool.py"]

    code, res, _ = agent(tmp_path, "rollback", "5")
    assert code == 0 and res == {"release": "R1", "previous": "R2"}
    assert (current(tmp_path), current(tmp_path, "previous")) == ("R1", "R2")
    code, res, _ = agent(tmp_path, "rollback", "5")  # and forward again
    assert code == 0 and current(tmp_path) == "R2"


def test_a_file_edited_on_the_node_is_suspect_and_never_linked(tmp_path: Path) -> None:
    assert agent(tmp_path, "stage", "5", stdin=stage_input("R1", V1))[0] == 0
    edited = payloads(tmp_path) / "releases" / "R1" / "lib" / "helper.py"
    stat_marker = payloads(tmp_path) / "releases" / "R1" / ".labkit-stat"
    edited.write_bytes(b"X = 2  # hotfix\n")
    later = stat_marker.stat().st_mtime + 5
    os.utime(edited, (later, later))  # find -newer compares mtimes; no sleeping for the clock
    seen = probe(tmp_path)
    assert seen["current"]["suspect"] == ["lib/helper.py"]
    code, hashed, _ = agent(tmp_path, "probe", "0", "hash")
    assert hashed["current"]["modified"] == ["lib/helper.py"]
    (payloads(tmp_path) / "releases" / "R1" / "blob.bin").unlink()
    assert probe(tmp_path)["current"]["suspect"] == ["blob.bin", "lib/helper.py"]


def test_a_kept_file_that_no_longer_matches_its_hash_is_refused(tmp_path: Path) -> None:
    """A file to be kept from a release already on the node is copied and hashed; one edited
    since (whatever its size and mtime say) is named in ``resend`` and nothing is switched."""
    assert agent(tmp_path, "stage", "5", stdin=stage_input("R1", V1))[0] == 0
    helper = payloads(tmp_path) / "releases" / "R1" / "lib" / "helper.py"
    with open(helper, "r+b") as f:
        f.write(b"X = 2\n")
    v2 = {**V1, "tool.py": b"print('v2')\n"}
    link = {p: ["R1", p] for p in V1 if p != "tool.py"}
    code, res, _ = agent(tmp_path, "stage", "5",
                         stdin=stage_input("R2", {"tool.py": v2["tool.py"]}, link, every=v2))
    assert code == 3 and res["resend"] == ["lib/helper.py"], res
    assert "nothing switched" in res["error"]
    assert current(tmp_path) == "R1"
    assert sorted(os.listdir(payloads(tmp_path) / "releases")) == ["R1"]


def test_failures_switch_nothing_and_leave_nothing(tmp_path: Path) -> None:
    assert agent(tmp_path, "stage", "5", stdin=stage_input("R1", V1))[0] == 0
    rels = payloads(tmp_path) / "releases"

    def unchanged() -> None:
        assert current(tmp_path) == "R1"
        assert sorted(os.listdir(rels)) == ["R1"]  # no .incoming-*, no second release

    full = stage_input("R2", {"a.py": b"A = 1\n" * 100})
    code, res, _ = agent(tmp_path, "stage", "5", stdin=full[:-10])
    assert code == 3 and "transfer ended early in a.py (10 bytes missing)" in res["error"]
    unchanged()
    code, res, _ = agent(tmp_path, "stage", "5", stdin=full + b"extra")
    assert code == 3 and "more data than planned" in res["error"]
    unchanged()
    code, res, _ = agent(tmp_path, "stage", "5",
                         stdin=stage_input("R2", {"bad.py": b"def broken(:\n"},
                                           build="python-check"))
    assert code == 3 and res["build_failed"] and res["error"].startswith("python check: bad.py")
    unchanged()
    code, res, _ = agent(tmp_path, "stage", "5",
                         stdin=stage_input("R2", {"x": b"1"}, build="echo boom >&2; exit 4"))
    assert code == 3 and "exited 4: boom" in res["error"]
    unchanged()
    code, res, _ = agent(tmp_path, "stage", "5", stdin=b"")
    assert code == 3 and res["error"] == "no plan received"
    code, res, _ = agent(tmp_path, "nosuch", "5")
    assert code == 3 and "unknown op" in res["error"]


def test_a_silent_controller_does_not_hold_the_lock(tmp_path: Path) -> None:
    """Plan sent, then nothing (a hung controller, a session the server failed to tear down):
    the agent gives up after the stall timeout and removes its half release."""
    data = stage_input("R1", V1)
    p = subprocess.Popen(["/bin/sh", "-c", nodeside.command("stage", "stage", "~/labkit", "0.5")],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tmp_path,
                         env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    try:
        p.stdin.write(data[:len(data) // 2])
        p.stdin.flush()
        t0 = time.monotonic()
        p.wait(timeout=30)  # stdin stays open: only the stall timeout ends it
        assert time.monotonic() - t0 >= 0.4
        out = p.stdout.read()
    finally:
        p.kill()
        p.wait()
        p.stdin.close()
        p.stdout.close()
    assert p.returncode == 3
    answer = json.loads(out.split(b"\n")[-1])
    assert answer["error"].startswith("no data from the controller for 0.5s")
    assert current(tmp_path) is None
    assert not [n for n in os.listdir(payloads(tmp_path) / "releases") if n.startswith(".")]


def test_the_lock_refuses_a_second_deploy_and_names_the_holder(tmp_path: Path) -> None:
    assert agent(tmp_path, "stage", "5", stdin=stage_input("R1", V1))[0] == 0
    assert agent(tmp_path, "stage", "5", stdin=stage_input("R2", {"n": b"2"}))[0] == 0
    lock = payloads(tmp_path) / ".lock"
    with open(lock, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.truncate(0)
        f.write("pid 1 on behalf of someone@else since now")
        f.flush()
        t0 = time.monotonic()
        code, res, _ = agent(tmp_path, "rollback", "0.3")
        assert time.monotonic() - t0 >= 0.3
        assert code == 3 and "holds" in res["error"] and "someone@else" in res["error"]
        code, res, _ = agent(tmp_path, "stage", "5",
                             stdin=stage_input("R3", {"n": b"3"}, lock_wait=0.2))
        assert code == 3 and "someone@else" in res["error"]
        assert current(tmp_path) == "R2"
    code, res, _ = agent(tmp_path, "rollback", "5")  # released: it goes through
    assert code == 0 and current(tmp_path) == "R1"
    assert "on behalf of" in lock.read_text()


def test_leftovers_are_reported_read_only_and_cleaned_under_the_lock(tmp_path: Path) -> None:
    assert agent(tmp_path, "stage", "5", stdin=stage_input("R1", V1))[0] == 0
    half = payloads(tmp_path) / "releases" / ".incoming-R0"
    half.mkdir()
    (half / "tool.py").write_bytes(b"print('half")
    (payloads(tmp_path) / ".current.tmp-999").symlink_to("releases/.incoming-R0")
    assert probe(tmp_path)["leftovers"] == [".incoming-R0", ".current.tmp-999"]
    assert half.exists()  # the probe changes nothing
    code, res, _ = agent(tmp_path, "clean", "5")
    assert code == 0 and res["cleaned"] == [".incoming-R0", ".current.tmp-999"]
    assert not half.exists() and probe(tmp_path)["leftovers"] == []
    assert current(tmp_path) == "R1"


def test_nothing_deployed(tmp_path: Path) -> None:
    assert probe(tmp_path) == {"leftovers": [], "cleaned": [], "current": None,
                               "previous": None}
    code, res, _ = agent(tmp_path, "probe", "0", "hash")
    assert code == 0 and res["current"] is None and res["releases"] == []
    code, res, _ = agent(tmp_path, "rollback", "5")
    assert code == 3 and res["error"] == "nothing deployed"
    code, res, _ = agent(tmp_path, "clean", "5")
    assert code == 0 and res == {"cleaned": []}


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/dash", "/bin/bash"])
def test_probe_is_posix_sh(shell: str) -> None:
    if not os.path.exists(shell):
        pytest.skip(f"{shell} not installed")
    text = nodeside.script("probe")
    r = subprocess.run([shell, "-n"], input=text.encode(), capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr


def edit_in_place(path: Path, data: bytes) -> None:
    """An edit that keeps size and mtime (``cp -p``, an editor that restores it): only the
    ctime, which nobody can set back, tells."""
    st = path.stat()
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_rollback_refuses_a_previous_release_edited_since_it_was_built(tmp_path: Path) -> None:
    """Rollback only swaps symlinks; it restored "byte for byte" only if nobody had edited
    the previous release. Now it checks previous by stat (hashing what the stat cannot vouch
    for) and refuses, naming the files, instead of switching to edited code."""
    assert agent(tmp_path, "stage", "5", stdin=stage_input("R1", V1))[0] == 0
    v2 = {**V1, "tool.py": b"print('v2')\n"}
    link = {p: ["R1", p] for p in V1 if p != "tool.py"}
    assert agent(tmp_path, "stage", "5",
                 stdin=stage_input("R2", {"tool.py": v2["tool.py"]}, link, every=v2))[0] == 0
    r1 = payloads(tmp_path) / "releases" / "R1"
    # touched, same bytes: not an edit (read and hashed, then trusted)
    os.utime(r1 / "blob.bin", (1, 1))
    edit_in_place(r1 / "lib" / "helper.py", b"X = 9\n")
    code, res, _ = agent(tmp_path, "rollback", "5")
    assert code == 3, res
    assert res["modified"] == ["lib/helper.py"] and res["release"] == "R2"
    assert res["error"] == ("previous release R1 has 1 file modified on the node since it was "
                            "built (lib/helper.py); not rolled back: deploy instead")
    assert (current(tmp_path), current(tmp_path, "previous")) == ("R2", "R1")
    (r1 / "lib" / "helper.py").write_bytes(V1["lib/helper.py"])  # put right: rolls back
    code, res, _ = agent(tmp_path, "rollback", "5")
    assert code == 0 and res == {"release": "R1", "previous": "R2"}
    (r1 / "blob.bin").unlink()  # and forward again is checked the same way: R2 is intact
    code, res, _ = agent(tmp_path, "rollback", "5")
    assert code == 0 and current(tmp_path) == "R2"
    code, res, _ = agent(tmp_path, "rollback", "5")
    assert code == 3 and res["modified"] == ["blob.bin"] and "1 file modified" in res["error"]


def test_a_marker_moved_forward_vouches_for_nothing(tmp_path: Path) -> None:
    """Kept files are trusted by stat (size, mtime, ctime not after the release's marker), not
    re-hashed. A marker whose mtime was pushed past an edit (``touch -d``) must not make the
    edit look older than the build: such a marker is after its own ctime, and every file of
    that release is hashed instead."""
    assert agent(tmp_path, "stage", "5", stdin=stage_input("R1", V1))[0] == 0
    r1 = payloads(tmp_path) / "releases" / "R1"
    edit_in_place(r1 / "lib" / "helper.py", b"X = 2\n")
    later = time.time() + 3600
    os.utime(r1 / ".labkit-stat", (later, later))
    assert probe(tmp_path)["current"]["suspect"] == []  # the probe cannot see it ...
    v2 = {**V1, "tool.py": b"print('v2')\n"}
    link = {p: ["R1", p] for p in V1 if p != "tool.py"}
    code, res, _ = agent(tmp_path, "stage", "5",
                         stdin=stage_input("R2", {"tool.py": v2["tool.py"]}, link, every=v2))
    assert code == 3 and res["resend"] == ["lib/helper.py"], res  # ... the stage agent does
    assert res["error"].startswith("1 kept file changed on the node")
    assert current(tmp_path) == "R1"


def test_kept_files_are_copied_exactly_whatever_the_copy_path(tmp_path: Path) -> None:
    """Kept files go through FICLONE, copy_file_range(2) or a read/write loop, whichever the
    filesystem takes: each new release holds the bytes of the old one, in inodes of its own,
    and files larger than one copy call or one read are whole."""
    big = os.urandom(3 << 20) + b"tail"
    v1 = {**V1, "big.bin": big, "empty": b""}
    assert agent(tmp_path, "stage", "5", stdin=stage_input("R1", v1))[0] == 0
    v2 = {**v1, "tool.py": b"print('v2')\n"}
    link = {p: ["R1", p] for p in v1 if p != "tool.py"}
    code, res, _ = agent(tmp_path, "stage", "5",
                         stdin=stage_input("R2", {"tool.py": v2["tool.py"]}, link, every=v2))
    assert code == 0, res
    r1, r2 = payloads(tmp_path) / "releases" / "R1", payloads(tmp_path) / "releases" / "R2"
    for p, data in v2.items():
        assert (r2 / p).read_bytes() == data, p
        if p != "tool.py":
            assert os.stat(r2 / p).st_ino != os.stat(r1 / p).st_ino
    code, hashed, _ = agent(tmp_path, "probe", "0", "hash")
    assert code == 0 and hashed["current"]["modified"] == [] and hashed["current"]["missing"] == []


def test_a_full_node_is_reported_as_such_not_as_a_changed_file(tmp_path: Path) -> None:
    """A copy of a kept file that fails because the node cannot write (a full disk, a file
    size limit) was reported as "kept file changed" and sent again, to fail the same way; now
    it is the error it is."""
    big = {**V1, "big.bin": os.urandom(4 << 20)}
    assert agent(tmp_path, "stage", "5", stdin=stage_input("R1", big))[0] == 0
    v2 = {**big, "tool.py": b"print('v2')\n"}
    link = {p: ["R1", p] for p in big if p != "tool.py"}
    # ulimit -f counts 512- or 1024-byte blocks depending on the shell: 1-2 MiB either way
    code, out = sh("ulimit -f 2048; " + nodeside.command("stage", "stage", "~/labkit", "5"),
                   tmp_path, stage_input("R2", {"tool.py": v2["tool.py"]}, link, every=v2))
    res = json.loads(out.split(b"\n")[-1])
    assert code == 3 and "resend" not in res, res
    assert "File too large" in res["error"]
    assert current(tmp_path) == "R1"
    assert sorted(os.listdir(payloads(tmp_path) / "releases")) == ["R1"]


@pytest.fixture
def coarse_fs(tmp_path: Path):
    """A home on a filesystem whose timestamps have whole-second ticks (ext2 with 128-byte
    inodes): what an old node's disk can be, and the same race a jiffy tick makes, made wide
    enough to hit every time."""
    import shutil

    if os.geteuid() != 0 or not shutil.which("mke2fs") or not shutil.which("mount"):
        pytest.skip("needs root, mke2fs and mount for a loop-mounted ext2")
    img, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    r = subprocess.run(["mke2fs", "-q", "-F", "-t", "ext2", "-I", "128", str(img)],
                       capture_output=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"mke2fs failed: {r.stderr.decode().strip()}")
    r = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True,
                       timeout=60)
    if r.returncode != 0:
        pytest.skip(f"cannot loop-mount here: {r.stderr.decode().strip()}")
    try:
        probe_file = mnt / "tick"
        probe_file.write_bytes(b"")
        if probe_file.stat().st_mtime_ns % 1_000_000_000:
            pytest.skip("this ext2 keeps sub-second timestamps")
        probe_file.unlink()
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60)


def test_an_edit_in_the_markers_own_tick_is_seen(coarse_fs: Path) -> None:
    """``find -cnewer`` and the stage agent's stat check are strict, and timestamps come in
    ticks: an edit right after a deploy, in the tick its marker was written in, looked as old
    as the build and was copied into the next release. The agent now publishes a release only
    once the file clock has passed its marker."""
    home = coarse_fs
    assert agent(home, "stage", "5", stdin=stage_input("R1", V1))[0] == 0
    helper = payloads(home) / "current" / "lib" / "helper.py"
    edit_in_place(helper, b"X = 2\n")  # at once, as a hotfix script would
    marker = payloads(home) / "current" / ".labkit-stat"
    assert helper.stat().st_ctime_ns > marker.stat().st_mtime_ns
    assert probe(home)["current"]["suspect"] == ["lib/helper.py"]
    v2 = {**V1, "tool.py": b"print('v2')\n"}
    link = {p: ["R1", p] for p in V1 if p != "tool.py"}  # a plan that keeps it anyway
    code, res, _ = agent(home, "stage", "5",
                         stdin=stage_input("R2", {"tool.py": v2["tool.py"]}, link, every=v2))
    assert code == 3 and res["resend"] == ["lib/helper.py"], res
