"""Task: demo — the quick start's first command. Starts the embedded fake lab, powers every node
on (waiting for SSH), deploys the payloads, and runs a verified migrate-test, printing each
step's per-node table and pointing at the results folder. Each step is a library call that
the individual tasks also use, so the demo shows exactly what they do."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from invoke import Context
from invoke.exceptions import Exit

from labkit.tasks.common import lab, labtask


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.monotonic()


VM_STATE = ".lab-vm"  # --vm: the two-guest lab's folder (its inventory.yaml is written there)


@labtask(help={"size": "workload size for the migrate-test (default 64M; 16M with --vm)",
               "rate": "pages/s it dirties (default 5000; 1000 with --vm)",
               "src": "source node", "dst": "destination node",
               "vm": f"run it on two QEMU guest nodes with their own kernel (a lab in "
                     f"./{VM_STATE}; ignores --inventory)"}, changes=True)
def demo(c: Context, inventory: str | None = None, size: str | None = None,
         rate: str | None = None, src: str = "node1", dst: str = "node2", vm: bool = False,
         force: bool = False) -> None:
    """Fake lab up -> power-on --wait ssh -> deploy -> migrate-test, with a readable report.

    It powers on and deploys to every node of the inventory: a node leased by someone else
    is refused (before the lab is started) unless --force. With --vm the nodes are two QEMU
    guests (soft-dirty and a kernel of their own), which boot in ~10-20 s under emulation."""
    from labkit import bringup
    from labkit import deploy as dp
    from labkit.bmc.power import PowerClient
    from labkit.experiment import build_config, run_migrate_test
    from labkit.fake import lab as fake
    from labkit.fanout import report
    from labkit.inventory import find_inventory

    size = size or ("16M" if vm else "64M")
    rate = rate or ("1000" if vm else "5000")
    cfg = build_config(src=src, dst=dst, size=size, rate=rate, verify_resume=50)  # check args first
    if vm:
        inventory = str(_vm_lab())
    lab_ = lab(c, inventory)
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
    inv = f" -i {VM_STATE}/inventory.yaml" if vm else ""
    print(f"The fake lab is still running: try `invoke power-status{inv}`, `invoke console"
          f"{inv} node1`, `invoke run{inv} -n @all -- uname -r`; stop it with "
          f"`invoke lab.down{inv}`.", file=sys.stderr)


def _vm_lab() -> Path:
    """The two-guest lab's inventory: the one in ./.lab-vm if there is one, else written now."""
    from labkit.errors import UserError
    from labkit.fake import lab as fake
    from labkit.fake import vmimage
    from labkit.tasks import args

    why = vmimage.have_qemu()
    if why is not None:
        raise UserError(f"--vm: {why}")
    state = Path(VM_STATE).resolve()
    path = state / "inventory.yaml"
    if path.is_file():
        return path
    args.writable_folder(state, "guest lab folder")
    return fake.generate(2, state, kind="vm", power_delay=(0.2, 0.5))


TASKS = [demo]
COLLECTION = None
