"""Leases: exactly one of many truly concurrent reservers wins, expired leases neither block nor
survive, other people's leases are refused by name (``check``), and the tasks' exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit import leases
from labkit.config import Settings
from labkit.errors import LeaseError, UserError
from labkit.leases import Lease, LeaseStore, check, parse_duration

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path) -> LeaseStore:
    return LeaseStore(tmp_path / "leases")


def settings_for(store: LeaseStore) -> Settings:
    return Settings(lease_dir=str(store.folder))


def plant(store: LeaseStore, node: str, who: str, seconds_left: float, note: str = "") -> Lease:
    """Write a lease directly (e.g. one that expired an hour ago)."""
    now = time.time()
    lease = Lease(node=node, holder=who, expires=now + seconds_left, created=now - 7200,
                  note=note, token=os.urandom(8).hex())
    assert store.create(lease)
    return lease


# --- durations, holder, folder ------------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [("90s", 90), ("30m", 1800), ("2h", 7200),
                                          ("1d", 86400), ("1h30m", 5400), ("1.5h", 5400)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2", "2x", "h", "-1h", "0m", "2 hours", "1y", "400d"])
def test_bad_durations_are_user_errors(text: str) -> None:
    with pytest.raises(UserError, match="bad duration"):
        parse_duration(text)


def test_holder_and_default_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LABKIT_USER", "alice")
    assert leases.holder().startswith("alice@") and len(leases.holder()) > len("alice@")
    monkeypatch.setenv("LABKIT_USER", "alice@lab")
    assert leases.holder() == "alice@lab"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert leases.lease_dir(Settings()) == tmp_path / "state" / "labkit" / "leases"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert leases.lease_dir(Settings()) == Path.home() / ".local/state/labkit/leases"
    assert leases.lease_dir(Settings(lease_dir="/srv/lab/leases")) == Path("/srv/lab/leases")


# --- the rules ------------------------------------------------------------------------------------

def test_reserve_extend_release(store: LeaseStore) -> None:
    lease, what = store.reserve("node1", 60, note="tuning", who="alice@a")
    assert what == "reserved" and 55 < lease.left() <= 60
    again, what = store.reserve("node1", 7200, who="alice@a")
    assert what == "extended" and again.left() > 7000 and again.note == "tuning"
    assert store.read("node1") == again
    assert store.release("node1", who="alice@a") == "released"
    assert store.read("node1") is None and store.release("node1", who="alice@a") == \
        "was not leased"
    assert sorted(p.name for p in store.folder.iterdir()) == []  # no temp/claim litter


def test_someone_elses_lease_is_refused_with_holder_and_expiry(store: LeaseStore) -> None:
    held, _ = store.reserve("node1", 3600, note="migration run", who="bob@b")
    with pytest.raises(LeaseError) as ei:
        store.reserve("node1", 60, who="alice@a")
    msg = str(ei.value)
    assert "node1" in msg and "bob@b" in msg and held.until() in msg and "migration run" in msg
    assert "\n" not in msg and store.read("node1") == held
    with pytest.raises(LeaseError, match="bob@b"):
        store.release("node1", who="alice@a")
    assert store.read("node1") == held
    lease, what = store.reserve("node1", 60, who="alice@a", force=True)
    assert what == "taken over from bob@b" and store.read("node1") == lease
    assert store.release("node1", who="bob@b", force=True) == "released (was held by alice@a)"


def test_expired_lease_does_not_block_and_is_cleaned(store: LeaseStore) -> None:
    plant(store, "node1", "bob@b", -3600)
    plant(store, "node2", "bob@b", -1)
    check(["node1"], settings_for(store), who="alice@a")     # no refusal
    assert store.all() == []                                   # ignored ...
    assert not store.path("node1").exists() and not store.path("node2").exists()  # ... cleaned
    plant(store, "node1", "bob@b", -5)
    lease, what = store.reserve("node1", 60, who="alice@a")
    assert what == "reserved" and store.read("node1") == lease


def test_check_refuses_naming_holder_unless_forced(store: LeaseStore, capsys) -> None:
    s = settings_for(store)
    check(["node1", "node2"], s, who="alice@a")                # no folder, no leases: fine
    held = plant(store, "node2", "bob@b", 5400, note="do not touch")
    plant(store, "node3", "alice@a", 5400)
    check(["node1", "node3"], s, who="alice@a")                # mine: fine
    with pytest.raises(LeaseError) as ei:
        check(["node1", "node2", "node3"], s, False, who="alice@a")
    msg = str(ei.value)
    assert "node2 is leased by bob@b until " + held.until() in msg
    assert "do not touch" in msg and "--force" in msg and "node3" not in msg
    check(["node2"], s, True, who="alice@a")                   # forced: a warning, no error
    assert "bob@b" in capsys.readouterr().err


def test_stale_claim_of_a_crashed_process_is_broken(store: LeaseStore) -> None:
    old = plant(store, "node1", "bob@b", -10)
    claim = store.folder / f"node1.{old.token}.claim"
    claim.write_text("crashed")
    past = time.time() - leases.CLAIM_STALE - 5
    os.utime(claim, (past, past))
    lease, what = store.reserve("node1", 60, who="alice@a")
    assert what == "reserved" and not claim.exists()


# --- real concurrent processes -------------------------------------------------------------------

RACER = r"""
import json, sys, time
from pathlib import Path
from labkit.errors import LeaseError
from labkit.leases import LeaseStore
folder, node, who, gate = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
store = LeaseStore(Path(folder))
(gate / who).touch()                      # ready
while not (gate / "go").exists():         # released all at once by the test
    time.sleep(0.0002)
