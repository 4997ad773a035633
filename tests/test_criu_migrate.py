"""``migrate-test --backend criu`` end to end, through the program as a user types it, between
two QEMU guests (Debian 6.1 kernel, CRIU 3.17.1: this host's own kernel cannot run CRIU).

What migrates: the programs in tests/criu_progs/ (a C simulation whose output is compared with
a run that never migrated, a multi-threaded program, a process with a child, one with a file
open for writing), a process labkit did not start (--pid), and the built-in workload (with
--verify-resume, and in a --matrix beside the labkit backend). The negative case: a file the
program holds open read-only exists on src only, so dst cannot restore it; the run fails with
CRIU's reason, the program runs on in src, nothing is left on dst. And a node where CRIU cannot
work (this host, as a process-kind fake node) is refused before anything starts.

One module-scoped lab of two guests serves every guest test (a TCG boot is ~15 s; a migration
~20 s). The programs are built/copied under the host's /tmp: the guests see it, read-only
beneath their own tmpfs, at the same path, so one binary runs on both nodes. A migrated
program keeps running on dst by design: each test kills what it started, by pid."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from labkit.fake import vmimage
from labkit.fake.harness import FakeLabHandle, start_fake_lab

PROGS = Path(__file__).parent / "criu_progs"
LABKIT = [sys.executable, "-m", "labkit.cli"]
BOOT = 150.0  # see test_vm_nodes.py: a loaded 2-core machine boots two TCG guests slowly
RUN = 400.0  # one migrate-test under TCG: ~20 s alone; generous for a loaded machine


def _guest_skip() -> str | None:
    why = vmimage.have_qemu()
    if why:
        return f"guest nodes: {why}"
    if shutil.which("criu") is None:  # the guests run the host's userland, criu included
        return "criu not installed (apt-get install criu): the guests run the host's"
    if shutil.which("cc") is None:
        return "no C compiler (cc) to build tests/criu_progs/sim.c"
    return None


WHY = _guest_skip()


def on_guests(test: Callable[..., None]) -> Callable[..., None]:
    """A test on the two guests: slow, vm, skipped with the reason where they cannot run."""
    for mark in (pytest.mark.slow, pytest.mark.vm,
                 pytest.mark.skipif(WHY is not None, reason=str(WHY))):
        test = mark(test)
    return test


# --- driving the program ------------------------------------------------------------------------
def labkit(lab: FakeLabHandle, *args: str, results: Path | None = None,
           timeout: float = RUN) -> subprocess.CompletedProcess:
    env = lab.env if results is None else {**lab.env, "INVOKE_LABKIT_RESULTS_DIR": str(results)}
    return subprocess.run([*LABKIT, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def ok(lab: FakeLabHandle, *args: str, timeout: float = RUN) -> str:
    r = labkit(lab, *args, timeout=timeout)
    assert r.returncode == 0, f"labkit {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def sh(lab: FakeLabHandle, node: str, command: str) -> str:
    """A shell command on a node (``labkit run``), its stdout; it must succeed."""
    out = ok(lab, "run", "-n", node, "--json", "--", command, timeout=120)
    (row,) = json.loads(out)
    assert row["ok"], row
    return row["stdout"]


def first_json(stdout: str) -> Any:
    """The JSON document ``--json`` printed (progress lines may come before it)."""
    lines = stdout.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.strip() in ("{", "["):  # indent=2: the document opens on a line of its own
            return json.JSONDecoder().raw_decode("".join(lines[i:]))[0]
    raise AssertionError(f"no JSON in the output:\n{stdout}")


def migrate(lab: FakeLabHandle, results: Path, *args: str,
            expect: int = 0) -> tuple[dict[str, Any], subprocess.CompletedProcess]:
    """``labkit migrate-test --src node1 --dst node2 --backend criu --json ARGS``: its JSON and
    the process (exit status ``expect``, else the assertion shows everything it said)."""
    r = labkit(lab, "migrate-test", "--src", "node1", "--dst", "node2", "--backend", "criu",
               "--json", *args, results=results)
    assert r.returncode == expect, (f"migrate-test {' '.join(args)}: exit {r.returncode}\n"
                                    f"{r.stdout}\n{r.stderr}")
    return first_json(r.stdout), r


def poll(what: str, probe: Callable[[], Any], done: Callable[[Any], bool],
         timeout: float = 120.0) -> Any:
    """Read ``probe()`` until ``done`` holds (each probe is a remote command: ~1 s under TCG)."""
    end = time.monotonic() + timeout
    while True:
        got = probe()
        if done(got):
            return got
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not after {timeout:g} s; last: {str(got)[-800:]}")
        time.sleep(0.5)


def alive(lab: FakeLabHandle, node: str, pid: int) -> str:
    """The process's state letter on the node ('' if there is none)."""
    out = sh(lab, node, f"cat /proc/{pid}/stat 2>/dev/null || true")
    return out.rsplit(")", 1)[1].split()[0] if ")" in out else ""


