"""migrate-test end to end on the fake lab (real IPMI power-on, real SSH, real processes):
verification, --verify-resume, determinism in stepped mode, refused streams, and that nothing
is left running afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit.config import Settings
from labkit.experiment import MigrationFailed, build_config, run_migrate_test
from labkit.pytest_plugin import start_fake_lab

pytestmark = pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                                reason="x86_64 Linux only")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    handle = start_fake_lab(tmp_path_factory.mktemp("migratelab"), count=2)
    yield handle
    handle.stop()


@pytest.fixture
def settings(tmp_path):
    return Settings(results_dir=str(tmp_path / "results"), power_wait=30, ssh_wait=30)


def leftovers(lab) -> list[str]:
    """Payload processes still running on the lab's nodes (by the fake node's env marker)."""
    roots = [str((lab.state_dir / "nodes" / n).resolve()) for n in lab.nodes]
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(f"LABKIT_NODE_ROOT={r}".encode() in env for r in roots) and (
                "workload.py" in cmd or "agent.py" in cmd):
            found.append(f"{pid}: {cmd}")
    return found


def cfg(**kw):
    base = {"src": "node1", "dst": "node2", "size": "16M", "rate": 4000}
    return build_config(**{**base, **kw})


def test_migrate_verifies_and_resumes(lab, settings):
    r = run_migrate_test(lab.inventory(), settings, cfg(verify_resume=40))
    assert r.ok and r.verified and r.verify_resume is True
    assert r.source_sha256 == r.restored_sha256
    assert r.rounds[0]["pages"] == 4096 and r.rounds[-1]["kind"] == "final"
    assert r.stop_reason in ("min-pages", "growth", "max-rounds")
    assert 0 < r.downtime_s < r.stop_copy_downtime_s
    assert r.backend in ("uffd", "softdirty", "compare")
    files = {p.name for p in r.folder.iterdir()}
    assert {"run.json", "rounds.csv", "events.jsonl", "rounds.png", "timeline.png"} <= files
    run = json.loads((r.folder / "run.json").read_text())
    assert run["tracker_backend"] == r.backend
    assert run["nodes"]["node1"]["uname"].startswith("Linux")
    assert run["payload"]["releases"]["node1"]
    secret = lab.password().decode()
    for p in r.folder.iterdir():
        if p.suffix in (".json", ".jsonl", ".csv"):
            assert secret not in p.read_text()
    events = [json.loads(x)["event"] for x in (r.folder / "events.jsonl").read_text().splitlines()]
    for e in ("prepared", "freeze", "downtime", "verify", "verify-resume", "cleanup"):
        assert e in events
    assert "downtime" in r.summary()
    assert leftovers(lab) == []


@pytest.mark.slow  # two migrate-test runs
def test_stepped_rounds_are_deterministic(lab, settings):
    """Same seed and config -> the same per-round dirty counts (rounds driven by steps)."""
    runs = [run_migrate_test(lab.inventory(), settings,
                             cfg(steps_per_round=4, pattern="hotset", seed=9,
                                 stop_and_copy=False, min_pages=0, max_rounds=5))
            for _ in range(2)]
    counts = [[row["pages"] for row in r.rounds] for r in runs]
    assert counts[0] == counts[1], counts
    assert len(counts[0]) == 6 and all(c > 1 for c in counts[0][1:])
    assert runs[0].restored_sha256 == runs[1].restored_sha256
    assert leftovers(lab) == []


@pytest.mark.parametrize("hook, needle", [("round:2", "CRC mismatch"),
                                          ("truncate:final", "truncated")])
def test_bad_stream_fails_clearly_and_leaves_nothing(lab, settings, hook, needle):
    with pytest.raises(MigrationFailed) as e:
        run_migrate_test(lab.inventory(), settings,
                         cfg(steps_per_round=2, min_pages=0, max_rounds=4, corrupt=hook))
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    assert "node2" in msg or "node1" in msg
    folder = Path(e.value.value["folder"])
    run = json.loads((folder / "run.json").read_text())
    assert run["result"]["ok"] is False and needle in run["result"]["error"]
    assert leftovers(lab) == []


def test_bad_arguments_exit_2_before_anything_starts(lab):
    for args in (["--size", "12Q"], ["--rate", "-5"], ["--src", "node1", "--dst", "node1"],
                 ["--tracker", "nope"], ["--dst", "node9"]):
        r = subprocess.run([sys.executable, "-m", "invoke", "-r", str(Path(__file__).parents[1]),
                            "migrate-test", "--inventory", str(lab.inventory_path), *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")
    assert leftovers(lab) == []


@pytest.mark.slow  # a grid of migrate-test runs
def test_matrix_runs_the_grid_and_summarises(lab, tmp_path):
    """--matrix through the CLI: every cell migrates and verifies, each in its own folder, and
    the matrix folder gets summary.csv (one row per cell) and summary.png."""
    import csv

    results = tmp_path / "results"
    r = subprocess.run(
        [sys.executable, "-m", "labkit.cli", "migrate-test", "--inventory",
         str(lab.inventory_path), "--src", "node1", "--dst", "node2", "--no-stop-and-copy",
         "--matrix", "size=8M,16M rate=2000 pattern=uniform,hotset"],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "INVOKE_LABKIT_RESULTS_DIR": str(results)})
    assert r.returncode == 0, r.stdout + r.stderr
    (folder,) = [p for p in results.iterdir() if p.name.endswith("migrate-matrix")]
    with open(folder / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert {(row["size"], row["pattern"]) for row in rows} == {
        ("8388608", "uniform"), ("8388608", "hotset"), ("16777216", "uniform"),
        ("16777216", "hotset")}
    assert all(row["ok"] == "True" and row["verified"] == "True" for row in rows), rows
    assert (folder / "summary.png").stat().st_size > 1000
    assert all((folder / row["folder"] / "rounds.csv").exists() for row in rows)
    assert leftovers(lab) == []


# --- the controller's event pump, without nodes -------------------------------------------------
class _Chan:
    """A stand-in for an SSH channel: recv() hands out queued chunks (b"" = EOF; an exception
    is raised, as paramiko's recv raises EOFError once the connection is gone), sendall()
    calls a hook (the "destination" answering what it was sent); end() is the process exiting
    (its status, then EOF on stdout and stderr, as the fake lab's sshd sends them)."""

    def __init__(self, on_send=None):
        import queue
        import threading

        self.chunks: queue.Queue = queue.Queue()
        self.on_send = on_send
        self.status_event = threading.Event()
        self.stderr_eof = threading.Event()
        self.status = -1
        self.eof_received = False  # paramiko's: the channel's EOF is in (both streams end)
        self.closed = False

    def recv(self, n):
        chunk = self.chunks.get()
        if isinstance(chunk, BaseException):  # the connection died (paramiko: EOFError)
            raise chunk
        return chunk

    def sendall(self, data):
        if self.on_send:
            self.on_send(data)

    def recv_stderr(self, n):
        self.stderr_eof.wait()  # it writes nothing there: its stderr just ends with it
        return b""

    def recv_exit_status(self):
        return self.status

    def end(self, status):
        self.status = status
        self.status_event.set()
        self.eof_received = True
        self.stderr_eof.set()
        self.chunks.put(b"")


class _Shell:
    """Hands out the one channel as the process a Remote runs."""

    def __init__(self, ch):
        self.ch = ch

    def open_exec(self, cmd, env=None):
        from types import SimpleNamespace

        return SimpleNamespace(channel=self.ch, run_id="t", kill=lambda: None,
                               close=lambda: None)


def _pump(tmp_path, on_send=None):
    from labkit.experiment import results as res
    from labkit.experiment.relay import Pump
    from labkit.experiment.remote import Remote

    src = Remote(_Shell(_Chan()), "node1", "agent.py source", "source agent", raw=True)
    dst = Remote(_Shell(_Chan(on_send)), "node2", "agent.py restore", "restore agent")
    return Pump(src, dst, res.Events(tmp_path / "events.jsonl"), "t"), src, dst


def _frame(ftype, obj, seq=0):
    import zlib

    from labkit.payloads import stream as st

    payload = json.dumps(obj).encode()
    return st.pack_header(ftype, len(payload), seq, zlib.crc32(payload)) + payload


def test_pump_keeps_answers_that_overtake_the_frame_they_answer(tmp_path):
    """The destination may answer a frame ("applied", "resumed", "restored") before the relay
    has queued that frame: the answers must wait for the next wait, not be thrown away (that
    hung --matrix runs forever in "waiting for the restored workload")."""
    from labkit.payloads import stream as st

    pump, src, dst = _pump(tmp_path)
    for ev in ({"event": "applied", "round": 3}, {"event": "resumed", "pid": 7},
               {"event": "restored", "sha256": "ab"}):
        dst.lines.put(ev)
    end = time.monotonic() + 10
    while pump.q.qsize() < 3:  # the answers are queued first
        assert time.monotonic() < end, "the answers never reached the pump's queue"
        time.sleep(0.005)
    src.ch.chunks.put(_frame(st.ROUND_END, {"round": 3, "final": True}))
    assert pump.wait(5, "the final round", src_type=st.ROUND_END)["round"] == 3
    assert pump.wait(1, "the restored workload", dst_event="resumed")["pid"] == 7
    assert pump.wait(1, "the hash", dst_event="restored")["sha256"] == "ab"
    pump.wait_applied(3, 1)
    src.ch.chunks.put(_frame(st.VERIFY, {"sha256": "ab"}, seq=1))
    dst.lines.put({"event": "verified", "match": True})
    assert pump.wait(5, "the source hash", src_type=st.VERIFY)["sha256"] == "ab"
    assert pump.wait(1, "the verification", dst_event="verified")["match"] is True


def test_pump_queues_a_frame_before_the_destination_sees_it(tmp_path):
    """The relay queues a control frame before forwarding it, so the destination's answer is
    always behind it in the queue (events.jsonl reads in causal order)."""
    import queue
    import threading

    from labkit.payloads import stream as st

    class Queue(queue.Queue):  # says when the destination's answer is in
        def __init__(self) -> None:
            super().__init__()
            self.answered = threading.Event()

        def put(self, item, *a, **kw):
            super().put(item, *a, **kw)
            if item[0] == "dst":
                self.answered.set()

    holder = {}

    def answer(data):  # the destination answers at once, and its line reaches the queue
        holder["dst"].lines.put({"event": "applied", "round": 0})
        holder["q"].answered.wait(10)  # before the relay goes on

    pump, src, dst = _pump(tmp_path, on_send=answer)
    holder["dst"] = dst
    holder["q"] = pump.q = Queue()  # nothing has been put yet: both threads wait for input
    src.ch.chunks.put(_frame(st.ROUND_END, {"round": 0}))
    kind, ftype, _ = pump.q.get(timeout=5)
    assert (kind, ftype) == ("src", st.ROUND_END)
    assert pump.q.get(timeout=5)[0] == "dst"


def test_pump_fails_fast_and_names_what_it_waited_for(tmp_path):
    from labkit.payloads import stream as st

    pump, src, dst = _pump(tmp_path)
    with pytest.raises(MigrationFailed, match=r"timed out after 0s waiting for the final round "
                                              r"\(source agent on node1, restore agent on node2"):
        pump.wait(0.2, "the final round", src_type=st.ROUND_END)
    src.ch.end(1)  # the source agent died
    with pytest.raises(MigrationFailed, match="node1: source agent exited with status 1 while "
                                              "we waited for the source hash"):
        pump.wait(5, "the source hash", src_type=st.VERIFY)
    with pytest.raises(MigrationFailed, match="node1: source agent exited"):  # the first to die
        pump.wait(5, "the restored workload", dst_event="resumed")  # is the one blamed

    pump, src, dst = _pump(tmp_path)
    dst.ch.end(137)  # the restore agent is killed
    with pytest.raises(MigrationFailed, match=r"node2: restore agent exited with status 137 "
                                              r"\(SIGKILL\)"):
        pump.wait(5, "the restored workload", dst_event="resumed")
    with pytest.raises(MigrationFailed, match="node2: restore agent exited"):  # at once, again
        pump.wait(5, "the verification", dst_event="verified")


def test_pump_fails_at_once_when_the_source_ends_unasked(tmp_path):
    """The source agent ending while the run waits for the destination only (its hello) is a
    failure unless it was told to quit — it used to count as an orderly end, and the wait then
    ran out its whole budget for a hello that could not come. Told to quit, its connection
    dying is a failure still: the end of its stream was not seen."""
    pump, src, dst = _pump(tmp_path)
    src.ch.end(1)
    t0 = time.monotonic()
    with pytest.raises(MigrationFailed, match="node1: source agent exited with status 1 while "
                                              "we waited for the restore agent's hello"):
        pump.wait(30, "the restore agent's hello", dst_event="hello")
    assert time.monotonic() - t0 < 5

    pump, src, dst = _pump(tmp_path)
    src.quit()  # told to: its end is orderly, and the wait goes on for the destination
    src.ch.end(0)
    dst.lines.put({"event": "serving"})
    assert pump.wait(5, "the restored workload to serve", dst_event="serving") == {
        "event": "serving"}

    # told to quit, but its connection died: whether its stream was whole is unknown
    pump, src, dst = _pump(tmp_path)
    src.quit()
    src.ch.chunks.put(EOFError())
    with pytest.raises(MigrationFailed, match="the connection to node1 was lost at the end of "
                                              "stream 't': the connection was lost"):
        pump.wait(5, "the restored workload to serve", dst_event="serving")


def test_every_wait_fails_when_any_peer_of_the_run_ends(tmp_path):
    """A process of the run that is not one of the stream's agents (the workload) ending
    unasked fails a pump wait and a wait on another process at once, naming it; one told to
    quit does not; the run's cleanup (close) stops the watching."""
    from labkit.experiment import results as res
    from labkit.experiment.relay import Pump
    from labkit.experiment.remote import Peers, Remote

    events = res.Events(tmp_path / "events.jsonl")
    peers = Peers(events)

    def remote(node, label, raw=False):
        return Remote(_Shell(_Chan()), node, "x", label, raw=raw, peers=peers)

    wl, other = remote("node1", "workload"), remote("node2", "helper")
    waiter = remote("node2", "waiter")  # a process whose answer a wait expects
    src, dst = remote("node1", "source agent", raw=True), remote("node2", "restore agent")
    pump = Pump(src, dst, events, "t")
    other.quit()
    other.ch.end(0)  # asked to: nothing happens
    done = {}

    def kill_later():
        time.sleep(0.2)  # the waits below are blocked by then
        done["t"] = time.monotonic()
        wl.ch.end(137)

    import threading

    threading.Thread(target=kill_later, daemon=True).start()
    with pytest.raises(MigrationFailed, match=r"node1: workload exited with status 137 "
                                              r"\(SIGKILL\) while we waited for the end of "
                                              r"round 0"):
        pump.wait(30, "the end of round 0", src_type=1)
    assert time.monotonic() - done["t"] < 2
    with pytest.raises(MigrationFailed, match="node1: workload exited"):  # any later wait too
        waiter.next(30, "a reply")
    gone = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["peer"], e["exit_status"]) for e in gone] == [
        ("peer-exit", "workload", 137)]
    peers.close()
    waiter.lines.put({"ok": True})
    assert waiter.next(1, "a reply") == {"ok": True}


def test_wait_budget_follows_size_and_command_timeout():
    from labkit.experiment.run import wait_budget

    s = Settings()
    assert wait_budget(s, 16 << 20) == pytest.approx(3 * s.ssh_timeout + 4)
    assert wait_budget(s, 64 << 30) == s.command_timeout
    assert wait_budget(Settings(command_timeout=20), 1 << 30) == 20
    assert wait_budget(Settings(command_timeout=0), 4 << 30) == pytest.approx(30 + 1024)
