"""tests/suite.py, which ``make test`` runs: the guest tests in a pytest process of their own,
alongside the rest, with one exit status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402

SUITE = Path(suite.__file__)


@pytest.mark.parametrize(("args", "expr", "rest"), [
    ([], None, []),
    (["-x", "-m", "not slow", "-k", "tcp"], "not slow", ["-x", "-k", "tcp"]),
    (["-mslow", "-m", "interop"], "interop", []),
    (["-m=slow", "--maxfail=2"], "slow", ["--maxfail=2"]),
])
def test_a_marker_expression_narrows_both_halves(args, expr, rest) -> None:
    assert suite.split_marker(args) == (expr, rest)
    assert suite.half(expr, "vm") == ("vm" if expr is None else f"({expr}) and vm")


@pytest.mark.parametrize(("rest_rc", "guests_rc", "rc"), [
    (0, 0, 0), (0, 5, 0), (5, 0, 0), (5, 5, 5), (1, 0, 1), (0, 1, 1), (2, 1, 2), (5, 3, 3),
    (-2, 0, 130), (0, -9, 137)])
def test_one_exit_status(rest_rc, guests_rc, rc) -> None:
    assert suite.combined(rest_rc, guests_rc) == rc


def test_both_halves_run_and_report() -> None:
    """A real run on a small selection: one test of each half; then a failing selection."""
    guest = "tests/test_vm_nodes.py::test_console_tail_keeps_a_panics_cause"
    r = subprocess.run([sys.executable, str(SUITE), "-p", "no:cacheprovider",
                        "tests/test_suite.py::test_one_exit_status", guest],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rest_out, _, guest_out = r.stdout.partition("=== the guest tests (marker vm), run alongside")
    assert "10 passed, 1 deselected" in rest_out, r.stdout
    assert "1 passed" in guest_out or "1 skipped" in guest_out, r.stdout
    assert r.stdout.rstrip().endswith("rest exit 0, guest tests exit 0: exit 0")
    r = subprocess.run([sys.executable, str(SUITE), "-p", "no:cacheprovider",
                        "tests/test_suite.py", "-k", "no_such_test"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 5, r.stdout + r.stderr