def kill(lab: FakeLabHandle, node: str, *pids: int) -> None:
    """End what a test started (the migrated program runs on by design), by pid: SIGKILL
    to the process group (a child too), the pid itself if it leads none."""
    if pids:
        ids = " ".join(str(p) for p in pids)
        sh(lab, node, f"for p in {ids}; do kill -KILL -$p 2>/dev/null; "  # dash: no "--"
                      "kill -KILL $p 2>/dev/null; done; true")


def leftovers(lab: FakeLabHandle, node: str, run: str) -> list[str]:
    """What a run named ``run`` (its results folder's name) left under the node's
    /tmp/labkit-criu."""
    out = sh(lab, node, "ls -A /tmp/labkit-criu 2>/dev/null || true")
    return [n for n in out.split() if n.startswith(run)]


# --- the lab and the programs -------------------------------------------------------------------
@pytest.fixture(scope="module")
def progs() -> Iterator[Path]:
    """tests/criu_progs built and copied under the host's /tmp (which the guests see at the
    same path), sim from its source with cc."""
    d = Path(tempfile.mkdtemp(prefix="labkit-criu-progs-", dir="/tmp"))
    try:
        d.chmod(0o755)
        r = subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(d / "sim"),
                            str(PROGS / "sim.c")], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"cc sim.c:\n{r.stderr}"
        for p in PROGS.glob("*.py"):
            shutil.copy(p, d / p.name)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def vmlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeLabHandle]:
    if WHY:
        pytest.skip(WHY)
    lab = start_fake_lab(tmp_path_factory.mktemp("criulab"), count=2, kind="vm",
                         power_delay=(0.05, 0.1))
    try:
        ok(lab, "power-on", "--wait", "ssh", timeout=BOOT * 2)
        check = labkit(lab, "run", "-n", "node1", "--json", "--",
                       "ip link set lo up; criu check 2>&1 | tail -n 3", timeout=120)
        (row,) = json.loads(check.stdout)
        if "Looks good" not in row["stdout"]:
            pytest.skip(f"criu check fails in the guest: {row['stdout'].strip()[-300:]}")
        yield lab
    finally:
        lab.stop()


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return tmp_path / "results"


def sim_reference(sim: Path, mib: int, every: int, steps: int) -> dict[int, str]:
    """What sim prints when it is never migrated: {step: crc}."""
    out = subprocess.run([str(sim), "--mib", str(mib), "--every", str(every), "--steps",
                          str(steps)], capture_output=True, text=True, check=True, timeout=120)
    return parse_sim(out.stdout)


def parse_sim(text: str) -> dict[int, str]:
    got: dict[int, str] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"step (\d+) crc ([0-9a-f]{16})", line)
        assert m, f"not a sim line: {line!r}"
        assert int(m[1]) not in got, f"step {m[1]} printed twice"
        got[int(m[1])] = m[2]
    return got


