"""Leases: exactly one of many truly concurrent reservers wins, expired leases neither block nor
survive, other people's leases are refused by name (``check``), the tasks' exit codes, and the
one lease check every task that changes a node passes through (each such task refused through
the real program against a fake lab, read-only ones not, --force letting them through, and a
walk over the namespace so that a new task cannot forget to declare which it is)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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


# --- every task that changes a node passes the one lease check --------------------------------
#
# Against a running fake lab (node1 on with SSH up, node2 off), through the real `labkit`
# program, as alice, with leases bob holds. A refused task must exit 1 with one stderr line
# naming the node and bob, and start nothing: no IPMI packet reached any BMC, no power or boot
# device change, no file on any node's disk, no node process, no results folder.

LABKIT = [sys.executable, "-m", "labkit.cli"]
if (BIN / "labkit").exists():
    LABKIT = [str(BIN / "labkit")]
BOB = "bob@elsewhere"

# (id, argv after `labkit`, nodes bob holds, nodes the refusal must name)
REFUSED: list[tuple[str, list[str], list[str], list[str]]] = [
    ("power-on", ["power-on", "-n", "node2"], ["node2"], ["node2"]),
    ("power-on-wait-ssh", ["power-on", "-n", "node2", "--wait=ssh"], ["node2"], ["node2"]),
    ("power-off", ["power-off", "-n", "node1"], ["node1"], ["node1"]),
    ("power-soft", ["power-soft", "-n", "node1"], ["node1"], ["node1"]),
    ("power-reset", ["power-reset", "-n", "node1"], ["node1"], ["node1"]),
    ("power-cycle", ["power-cycle", "-n", "node1", "--wait=ssh"], ["node1"], ["node1"]),
    ("boot-device", ["boot-device", "-n", "node1", "pxe"], ["node1"], ["node1"]),
    ("run", ["run", "-n", "node1", "--", "touch", "STARTED"], ["node1"], ["node1"]),
    ("run-all", ["run", "--", "touch", "STARTED"], ["node2"], ["node2"]),
    ("deploy", ["deploy", "-n", "node1"], ["node1"], ["node1"]),
    ("deploy-rollback", ["deploy", "--rollback", "-n", "node1"], ["node1"], ["node1"]),
    ("migrate-test-src", ["migrate-test", "--src", "node1", "--dst", "node2", "--size", "1M"],
     ["node1"], ["node1"]),
    ("migrate-test-dst", ["migrate-test", "--src", "node1", "--dst", "node2", "--size", "1M"],
     ["node2"], ["node2"]),
    ("migrate-test-both", ["migrate-test", "--size", "1M"], ["node1", "node2"],
     ["node1", "node2"]),
    ("migrate-test-matrix", ["migrate-test", "--matrix", "size=1M,2M"], ["node2"], ["node2"]),
    ("sync-nodes", ["sync", "--nodes", "node1"], ["node1"], ["node1"]),
    ("dirty-rate", ["dirty-rate", "-n", "node1", "--pid", "1", "--seconds", "1"], ["node1"],
     ["node1"]),
    ("console", ["console", "node1"], ["node1"], ["node1"]),
    ("demo", ["demo", "--size", "1M"], ["node2"], ["node2"]),
]
REFUSED_IDS = [c[0] for c in REFUSED]

# Tasks that take nodes and only read them (or, for reserve/release, only the lease folder):
# a lease someone else holds does not stop them.
READ_ONLY: list[tuple[str, list[str]]] = [
    ("power-status", ["power-status", "-n", "node1"]),
    ("deploy-check", ["deploy", "--check", "-n", "node1"]),
    ("console-capture", ["console", "node1", "--capture", "0.3"]),
    ("sync-nodes-dry-run", ["sync", "--nodes", "node1", "--dry-run"]),
    ("lab.fault", ["lab.fault", "-n", "node1", "--clear"]),
]

# The cheap ones, with --force: (id, argv, nodes bob holds, check on the lab afterwards)
FORCED: list[tuple[str, list[str], list[str]]] = [
    ("power-on", ["power-on", "-n", "node2", "--wait", "--force"], ["node2"]),
    ("boot-device", ["boot-device", "-n", "node1", "pxe", "--force"], ["node1"]),
    ("run", ["run", "-n", "node1", "--force", "--", "touch", "FORCED"], ["node1"]),
    ("deploy", ["deploy", "-n", "node1", "--force"], ["node1"]),
]


def lab_snapshot(lab: Any) -> dict[str, Any]:
    """Everything a started task would change: BMC traffic and state, disks, processes."""
    st = lab.control.status()
    bmcs = {n: {k: s.get(k) for k in ("power", "pending", "bootdev", "persistent", "sessions",
                                      "sol")} | {"rx": s["stats"]["rx"]} for n, s in st.items()}
    disks = sorted(str(p.relative_to(lab.state_dir / "nodes"))
                   for p in (lab.state_dir / "nodes").rglob("*"))
    return {"bmcs": bmcs, "disks": disks, "procs": lab.processes()}


def run_as_alice(lab: Any, case_dir: Path, argv: list[str], bob_holds: list[str]) -> dict:
    """``labkit ARGV`` as alice, in its own folder, lease folder (bob's leases planted) and
    results folder."""
    case_dir.mkdir(parents=True, exist_ok=True)
    store = LeaseStore(case_dir / "leases")
    for node in bob_holds:
        plant(store, node, BOB, 3600, note="tuning")
    env = {**lab.env, "LABKIT_USER": "alice@here",
           "INVOKE_LABKIT_LEASE_DIR": str(store.folder),
           "INVOKE_LABKIT_RESULTS_DIR": str(case_dir / "results"),
           "INVOKE_LABKIT_SSH_WAIT": "20"}
    r = subprocess.run([*LABKIT, *argv], cwd=case_dir, env=env, capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    return {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr, "dir": case_dir,
            "where": f"labkit {' '.join(argv)}\nrc={r.returncode}\nstdout={r.stdout!r}\n"
                     f"stderr={r.stderr!r}"}


@pytest.fixture(scope="module")
def lease_lab(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from labkit.pytest_plugin import start_fake_lab

    handle = start_fake_lab(tmp_path_factory.mktemp("leaselab"), count=2, seed=7)
    handle.control.power("node1", "on", now=True)
    handle.control.wait("node1", timeout=30, phase="up")
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def runs(lease_lab: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The refused cases, concurrently, between two snapshots of the lab; then the read-only
    cases; then the forced ones, one at a time (they do change the lab)."""
    from concurrent.futures import ThreadPoolExecutor

    base = tmp_path_factory.mktemp("lease-cases")
    before = lab_snapshot(lease_lab)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {cid: pool.submit(run_as_alice, lease_lab, base / "refused" / cid, argv, held)
                   for cid, argv, held, _ in REFUSED}
        refused = {cid: f.result() for cid, f in futures.items()}
    after = lab_snapshot(lease_lab)
    read_only = {cid: run_as_alice(lease_lab, base / "ro" / cid, argv, ["node1", "node2"])
                 for cid, argv in READ_ONLY}
    forced = {cid: run_as_alice(lease_lab, base / "forced" / cid, argv, held)
              for cid, argv, held in FORCED}
    return {"before": before, "after": after, "refused": refused, "read_only": read_only,
            "forced": forced}


@pytest.mark.parametrize("cid, argv, held, named", REFUSED, ids=REFUSED_IDS)
def test_a_task_that_changes_a_node_refuses_someone_elses_lease(
        runs: dict[str, Any], cid: str, argv: list[str], held: list[str],
        named: list[str]) -> None:
    r = runs["refused"][cid]
    assert r["rc"] == 1, r["where"]
    assert "Traceback" not in r["stderr"], r["where"]
    lines = r["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r["where"]
    for node in ("node1", "node2"):
        said = f"{node} is leased by {BOB}" in lines[0]
        assert said == (node in named), r["where"]
    assert "tuning" in lines[0] and "--force" in lines[0], r["where"]
    assert not (r["dir"] / "results").exists(), r["where"]


def test_a_refused_task_started_nothing(runs: dict[str, Any]) -> None:
    assert runs["after"] == runs["before"], "a refused task touched the lab"


@pytest.mark.parametrize("cid", [c[0] for c in READ_ONLY])
def test_a_task_that_only_reads_is_not_refused(runs: dict[str, Any], cid: str) -> None:
    r = runs["read_only"][cid]
    assert "leased by" not in r["stderr"] + r["stdout"], r["where"]
    assert "Traceback" not in r["stderr"], r["where"]
    assert "node1" in r["stdout"], r["where"]  # it ran: node1's row (or capture file)
    if cid in ("power-status", "console-capture", "lab.fault"):
        assert r["rc"] == 0, r["where"]
    # deploy --check exits 1 (nothing deployed yet), sync --dry-run 1 (no git tree there):
    # each for its own reason, shown in node1's row


@pytest.mark.parametrize("cid", [c[0] for c in FORCED])
def test_force_lets_a_task_through_with_a_warning(runs: dict[str, Any], lease_lab: Any,
                                                  cid: str) -> None:
    r = runs["forced"][cid]
    assert r["rc"] == 0, r["where"]
    assert "warning: --force: node" in r["stderr"] and BOB in r["stderr"], r["where"]
    st = lease_lab.control.status()
    if cid == "power-on":
        assert st["node2"]["power"] == "on", st["node2"]
    elif cid == "boot-device":
        assert st["node1"]["bootdev"] == "pxe", st["node1"]
    elif cid == "run":
        assert (lease_lab.state_dir / "nodes" / "node1" / "FORCED").exists()
    elif cid == "deploy":
        assert "node1" in r["stdout"] and "1 ok" in r["stdout"], r["where"]


# --- no task can forget -------------------------------------------------------------------------

def _tasks() -> dict[str, Any]:
    from labkit.tasks import namespace

    out: dict[str, Any] = {}

    def walk(coll: Any, prefix: str) -> None:
        for name, t in coll.tasks.items():
            out[prefix + name] = t
        for name, sub in coll.collections.items():
            walk(sub, f"{prefix}{name}.")

    walk(namespace, "")
    return out


def test_every_task_that_takes_nodes_is_lease_checked_or_declared_read_only() -> None:
    """A task that takes nodes (-n, NODE, --src/--dst) declares labtask(changes=True) — it then
    takes --force and is in the refusal table above, which proves it refuses — or
    changes=False, and is in the read-only table. A new task that does neither fails here
    (and labtask refuses to define it at all)."""
    import inspect

    from labkit.tasks.common import NODE_PARAMS

    changing, reading = set(), set()
    for name, t in _tasks().items():
        params = inspect.signature(t.body).parameters
        takes = set(params) & set(NODE_PARAMS)
        if not takes:
            continue
        changes = getattr(t, "changes", None)
        assert changes in (True, False), f"{name} takes {takes}: lease-checked or read-only?"
        if changes:
            assert "force" in params, f"{name} changes nodes but has no --force"
            changing.add(name)
        else:
            reading.add(name)
    assert changing == {argv[0] for _, argv, _, _ in REFUSED}
    assert reading - {"reserve", "release"} <= {argv[0] for _, argv in READ_ONLY}


def test_labtask_refuses_a_task_that_does_not_declare(tmp_path: Path) -> None:
    from labkit.tasks.common import Lab, labtask

    def wild(c: Any, nodes: str | None = None) -> None: ...

    def careless(c: Any, src: str = "node1", force: bool = False) -> None: ...

    def forceless(c: Any, nodes: str | None = None) -> None: ...

    with pytest.raises(TypeError, match="declare"):
        labtask(wild)
    with pytest.raises(TypeError, match="declare"):
        labtask()(careless)
    with pytest.raises(TypeError, match="force"):
        labtask(changes=True)(forceless)
    # and a task declared read-only cannot select nodes to change
    lab_ = Lab(ctx=None, settings=Settings(lease_dir=str(tmp_path / "l")),  # type: ignore[arg-type]
               inventory_path=str(_inventory(tmp_path)), changes=False)
    assert [n.name for n in lab_.select("node1", change=False)] == ["node1"]
    with pytest.raises(RuntimeError, match="read-only"):
        lab_.select("node1", change=True)