time.sleep(int(sys.argv[5]) * 0.002)      # some exactly together, some a moment later
try:
    lease, what = store.reserve(node, 600, who=who)
    print(json.dumps({"who": who, "won": True, "what": what, "token": lease.token}))
except LeaseError as e:
    print(json.dumps({"who": who, "won": False, "error": str(e)}))
"""


def race(store: LeaseStore, n: int, node: str = "node1") -> list[dict]:
    """n processes, each started and waiting at a gate, released at the same instant."""
    gate = store.folder.parent / "gate"
    gate.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(store.folder), node,
                               f"user{i}@host", str(gate), str(i % 4)], stdout=subprocess.PIPE, text=True)
             for i in range(n)]
    deadline = time.monotonic() + 60
    while len(list(gate.iterdir())) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    (gate / "go").touch()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        results.append(json.loads(out))
    return results


@pytest.mark.parametrize("expired_first", [False, True])
def test_concurrent_reserve_exactly_one_wins(store: LeaseStore, expired_first: bool) -> None:
    store.folder.mkdir(parents=True)
    if expired_first:  # the racers must also agree on who cleans the expired lease
        plant(store, "node1", "old@gone", -30)
    results = race(store, 16)
    winners = [r for r in results if r["won"]]
    assert len(winners) == 1, results
    held = store.read("node1")
    assert held is not None and held.holder == winners[0]["who"]
    assert held.token == winners[0]["token"]
    for r in results:
        if not r["won"]:
            assert winners[0]["who"] in r["error"]
    assert [p.name for p in store.folder.iterdir()] == ["node1.lease"]


def _inventory(tmp_path: Path) -> Path:
    inv = tmp_path / "inventory.yaml"
    inv.write_text("nodes:\n" + "".join(
        f"  node{i}:\n    ssh:\n      host: 127.0.0.1\n      port: {2200 + i}\n"
        for i in (1, 2, 3)) + "groups:\n  pair: [node1, node2]\n")
    return inv


def _cli(tmp_path: Path, user: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, LABKIT_USER=user, XDG_STATE_HOME=str(tmp_path / "state"),
               LABKIT_INVENTORY=str(_inventory(tmp_path)))
    return subprocess.run([str(BIN / "invoke"), "-r", str(ROOT), *args], capture_output=True,
                          text=True, env=env, timeout=60)


def test_cli_concurrent_reserve(tmp_path: Path) -> None:
    _inventory(tmp_path)
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"),
               LABKIT_INVENTORY=str(tmp_path / "inventory.yaml"))
    procs = [subprocess.Popen([str(BIN / "labkit"), "reserve", "-n", "node1", "--for", "1h"],
                              env=dict(env, LABKIT_USER=f"racer{i}"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(8)]
    codes = [p.wait(timeout=60) for p in procs]
    assert sorted(codes) == [0] + [1] * 7, codes


def test_cli_reserve_who_release(tmp_path: Path) -> None:
    r = _cli(tmp_path, "alice", "reserve", "-n", "@pair", "--for", "2h", "--note", "pre-copy")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reserved" in r.stdout and "2 node(s), 2 ok" in r.stdout
    r = _cli(tmp_path, "bob", "reserve", "-n", "node2,node3", "--for", "30m")
    assert r.returncode == 1 and "alice@" in r.stdout and "node3" in r.stdout
    r = _cli(tmp_path, "bob", "who", "--json")
    rows = {x["node"]: x for x in json.loads(r.stdout)}
    assert set(rows) == {"node1", "node2", "node3"}
    assert rows["node1"]["holder"].startswith("alice@") and rows["node1"]["note"] == "pre-copy"
    assert 7000 < rows["node1"]["seconds_left"] <= 7200
    r = _cli(tmp_path, "bob", "who")
    assert r.returncode == 0 and "pre-copy" in r.stdout and "1h59m" in r.stdout
    r = _cli(tmp_path, "bob", "release", "-n", "node1")
    assert r.returncode == 1 and "alice@" in r.stdout
    r = _cli(tmp_path, "bob", "release", "-n", "node1", "--force")
    assert r.returncode == 0
    r = _cli(tmp_path, "alice", "release", "-n", "@pair")
    assert r.returncode == 0 and "was not leased" in r.stdout and "released" in r.stdout


@pytest.mark.parametrize("args,words", [(["--for", "2q"], "bad duration"),
                                        ([], "--for DURATION"),
                                        (["--for", "1h", "-n", "nodeX"], "unknown node")])
def test_cli_bad_input_exit_2(tmp_path: Path, args: list[str], words: str) -> None:
    r = _cli(tmp_path, "alice", "reserve", *args)
    assert r.returncode == 2 and words in r.stderr, r.stderr
    assert not (tmp_path / "state").exists()  # nothing started