def counts(text: str, pattern: str) -> dict[str, list[int]]:
    """Per key, the counts printed in order (lines ``KEY ... count N``)."""
    out: dict[str, list[int]] = {}
    for line in text.splitlines():
        m = re.fullmatch(pattern, line)
        assert m, f"unexpected line {line!r}"
        out.setdefault(m["key"], []).append(int(m["n"]))
    return out


def assert_continuous(series: dict[str, list[int]]) -> None:
    """Every counter ran 1, 2, 3, ... : no gap or repeat across the migration."""
    for key, ns in series.items():
        assert ns == list(range(1, len(ns) + 1)), f"{key}: {ns}"


# --- the tests ----------------------------------------------------------------------------------
@on_guests
def test_sim_continues_on_dst_as_if_never_migrated(vmlab, progs, results) -> None:
    """The C simulation migrates (with the stop-and-copy baseline first, 2 pre-dump rounds):
    verified, it runs on dst and no longer on src, and every line it printed (on src before
    the freeze, on dst after) equals a run that never migrated, thousands of steps on."""
    mib, every = 16, 200
    data, _ = migrate(vmlab, results, "--command",
                      f"exec {progs}/sim --mib {mib} --rate 400 --every {every}",
                      "--max-rounds", "2")
    moved = data["criu"]["migrated"]
    pid, out = moved["pid"], moved["output"]
    try:
        assert data["ok"] and data["verified"] and data["backend"] == "criu", data
        assert moved["node"] == "node2"
        assert data["stop_copy_downtime_ms"] and data["downtime_ms"]
        assert alive(vmlab, "node1", pid) == ""  # gone on src
        assert alive(vmlab, "node2", pid) in ("S", "R")  # running (not held stopped) on dst
        folder = Path(data["folder"])
        run = json.loads((folder / "run.json").read_text())
        assert run["backend"] == "criu" and run["criu"]["version"]
        assert [r["kind"] for r in run["criu"]["rounds"]][-1] == "final"
        assert (folder / "rounds.csv").exists() and (folder / "criu-logs").is_dir()
        assert all(r["image_bytes"] and r["stats"] for r in run["criu"]["rounds"])
        parts = run["criu"]["downtime_parts_ms"]
        assert set(parts) >= {"dump_ms", "copy_ms", "restore_ms", "verify_ms", "resume_ms"}
        assert sum(parts.values()) <= data["downtime_ms"] + 1  # the parts are inside it
        assert run["criu"]["stop_and_copy"]["pages"] > 0
        assert run["criu"]["image_sha256"] == data["source_sha256"] == data["restored_sha256"]
        # the program's output up to the end of the run, in the results folder
        kept = parse_sim((folder / "program.log").read_text())
        assert kept and max(kept) >= 0 and kept.items() <= sim_reference(
            progs / "sim", mib, every, max(kept)).items()

        def lines() -> dict[int, str]:
            return parse_sim(sh(vmlab, "node2", f"cat {out}"))

        at_move = max(lines())
        got = poll("sim's output on dst 3000 steps after the migration", lines,
                   lambda got: max(got) >= at_move + 3000)
        assert sorted(got) == list(range(0, max(got) + 1, every))  # no gap, no repeat
        assert got == sim_reference(progs / "sim", mib, every, max(got))
    finally:
        kill(vmlab, "node2", pid)


@on_guests
def test_threads_migrate_and_keep_counting(vmlab, progs, results) -> None:
    data, _ = migrate(vmlab, results, "--command",
                      f"exec python3 -u {progs}/threads.py --threads 3 --period 0.1",
                      "--max-rounds", "2", "--no-stop-and-copy")
    moved = data["criu"]["migrated"]
    pid, out = moved["pid"], moved["output"]
    try:
        assert data["ok"] and data["verified"], data
        tasks = sh(vmlab, "node2", f"ls /proc/{pid}/task | wc -l").strip()
        assert tasks == "4", f"{tasks} threads on dst"  # main + 3, same tid count as on src
        assert alive(vmlab, "node1", pid) == ""
        pattern = r"thread (?P<key>\d) count (?P<n>\d+)"
        before = counts(sh(vmlab, "node2", f"cat {out}"), pattern)
        assert sorted(before) == ["0", "1", "2", "3"]
        after = poll("every thread counting on dst",
                     lambda: counts(sh(vmlab, "node2", f"cat {out}"), pattern),
                     lambda c: all(len(c[k]) >= len(before[k]) + 10 for k in before))
        assert_continuous(after)
    finally:
        kill(vmlab, "node2", pid)


