"""Tasks: lab.up, lab.down, lab.status, lab.fault — the embedded fake lab.

The work lives in labkit.fake.lab (process management, generated inventories) and
labkit.fake.control (the control socket); these tasks parse options and print."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from invoke import Collection, Context

from labkit.errors import LabkitError, UserError
from labkit.tasks import args
from labkit.tasks.common import finish, labtask

STATUS_COLUMNS = ("power", "pending", "phase", "ssh", "pid", "bootdev", "bmc", "faults")
FAULT_COLUMNS = ("drop", "busy", "hang", "refuse_password", "down", "power_delay")
DEFAULT_STATE = Path(".lab")


def _state_dir(inventory: str | None) -> Path:
    """The state folder of --inventory / $LABKIT_INVENTORY / ./inventory.yaml, or ./.lab when
    there is no inventory at all (a generated lab)."""
    from labkit import inventory as inv
    from labkit.fake.lab import state_dir_of

    try:
        path = inv.find_inventory(inventory)
    except UserError:
        if inventory:
            raise
        return DEFAULT_STATE.resolve()
    return state_dir_of(inv.load(path, check_secrets=False))


def _faults_text(f: dict[str, Any]) -> str:
    active = []
    for k, v in f.items():
        if v in (None, False, 0, 0.0):
            continue
        active.append(k if v is True else f"{k}={v}")
    return ",".join(active) or "-"


@labtask(help={"count": "generate a lab of N nodes on free ports in ./.lab (writes "
                        ".lab/inventory.yaml) instead of serving the inventory",
               "power_on": "with --count: nodes start powered on",
               "vm": "with --count: the nodes are QEMU guests with their own Linux kernel "
                     "(needs qemu-system-x86, a kernel with modules, busybox-static)",
               "memory": "with --vm: MiB per guest (default 1024)",
               "cpus": "with --vm: vCPUs per guest (default 1)",
               "kernel": "with --vm: vmlinuz path or version (default: newest in /boot with "
                         "its modules)"})
def up(c: Context, inventory: str | None = None, count: str | None = None,
       power_on: bool = False, vm: bool = False, memory: str | None = None,
       cpus: str | None = None, kernel: str | None = None) -> None:
    """Start the fake lab in the background (idempotent); print its inventory path."""
    from labkit import inventory as inv
    from labkit.fake import lab as fake

    nodes = args.count(count, "--count") if count is not None else 0
    if (vm or memory or cpus or kernel) and not nodes:
        raise UserError("--vm, --memory, --cpus and --kernel go with --count N (or set them "
                        "under fake_lab: in the inventory)")
    if (memory or cpus or kernel) and not vm:
        raise UserError("--memory, --cpus and --kernel are for guest nodes: add --vm")
    knobs = None
    if vm:
        from labkit.fake import vmimage

        knobs = {"memory": args.integer(memory, "--memory", minimum=128) if memory else None,
                 "cpus": args.count(cpus, "--cpus") if cpus else None,
                 "kernel": kernel}
        why = vmimage.have_qemu(kernel)
        if why is not None:
            raise UserError(f"--vm: {why}")
    if nodes:
        state = DEFAULT_STATE.resolve()
        args.writable_folder(state, "fake lab state folder")
        if fake._pid(state) is not None:
            raise UserError(f"a fake lab already runs in {state}; run lab.down first")
        path = fake.generate(nodes, state, power_on=power_on, kind="vm" if vm else "process",
                             vm=knobs)
    else:
        path = inv.find_inventory(inventory).resolve()
        args.writable_folder(fake.state_dir_of(inv.load(path, check_secrets=False)),
                             "fake lab state folder (fake_lab.state_dir)")
    info = fake.up(path)
    word = "started" if info["started"] else "already running"
    print(f"fake lab {word}: pid {info['pid']}, state {info['state_dir']}")
    print(path)


@labtask
def down(c: Context, inventory: str | None = None) -> None:
    """Stop the fake lab and every process its nodes started."""
    from labkit.fake import lab as fake

    state = _state_dir(inventory)
    print("fake lab stopped" if fake.down(state_dir=state) else "fake lab was not running")


@labtask
def status(c: Context, inventory: str | None = None, json: bool = False) -> None:
    """Per-node power, boot phase, SSH and fault state, as the fake lab sees it."""
    from labkit.fake.control import LabControl
    from labkit.fanout import Outcome

    nodes = LabControl(_state_dir(inventory)).status()
    outcomes = []
    for name, st in nodes.items():
        value = {k: st.get(k) for k in STATUS_COLUMNS if k != "faults"}
        value["faults"] = st.get("faults") if json else _faults_text(st.get("faults") or {})
        if st.get("pid") is not None:  # a guest node: its QEMU's pid
            value["pid"] = st["pid"]
        if json:
            value.update({k: st[k] for k in ("sol", "sessions", "reachable") if k in st})
        outcomes.append(Outcome(name, True, value))
    finish(outcomes, as_json=json, columns=STATUS_COLUMNS)


@labtask(help={
    "drop": "drop this fraction (0-1) of packets reaching the BMC",
    "busy": "answer 0xC0 (busy) to the next N chassis commands",
    "hang": "power requests are accepted but never land",
    "no_hang": "let hung power requests land",
    "refuse_password": "every login fails as with a wrong password",
    "cold_reset": "cold-reset the BMC: sessions dropped, unreachable ~1 s",
    "down": "the BMC ignores every packet (until --clear)",
    "clear": "clear every fault (applied before the other options)",
    "power_delay": "LO,HI seconds for power changes to land (e.g. 0.5,2)",
}, changes=False)
def fault(c: Context, inventory: str | None = None, nodes: str | None = None,
          drop: str | None = None, busy: str | None = None, hang: bool = False,
          no_hang: bool = False,
          refuse_password: bool = False, cold_reset: bool = False, down: bool = False,
          clear: bool = False,
          power_delay: str | None = None, json: bool = False) -> None:
    """Inject (or clear) faults in fake BMCs; prints the resulting fault state.

    Not lease-checked: it changes the fake lab's simulation (yours, in your state folder), not
    a lab node; the fake nodes' names may well be leased on the real lab by someone else."""
    from labkit import inventory as inv
    from labkit.fake.control import LabControl
    from labkit.fanout import Outcome

    if hang and no_hang:
        raise UserError("--hang and --no-hang contradict each other")
    change: dict[str, Any] = {}
    if clear:
        change["clear"] = True
    if drop is not None:
        change["drop"] = args.number(drop, "--drop", minimum=0.0, maximum=1.0)
    if busy is not None:
        change["busy"] = args.integer(busy, "--busy", minimum=0)
    if hang or no_hang:
        change["hang"] = hang
    if refuse_password:
        change["refuse_password"] = True
    if down:
        change["down"] = True
    if power_delay is not None:
        parts = [args.seconds(x, "--power-delay", allow_zero=True,
                              shown=f"--power-delay {power_delay!r} (LO,HI seconds)")
                 for x in power_delay.split(",")]
        if len(parts) == 1:
            parts *= 2
        if len(parts) != 2 or parts[0] > parts[1]:
            raise UserError(f"--power-delay {power_delay!r}: want LO,HI with 0 <= LO <= HI")
        change["power_delay"] = parts
    if not change and not cold_reset:
        raise UserError("nothing to do: give a fault option (see --help) or --clear")
    state = _state_dir(inventory)
    control = LabControl(state)
    try:
        path: Path | None = inv.find_inventory(inventory)
    except UserError:
        if inventory:
            raise
        path = None  # a generated lab without inventory at hand: names go to the lab as is
    if path is not None:
        names = [n.name for n in inv.load(path, check_secrets=False).select(nodes)]
    elif nodes is not None:
        # no inventory to select from: the names go to the lab as given, but an empty list
        # must not widen to every node ("*"), as `-n ""` once did
        names = [n.strip() for n in nodes.split(",")]
        if not all(names):
            raise UserError(f"bad node selector {nodes!r}: empty item")
    else:
        names = []
    target = ",".join(names) if nodes is not None else "*"
    result = control.fault(target, **change) if change else {
        "nodes": {n: None for n in names}}
    if cold_reset:
        control.cold_reset(target)
    outcomes = []
    faults = result["nodes"]
    if any(v is None for v in faults.values()):
        st = control.status()
        faults = {n: st[n]["faults"] for n in faults}
    for name, f in faults.items():
        value = dict(f)
        if cold_reset:
            value["cold_reset"] = True
        outcomes.append(Outcome(name, True, value))
    if not outcomes:
        raise LabkitError("no fake BMC matched")
    finish(outcomes, as_json=json, columns=FAULT_COLUMNS)


TASKS: list = []
COLLECTION = Collection("lab", up, down, status, fault)
