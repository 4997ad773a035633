"""Power-on --wait of 16 nodes under BMC faults, repeated: 20 runs in `make test`, more in stress
mode (``LABKIT_STRESS=200 make test``, or ``pytest --stress`` / ``--stress=N``,
an option tests/conftest.py registers). Each run draws its faults from ``Random(SEED:run)``:
10-30 % packet loss, 0-3 busy (0xC0) replies per BMC, power changes landing after a random
0.05-0.6 s; every node must end on and confirmed, within budget, with no failures.

Runs are spread over LABS 16-node labs side by side, each lab's runs in sequence (a fresh
lab per run would cost more than the run), so a run is replayed exactly by replaying the
sequence: same ``LABKIT_POWER_SEED``, same run count. Delays
are small on purpose: what is tested is the retry/wait logic under loss, not patience.
tests/test_power_faults.py covers the same through the CLI with realistic delays (3 seeds)."""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from labkit.bmc.power import PowerClient
from labkit.config import Settings
from labkit.fanout import fan_out
from labkit.pytest_plugin import FakeLabHandle, start_fake_lab

SEED = int(os.environ.get("LABKIT_POWER_SEED", "1"))
RUNS = 20
STRESS_RUNS = 200
SETTINGS = Settings(bmc_timeout=4, retry_window=25, retry_first_delay=0.1, retry_max_delay=0.5,
                    power_wait=25, parallel=16, progress="never")
BUDGET = 30.0
LABS = 10


pytestmark = pytest.mark.slow  # stress: 20 runs of 16 nodes under faults


def runs(config: pytest.Config) -> int:
    n = int(os.environ.get("LABKIT_STRESS", "0") or 0)
    opt = config.getoption("stress", default=None)
    if opt not in (None, False):
        n = max(n, STRESS_RUNS if opt is True or str(opt) in ("", "True") else int(opt))
    return max(RUNS, n)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "run" in metafunc.fixturenames:
        metafunc.parametrize("run", range(runs(metafunc.config)))


def one_run(lab: FakeLabHandle, client: PowerClient, run: int) -> dict[str, Any]:
    rng = random.Random(f"{SEED}:{run}")
    lab.control.clear("*")
    lab.control.power("*", "off", now=True)
    lo = rng.uniform(0.05, 0.3)
    faults = {"drop": round(rng.uniform(0.1, 0.3), 3), "busy": rng.randint(0, 3),
              "power_delay": [round(lo, 3), round(lo + rng.uniform(0.0, 0.3), 3)]}
    lab.control.fault("*", **faults)
    before = sum(s["stats"]["dropped"] for s in lab.status().values())
    nodes = list(lab.inventory().nodes.values())
    t0 = time.monotonic()
    out = fan_out(nodes, lambda n: client.on(n, wait=True), parallel=16, progress="never")
    took = time.monotonic() - t0
    status = lab.status()
    lab.control.clear("*")
    return {"faults": faults, "took": took, "outcomes": out, "nodes": [n.name for n in nodes],
            "power": {n: s["power"] for n, s in status.items()},
            "dropped": sum(s["stats"]["dropped"] for s in status.values()) - before}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest,
            ) -> dict[int, Any]:
    """All runs, LABS labs side by side (each run mostly waits on retransmit timers, so
    labs in parallel cost little CPU), runs of one lab in sequence."""
    total = runs(request.config)
    labs = [start_fake_lab(tmp_path_factory.mktemp(f"powerstress{i}"), count=16, ssh=False,
                           power_delay=(0.05, 0.3), boot_delay=0.05, seed=SEED * 100 + i)
            for i in range(LABS)]
    done: dict[int, Any] = {}

    def worker(i: int) -> None:
        with PowerClient(SETTINGS) as client:
            for run in range(i, total, LABS):
                try:
                    done[run] = one_run(labs[i], client, run)
                except Exception as e:  # noqa: BLE001 - reported by that run's test
                    done[run] = {"error": f"{type(e).__name__}: {e}"}

    try:
        with ThreadPoolExecutor(LABS) as pool:
            list(pool.map(worker, range(LABS)))
    finally:
        for lab in labs:
            lab.stop()
    return done


def test_power_on_wait_16_nodes_under_faults(results: dict[int, Any], run: int) -> None:
    r = results[run]
    assert "error" not in r, r
    why = f"run {run} (LABKIT_POWER_SEED={SEED}), faults {r['faults']}, {r['took']:.1f}s"
    failed = {o.node: o.error for o in r["outcomes"] if not o.ok}
    assert failed == {}, f"{why}: {failed}"
    assert all(o.value["power"] == "on" and o.value["confirmed"] for o in r["outcomes"]), why
    assert r["power"] == {n: "on" for n in r["nodes"]}, why
    assert r["took"] < BUDGET, why
    assert r["dropped"] > 0, f"{why}: no packet was dropped, the faults did not bite"
