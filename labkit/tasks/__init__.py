"""All labkit tasks, assembled into one Invoke namespace used by both ``tasks.py`` (``invoke``)
and the installed ``labkit`` program. Tasks live in the package so the installed command has them.

Each module exports ``TASKS`` (top-level tasks) and ``COLLECTION`` (a named sub-collection such
as ``lab``, or None)."""

from __future__ import annotations

from invoke import Collection

from labkit.config import config_layer


def build_namespace() -> Collection:
    from labkit.tasks import demo, deploy, experiment, lab, leases, nodes, power, sync

    ns = Collection()
    for module in (power, lab, nodes, deploy, sync, leases, experiment, demo):
        for t in module.TASKS:
            ns.add_task(t)
        if module.COLLECTION is not None:
            ns.add_collection(module.COLLECTION)
    ns.configure({"labkit": config_layer()})
    return ns


namespace = build_namespace()
