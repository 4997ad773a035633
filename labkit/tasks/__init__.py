"""All labkit tasks, assembled into one Invoke namespace used by both ``tasks.py`` (``invoke``)
and the installed ``labkit`` program. Tasks live in the package so the installed command has them."""

from __future__ import annotations

from invoke import Collection

from labkit.config import DEFAULTS


def build_namespace() -> Collection:
    from labkit.tasks import power

    ns = Collection()
    for module in (power,):
        for t in module.TASKS:
            ns.add_task(t)
    for sub in ():
        ns.add_collection(sub)
    ns.configure({"labkit": dict(DEFAULTS)})
    return ns


namespace = build_namespace()
