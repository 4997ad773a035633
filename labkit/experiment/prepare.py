"""Getting a run's nodes ready, whatever the backend: power on and wait for SSH, sweep what a
SIGKILLed earlier controller left running, deploy the payloads (a no-op when already in sync)
so both nodes run the same release, and record the facts run.json reports (kernel, python,
CPUs). A backend that needs more of a node (CRIU installed, ``criu check``) checks it after
this, before anything starts."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from labkit.config import Settings
from labkit.errors import LabkitError
from labkit.experiment import results as res
from labkit.fanout import fan_out
from labkit.inventory import Node

if TYPE_CHECKING:
    from labkit.ssh import ShellPool


def power_on(node: Node, settings: Settings) -> dict[str, Any]:
    """Power ``node`` on and wait until it answers SSH. The one place preparation touches the
    power layer: through ``labkit.bringup``."""
    from labkit import bringup
    from labkit.bmc.power import PowerClient

    with PowerClient(settings) as pc:
        return bringup.power_on(pc, node, settings, wait="ssh")


def prepare_nodes(nodes: list[Node], settings: Settings,
                  pool: ShellPool,
                  *, deploy: bool = True, power: bool = True, events: res.Events | None = None,
                  sweep: bool = True) -> dict[str, Any]:
    """Every node through THE fan-out: power (if it has a BMC), leftover sweep
    (``labkit.janitor``: processes of dead controllers of this host, their temp folders),
    deploy, facts. Returns ``{"nodes": {name: facts}, "payload": {...}}``; fails with one line
    naming the node(s) that could not be prepared, or when their payload releases differ."""
    from labkit.deploy import Deployer, bundle_paths, collect_bundle, remote_workdir

    bundle = collect_bundle(bundle_paths(None, [])) if deploy else None
    deployer = Deployer(settings, bundle, connect=lambda n: pool.get(n)) if bundle else None

    def act(node: Node) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if power and node.bmc is not None:
            out["power"] = power_on(node, settings)
        client = pool.get(node)
        if sweep:
            from labkit import janitor

            try:
                out["leftovers"] = janitor.sweep(client, workdir=remote_workdir(node))
            except Exception as e:  # noqa: BLE001 - a failed sweep is reported, not fatal
                out["leftovers_error"] = str(e)
        if deployer is not None:
            d = deployer.deploy_node(node)
            out["release"] = d.get("release")
            out["revision"] = d.get("revision")
            out["deploy"] = d.get("state")
        facts = client.check("uname -srm; python3 -c 'import sys; print(sys.version.split()[0])';"
                             " nproc", timeout=settings.ssh_timeout + 10)
        lines = facts.stdout.decode(errors="replace").splitlines() + ["", "", ""]
        out.update(uname=lines[0], python=lines[1], cpus=lines[2])
        return out

    outcomes = fan_out(nodes, act, parallel=settings.parallel, label="prepare",
                       progress=settings.progress)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise LabkitError("; ".join(o.line() for o in failed))
    info: dict[str, Any] = {"nodes": {o.node: o.value for o in outcomes}}
    # a release id is <time>-<content digest>: equal content may carry different times
    contents = {str(o.value.get("release")).rsplit("-", 1)[-1] for o in outcomes}
    if deploy and len(contents) != 1:
        raise LabkitError("nodes run different payload releases: "
                          + ", ".join(f"{o.node} {o.value.get('release')}" for o in outcomes))
    info["payload"] = {"releases": {o.node: o.value.get("release") for o in outcomes},
                       "revision": bundle.revision if bundle else None,
                       "dirty": bundle.dirty if bundle else None,
                       "digest": bundle.digest if bundle else None}
    if events:
        events.emit("prepared", **info)
    return info


def report_leftovers(info: dict[str, Any], events: res.Events) -> list[str]:
    """Say (stderr, events.jsonl) what the sweep cleaned on each node, or that it could not
    check; the lines, for the result's ``leftovers_cleaned``."""
    from labkit.janitor import describe

    out: list[str] = []
    for name, facts in sorted(info.get("nodes", {}).items()):
        if facts.get("leftovers_error"):
            line = f"{name}: could not check for leftovers of an interrupted run: " \
                   f"{facts['leftovers_error']}"
            events.emit("leftovers-error", node=name, error=facts["leftovers_error"])
        else:
            cleaned = facts.get("leftovers") or []
            described = describe(name, cleaned)
            if described is None:
                continue
            line = described
            events.emit("leftovers-cleaned", node=name, message=line,
                        processes=[c for c in cleaned if c["kind"] == "process"],
                        files=[c["path"] for c in cleaned if c["kind"] == "files"])
        out.append(line)
        print(line, file=sys.stderr, flush=True)
    return out