@on_guests
def test_a_process_and_its_child_migrate_together(vmlab, progs, results) -> None:
    data, _ = migrate(vmlab, results, "--command",
                      f"exec python3 -u {progs}/child.py --period 0.1",
                      "--max-rounds", "2", "--no-stop-and-copy")
    moved = data["criu"]["migrated"]
    pid, out = moved["pid"], moved["output"]
    try:
        assert data["ok"] and data["verified"], data
        kids = sh(vmlab, "node2", f"cat /proc/{pid}/task/{pid}/children").split()
        assert len(kids) == 1, kids
        child = int(kids[0])
        assert alive(vmlab, "node2", child) in ("S", "R")
        assert alive(vmlab, "node1", pid) == "" and alive(vmlab, "node1", child) == ""
        pattern = r"(?P<key>parent|child) (?P<pid>\d+) count (?P<n>\d+)"
        text = sh(vmlab, "node2", f"cat {out}")
        assert "orphaned" not in text
        assert {int(p) for p in re.findall(r"^\w+ (\d+) ", text, re.M)} == {pid, child}
        before = counts(text, pattern)
        after = poll("parent and child counting on dst",
                     lambda: counts(sh(vmlab, "node2", f"cat {out}"), pattern),
                     lambda c: all(len(c.get(k, [])) >= len(before[k]) + 10
                                   for k in ("parent", "child")))
        assert_continuous(after)
    finally:
        kill(vmlab, "node2", pid)


@on_guests
def test_a_file_open_for_writing_travels_and_numbering_goes_on(vmlab, progs, results) -> None:
    """openfile.py appends 1, 2, 3... to a file it holds open; the file exists at the same
    path on both nodes (the folder does; the controller copies the file at the freeze). On dst
    the numbering goes on with no gap or repeat."""
    path = f"{progs}/counter-{uuid.uuid4().hex[:8]}.txt"
    data, _ = migrate(vmlab, results, "--command",
                      f"exec python3 -u {progs}/openfile.py {path} --period 0.1",
                      "--max-rounds", "2", "--no-stop-and-copy")
    pid = data["criu"]["migrated"]["pid"]
    try:
        assert data["ok"] and data["verified"], data
        copied = [f for r in data["criu"].get("restore", []) for f in r.get("files_copied")
                  or []]
        assert path in copied, copied

        def numbers() -> list[int]:
            return [int(x) for x in sh(vmlab, "node2", f"cat {path}").split()]

        at_move = len(numbers())
        got = poll("the numbering going on on dst", numbers, lambda ns: len(ns) >= at_move + 20)
        assert got == list(range(1, len(got) + 1))
        assert alive(vmlab, "node1", pid) == ""
    finally:
        kill(vmlab, "node2", pid)


