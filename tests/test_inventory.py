"""Inventory validation: every malformed case is one line naming file:line, exit 2 via the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from labkit import inventory as inv
from labkit.errors import InventoryError, UserError

GOOD = """\
defaults:
  bmc: {user: admin, password_env: LAB_BMC_PASSWORD, port: 623}
  ssh: {user: root, port: 22}
groups:
  rack1: [sun20, sun21]
nodes:
  sun20:
    bmc: {host: sun20-sp}
    ssh: {host: sun20}
  sun21:
    bmc: {host: sun21-sp, port: 6230}
    ssh: {host: sun21, port: 2222}
  sun22:
    ssh: {host: sun22}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "inventory.yaml"
    p.write_text(textwrap.dedent(text))
    return p


@pytest.fixture(autouse=True)
def _password_env(monkeypatch):
    monkeypatch.setenv("LAB_BMC_PASSWORD", "s3cret-pw")


def test_good_inventory_loads_with_defaults_merged(tmp_path):
    i = inv.load(write(tmp_path, GOOD))
    assert list(i.nodes) == ["sun20", "sun21", "sun22"]
    assert i.nodes["sun20"].bmc.port == 623 and i.nodes["sun21"].bmc.port == 6230
    assert i.nodes["sun21"].ssh.port == 2222 and i.nodes["sun20"].ssh.user == "root"
    assert i.nodes["sun22"].bmc is None
    assert i.nodes["sun20"].bmc.password().reveal() == b"s3cret-pw"
    assert "s3cret" not in repr(i.nodes["sun20"].bmc.password())


@pytest.mark.parametrize("sel,expect", [
    (None, ["sun20", "sun21", "sun22"]),
    ("@all", ["sun20", "sun21", "sun22"]),
    ("sun21", ["sun21"]),
    ("sun2[01]", ["sun20", "sun21"]),
    ("@rack1,sun22", ["sun20", "sun21", "sun22"]),
    ("sun22, sun20", ["sun20", "sun22"]),
    ("sun*", ["sun20", "sun21", "sun22"]),
])
def test_select(tmp_path, sel, expect):
    i = inv.load(write(tmp_path, GOOD))
    assert [n.name for n in i.select(sel)] == expect


@pytest.mark.parametrize("sel,msg", [
    ("nope", "unknown node 'nope'"),
    ("@rack9", "unknown group '@rack9'"),
    ("x*", "matches no node"),
    ("sun20,,sun21", "empty item"),
])
def test_bad_selectors(tmp_path, sel, msg):
    i = inv.load(write(tmp_path, GOOD))
    with pytest.raises(UserError, match=msg):
        i.select(sel)


