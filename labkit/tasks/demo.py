"""Task: demo — the quick start's first command. Starts the embedded fake lab, powers every node
on (waiting for SSH), deploys the payloads, and runs a verified migrate-test, printing each
step's per-node table and pointing at the results folder. Each step is a library call that
the individual tasks also use, so the demo shows exactly what they do."""

from __future__ import annotations

import sys
import time

from invoke import Context
from invoke.exceptions import Exit

from labkit.tasks.common import lab, labtask


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.monotonic()


@labtask(help={"size": "workload size for the migrate-test", "rate": "pages/s it dirties",
               "src": "source node", "dst": "destination node"}, changes=True)
def demo(c: Context, inventory: str | None = None, size: str = "64M", rate: str = "5000",
         src: str = "node1", dst: str = "node2", force: bool = False) -> None:
    """Fake lab up -> power-on --wait ssh -> deploy -> migrate-test, with a readable report.

    It powers on and deploys to every node of the inventory: a node leased by someone else
    is refused (before the lab is started) unless --force."""
    from labkit import bringup
    from labkit import deploy as dp
    from labkit.bmc.power import PowerClient
    from labkit.experiment import build_config, run_migrate_test
    from labkit.fake import lab as fake
    from labkit.fanout import report
    from labkit.inventory import find_inventory

    lab_ = lab(c, inventory)
    cfg = build_config(src=src, dst=dst, size=size, rate=rate, verify_resume=50)  # check args first
    path = find_inventory(inventory).resolve()
    # the lab's password file may not exist before it is up: secrets are checked at login
    nodes = lab_.select(None, change=True, force=force, check_secrets=False)
    lab_.named([src, dst], change=False)
    lab_.need_ssh(nodes, "demo (power-on --wait ssh)")
    from labkit.tasks import args

    args.writable_folder(fake.state_dir_of(lab_.inventory()), "fake lab state folder")
    args.writable_folder(lab_.settings.results_dir, "results folder (labkit.results_dir)")

    t0 = _step(f"1/4 fake lab ({path})")
    info = fake.up(path)
    print(f"fake lab {'started' if info['started'] else 'already running'}: pid {info['pid']},"
          f" state in {info['state_dir']}")

    t = _step("2/4 power-on --wait ssh (BMCs over IPMI lanplus, then SSH)")
    with PowerClient(lab_.settings) as client:
        outcomes = lab_.fan_out(nodes, lambda n: bringup.power_on(client, n, lab_.settings,
                                                                  wait="ssh"),
                                label="power-on")
    if report(outcomes, columns=("power", "changed")):
        raise Exit(code=1)
    print(f"({time.monotonic() - t:.1f}s)")

    t = _step("3/4 deploy payloads (delta upload, atomic switch)")
    deployer = dp.deployer_for(lab_.settings, c.config.get("labkit", {}), lab_.inventory(),
                               "deploy")
    outcomes = deployer.run(nodes, "deploy")
    if report(outcomes, columns=dp.columns_for("deploy")):
        raise Exit(code=1)
    print(f"({time.monotonic() - t:.1f}s)")

    _step(f"4/4 migrate-test {src} -> {dst} ({size}, {rate} pages/s, verify + resume check)")
    result = run_migrate_test(lab_.inventory(), lab_.settings, cfg)
    print(result.summary())
    print(f"\ndemo done in {time.monotonic() - t0:.1f}s. Results: {result.folder}")
    print("The fake lab is still running: try `invoke power-status`, `invoke console node1`, "
          "`invoke run -n @all -- uptime`; stop it with `invoke lab.down`.", file=sys.stderr)


TASKS = [demo]
COLLECTION = None