@on_guests
def test_dst_cannot_restore_the_source_runs_on_and_dst_is_clean(vmlab, progs, results) -> None:
    """sim holds a file open READ-ONLY that exists on src only (in its own /tmp, not the
    host's): CRIU copies no read-only file, so the restore on dst fails. Exit 1, the message
    names the step and CRIU's reason; sim runs on (not stopped) on src; on dst no process of it
    and nothing of the run under /tmp/labkit-criu."""
    d = f"/tmp/labkit-criu-negative-{uuid.uuid4().hex[:8]}"  # not on the host: node1's alone
    sh(vmlab, "node1", f"mkdir -p {d} && echo settings > {d}/only-on-src.cfg")
    data, r = migrate(vmlab, results, "--command",
                      f"exec {progs}/sim --mib 8 --rate 200 --every 100 3<{d}/only-on-src.cfg",
                      "--max-rounds", "1", "--no-stop-and-copy", expect=1)
    src = data["criu"]["source"]
    pid, out = src["pid"], src["output"]
    try:
        assert data["ok"] is False
        error = data["error"]
        assert "restore" in error and "only-on-src.cfg" in error, error
        assert "No such file" in error, error  # CRIU's own reason, quoted
        message = r.stderr.strip().splitlines()
        assert len(message) == 1 and "only-on-src.cfg" in message[0], r.stderr
        folder = Path(data["folder"])
        assert any((folder / "criu-logs" / "node2").rglob("*restore*.log"))
        # the process runs on, unfrozen, on src
        assert alive(vmlab, "node1", pid) in ("S", "R")
        first = max(parse_sim(sh(vmlab, "node1", f"cat {out}")))
        poll("sim stepping on src after the failed migration",
             lambda: max(parse_sim(sh(vmlab, "node1", f"cat {out}"))),
             lambda step: step >= first + 300)
        # nothing on dst
        assert alive(vmlab, "node2", pid) == ""
        assert "sim" not in sh(vmlab, "node2", "ps -eo comm | grep -x sim || true")
        assert leftovers(vmlab, "node2", folder.name) == []
    finally:
        kill(vmlab, "node1", pid)
        sh(vmlab, "node1", f"rm -rf {d}")


