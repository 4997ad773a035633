"""tests/suite.py, which ``make test`` runs: the guest tests in a pytest process of their own,
alongside the rest, with one exit status; real runs of it on small selections."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402

SUITE = Path(suite.__file__)
SELFTEST = "LABKIT_SUITE_SELFTEST"  # what the two target tests below do (unset: they skip)
GUEST = "tests/test_vm_nodes.py::test_console_tail_keeps_a_panics_cause"  # vm, boots nothing
STATUSES = [(0, 0, 0), (0, 5, 0), (5, 0, 0), (5, 5, 5), (1, 0, 1), (0, 1, 1), (2, 1, 2),
            (5, 3, 3), (-2, 0, 130), (0, -9, 137)]


@pytest.mark.parametrize(("rest_rc", "guests_rc", "rc"), STATUSES)
def test_one_exit_status(rest_rc, guests_rc, rc) -> None:
    assert suite.combined(rest_rc, guests_rc) == rc


def run_suite(*args: str, extra_env: dict[str, str] | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTEST_ADDOPTS", suite.HALF_VAR, SELFTEST)}
    return subprocess.run([sys.executable, str(SUITE), "-p", "no:cacheprovider", *args],
                          env={**env, **(extra_env or {})}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def target() -> Iterator[None]:
    """The target tests' fixture: notes its setup and teardown in the folder named after
    ``sleep:`` in LABKIT_SUITE_SELFTEST."""
    what = os.environ.get(SELFTEST, "")
    folder = Path(what.split(":", 1)[1]) if what.startswith("sleep:") else None
    half = os.environ.get(suite.HALF_VAR)
    if folder is not None:
        (folder / f"setup-{half}").touch()
    yield
    if folder is not None:
        (folder / f"teardown-{half}").touch()


def _act() -> None:
    what = os.environ.get(SELFTEST, "")
    if what == "fail":
        pytest.fail("asked to fail (a nested run of tests/test_suite.py)")
    if what.startswith("sleep:"):
        time.sleep(120)


@pytest.mark.skipif(SELFTEST not in os.environ, reason="run by test_suite.py's own suite runs")
def test_selftest_target(target) -> None:
    _act()


@pytest.mark.vm
@pytest.mark.skipif(SELFTEST not in os.environ, reason="run by test_suite.py's own suite runs")
def test_selftest_target_vm(target) -> None:
    _act()


def test_both_halves_run_each_their_own_and_report() -> None:
    r = run_suite("tests/test_suite.py::test_one_exit_status", GUEST)
    assert r.returncode == 0, r.stdout + r.stderr
    rest_out, _, guest_out = r.stdout.partition("=== the guest tests (marker vm), run alongside")
    assert f"{len(STATUSES)} passed, 1 deselected" in rest_out, r.stdout
    assert re.search(r"\b1 (passed|skipped), \d+ deselected", guest_out), r.stdout
    log = re.search(r"live in (\S+)\)", r.stdout).group(1)
    assert not os.path.exists(log)  # passed: nothing to keep
    assert r.stdout.rstrip().endswith("suite: exit 0 (the rest: 0, the guest tests: 0)")


def test_a_marker_expression_narrows_both_halves() -> None:
    """-m is pytest's own, in both halves: the guest test chosen is slow (all of
    test_vm_nodes is), test_one_exit_status is not."""
    r = run_suite("-m", "not slow", "tests/test_suite.py::test_one_exit_status", GUEST)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "suite: exit 0 (the rest: 0, the guest tests: 5)" in r.stdout
    assert f"{len(STATUSES)} passed, 1 deselected" in r.stdout
    r = run_suite("-m", "slow", "-k", "panics or one_exit", "tests/test_suite.py", GUEST)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "suite: exit 0 (the rest: 5, the guest tests: 0)" in r.stdout
    assert re.search(r"\b1 (passed|skipped), \d+ deselected", r.stdout), r.stdout


@pytest.mark.parametrize(("which", "status"), [("test_selftest_target", "the rest: 1, "
                                                "the guest tests: 5"),
                                               ("test_selftest_target_vm", "the rest: 5, "
                                                "the guest tests: 1")])
def test_a_failing_half_fails_the_suite_and_its_log_is_kept(which: str, status: str) -> None:
    r = run_suite(f"tests/test_suite.py::{which}", extra_env={SELFTEST: "fail"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"suite: exit 1 ({status})" in r.stdout, r.stdout
    assert "asked to fail" in r.stdout
    log = re.search(r"live in (\S+)\)", r.stdout).group(1)
    if which.endswith("_vm"):
        assert f"the guest tests' log is kept in {log}" in r.stdout
        assert "asked to fail" in Path(log).read_text()
        os.unlink(log)
    else:
        assert not os.path.exists(log)


def test_options_with_one_output_for_the_run_are_refused() -> None:
    r = run_suite("--junitxml=out.xml", "tests/test_suite.py::test_one_exit_status")
    assert r.returncode == 4 and r.stdout == "", r
    assert r.stderr.count("\n") == 1 and "--junitxml names one output" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_tears_both_halves_down(tmp_path: Path, sig: int) -> None:
    """A CI job's SIGTERM (or ^C) reaches each half once, as SIGINT: each pytest runs its
    fixtures' teardown (where labs stop and guests end) and the suite exits with pytest's
    'interrupted' status."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTEST_ADDOPTS", suite.HALF_VAR)}
    env[SELFTEST] = f"sleep:{tmp_path}"
    p = subprocess.Popen([sys.executable, str(SUITE), "-p", "no:cacheprovider",
                          "tests/test_suite.py::test_selftest_target",
                          "tests/test_suite.py::test_selftest_target_vm"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while {f.name for f in tmp_path.iterdir()} != {"setup-vm", "setup-rest"}:
            assert time.monotonic() < deadline, "the halves never started their tests"
            time.sleep(0.05)
        p.send_signal(sig)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert {f.name for f in tmp_path.iterdir()} == {
        "setup-vm", "setup-rest", "teardown-vm", "teardown-rest"}, out
    assert p.returncode == 2, out  # pytest's "interrupted"
    assert "suite: exit 2 (the rest: 2, the guest tests: 2)" in out, out
