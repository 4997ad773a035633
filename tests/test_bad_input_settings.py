"""Issue 9, the siblings of a bad flag: bad values in labkit's settings (config files and the
environment) are one line, exit 2, through ``labkit`` and ``invoke``; a node's error is named
by its node once, never ``node2: node2: ...``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from labkit.config import Settings, parse_number
from labkit.errors import UserError
from labkit.fanout import Outcome, named

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = {"labkit": [sys.executable, "-m", "labkit.cli"],
            "invoke": [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]}


@pytest.mark.parametrize("data, words", [
    ({"parallel": "nan"}, ["labkit.parallel", "nan"]),
    ({"parallel": 1.5}, ["labkit.parallel", "whole number"]),
    ({"parallel": 0}, ["labkit.parallel", ">= 1"]),
    ({"bmc_timeout": float("inf")}, ["labkit.bmc_timeout", "finite"]),
    ({"bmc_timeout": 0}, ["labkit.bmc_timeout", "> 0"]),
    ({"retry_window": "1e999"}, ["labkit.retry_window", "finite"]),
    ({"command_timeout": -1}, ["labkit.command_timeout"]),
    ({"trust_on_first_use": "maybe"}, ["labkit.trust_on_first_use", "maybe"]),
    ({"results_dir": 83}, ["labkit.results_dir", "quote"]),       # `results_dir: 0123`
    ({"lease_dir": 0.5}, ["labkit.lease_dir", "quote"]),          # `lease_dir: .5`
    ({"progress": "sometimes"}, ["labkit.progress", "sometimes"]),
])
def test_bad_setting_is_one_user_error(data: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(UserError) as ei:
        Settings.from_mapping(data)
    for w in words:
        assert w in str(ei.value), str(ei.value)


def test_good_settings_still_read() -> None:
    s = Settings.from_mapping({"parallel": "8", "bmc_timeout": "2.5", "retry_window": 0,
                               "trust_on_first_use": "yes", "results_dir": "out",
                               "progress": "never"})
    assert (s.parallel, s.bmc_timeout, s.retry_window, s.trust_on_first_use) == (8, 2.5, 0.0,
                                                                                  True)


@pytest.mark.parametrize("text, integer, words", [
    ("nan", False, "expected a number"), ("inf", False, "expected a number"),
    ("-inf", False, "expected a number"), ("1e999", False, "finite"),
    ("0x10", True, "whole number"), ("1.5", True, "whole number"), ("1e3", True, "whole"),
    ("", False, "expected a number"), (" ", True, "whole number"), ("1_000", False, "number"),
])
def test_the_one_number_parser_refuses(text: str, integer: bool, words: str) -> None:
    with pytest.raises(UserError, match=words):
        parse_number(text, "--x", integer=integer)


def test_the_one_number_parser_reads_plain_decimals() -> None:
    assert parse_number(" 42 ", "--x", integer=True) == 42
    assert parse_number("-0.5e1", "--x") == -5.0 and parse_number(".5", "--x") == 0.5
    assert parse_number(3, "--x") == 3.0 and isinstance(parse_number(3, "--x"), float)


@pytest.mark.parametrize("prog", list(PROGRAMS))
@pytest.mark.parametrize("yaml_text, words", [
    ("labkit:\n  parallel: .nan\n", ["labkit.parallel"]),
    ("labkit:\n  results_dir: 0123\n", ["labkit.results_dir", "quote"]),
    ("labkit:\n  bmc_timeout: .inf\n", ["labkit.bmc_timeout"]),
], ids=["parallel-nan", "results-dir-octal", "timeout-inf"])
def test_bad_config_file_one_line_exit_2(tmp_path: Path, prog: str, yaml_text: str,
                                         words: list[str]) -> None:
    """A runtime config file (-f) with a YAML-typed value: one line through both programs,
    before the inventory is even read (there is none here)."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml_text)
    r = subprocess.run([*PROGRAMS[prog], "-f", str(cfg), "power-status", "--inventory", "/nonexistent.yaml"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config labkit."), r.stderr
    for w in words:
        assert w in lines[0]


@pytest.mark.parametrize("prog", list(PROGRAMS))
@pytest.mark.parametrize("var, value", [("PARALLEL", "nan"), ("PARALLEL", "1.5"),
                                        ("BMC_TIMEOUT", "inf"), ("TRUST_ON_FIRST_USE", "maybe")])
def test_bad_setting_in_the_environment_one_line_exit_2(tmp_path: Path, prog: str, var: str,
                                                        value: str) -> None:
    """Invoke casts INVOKE_LABKIT_* itself (a traceback for nan, True for 'maybe') unless
    the value it overrides is None: labkit's config layer hands it None."""
    env = {**os.environ, f"INVOKE_LABKIT_{var}": value}
    r = subprocess.run([*PROGRAMS[prog], "power-status", "--inventory", "/nonexistent.yaml"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == r.stderr.strip().splitlines()[0], r.stderr
    assert f"labkit.{var.lower()}" in r.stderr and value in r.stderr, r.stderr


# --- "node2: node2: ..." ------------------------------------------------------------------

def test_named_prefixes_a_node_once() -> None:
    assert named("node2", "node2: BMC 127.0.0.1:623: timeout") == \
        "node2: BMC 127.0.0.1:623: timeout"
    assert named("node2", "node2 (via jump): refused") == "node2 (via jump): refused"
    assert named("node2", "BMC timeout") == "node2: BMC timeout"
    assert named("node2", "node20: x") == "node2: node20: x"  # another node's name is kept
    assert Outcome("n1", False, error="n1: exit code 3").line() == "n1: exit code 3"


def test_prepare_failure_names_the_node_once(make_fake_lab: Any, tmp_path: Path) -> None:
    """migrate-test whose destination BMC does not answer: the prepare step's summary once
    read ``node2: node2: BMC ...``."""
    lab = make_fake_lab(count=2, seed=9)
    lab.control.fault("node2", down=True)
    env = {**os.environ, "INVOKE_LABKIT_RETRY_WINDOW": "1", "INVOKE_LABKIT_BMC_TIMEOUT": "0.5",
           "INVOKE_LABKIT_POWER_WAIT": "20", "INVOKE_LABKIT_RESULTS_DIR": str(tmp_path / "r"),
           "INVOKE_LABKIT_LEASE_DIR": str(tmp_path / "leases")}
    r = subprocess.run([*PROGRAMS["labkit"], "migrate-test", "--inventory",
                        str(lab.inventory_path), "--no-deploy", "--size", "64K"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "node2: BMC" in out and "node2: node2" not in out, out