@on_guests
def test_pid_of_a_process_labkit_did_not_start(vmlab, progs, results) -> None:
    """--pid: sim started by hand (own session, no labkit marker in its environment: a run's
    sweep would take it for a dead controller's leftover), migrated and verified, it goes on on
    dst as if never migrated."""
    mib, every = 8, 100
    log = f"/tmp/labkit-criu-pid-{uuid.uuid4().hex[:8]}.log"
    # CRIU restores every task with its own pid: a pid that the other guest (booted alike,
    # running its own commands) also uses fails the restore. spawn puts its processes high up;
    # a user starting by hand does the same here.
    pid_max = int(sh(vmlab, "node1", "cat /proc/sys/kernel/pid_max"))
    last = random.randrange(pid_max // 2, pid_max - 1000)
    started = sh(vmlab, "node1",
                 f"cd /tmp; echo {last} > /proc/sys/kernel/ns_last_pid; "
                 "env -u LABKIT_RUN -u LABKIT_CTL setsid "
                 f"{progs}/sim --mib {mib} --rate 300 --every {every} "
                 f"</dev/null >{log} 2>&1 & echo $!")
    pid = int(started.split()[-1])
    assert pid > last, f"sim got pid {pid}, not one above {last}"
    try:
        poll("sim's first line", lambda: sh(vmlab, "node1", f"cat {log}"),
             lambda t: t.startswith("step 0 "))
        data, _ = migrate(vmlab, results, "--pid", str(pid), "--max-rounds", "2",
                          "--no-stop-and-copy")
        assert data["ok"] and data["verified"], data
        assert data["criu"]["migrated"]["pid"] == pid
        assert alive(vmlab, "node1", pid) == ""
        at_move = max(parse_sim(sh(vmlab, "node2", f"cat {log}")))
        got = poll("sim on dst 1500 steps after the migration",
                   lambda: parse_sim(sh(vmlab, "node2", f"cat {log}")),
                   lambda got: max(got) >= at_move + 1500)
        assert got == sim_reference(progs / "sim", mib, every, max(got))
    finally:
        kill(vmlab, "node1", pid)
        kill(vmlab, "node2", pid)


@on_guests
def test_verify_resume_on_the_builtin_workload(vmlab, results) -> None:
    """The built-in workload under CRIU (timed, stdin ignored): both copies hold and run to the
    same step over workload.py --ctl and hash the same."""
    data, _ = migrate(vmlab, results, "--size", "8M", "--rate", "1000", "--max-rounds", "2",
                      "--no-stop-and-copy", "--verify-resume", "20")
    assert data["ok"] and data["verified"] and data["verify_resume"] is True, data
    events = [json.loads(x) for x in
              (Path(data["folder"]) / "events.jsonl").read_text().splitlines()]
    (vr,) = [e for e in events if e["event"] == "verify-resume"]
    assert vr["match"] and vr["source"] == vr["restored"]
    assert_workload_ended(vmlab, data["criu"]["source"]["pid"])


def assert_workload_ended(lab: FakeLabHandle, pid: int) -> None:
    """The built-in workload is the run's own: its end ended both copies (CRIU restores it on
    dst with the same pid). Killed here either way, so a leftover fails one test, not the next."""
    try:
        for node in ("node1", "node2"):
            state = alive(lab, node, pid)
            assert state == "", (f"{node}: the run's workload (pid {pid}) left running ({state}): "
                                 + sh(lab, node, f"ps -o pid,ppid,stat,args -p {pid} || true"))
    finally:
        for node in ("node1", "node2"):
            kill(lab, node, pid)


@on_guests
def test_matrix_compares_both_backends_in_one_summary(vmlab, results) -> None:
    r = labkit(vmlab, "migrate-test", "--src", "node1", "--dst", "node2", "--size", "8M",
               "--rate", "1000", "--max-rounds", "2", "--matrix", "backend=labkit,criu",
               "--json", results=results)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    rows = first_json(r.stdout)
    assert [row["backend"] for row in rows] == ["labkit", "criu"]
    assert all(row["ok"] and row["verified"] for row in rows), rows
    (folder,) = [p for p in results.iterdir() if p.name.endswith("migrate-matrix")]
    with open(folder / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert [(s["backend"], s["ok"]) for s in summary] == [("labkit", "True"), ("criu", "True")]
    assert all(float(s["downtime_ms"]) > 0 and float(s["stop_copy_downtime_ms"]) > 0
               for s in summary), summary
    assert (folder / "summary.png").stat().st_size > 1000
    run = json.loads((folder / summary[1]["folder"] / "run.json").read_text())
    assert run["backend"] == "criu"
    assert_workload_ended(vmlab, run["criu"]["source"]["pid"])


# --- a node where CRIU cannot work (no guests: fast) --------------------------------------------
def _criu_works_here() -> bool:
    if shutil.which("criu") is None:
        return False
    try:
        r = subprocess.run(["criu", "check"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
def test_a_node_where_criu_cannot_work_is_refused_before_anything_starts(tmp_path) -> None:
    """Process-kind fake nodes run on this host, whose kernel CRIU 3.17.1 fails on (or criu is
    not installed): exit 2, criu's reason in one line, no process started, no images folder."""
    if _criu_works_here():
        pytest.skip("criu check passes on this host: no node here where CRIU cannot work")
    lab = start_fake_lab(tmp_path / "lab", count=2)
    results = tmp_path / "results"
    marker = f"{random.randrange(10**6, 10**7)}.25"  # a sleep nobody else runs
    try:
        data, r = migrate(lab, results, "--command", f"sleep {marker}", expect=2)
        message = r.stderr.strip().splitlines()
        assert len(message) == 1, r.stderr
        assert "criu" in message[0].lower() and "cannot work" in message[0], message
        assert data["ok"] is False and data["error"] in message[0], (data, message)
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert marker.encode() not in cmd, f"pid {pid} was started: {cmd!r}"
        run = Path(data["folder"]).name
        root = Path("/tmp/labkit-criu")  # process-kind nodes: the node's /tmp is this host's
        made = [p.name for p in root.iterdir() if p.name.startswith(run)] if root.is_dir() else []
        assert made == []
        assert not [p for p in lab.processes() if "criu_driver" in p or "workload" in p]
    finally:
        lab.stop()
