"""A migrate-test run whose peer dies (source agent, restore agent, workload) fails AT ONCE, not
when the wait's budget (tens of seconds) runs out, and says why: the peer's own last stderr
lines are in the message, in run.json's ``error`` object and in events.jsonl, scrubbed of
secrets. Real processes on the fake lab, made to die for real reasons: a node whose file
descriptor limit leaves the source agent none to open its own script with (whatever the
kernel), a tracker this kernel lacks (where it does), a SIGKILL, a node whose address-space
limit cannot hold the region."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from labkit.config import Settings
from labkit.experiment import MigrationFailed, build_config, run_migrate_test
from labkit.pytest_plugin import FakeLabHandle, start_fake_lab
from labkit.secrets import MASK
from labkit.ssh.client import WINDOW

pytestmark = pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                                reason="x86_64 Linux only")

# A dead peer must be reported within this many seconds (the budget of one wait is 34 s or
# more: 3 x ssh_timeout + size at 4 MiB/s). Generous for a loaded 2-core machine.
FAST = 5.0


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    handle = start_fake_lab(tmp_path_factory.mktemp("peerslab"), count=2, power_on=True)
    yield handle
    handle.stop()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(results_dir=str(tmp_path / "results"), power_wait=30, ssh_wait=30)


def cfg(**kw: Any):
    base = {"src": "node1", "dst": "node2", "size": "16M", "rate": 4000}
    return build_config(**{**base, **kw})


def node_processes(lab: FakeLabHandle, node: str, needle: str) -> list[int]:
    """Pids of the node's processes (by its env marker) whose command line holds ``needle``
    ("agent.py source") as arguments of their own: the payload itself, not the shell that is
    about to exec it (stopping that one would stop the payload from ever starting)."""
    root = f"LABKIT_NODE_ROOT={(lab.state_dir / 'nodes' / node).resolve()}".encode()
    want = needle.split()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if root in env and any(argv[i:i + len(want)] == want for i in range(len(argv))):
            found.append(int(pid))
    return found


def leftovers(lab: FakeLabHandle) -> list[str]:
    """The payload processes (or shells about to run one) still alive on the lab's nodes."""
    roots = [f"LABKIT_NODE_ROOT={(lab.state_dir / 'nodes' / n).resolve()}".encode()
             for n in lab.nodes]
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(r in env for r in roots) and ("workload.py" in cmd or "agent.py" in cmd):
            found.append(f"{pid}: {cmd}")
    return found


def events(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (folder / "events.jsonl").read_text().splitlines()]