# (inventory text, expected line, expected message fragment)
BAD = [
    ("nodes: [a, b\n", 2, "YAML syntax error"),
    ("nodes:\n  n1:\n    bmc: {host: h, password_env: LAB_BMC_PASSWORD}\n  n1:\n    ssh: {host: x}\n", 4, "duplicate key 'n1'"),
    ("", 1, "empty inventory"),
    ("groups: {}\n", 1, "no nodes"),
    ("nodes: {}\n", 1, "nodes: is empty"),
    ("nodes: [n1, n2]\n", 1, "nodes must be a mapping"),
    ("nodez:\n  n1: {ssh: {host: h}}\n", 1, "unknown key 'nodez'"),
    ("nodes:\n  n1:\n    ssh: {host: h, prot: 22}\n", 3, "unknown key 'prot'"),
    ("nodes:\n  n1:\n    bmc: {port: 623, password_env: LAB_BMC_PASSWORD}\n", 3, "missing host"),
    ("nodes:\n  n1:\n    ssh: {port: 22}\n", 3, "missing host"),
    ("nodes:\n  n1:\n    ssh: {host: h, port: 70000}\n", 3, "port number"),
    ("nodes:\n  n1:\n    ssh: {host: h, port: twenty}\n", 3, "port number"),
    ("nodes:\n  n1:\n    ssh: {host: h, port: -1}\n", 3, "port number"),
    ("nodes:\n  n1:\n    bmc: {host: h, password_env: NOT_SET_ANYWHERE_XYZ}\n", 3, "NOT_SET_ANYWHERE_XYZ is not set"),
    ("nodes:\n  n1:\n    bmc: {host: h, password_file: /nonexistent/pw}\n", 3, "not readable"),
    ("nodes:\n  n1:\n    bmc: {host: h}\n", 3, "no password_env or password_file"),
    ("nodes:\n  n1:\n    bmc: {host: h, password_env: LAB_BMC_PASSWORD, password_file: /x}\n", 3, "only one of"),
    ("nodes:\n  'bad name':\n    ssh: {host: h}\n", 2, "bad node name"),
    ("nodes:\n  n1: {}\n", 2, "neither bmc: nor ssh:"),
    ("nodes:\n  n1:\n    ssh: {host: h}\ngroups:\n  g: [n1, n9]\n", 5, "unknown node 'n9'"),
    ("nodes:\n  n1:\n    ssh: {host: h}\ngroups:\n  g: n1\n", 5, "list of node names"),
    ("nodes:\n  n1:\n    ssh: {host: h}\ngroups:\n  all: [n1]\n", 5, "bad group name"),
    ("nodes:\n  n1:\n    ssh: {host: h}\ngroups:\n  g: [n1, n1]\n", 5, "listed twice"),
    ("nodes:\n  n1:\n    ssh: {host: ''}\n", 3, "non-empty string"),
    ("nodes:\n  n1:\n    ssh: {host: h, trust_on_first_use: maybe}\n", 3, "true or false"),
    ("nodes:\n  n1:\n    ssh: host\n", 3, "must be a mapping"),
    ("defaults:\n  bmc: {colour: red}\nnodes:\n  n1: {ssh: {host: h}}\n", 2, "unknown key 'colour'"),
    ("defaults:\n  power: {}\nnodes:\n  n1: {ssh: {host: h}}\n", 2, "unknown key 'power'"),
    ("nodes:\n  a:\n    bmc: {host: h, password_env: LAB_BMC_PASSWORD}\n  b:\n    bmc: {host: h, password_env: LAB_BMC_PASSWORD}\n", 4, "same BMC h:623"),
    ("nodes:\n  n1: {ssh: {host: h}}\nfake_lab: {power_delay: [3, 1]}\n", 3, "min <= max"),
    ("nodes:\n  n1: {ssh: {host: h}}\nfake_lab: {boot_delay: -2}\n", 3, "number >= 0"),
    ("nodes:\n  n1: {ssh: {host: h}}\nfake_lab: {sshd: dropbear}\n", 3, "python or openssh"),
    ("nodes:\n  n1: {ssh: {host: h}}\npayloads: bundle\n", 3, "list of paths"),
    ("nodes:\n  n1:\n    ssh: {host: h}\n\tbad: tab\n", 4, "YAML syntax error"),
]


@pytest.mark.parametrize("text,line,msg", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_inventory_names_file_and_line(tmp_path, text, line, msg):
    path = write(tmp_path, text)
    with pytest.raises(InventoryError) as ei:
        inv.load(path)
    err = str(ei.value)
    assert err.startswith(f"{path}:{line}: "), err
    assert msg in err
    assert "\n" not in err


def test_literal_password_is_warned_about(tmp_path, capsys):
    path = write(tmp_path, "nodes:\n  n1:\n    bmc: {host: h, password: hunter22}\n")
    i = inv.load(path)
    assert i.nodes["n1"].bmc.password().reveal() == b"hunter22"
    err = capsys.readouterr().err
    assert f"{path}:3" in err and "literal BMC password" in err and "hunter22" not in err


def test_password_file_relative_to_inventory(tmp_path):
    (tmp_path / "pw").write_text("from-file\n")
    path = write(tmp_path, "nodes:\n  n1:\n    bmc: {host: h, password_file: pw}\n")
    assert inv.load(path).nodes["n1"].bmc.password().reveal() == b"from-file"


def test_missing_secret_checked_lazily_when_asked(tmp_path):
    path = write(tmp_path, "nodes:\n  n1:\n    bmc: {host: h, password_file: later}\n")
    i = inv.load(path, check_secrets=False)
    with pytest.raises(UserError, match=r"inventory.yaml:3: password_file .*later"):
        i.nodes["n1"].bmc.password()


def test_inventory_env_var_and_missing_file(tmp_path, monkeypatch):
    path = write(tmp_path, GOOD)
    monkeypatch.setenv(inv.ENV_VAR, str(path))
    assert inv.find_inventory() == path
    with pytest.raises(UserError, match="inventory not found"):
        inv.find_inventory(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text", [b[0] for b in BAD[:12]])
def test_cli_bad_inventory_exit_2_one_line(tmp_path, text):
    """Through the real CLI: one line on stderr, exit 2, no traceback."""
    path = write(tmp_path, text)
    env = dict(os.environ, LAB_BMC_PASSWORD="x")
    r = subprocess.run([sys.executable, "-m", "labkit.cli", "power-status", "--inventory", str(path)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:"), r.stderr
    assert "Traceback" not in r.stderr
