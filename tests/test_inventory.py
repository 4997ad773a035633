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


# --- issue 9: selectors that select nothing by accident ----------------------------------

@pytest.mark.parametrize("sel", ["", " ", ",", ",,", ",  ,", " , "])
def test_selector_that_selects_nothing_is_refused_not_all(tmp_path, sel):
    """`-n ""` (an unset shell variable) once meant every node; only a missing -n does."""
    i = inv.load(write(tmp_path, GOOD))
    with pytest.raises(UserError, match="empty node selector"):
        i.select(sel)
    assert len(i.select(None)) == 3


# --- issue 9: files the inventory names, checked at load ---------------------------------

def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _folder(p: Path) -> None:
    p.mkdir()


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _huge(p: Path) -> None:
    with open(p, "wb") as f:  # sparse: 200 MB in the size, nothing on disk
        f.truncate(200 << 20)


def _dangling(p: Path) -> None:
    p.symlink_to(p.parent / "gone")


def _device(p: Path) -> None:
    p.symlink_to("/dev/zero")  # a device through a symlink: stat follows it


FILE_KINDS = [(_fifo, "FIFO"), (_folder, "a folder"), (_empty, "is empty"),
              (_huge, "more than"), (_dangling, "dangling symlink"), (_device, "a device")]
FILE_FIELDS = [
    ("bmc", "password_file", "nodes:\n  n1:\n    bmc: {{host: h, password_file: {p}}}\n"),
    ("ssh", "key_file", "nodes:\n  n1:\n    ssh: {{host: h, key_file: {p}}}\n"),
    ("ssh", "known_hosts", "nodes:\n  n1:\n    ssh: {{host: h, known_hosts: {p}}}\n"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("make, msg", FILE_KINDS, ids=[k[1].split()[-1] for k in FILE_KINDS])
@pytest.mark.parametrize("block, key, text", FILE_FIELDS, ids=[f[1] for f in FILE_FIELDS])
def test_file_fields_checked_at_load_with_file_and_line(tmp_path, make, msg, block, key, text):
    """A folder, FIFO, device, empty, huge or dangling file is refused at LOAD with file:line
    (a FIFO once hung forever, a huge file ended in MemoryError, others failed per node)."""
    if key == "known_hosts" and make is _empty:
        pytest.skip("an empty known_hosts is a fresh one: allowed")
    target = tmp_path / "the-file"
    make(target)
    path = write(tmp_path, text.format(p=target))
    for check_secrets in (True, False):  # lab.up may create a missing file, never fix a FIFO
        with pytest.raises(InventoryError) as ei:
            inv.load(path, check_secrets=check_secrets)
        err = str(ei.value)
        assert err.startswith(f"{path}:3: ") and key in err and str(target) in err, err
        assert msg in err and "\n" not in err, err


def test_missing_known_hosts_and_missing_files_for_lab_up_still_load(tmp_path):
    path = write(tmp_path, "nodes:\n  n1:\n    ssh: {host: h, known_hosts: kh, key_file: k}\n"
                           "    bmc: {host: h, password_file: pw}\n")
    i = inv.load(path, check_secrets=False)
    assert i.nodes["n1"].ssh.known_hosts == tmp_path / "kh"
    (tmp_path / "kh").write_text("")
    (tmp_path / "k").write_text("key\n")
    with pytest.raises(InventoryError, match=r"inventory.yaml:4: .*password_file .*no such file"):
        inv.load(path)


def _without_dac_override() -> None:
    """Root reads any file; drop the two capabilities that let it (CAP_DAC_OVERRIDE=1,
    CAP_DAC_READ_SEARCH=2) from the child's bounding set so mode 000 means unreadable."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl")


@pytest.mark.parametrize("key, text", [(f[1], f[2]) for f in FILE_FIELDS], ids=[f[1] for f in FILE_FIELDS])
def test_unreadable_file_refused_at_load_through_cli(tmp_path, key, text):
    target = tmp_path / "secret"
    target.write_text("x\n")
    target.chmod(0)
    path = write(tmp_path, text.format(p=target))
    r = subprocess.run([sys.executable, "-m", "labkit.cli", "power-status", "--inventory",
                        str(path)], capture_output=True, text=True, timeout=60,
                       preexec_fn=_without_dac_override if os.geteuid() == 0 else None)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.splitlines() == [f"error: {path}:3: {r.stderr.split(': ', 2)[2].strip()}"]
    assert key in r.stderr and "permission denied" in r.stderr.lower(), r.stderr


@pytest.mark.timeout(30)
def test_password_file_replaced_by_fifo_after_load_never_blocks(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("hunter2\n")
    i = inv.load(write(tmp_path, "nodes:\n  n1:\n    bmc: {host: h, password_file: pw}\n"))
    pw.unlink()
    os.mkfifo(pw)
    with pytest.raises(UserError, match="not a regular file"):
        i.nodes["n1"].bmc.password()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("make, msg", [(_fifo, "FIFO"), (_folder, "a folder"),
                                       (_huge, "more than"), (_dangling, "dangling")],
                         ids=["fifo", "folder", "huge", "dangling"])
def test_inventory_env_var_pointing_at_a_non_file(tmp_path, make, msg):
    """$LABKIT_INVENTORY at a FIFO once hung forever: one line naming the variable."""
    target = tmp_path / "inventory.yaml"
    make(target)
    env = dict(os.environ, LABKIT_INVENTORY=str(target))
    r = subprocess.run([sys.executable, "-m", "labkit.cli", "power-status"], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=50)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, (r.stdout, r.stderr)
    assert str(target) in r.stderr and "$LABKIT_INVENTORY" in r.stderr and msg in r.stderr


# --- issue 9: YAML typing behind the user's back ------------------------------------------

TYPED = [
    ("nodes:\n  n1:\n    ssh: {host: h, user: yes}\n", "yes reads as a boolean"),
    ("nodes:\n  n1:\n    ssh: {host: h, user: no}\n", "no reads as a boolean"),
    ("nodes:\n  n1:\n    ssh: {host: 10.0}\n", "10.0 reads as a number"),
    ("nodes:\n  n1:\n    ssh: {host: h, workdir: ~}\n", "~ reads as null"),
    ("nodes:\n  n1:\n    ssh: {host: h, proxy_jump: 1234}\n", "1234 reads as a number"),
    ("nodes:\n  n1:\n    ssh: {host: 2024-01-01}\n", "2024-01-01 reads as a date"),
    ("nodes:\n  n1:\n    bmc: {host: h, password_file: 0123}\n", "0123 reads as a number (83)"),
    ("nodes:\n  n1:\n    bmc: {host: h, user: on, password_env: LAB_BMC_PASSWORD}\n",
     "on reads as a boolean"),
    ("nodes:\n  n1:\n    bmc: {host: h, password: 0123}\n", "0123 reads as a number (83)"),
    ("nodes:\n  n1:\n    bmc: {host: h, password: yes}\n", "yes reads as a boolean"),
    ("nodes:\n  n1:\n    bmc: {host: h, password_env: 1.5}\n", "1.5 reads as a number"),
    ("nodes:\n  n1:\n    ssh: {host: h}\ngroups:\n  g: [yes]\n", "yes reads as a boolean"),
    ("nodes:\n  n1:\n    ssh: {host: h}\nfake_lab: {sshd: null}\n", "null reads as null"),
    ("nodes:\n  n1:\n    ssh: {host: h, port: 0x16}\n", "port number"),
    ("nodes:\n  n1:\n    ssh: {host: h, port: '22'}\n", "port number"),
    ("nodes:\n  n1:\n    ssh: {host: h, port: 0:22}\n", "port number"),
    ("nodes:\n  n1:\n    ssh: {host: h, port: 22.0}\n", "port number"),
    ("nodes:\n  n1:\n    ssh: {host: h}\nfake_lab: {boot_delay: .inf}\n", "number >= 0"),
    ("nodes:\n  n1:\n    ssh: {host: h}\nfake_lab: {boot_delay: .nan}\n", "number >= 0"),
    ("nodes:\n  n1:\n    ssh: {host: h}\nfake_lab: {seed: 1.5}\n", "whole number"),
    ("nodes:\n  n1:\n    ssh: {host: h}\nfake_lab: {power_delay: [0, 1_0]}\n", "number >= 0"),
]


@pytest.mark.parametrize("text, msg", TYPED, ids=[t[1][:24] for t in TYPED])
def test_yaml_typed_values_refused_with_a_hint_to_quote(tmp_path, text, msg):
    path = write(tmp_path, text)
    with pytest.raises(InventoryError) as ei:
        inv.load(path)
    err = str(ei.value)
    assert err.startswith(f"{path}:{text.count(chr(10))}: ") and msg in err and "\n" not in err, err
    if "reads as" in msg:
        assert "quote it" in err


def test_quoted_and_meant_numbers_stay_fine(tmp_path):
    path = write(tmp_path, "nodes:\n  n1:\n    ssh: {host: '10.0', user: 'yes', port: 2222,"
                           " workdir: '~/lab'}\n    bmc: {host: h, password: '0123', port: 623}\n"
                           "fake_lab: {boot_delay: 0.5, seed: 7, power_delay: [1, 2.5]}\n")
    n = inv.load(path).nodes["n1"]
    assert (n.ssh.host, n.ssh.user, n.ssh.port, n.ssh.workdir) == ("10.0", "yes", 2222, "~/lab")
    assert n.bmc.password().reveal() == b"0123" and n.bmc.port == 623


# --- issue 9: proxy_jump syntax and one BMC under two spellings ---------------------------

@pytest.mark.parametrize("jump", ["a b", "a,,b", ",a", "a,", "a:0", "a:70000", "u@", "@h",
                                  "a:b", "a, b", "u@h:22:1", ""])
def test_bad_proxy_jump_refused_at_load(tmp_path, jump):
    path = write(tmp_path, f"nodes:\n  n1:\n    ssh: {{host: h, proxy_jump: '{jump}'}}\n")
    with pytest.raises(InventoryError) as ei:
        inv.load(path)
    assert str(ei.value).startswith(f"{path}:3: ") and "proxy_jump" in str(ei.value)


@pytest.mark.parametrize("jump", ["j", "u@j", "u@j:2222", "j1,u@j2:22", "[::1]:22", "none",
                                  "10.0.0.1"])
def test_good_proxy_jump_loads(tmp_path, jump):
    path = write(tmp_path, f"nodes:\n  n1:\n    ssh: {{host: h, proxy_jump: '{jump}'}}\n")
    assert inv.load(path).nodes["n1"].ssh.proxy_jump == jump


@pytest.mark.parametrize("a, b", [("localhost", "127.0.0.1"), ("127.0.0.1", "'127.1'"),
                                  ("127.0.0.1", "'::ffff:127.0.0.1'"), ("LocalHost", "'::1'"),
                                  ("10.1.2.3", "'10.1.2.3.'"), ("bmc-a", "BMC-A")])
def test_same_bmc_under_another_spelling_is_a_duplicate(tmp_path, a, b):
    path = write(tmp_path, f"nodes:\n  x:\n    bmc: {{host: {a}, password_env: LAB_BMC_PASSWORD}}\n"
                           f"  y:\n    bmc: {{host: {b}, password_env: LAB_BMC_PASSWORD}}\n")
    with pytest.raises(InventoryError) as ei:
        inv.load(path)
    err = str(ei.value)
    assert err.startswith(f"{path}:4: ") and "'y'" in err and "'x'" in err, err
    assert f"{path}:2" in err, err  # the first node's line too


def test_same_host_other_port_is_not_a_duplicate(tmp_path):
    path = write(tmp_path, "nodes:\n  x:\n    bmc: {host: localhost, port: 6230, password_env: "
                           "LAB_BMC_PASSWORD}\n  y:\n    bmc: {host: 127.0.0.1, port: 6231, "
                           "password_env: LAB_BMC_PASSWORD}\n")
    assert list(inv.load(path).nodes) == ["x", "y"]