def check_reported(e: MigrationFailed, *, node: str, peer: str, needle: str,
                   step: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The failure names node, peer and the peer's reason in its one line, in run.json's
    ``error`` object and in events.jsonl's ``failed`` event; returns (error, events)."""
    msg = str(e)
    assert "\n" not in msg, msg
    assert f"{node}: {peer}" in msg and needle in msg and step in msg, msg
    folder = Path(e.value["folder"])
    run = json.loads((folder / "run.json").read_text())
    assert run["result"]["ok"] is False and run["result"]["error"] == msg
    err = run["error"]
    assert err["message"] == msg and err["node"] == node and err["peer"] == peer, err
    assert step in err["step"], err
    if needle:  # the peer's reason is its own: in its stderr
        assert any(needle in line for line in err["stderr"]), err
    assert run["result"]["failure"] == err
    evs = events(folder)
    (failed,) = [ev for ev in evs if ev["event"] == "failed"]
    assert failed["error"] == msg and failed["node"] == node and failed["peer"] == peer
    assert failed["stderr"] == err["stderr"]
    return err, evs


def started_at(evs: list[dict[str, Any]], what: str) -> float:
    return next(ev["t"] for ev in evs if ev["event"] == "start" and ev["what"] == what)


def failed_at(evs: list[dict[str, Any]]) -> float:
    return next(ev["t"] for ev in evs if ev["event"] == "failed")


def softdirty_missing() -> str:
    """Why soft-dirty cannot work on this kernel ('' if it can: the test is then skipped)."""
    from labkit.payloads import tracker

    ok, reason = tracker.softdirty_kernel_ok()
    return "" if ok else reason


# --- making a node's python3 processes misbehave, for real ---------------------------------------
@contextmanager
def python_hook(lab: FakeLabHandle, node: str, code: str) -> Iterator[None]:
    """While inside, every python3 process on ``node`` runs ``code`` first: the node's own
    usercustomize.py (under its HOME, in the lab's state folder), as a node's admin could
    have set it up. Applies to processes started from then on."""
    from labkit.ssh import SshClient

    settings = Settings(power_wait=30, ssh_wait=30)
    with SshClient.connect(lab.inventory().node(node), settings) as c:
        site = c.check("python3 -c 'import site; print(site.getusersitepackages())'",
                       timeout=30).stdout.decode().strip()
    hook = Path(site) / "usercustomize.py"
    assert str(hook).startswith(str(lab.state_dir)), hook  # the node's own HOME
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(code)
    try:
        yield
    finally:
        hook.unlink()


def source_agent_hook(*, only_with: str = "", say: str = "", flood: int = 0,
                      no_fds: bool = True) -> str:
    """usercustomize.py code for the source agent only (``agent.py source``, and ``only_with``
    among its arguments): write ``say`` and then ``flood`` bytes of numbered lines (ending
    with 'flood done') to stderr, then, with ``no_fds``, lower its file descriptor limit
    (``ulimit -n``) to the descriptors it holds: python3 cannot open the agent's script and
    exits 2 with "Too many open files", on any kernel."""
    cond = "b'agent.py' in argv and b'source' in argv"
    if only_with:
        cond += f" and {only_with.encode()!r} in argv"
    lines = ["import os, resource, sys",
             "argv = open('/proc/self/cmdline', 'rb').read().split(b'\\0')",
             f"if {cond}:"]
    if say:
        lines.append(f"    sys.stderr.write({say + chr(10)!r})")
    if flood:
        lines += [f"    n, i = {flood}, 0",
                  "    while n > 0:",
                  "        line = f'flood line {i} ' + 'x' * 1000 + '\\n'",
                  "        sys.stderr.write(line)",
                  "        n, i = n - len(line), i + 1",
                  "    sys.stderr.write('flood done\\n')"]
    lines.append("    sys.stderr.flush()")
    if no_fds:
        lines += [
            "    fd = os.dup(0)",  # the lowest free descriptor: from it on, none may be opened
            "    os.close(fd)",
            "    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]",
            "    resource.setrlimit(resource.RLIMIT_NOFILE, (fd, hard))",
        ]
    return "\n".join(lines) + "\n"


NO_FDS = "Too many open files"
# More stderr than the SSH channel's window (which stdout shares): unread, it stalls the peer.
FLOOD = WINDOW * 3 // 2


# --- the source agent dies before it streams -----------------------------------------------------
def _source_agent_dies(lab, settings, why: str, **kw: Any) -> tuple[MigrationFailed, str]:
    """A run whose source agent dies at start (``why``: "fds", the descriptor limit, on any
    kernel; "softdirty", the tracker this kernel lacks); returns the error and its needle."""
    if why == "softdirty":
        if not softdirty_missing():
            pytest.skip("this kernel has soft-dirty: the source agent would not die of it")
        with pytest.raises(MigrationFailed) as e:
            run_migrate_test(lab.inventory(), settings, cfg(tracker="softdirty"))
        return e.value, "soft-dirty"
    with python_hook(lab, "node1", source_agent_hook(**kw)), \
            pytest.raises(MigrationFailed) as e:
        run_migrate_test(lab.inventory(), settings, cfg())
    return e.value, NO_FDS


@pytest.mark.parametrize("why, status", [("fds", 2), ("softdirty", 1)])
def test_source_agent_that_dies_at_start_fails_the_run_at_once(lab, settings, why, status):
    """The issue's example was --tracker softdirty on a kernel without soft-dirty; a node whose
    descriptor limit is too low does it on any kernel. The source agent exits at start; the
    run used to wait out its whole budget for the restore agent's hello (which never comes:
    nothing was streamed) and report a bare timeout."""
    error, needle = _source_agent_dies(lab, settings, why)
    err, evs = check_reported(error, node="node1", peer="source agent", needle=needle,
                              step="hello")
    assert failed_at(evs) - started_at(evs, "source agent") < FAST, evs
    assert err["exit_status"] == status
    (gone,) = [ev for ev in evs if ev["event"] == "peer-exit"]
    assert gone["node"] == "node1" and gone["peer"] == "source agent"
    assert any(needle in line for line in gone["stderr"])
    assert "cleanup" in {ev["event"] for ev in evs}
    assert leftovers(lab) == []


def folder_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_a_secret_in_a_peers_stderr_is_scrubbed_everywhere(lab, settings):
    """A peer's stderr is quoted in the message, run.json (``error``, ``result``) and
    events.jsonl (``peer-exit``, ``failed``): a secret this process knows (the BMC password,
    resolved to power the nodes) that a peer prints there is masked in all of them."""
    password = lab.password().decode()
    said = f"retrying the BMC login with password {password}"
    error, _ = _source_agent_dies(lab, settings, "fds", say=said)
    masked = said.replace(password, MASK)
    err, evs = check_reported(error, node="node1", peer="source agent", needle=NO_FDS,
                              step="hello")
    assert masked in str(error) and masked in err["stderr"], err
    (gone,) = [ev for ev in evs if ev["event"] == "peer-exit"]
    assert masked in gone["stderr"], gone
    folder = Path(error.value["folder"])
    assert password.encode() not in folder_bytes(folder)
    assert password not in str(error) and password not in json.dumps(error.value)
    assert leftovers(lab) == []


# --- a peer that writes megabytes to stderr ------------------------------------------------------
def chatty_peer(lines: int) -> str:
    """The command of a peer that writes LINES numbered 1000-byte lines and "the last words"
    to stderr, then its ready line to stdout, then waits for a line on stdin."""
    code = ("import sys\n"
            f"for i in range({lines}):\n"
            "    sys.stderr.write(f'line {i} ' + 'y' * 990 + '\\n')\n"
            "sys.stderr.write('the last words\\n')\n"
            "sys.stderr.flush()\n"
            "print('{\"event\": \"ready\"}', flush=True)\n"
            "sys.stdin.readline()\n")
    return f"python3 -u -c {shlex.quote(code)}"


def test_a_peer_flooding_stderr_neither_stalls_nor_fills_the_controller(lab, settings):
    """Remote reads stderr as it comes and keeps its tail: a peer that writes more there than
    the channel's window (FLOOD, 96 MiB) still gets its stdout line through, the lines
    quoted are its last ones, and the controller holds a few KiB of it. Unread, the window
    ran out, the peer blocked writing stderr and the wait ran out its budget (and until
    then the controller held all of it)."""
    from labkit.experiment.remote import STDERR_KEEP, Remote
    from labkit.ssh import SshClient

    with SshClient.connect(lab.inventory().node("node1"), settings) as c:
        rem = Remote(c, "node1", chatty_peer(FLOOD // 1000), "chatty peer")
        try:
            assert rem.next(30, "its ready line") == {"event": "ready"}
            rem.quit()
            # its end (stderr read to EOF): stdout's line may overtake stderr's last bytes
            assert rem.ended.wait(10) and rem.exit_status == 0
            last = f"line {FLOOD // 1000 - 1} " + "y" * 990
            assert rem.stderr_lines(2) == [last, "the last words"]
            assert len(rem._err.value()) <= STDERR_KEEP and rem._err.total > FLOOD
        finally:
            rem.kill()


def test_its_end_waits_for_a_stderr_reader_that_is_behind(lab, settings, monkeypatch):
    """A busy controller's stderr reader can be seconds behind when the peer ends (CI: a
    window's backlog read in 64 KiB pieces took over the 2 s grace, and the lines a failure
    quotes were 40 MB old). Once the channel's EOF is in, ``ended`` waits for the reader to
    finish what paramiko holds. Here the reader is held back until the grace has run out
    after the EOF: the old end (at most the grace after it) came before the release."""
    from labkit.experiment import remote
    from labkit.ssh import SshClient

    release = threading.Event()
    read = remote.Remote._read_stderr

    def behind(self) -> None:
        release.wait(60)
        read(self)

    monkeypatch.setattr(remote.Remote, "_read_stderr", behind)
    n = 4000  # 4 MB: within the window, so the peer is never blocked by the held reader
    with SshClient.connect(lab.inventory().node("node1"), settings) as c:
        rem = remote.Remote(c, "node1", chatty_peer(n), "chatty peer")
        try:
            released_first: list[bool] = []
            rem.on_end(lambda r: released_first.append(release.is_set()))
            assert rem.next(30, "its ready line") == {"event": "ready"}
            rem.quit()
            end = time.monotonic() + 30
            while not rem.ch.eof_received and time.monotonic() < end:
                time.sleep(0.01)
            assert rem.ch.eof_received
            time.sleep(remote.EXIT_STATUS_GRACE + 0.5)
            release.set()
            assert rem.ended.wait(30) and rem.exit_status == 0
            assert released_first == [True]  # it waited for the reader, and ended once
            assert rem.stderr_lines(2) == [f"line {n - 1} " + "y" * 990, "the last words"]
        finally:
            release.set()
            rem.kill()


def test_a_run_whose_source_agent_floods_stderr_still_migrates(lab, settings):
    """The whole run: the source agent writes FLOOD bytes to stderr before it starts its
    work; the migration completes and verifies (its stderr read and dropped on the way)."""
    with python_hook(lab, "node1", source_agent_hook(flood=FLOOD, no_fds=False)):
        r = run_migrate_test(lab.inventory(), settings, cfg())
    assert r.ok and r.verified, r.summary()
    assert leftovers(lab) == []


def test_a_flooding_source_agent_that_dies_is_reported_with_its_last_lines(lab, settings):
    """FLOOD bytes of stderr and then death: reported at once, quoting its last lines (the
    flood's end and python's own reason), not its first."""
    error, _ = _source_agent_dies(lab, settings, "fds", flood=FLOOD)
    err, evs = check_reported(error, node="node1", peer="source agent", needle=NO_FDS,
                              step="hello")
    assert "flood done" in err["stderr"], err
    assert not any("flood line 0 " in ln for ln in err["stderr"]), err
    assert failed_at(evs) - started_at(evs, "source agent") < FAST + 5, evs
    assert leftovers(lab) == []


# --- a peer killed while the run waits on something else -----------------------------------------
def _run_in_thread(lab, settings, config) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def go() -> None:
        try:
            out["result"] = run_migrate_test(lab.inventory(), settings, config)
        except MigrationFailed as e:
            out["error"] = e
        finally:
            out["done"] = time.monotonic()

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out


def _first(lab, node: str, needle: str, timeout: float = 60) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        pids = node_processes(lab, node, needle)
        if pids:
            return pids[0]
        time.sleep(0.01)
    raise AssertionError(f"{needle} never started on {node}")


def _wait_event(results: Path, kind: str, timeout: float = 60, **fields: Any) -> None:
    """Wait until the (one) run under ``results`` has logged event ``kind`` with ``fields``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for log in results.glob("*/events.jsonl"):
            for line in log.read_text().splitlines():
                ev = json.loads(line) if line.endswith("}") else {}
                if ev.get("event") == kind and all(ev.get(k) == v for k, v in fields.items()):
                    return
        time.sleep(0.01)
    raise AssertionError(f"no {kind} {fields} event under {results}")


@pytest.mark.parametrize("victim, node, peer", [
    ("agent.py source", "node1", "source agent"),
    ("workload.py run", "node1", "workload"),
    ("agent.py restore", "node2", "restore agent"),
])
def test_a_killed_peer_fails_the_wait_at_once(lab, settings, victim, node, peer):
    """The source agent is stopped (SIGSTOP) as soon as it runs, so the run is held in a wait
    that only a live agent could end; then one peer is killed. Whatever the run was waiting
    for, and whichever peer died, the wait fails within seconds naming the dead peer and how it
    ended (SIGKILL: status 137). Before, a dead workload was not watched at all, and a dead
    source agent while the run waited for the destination counted as an orderly end."""
    thread, out = _run_in_thread(lab, settings, cfg(size="32M"))
    agent = _first(lab, "node1", "agent.py source")
    os.kill(agent, signal.SIGSTOP)
    target = agent if victim == "agent.py source" else _first(lab, node, victim)
    # the restore agent's start is the run's last step before the wait for its hello, which
    # the stopped agent cannot end
    _wait_event(Path(settings.results_dir), "start", what="restore agent")
    assert "done" not in out, "the run ended although its source agent is stopped"
    t_kill = time.monotonic()
    os.kill(target, signal.SIGKILL)
    thread.join(60)
    assert "error" in out, out
    assert out["done"] - t_kill < FAST, f"the failure took {out['done'] - t_kill:.1f}s"
    err, evs = check_reported(out["error"], node=node, peer=peer, needle="", step="")
    assert err["exit_status"] == 128 + signal.SIGKILL, err
    assert "SIGKILL" in str(out["error"])
    assert leftovers(lab) == []


# --- the destination cannot map the region -------------------------------------------------------
def test_destination_that_cannot_map_the_region_fails_at_once(lab, settings):
    """node2 allows a process less address space (RLIMIT_AS, as ``ulimit -v`` would) than the
    region needs: the restore agent's mmap fails, and the run says so at once, with the
    agent's reason, though the source keeps streaming into the dead channel."""
    limit = (  # this node's python3 processes get 64 MiB above what they start with
        "import resource\n"
        "vm = [int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmSize')]\n"
        "lim = vm[0] * 1024 + (64 << 20)\n"
        "resource.setrlimit(resource.RLIMIT_AS, (lim, lim))\n")
    with python_hook(lab, "node2", limit), pytest.raises(MigrationFailed) as e:
        run_migrate_test(lab.inventory(), settings, cfg(size="128M"))
    err, evs = check_reported(e.value, node="node2", peer="restore agent",
                              needle="Cannot allocate memory", step="hello")
    assert failed_at(evs) - started_at(evs, "restore agent") < FAST, evs
    assert leftovers(lab) == []


# --- the workload cannot start -------------------------------------------------------------------
def test_workload_that_cannot_start_fails_at_once(lab, settings):
    """A region larger than the node's memory and swap: the workload's mmap is refused; the
    wait for its ready line fails at once with its reason."""
    with pytest.raises(MigrationFailed) as e:
        run_migrate_test(lab.inventory(), settings, cfg(size="64T"))
    err, evs = check_reported(e.value, node="node1", peer="workload",
                              needle="Cannot allocate memory", step="ready")
    assert failed_at(evs) - started_at(evs, "workload") < FAST, evs
    assert leftovers(lab) == []


# --- through the program: --json still prints, exit 1; --matrix records the reason --------------
def _cli(lab, tmp_path: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "labkit.cli", "migrate-test", "--inventory",
         str(lab.inventory_path), "--src", "node1", "--dst", "node2", "--size", "16M",
         "--no-stop-and-copy", *args],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "INVOKE_LABKIT_RESULTS_DIR": str(tmp_path / "results")})


def test_cli_json_prints_the_failure_and_exits_1(lab, tmp_path):
    """Through the program, on any kernel: --json still prints the result (ok false, the
    failure with the peer's stderr), the one error line goes to stderr, exit 1; and a secret
    the peer printed is masked in both (the task prints the failure's result as it is)."""
    password = lab.password().decode()
    hook = source_agent_hook(say=f"retrying the BMC login with password {password}")
    t0 = time.monotonic()
    with python_hook(lab, "node1", hook):
        r = _cli(lab, tmp_path, "--json")
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    assert password not in r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is False and NO_FDS in out["error"] and MASK in out["error"]
    assert out["failure"]["node"] == "node1" and out["failure"]["peer"] == "source agent"
    assert any(NO_FDS in line for line in out["failure"]["stderr"])
    assert Path(out["folder"], "run.json").exists()
    assert password.encode() not in folder_bytes(Path(out["folder"]))
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: node1: source agent") and (
        NO_FDS in err[0]), r.stderr
    assert took < 60, f"{took:.0f}s"  # the budget of one wait is 34 s
    assert leftovers(lab) == []


