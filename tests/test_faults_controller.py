"""The controller interrupted: SIGINT and SIGKILL of `labkit deploy` and `labkit migrate-test` at
seeded random points, against the fake lab (real SSH, real node processes).

After SIGINT: nothing of ours keeps running on any node (processes found by the fake node's
LABKIT_NODE_ROOT environment marker, which every process a node runs carries — setsid'd or
not), and every node runs a complete release (the old or the new one, never a mix).
After SIGKILL: the same, and the next run finds what the killed one left (half-received
releases ``.incoming-*``, ``.*.tmp-*`` symlink temps), removes it and says so in its output.

Each scenario is named by its seed; ``LABKIT_FAULT_SEEDS=7,8`` replays chosen ones. A point is
either a delay after start or an event (a node has received N bytes of the big file, or the
first node switched), so the same seed interrupts at the same place in the work."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from labkit.pytest_plugin import FakeLabHandle, start_fake_lab

LABKIT = [sys.executable, "-m", "labkit.cli"]
_bin = Path(sys.executable).with_name("labkit")
if _bin.exists():
    LABKIT = [str(_bin)]
SEEDS = [int(s) for s in os.environ.get("LABKIT_FAULT_SEEDS", "1,2,3").split(",")]
X86_LINUX = sys.platform == "linux" and os.uname().machine == "x86_64"
BIG = 32 << 20
GRACE = 5.0  # seconds the nodes get to reap a dead controller's sessions


pytestmark = pytest.mark.slow  # fault seeds: deploy and migrate-test interrupted


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Any:
    handle = start_fake_lab(tmp_path_factory.mktemp("ctlfaults"), count=3, seed=4,
                            power_delay=(0.05, 0.2), boot_delay=0.2)
    handle.power_on_all()
    yield handle
    handle.stop()


def env_for(lab: FakeLabHandle, **extra: str) -> dict[str, str]:
    return {**lab.env, "LABKIT_SSH_CONFIG": "/nonexistent",
            "XDG_CACHE_HOME": str(lab.state_dir / "cache"),
            "INVOKE_LABKIT_RESULTS_DIR": str(lab.state_dir / "results"),
            "INVOKE_LABKIT_POWER_WAIT": "30", "INVOKE_LABKIT_SSH_WAIT": "30", **extra}


def node_root(lab: FakeLabHandle, node: str) -> Path:
    return (lab.state_dir / "nodes" / node).resolve()


def our_processes(lab: FakeLabHandle) -> list[str]:
    """Everything any node of the lab runs right now."""
    return lab.processes()


def wait_nothing_running(lab: FakeLabHandle) -> float:
    """Seconds until no node runs anything of ours; fails after GRACE."""
    t0 = time.monotonic()
    while True:
        left = our_processes(lab)
        if not left:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < GRACE, f"still running {GRACE}s after the controller " \
                                              f"died: {left}"
        time.sleep(0.05)


def pdir(lab: FakeLabHandle, node: str) -> Path:
    return node_root(lab, node) / "labkit" / "payloads"


def current(lab: FakeLabHandle, node: str) -> str | None:
    link = pdir(lab, node) / "current"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def leftovers(lab: FakeLabHandle, node: str) -> list[str]:
    """What the deploy agent counts as leftovers (see labkit/deploy.py)."""
    base = pdir(lab, node)
    found = sorted(p.name for p in (base / "releases").glob(".incoming-*"))
    found += sorted(p.name for p in base.glob(".*.tmp-*"))
    return found


def make_bundle(lab: FakeLabHandle, tag: str) -> Path:
    root = lab.state_dir / "bundles" / tag
    root.mkdir(parents=True, exist_ok=True)
    (root / "tool.py").write_text(f"print({tag!r})\n")
    (root / "lib.py").write_text("X = 1\n")
    with open(root / "huge.bin", "wb") as f:
        f.truncate(BIG)
    inv = lab.state_dir / f"inventory-{tag}.yaml"
    inv.write_text(f"payloads: [{root}]\n" + lab.inventory_path.read_text())
    return inv


def deploy(lab: FakeLabHandle, inv: Path) -> dict[str, dict[str, Any]]:
    r = subprocess.run([*LABKIT, "deploy", "--json"], env=env_for(lab, LABKIT_INVENTORY=str(inv)),
                       cwd=lab.state_dir, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return {o["node"]: o for o in json.loads(r.stdout)}


def assert_complete_release(lab: FakeLabHandle, node: str, allowed: dict[str, str]) -> None:
    """current is a whole release: one of the allowed (release -> tag), every file in place."""
    rid = current(lab, node)
    assert rid in allowed, f"{node}: current -> {rid}, expected one of {sorted(allowed)}"
    cur = pdir(lab, node) / "current"
    manifest = json.loads((cur / "MANIFEST").read_text())
    for path, entry in manifest["files"].items():
        assert (cur / path).stat().st_size == entry["size"], f"{node}: {path} incomplete"
    assert (cur / "tool.py").read_text() == f"print({allowed[rid]!r})\n"


def interrupt_point(rng: random.Random, lab: FakeLabHandle, proc: subprocess.Popen,
                    old: dict[str, str | None]) -> str:
    """Wait for a seeded point in the deploy; returns its description."""
    kind = rng.choice(["delay", "bytes", "bytes", "switched"])
    node = rng.choice(lab.nodes)
    end = time.monotonic() + 60
    if kind == "delay":
        delay = rng.uniform(0.3, 1.2)
        time.sleep(delay)
        if proc.poll() is not None:
            return f"delay point never reached: the deploy had ended before {delay:.2f}s"
        return f"{delay:.2f}s after start"
    want = rng.randint(1, BIG >> 20) << 20
    while proc.poll() is None and time.monotonic() < end:
        if kind == "bytes":
            inc = sorted((pdir(lab, node) / "releases").glob(".incoming-*/huge.bin"))
            if inc and inc[0].stat().st_size >= want:
                return f"{node} holds {want >> 20} MiB of huge.bin"
        elif any(current(lab, n) != old[n] for n in lab.nodes):
            return "the first node switched"
        time.sleep(0.002)
    return f"{kind} point never reached: the deploy had ended"


# --- deploy ---------------------------------------------------------------------------------

def _all_ok(out: str) -> bool:
    try:
        rows = json.loads(out)
    except ValueError:
        return False
    return bool(rows) and all(r.get("ok") and r.get("state") == "deployed" for r in rows)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("seed", SEEDS)
def test_deploy_interrupted(lab: FakeLabHandle, seed: int, sig: signal.Signals) -> None:
    rng = random.Random(seed * 1000 + int(sig))
    tag_old, tag_new = f"s{seed}-{sig.name}-old", f"s{seed}-{sig.name}-new"
    first = deploy(lab, make_bundle(lab, tag_old))
    old = {n: current(lab, n) for n in lab.nodes}
    assert all(o["ok"] for o in first.values())
    new_inv = make_bundle(lab, tag_new)
    proc = subprocess.Popen([*LABKIT, "deploy", "--json"],
                            env=env_for(lab, LABKIT_INVENTORY=str(new_inv)), cwd=lab.state_dir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    where = interrupt_point(rng, lab, proc, old)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    why = f"seed {seed}, {sig.name} when {where}: rc={proc.returncode}\n{out}\n{err}"
    if sig == signal.SIGINT and "never reached" not in where:
        # rc 0 is right only when the deploy had in fact completed everywhere before the
        # signal landed (a seeded delay can outlast a fast deploy's work but not its exit)
        completed = proc.returncode == 0 and _all_ok(out)
        # -2: the signal landed while Python was still starting, before any handler existed
        assert proc.returncode in (1, 130, -signal.SIGINT) or completed, why
    took = wait_nothing_running(lab)
    assert took < GRACE, why
    # every node: the old or the new release, whole
    new_ids = {current(lab, n) for n in lab.nodes} - set(old.values())
    allowed = {**{r: tag_old for r in old.values()}, **{r: tag_new for r in new_ids}}
    for n in lab.nodes:
        assert_complete_release(lab, n, allowed)
    # the next run cleans what the interrupted one left, and says so
    left = {n: leftovers(lab, n) for n in lab.nodes}
    nxt = deploy(lab, new_inv)
    for n, o in nxt.items():
        assert o["ok"], why
        assert sorted(o["cleaned"]) == left[n], f"{n}: {o}\n{why}"
        for name in left[n]:
            assert name in o["state"], f"{n} did not say it cleaned {name}: {o}\n{why}"
        assert leftovers(lab, n) == []
        assert_complete_release(lab, n, {current(lab, n): tag_new})
    assert our_processes(lab) == []


# --- migrate-test ---------------------------------------------------------------------------

@pytest.mark.skipif(not X86_LINUX, reason="migrate-test payloads are x86_64 Linux only")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_migrate_test_interrupted(lab: FakeLabHandle, sig: signal.Signals,
                                  tmp_path: Path) -> None:
    seed = SEEDS[0]
    rng = random.Random(seed * 7919 + int(sig))
    args = ["migrate-test", "--size", "32M", "--rate", "3000", "--steps-per-round", "0",
            "--max-rounds", "6", "--json"]
    proc = subprocess.Popen([*LABKIT, *args], env=env_for(lab), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # a point while payload processes run on the nodes: the workload has started, plus a
    # seeded extra delay into the pre-copy
    end = time.monotonic() + 60
    while not any("workload.py" in p for p in our_processes(lab)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the workload never started"
        time.sleep(0.01)
    delay = rng.uniform(0.0, 1.5)
    time.sleep(delay)
    running = our_processes(lab)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    why = f"seed {seed}, {sig.name} {delay:.2f}s after the workload started " \
          f"(running then: {running}): rc={proc.returncode}\n{out[-1500:]}\n{err[-1500:]}"
    if sig == signal.SIGINT and proc.returncode != 0:
        assert proc.returncode in (1, 130), why
        assert "Traceback" not in err, why
    wait_nothing_running(lab)
    # the next run works on the same nodes
    r = subprocess.run([*LABKIT, "migrate-test", "--size", "8M", "--rate", "2000",
                        "--max-rounds", "3", "--json"], env=env_for(lab), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{why}\nnext run: {r.stdout[-1500:]}\n{r.stderr[-1500:]}"
    assert json.loads(r.stdout)["ok"] is True
    assert our_processes(lab) == []
