"""Power under BMC misbehaviour: packet loss, 0xC0 node-busy replies and slow power changes on
every BMC at once. `power-on --wait` over 16 nodes must still succeed, for several seeds (the
fake lab draws drops and delays from a per-BMC RNG seeded from the lab seed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit.bmc.power import PowerClient
from labkit.config import Settings
from labkit.fanout import fan_out

ROOT = Path(__file__).resolve().parent.parent
# The defaults are for real hardware (60 s retry window, 10 s per command); a lossy loopback
# needs neither, and the test must stay fast.
ENV = {"INVOKE_LABKIT_BMC_TIMEOUT": "4", "INVOKE_LABKIT_RETRY_WINDOW": "20",
       "INVOKE_LABKIT_RETRY_FIRST_DELAY": "0.2", "INVOKE_LABKIT_RETRY_MAX_DELAY": "1",
       "INVOKE_LABKIT_POWER_WAIT": "30"}


pytestmark = pytest.mark.slow  # fault seeds: 16 nodes under loss, busy and delays


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_power_on_wait_16_nodes_with_loss_busy_and_delays(make_fake_lab, seed):
    lab = make_fake_lab(count=16, ssh=False, power_delay=(0.2, 1.0), boot_delay=0.1, seed=seed)
    lab.control.fault("*", drop=0.1, busy=2)
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "invoke", "--search-root", str(ROOT), "power-on",
         "--inventory", str(lab.inventory_path), "--wait", "--json"],
        capture_output=True, text=True, timeout=120, env={**os.environ, **ENV})
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert len(out) == 16 and all(o["ok"] and o["power"] == "on" and o["confirmed"] for o in out)
    assert all(lab.status(n)["power"] == "on" for n in lab.nodes)
    stats = lab.status()
    assert sum(s["stats"]["dropped"] for s in stats.values()) > 0  # the faults really bit
    assert elapsed < 60


def test_library_cycle_under_faults(make_fake_lab):
    """Through the library, the way migrate-test uses it: cycle = off, wait, on."""
    lab = make_fake_lab(count=8, ssh=False, power_delay=(0.2, 1.0), boot_delay=0.1, seed=7,
                        power_on=True)
    lab.control.fault("*", drop=0.1, busy=2)
    settings = Settings(bmc_timeout=4, retry_window=20, retry_first_delay=0.2,
                        retry_max_delay=1, power_wait=30, cycle_delay=0.2)
    nodes = list(lab.inventory().nodes.values())
    with PowerClient(settings) as power:
        out = fan_out(nodes, lambda n: power.cycle(n, wait=True), parallel=8, progress="never")
        assert all(o.ok for o in out), [o.error for o in out if not o.ok]
        assert all(power.status(n) == "on" for n in nodes)