def test_cli_json_with_a_tracker_this_kernel_lacks(lab, tmp_path):
    """The same through --tracker softdirty, where the kernel lacks soft-dirty."""
    if not softdirty_missing():
        pytest.skip("this kernel has soft-dirty: the source agent would not die")
    r = _cli(lab, tmp_path, "--tracker", "softdirty", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is False and "soft-dirty" in out["error"]
    assert any("soft-dirty" in line for line in out["failure"]["stderr"])
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: node1: source agent"), r.stderr
    assert leftovers(lab) == []


@pytest.mark.slow  # a two-cell matrix, one cell a full migration
def test_matrix_cell_with_a_dead_peer_records_why_and_the_matrix_goes_on(lab, tmp_path):
    """Cell 1's source agent (tracker compare, the one the node's hook aims at) dies of the
    descriptor limit; the row records why, and cell 2 (tracker auto) runs and succeeds."""
    import csv

    with python_hook(lab, "node1", source_agent_hook(only_with="compare")):
        r = _cli(lab, tmp_path, "--matrix", "tracker=compare,auto", "--json", timeout=240)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert any("[1/2] tracker=compare: FAILED: node1: source agent" in ln and
               NO_FDS in ln for ln in lines), r.stdout
    assert any(ln.startswith("[2/2] tracker=auto: downtime") for ln in lines), r.stdout
    start = lines.index("[")
    end = next(i for i, ln in enumerate(lines) if ln.startswith("matrix results: "))
    rows = json.loads("\n".join(lines[start:end]))
    assert rows[0]["ok"] is False and "node1: source agent" in rows[0]["error"]
    assert NO_FDS in rows[0]["error"]
    assert rows[1]["ok"] is True
    folder = Path(lines[end].split(": ", 1)[1])
    with open(folder / "summary.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert NO_FDS in csv_rows[0]["error"] and csv_rows[1]["ok"] == "True"
    cell = json.loads((folder / csv_rows[0]["folder"] / "run.json").read_text())
    assert cell["error"]["peer"] == "source agent"
    assert any(NO_FDS in line for line in cell["error"]["stderr"])
    assert leftovers(lab) == []


# --- the channel baseline: the same relay path, the same rule --------------------------------------
def test_channel_rate_fails_at_once_when_the_sink_dies(lab, settings):
    """measure_channel_rate relays src -> dst like a migration. A sink killed mid-stream fails
    it at once naming the node and how the sink ended (it used to surface as a bare OSError
    from paramiko, or, dying at the end, as a measurement of bytes that never arrived)."""
    from labkit.errors import LabkitError
    from labkit.experiment import measure_channel_rate

    inv = lab.inventory()
    assert measure_channel_rate(inv, settings, "node1", "node2", 8 << 20) > 0
    out: dict[str, Any] = {}

    def go() -> None:
        try:
            out["rate"] = measure_channel_rate(inv, settings, "node1", "node2", 64 << 30)
        except LabkitError as e:
            out["error"] = e
        out["done"] = time.monotonic()

    t = threading.Thread(target=go, daemon=True)
    t.start()
    sink = _first(lab, "node2", "cat")
    t_kill = time.monotonic()
    os.kill(sink, signal.SIGKILL)
    t.join(60)
    assert "error" in out, out
    assert out["done"] - t_kill < FAST
    msg = str(out["error"])
    assert msg.startswith("node2: channel sink ") and "while we waited for the channel" in msg
    assert [p for p in node_processes(lab, "node1", "head") + node_processes(lab, "node2", "cat")
            if Path(f"/proc/{p}").exists()] == []
