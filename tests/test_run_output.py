"""`run`'s output as a user meets it: streamed as it arrives however it is shaped, bounded
memory however much of it there is, a failed command's own last words in its node's error
text, and no paramiko noise on stderr when a node is powered off under a live connection.
Real CLI processes against fake nodes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from labkit import inventory as inv
from labkit.config import Settings
from labkit.fake.harness import SshNodeSet, start_fake_lab
from labkit.ssh import CommandFailed, RunResult, SshClient
from labkit.ssh.client import STREAM_WINDOW
from labkit.ssh.output import KEEP, LINE_MAX
from labkit.ssh.run import run_to_end
from labkit.ssh.shell import READ_SIZE

REPO = Path(__file__).resolve().parent.parent
LABKIT = [sys.executable, "-m", "labkit.cli"]
INVOKE = [str(Path(sys.executable).with_name("invoke"))]
MB = 1000 * 1000
LIMIT = 90.0  # seconds: the 400 MB run takes 1-9 s here, under load from other test runs


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    with SshNodeSet(tmp_path_factory.mktemp("runout"), ["node1", "node2"]) as lab:
        yield lab


def cli(lab: SshNodeSet, *args: str, prog: list[str] = LABKIT,
        timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, LABKIT_INVENTORY=str(lab.inventory_path))
    return subprocess.run([*prog, *args], capture_output=True, env=env, timeout=timeout,
                          cwd=REPO)


# --- bounded: time and memory ----------------------------------------------------------------

def _vm_hwm(pid: int) -> int:
    """Peak resident bytes of ``pid``'s current program (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def test_400mb_without_newlines_streams_in_bounded_time_and_memory(lab: SshNodeSet,
                                                                    tmp_path: Path) -> None:
    """Used to never finish (the partial line was re-scanned and copied on every chunk, and
    every byte was kept): 80 MB took 8-11 s and 350-440 MB of RSS. Now the output streams in
    LINE_MAX pieces, each prefixed, and the controller's peak RSS (VmHWM: the child's own
    high-water mark) stays near its size at rest plus the SSH window."""
    size = 400 * MB
    env = dict(os.environ, LABKIT_INVENTORY=str(lab.inventory_path))
    err = open(tmp_path / "stderr", "wb")  # noqa: SIM115
    t0 = time.monotonic()
    proc = subprocess.Popen([*LABKIT, "run", "-n", "node1", "--", f"head -c {size} /dev/zero"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=err)
    # the old code printed nothing until the end and never got there: a deadline, not a hang
    deadline = threading.Timer(LIMIT, proc.kill)
    deadline.start()
    received = newlines = longest = 0
    pending = 0  # bytes since the last newline
    assert proc.stdout is not None
    hwm = 0  # the child's own peak (VmHWM: reset at exec, unlike ru_maxrss, which keeps the
    #          RSS of the forked copy of this test process before exec: 300+ MB in a full run)
    while data := proc.stdout.read1(1 << 20):
        hwm = max(hwm, _vm_hwm(proc.pid))
        received += len(data)
        newlines += data.count(b"\n")
        last = data.rfind(b"\n")
        if last < 0:
            pending += len(data)
        else:
            longest = max(longest, pending + data.find(b"\n"))
            pending = len(data) - last - 1
    hwm = max(hwm, _vm_hwm(proc.pid))
    _, status, _usage = os.wait4(proc.pid, 0)
    deadline.cancel()
    seconds = time.monotonic() - t0
    err.close()
    assert seconds < LIMIT, f"killed after {LIMIT:.0f} s, {received / MB:.0f} MB received"
    assert os.waitstatus_to_exitcode(status) == 0, (tmp_path / "stderr").read_text()
    pieces = -(-size // LINE_MAX)
    table = received - size - pieces * len(b"node1| \n")
    assert 0 < table < 1000, f"got {received} bytes for {size} of output in {pieces} pieces"
    assert newlines >= pieces and longest <= LINE_MAX + len("node1| ")
    peak = hwm
    print(f"400 MB without newlines: {seconds:.1f}s, controller peak RSS {peak / MB:.0f} MB")
    assert peak < 160 * MB, f"controller peak RSS {peak / MB:.0f} MB"


def test_json_keeps_the_last_mib_and_says_how_much_is_left_out(lab: SshNodeSet) -> None:
    p = cli(lab, "run", "--json", "--", "head -c 3000000 /dev/zero | tr '\\0' a; echo END; "
            "head -c 5 /dev/zero | tr '\\0' e >&2")
    assert p.returncode == 0, p.stderr
    for d in json.loads(p.stdout):
        assert len(d["stdout"]) == KEEP and d["stdout"].endswith("aaaEND\n")
        assert d["stdout_truncated"] == 3000004 - KEEP
        assert d["stderr"] == "eeeee" and d["stderr_truncated"] == 0


def test_a_long_line_is_printed_in_prefixed_pieces(lab: SshNodeSet) -> None:
    p = cli(lab, "run", "-n", "node1", "--",
            f"head -c {2 * LINE_MAX + 10} /dev/zero | tr '\\0' b; echo; echo next")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[:4] == [b"node1| " + b"b" * LINE_MAX] * 2 + [b"node1| " + b"b" * 10,
                                                                b"node1| next"]


@pytest.mark.parametrize("prog", [LABKIT, INVOKE], ids=["labkit", "invoke"])
def test_out_dir_keeps_every_byte(lab: SshNodeSet, tmp_path: Path, prog: list[str]) -> None:
    out = tmp_path / "a" / "b"
    p = cli(lab, "run", "--json", "--out", str(out), "--",
            "head -c 2500000 /dev/urandom | od -An -tx1 -v | head -c 3000000; "
            "echo $LABKIT_NODE >&2", prog=prog)
    assert p.returncode == 0, p.stderr
    rows = {d["node"]: d for d in json.loads(p.stdout)}
    for node in ("node1", "node2"):
        data = (out / f"{node}.stdout").read_bytes()
        assert len(data) == 3000000
        assert data.endswith(rows[node]["stdout"].encode())
        assert (out / f"{node}.stderr").read_text() == f"{node}\n"


@pytest.mark.parametrize("prog", [LABKIT, INVOKE], ids=["labkit", "invoke"])
def test_out_dir_that_cannot_be_written_is_a_usage_error(lab: SshNodeSet, tmp_path: Path,
                                                         prog: list[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    marker = lab.nodes["node1"].root / "ran"
    for bad in (blocker / "sub", "/proc/labkit-out"):
        p = cli(lab, "run", "--out", str(bad), "--", "touch ran", prog=prog)
        err = p.stderr.decode()
        assert p.returncode == 2, err
        assert err.count("\n") == 1 and err.startswith("error: --out ") and str(bad) in err
        assert not marker.exists(), "the command ran although --out was refused"


def test_client_run_keep_holds_a_bounded_tail_and_counts_the_rest(lab: SshNodeSet) -> None:
    """``keep=`` on ``SshClient.run`` (the ``RemoteShell`` protocol): what ``labkit run`` uses
    instead of a run loop of its own. Every byte still reaches ``on_stdout`` / ``on_stderr``;
    the result holds the last ``keep`` and says how many of the head it left out."""
    node = inv.load(lab.inventory_path).node("node1")
    seen = {"out": 0, "err": 0}

    def count(what: str):
        return lambda data: seen.__setitem__(what, seen[what] + len(data))

    with SshClient.connect(node, Settings(ssh_timeout=10.0, command_timeout=30.0)) as c:
        r = c.run("head -c 700000 /dev/zero | tr '\\0' a; echo END; echo oops >&2",
                  keep=1000, on_stdout=count("out"), on_stderr=count("err"))
        whole = c.run("head -c 300000 /dev/zero")
    assert r.ok and seen == {"out": 700004, "err": 5}
    assert r.stdout == b"a" * 996 + b"END\n" and r.stdout_truncated == 700004 - 1000
    assert r.stderr == b"oops\n" and r.stderr_truncated == 0
    assert len(whole.stdout) == 300000 and whole.stdout_truncated == 0  # default: everything


def test_run_result_reason_is_one_wording_for_run_and_check() -> None:
    """``labkit run``'s node error and ``check``'s ``CommandFailed`` come from the same
    ``RunResult.reason`` (exit codes through ``exit_text``)."""
    def res(**kw: object) -> RunResult:
        return RunResult(**{"exit_code": None, "stdout": b"", "stderr": b"", "seconds": 2.04,
                            **kw})  # type: ignore[arg-type]

    assert res(exit_code=3, stderr=b"x\nbad thing\n").reason() == "exit code 3: bad thing"
    assert res(timed_out=True).reason() == "timed out after 2.0s, remote processes killed"
    assert res(connection_lost=True).reason() == (
        "connection lost after 2.0s (node powered off or rebooted?); no exit status")
    assert res().reason() == "no exit status (the command was killed by a signal?)"
    assert res(exit_code=1).failure("n1") == "n1: exit code 1"


# --- a failed command's reason in its node's error text --------------------------------------

@pytest.mark.parametrize("prog", [LABKIT, INVOKE], ids=["labkit", "invoke"])
def test_run_error_text_ends_with_the_last_stderr_line(lab: SshNodeSet, prog: list[str]) -> None:
    p = cli(lab, "run", "--", 'echo early >&2; echo "tracker: no such pid 99" >&2; echo >&2; '
            '[ "$LABKIT_NODE" = node2 ] && exit 3; true', prog=prog)
    assert p.returncode == 1
    row = [line for line in p.stdout.decode().splitlines() if line.startswith("node2")][0]
    assert row.endswith("exit code 3: tracker: no such pid 99"), row
    p = cli(lab, "run", "--json", "--", "exit 4")
    assert [d["error"] for d in json.loads(p.stdout)] == ["exit code 4", "exit code 4"]


def test_check_failure_carries_the_last_stderr_line(lab: SshNodeSet) -> None:
    """The shared path (``RunResult.failure``, what ``check`` raises with): dirty-rate, node
    preparation and every other ``check`` caller get the command's own reason."""
    node = inv.load(lab.inventory_path).node("node1")
    with SshClient.connect(node, Settings(ssh_timeout=10.0, command_timeout=30.0)) as c:
        with pytest.raises(CommandFailed) as e:
            c.check("printf 'Traceback...\\nValueError: bad \\033[1mpid\\033[0m\\n\\n' >&2; "
                    "exit 5")
    assert str(e.value) == "node1: exit code 5: ValueError: bad  [1mpid [0m"
    assert e.value.value["exit_code"] == 5


# --- paramiko's logger ------------------------------------------------------------------------

def test_paramiko_log_records_never_reach_stderr() -> None:
    """What paramiko's transport thread logs when a connection breaks under it. labkit's own
    warnings still do reach stderr."""
    code = ("import logging, labkit.ssh.client\n"
            "logging.getLogger('paramiko.transport').error('Socket exception: reset (104)')\n"
            "logging.getLogger('paramiko.transport').error('Exception (client): boom')\n"
            "logging.getLogger('labkit.ssh').warning('labkit says')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.stderr == "labkit says\n"


def test_power_off_mid_run_leaves_no_paramiko_line(tmp_path: Path) -> None:
    """Nodes powered off while they stream output to `run`: each node fails with "connection
    lost", and stderr holds nothing but the streamed lines (a reset connection used to add
    paramiko's "Socket exception: Connection reset by peer (104)" now and then). The last
    round powers off only once every node's output is flowing (its exec was answered), and
    reads the table: the error says the connection was lost (``RunResult.reason``)."""
    lab = start_fake_lab(tmp_path, count=3, power_on=True)
    try:
        for round_ in range(3):
            watch = round_ == 2
            # lines of 1 KB: the prefixing of what the SSH windows hold at power-off stays quick
            proc = subprocess.Popen([*LABKIT, "run", "--",
                                     "yes $(printf %01000d 0) | head -c 4000000000"],
                                    env=lab.env, cwd=tmp_path,
                                    stdout=subprocess.PIPE if watch else subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            end = time.monotonic() + 30
            while sum("head -c" in p for p in lab.processes()) < 3:
                assert proc.poll() is None and time.monotonic() < end, proc.communicate()
                time.sleep(0.02)
            if watch:
                assert proc.stdout is not None
                streaming: set[str] = set()
                while len(streaming) < 3:
                    line = proc.stdout.readline()
                    assert line, proc.communicate()
                    streaming.add(line.split("|")[0])
            lab.control.power("*", "off", now=True)
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 1, err
            assert [line for line in err.splitlines() if "| " not in line] == [], err
            if watch:
                rows = [line for line in out.splitlines()
                        if line.split(" ")[0] in ("node1", "node2", "node3")]
                assert len(rows) == 3 and all("connection lost" in r for r in rows), rows
            lab.power_on_all()
    finally:
        lab.stop()


def test_a_read_that_meets_the_dead_socket_first_is_a_lost_connection(tmp_path: Path) -> None:
    """What the power-off test above met once in a CI run: the socket had died for sending
    before paramiko's reader thread saw it go, and the run loop's next read (a read grants the
    peer window: a send) raised EOFError, which reached the table as "connection closed
    unexpectedly (EOF)". Made to happen every time here: the lab's process is stopped (so no
    data and no EOF can arrive), the client's socket is shut for writing, and the loop reads
    what paramiko holds. The result says the connection was lost, nothing raises, and the
    output holds what paramiko held but the piece the failed read took."""
    lab = start_fake_lab(tmp_path, count=1, power_on=True)
    try:
        node = lab.inventory().node("node1")
        with SshClient.connect(node, Settings(ssh_timeout=10.0, command_timeout=60.0)) as c:
            proc = c.open_exec("yes | head -c 1000000000", window=STREAM_WINDOW)
            proc.channel.shutdown_write()  # what run_to_end does first (a send: do it now)
            # a read's worth and more: the first read (past paramiko's threshold for a window
            # grant) meets the dead socket, and what it leaves is still read
            end = time.monotonic() + 30
            while len(proc.channel.in_buffer) < 2 * READ_SIZE:
                assert time.monotonic() < end, len(proc.channel.in_buffer)
                time.sleep(0.01)
            os.kill(lab.pid, signal.SIGSTOP)
            try:
                held = len(proc.channel.in_buffer)
                c.transport.sock.shutdown(socket.SHUT_WR)
                r = run_to_end(proc, started=time.monotonic(), deadline=time.monotonic() + 30)
            finally:
                os.kill(lab.pid, signal.SIGCONT)
        assert r.connection_lost and r.exit_code is None and not r.timed_out, r
        assert r.reason().startswith("connection lost after"), r.reason()
        assert len(r.stdout) >= held - READ_SIZE, (held, len(r.stdout))  # all but that read
    finally:
        lab.stop()
