"""lab.up / lab.status / lab.fault / lab.down through the installed ``labkit`` program, as a
user runs them (subprocesses, real lab process), including exit codes 0/1/2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from labkit.fake import lab as fake_lab


def labkit_cmd() -> list[str]:
    exe = shutil.which("labkit") or str(Path(sys.executable).with_name("labkit"))
    if not os.path.exists(exe):
        pytest.skip("the labkit program is not installed in this environment")
    return [exe]


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LABKIT_INVENTORY"}
    return subprocess.run(labkit_cmd() + list(args), cwd=cwd, capture_output=True, text=True,
                          timeout=60, env=env)


def run_many(cwd: Path, *argvs: list[str]) -> list[subprocess.CompletedProcess]:
    """Independent invocations in parallel: each pays Python + Invoke start-up."""
    env = {k: v for k, v in os.environ.items() if k != "LABKIT_INVENTORY"}
    procs = [subprocess.Popen(labkit_cmd() + a, cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for a in argvs]
    out = []
    for a, p in zip(argvs, procs):
        stdout, stderr = p.communicate(timeout=60)
        out.append(subprocess.CompletedProcess(a, p.returncode, stdout, stderr))
    return out


@pytest.mark.slow  # end to end: every lab task
def test_lab_tasks_end_to_end(tmp_path: Path):
    r = run(tmp_path, "lab.up", "--count", "3")
    try:
        assert r.returncode == 0, r.stderr
        inventory = Path(r.stdout.strip().splitlines()[-1])
        assert inventory == (tmp_path / ".lab" / "inventory.yaml").resolve()
        state = inventory.parent
        password = (state / "bmc-password").read_bytes().strip()
        assert oct((state / "bmc-password").stat().st_mode & 0o777) == "0o600"
        assert oct((state / "id_ed25519").stat().st_mode & 0o777) == "0o600"
        assert (state / "id_ed25519.pub").exists() and (state / "known_hosts").exists()
        assert {p.name for p in (state / "nodes").iterdir()} >= {"node1", "node2", "node3"}

        i = ["-i", str(inventory)]
        again, st, js = run_many(tmp_path, ["lab.up", *i], ["lab.status", *i],
                                 ["lab.status", *i, "--json"])
        assert again.returncode == 0 and "already running" in again.stdout
        assert st.returncode == 0, st.stderr
        assert "node3" in st.stdout and "3 node(s), 3 ok" in st.stdout
        rows = json.loads(js.stdout)
        assert [r["node"] for r in rows] == ["node1", "node2", "node3"]
        assert all(r["power"] == "off" and r["ssh"] is False for r in rows)

        f = run(tmp_path, "lab.fault", "-i", str(inventory), "-n", "node1,node2", "--busy",
                "3", "--hang", "--drop", "0.1", "--power-delay", "0.5,2", "--json")
        assert f.returncode == 0, f.stderr
        faults = {r["node"]: r for r in json.loads(f.stdout)}
        assert set(faults) == {"node1", "node2"}
        assert faults["node1"]["busy"] == 3 and faults["node1"]["hang"] is True
        assert faults["node2"]["power_delay"] == [0.5, 2.0]
        f, cold = run_many(tmp_path, ["lab.fault", *i, "-n", "node1", "--no-hang"],
                           ["lab.fault", *i, "-n", "node3", "--cold-reset"])
        assert f.returncode == 0 and "node1" in f.stdout
        assert cold.returncode == 0, cold.stderr
        rows = json.loads(run(tmp_path, "lab.status", *i, "--json").stdout)
        by = {r["node"]: r for r in rows}
        assert by["node1"]["faults"]["hang"] is False and by["node2"]["faults"]["hang"] is True
        assert run(tmp_path, "lab.fault", *i, "--clear").returncode == 0

        # usage errors: exit 2, one line, no traceback; and status shows the clear
        bads = (["-n", "nodeX", "--hang"], [], ["--drop", "2"], ["--power-delay", "3,1"],
                ["--hang", "--no-hang"])
        *errs, js = run_many(tmp_path, *(["lab.fault", *i, *b] for b in bads),
                             ["lab.status", *i, "--json"])
        for bad, e in zip(bads, errs):
            assert e.returncode == 2, (bad, e.stdout, e.stderr)
            assert e.stderr.startswith("error: ") and "Traceback" not in e.stderr
        assert all(not any(r["faults"].values()) for r in json.loads(js.stdout))
        everything = "".join(p.read_text(errors="replace") for p in state.glob("*.log"))
        assert password.decode() not in everything
    finally:
        down = run(tmp_path, "lab.down")
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not (tmp_path / ".lab" / "lab.pid").exists()
    gone = run(tmp_path, "lab.status", "-i", str(inventory))
    assert gone.returncode == 1 and "not running" in gone.stderr


def test_generate_and_module_cli(tmp_path: Path):
    path = fake_lab.generate(2, tmp_path / "g", ssh=False, power_delay=(0.1, 0.2))
    text = path.read_text()
    assert "node2" in text and "    ssh:" not in text and "password_file: bmc-password" in text
    from labkit import inventory

    inv = inventory.load(path, check_secrets=False)
    assert inv.fake_lab is not None and inv.fake_lab.state_dir == path.parent
    assert inv.fake_lab.power_delay == (0.1, 0.2)
    r = subprocess.run([sys.executable, "-m", "labkit.fake.lab", "up", "-i", str(path)],
                       capture_output=True, text=True, timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["started"] is True
        st = fake_lab.status(path)
        assert st is not None and set(st) == {"node1", "node2"}
    finally:
        assert fake_lab.down(path) is True
    assert fake_lab.status(path) is None
    assert fake_lab.down(path) is False


def test_port_in_use_is_a_clear_error(tmp_path: Path):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        path = fake_lab.generate(1, tmp_path / "p", ssh=False, bmc_base=port)
        from labkit.errors import LabkitError

        with pytest.raises(LabkitError, match=f"cannot bind fake BMC node1 on 127.0.0.1:{port}"):
            fake_lab.up(path, timeout=20)


def _sleeper(*extra: str) -> subprocess.Popen:
    """An unrelated live process (its own session, as a lab would be) for lab.pid to name.
    Returned once it runs Python code: Popen returns when the child's close-on-exec fds close,
    early in execve(), before the kernel has set up the new argv, and /proc/PID/cmdline reads
    empty until then (as for any process still in exec, which is not a lab)."""
    p = subprocess.Popen([sys.executable, "-c",
                          "import sys, time; print('ready', flush=True); time.sleep(60)", *extra],
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert p.stdout is not None
    with p.stdout:  # it writes nothing more
        assert p.stdout.readline().strip() == "ready"
    return p


def _assert_untouched(p: subprocess.Popen) -> None:
    # down() signals synchronously, and its SIGTERM/SIGKILL would end the sleeper at once
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(timeout=0.5)
    # (a failure here with returncode -15/-9 while down() sent nothing can also be another
    # run's `pkill -f "labkit.fake.lab serve"`: the sleeper's argv matches that pattern)


def test_down_with_a_stale_pid_file_signals_nothing(tmp_path: Path):
    """lab.pid left behind (the lab crashed, the machine rebooted) names a pid that now belongs
    to an unrelated process: lab.down / down() must report "not running" and leave it alone."""
    state = tmp_path / ".lab"
    state.mkdir()
    p = _sleeper()
    try:
        (state / fake_lab.PID_FILE).write_text(f"{p.pid}\n")
        assert fake_lab._pid(state) is None
        assert fake_lab.down(state_dir=state) is False
        assert not (state / fake_lab.PID_FILE).exists()
        _assert_untouched(p)
        (state / fake_lab.PID_FILE).write_text(f"{p.pid}\n")
        r = run(tmp_path, "lab.down")
        assert r.returncode == 0 and "not running" in r.stdout, (r.stdout, r.stderr)
        assert not (state / fake_lab.PID_FILE).exists()
        _assert_untouched(p)
    finally:
        p.kill()
        p.wait()


def test_down_checks_the_start_time_too(tmp_path: Path):
    """A process that even looks like a lab (``labkit.fake.lab serve`` in its argv) but did
    not start when the lab that wrote lab.pid did is another process under a reused pid."""
    state = tmp_path / ".lab"
    state.mkdir()
    p = _sleeper("labkit.fake.lab", "serve")
    try:
        start = fake_lab._start_time(p.pid)
        assert start is not None
        (state / fake_lab.PID_FILE).write_text(f"{p.pid} {start}\n")
        assert fake_lab._pid(state) == p.pid  # the right start time: that is the lab
        (state / fake_lab.PID_FILE).write_text(f"{p.pid} {start + 1}\n")
        assert fake_lab._pid(state) is None
        assert fake_lab.down(state_dir=state) is False
        _assert_untouched(p)
    finally:
        p.kill()
        p.wait()


def test_lab_pid_file_holds_pid_and_start_time(tmp_path: Path):
    """The lab records its start time beside its pid, and down() stops it by them."""
    from labkit.fake.harness import start_fake_lab

    lab = start_fake_lab(tmp_path, count=1, ssh=False)
    try:
        pid, start = map(int, (lab.state_dir / fake_lab.PID_FILE).read_text().split())
        assert pid == lab.pid and start == fake_lab._start_time(lab.pid)
    finally:
        assert fake_lab.down(state_dir=lab.state_dir) is True
    assert not (lab.state_dir / fake_lab.PID_FILE).exists()
