"""Tasks: ``reserve``, ``release``, ``who`` — sharing lab nodes (logic in labkit/leases.py).

``reserve`` and ``release`` take nodes but change only the lease folder, never a node: they are
declared read-only (``changes=False``), and their ``--force`` is about other people's leases
(take over, release), not about the lease check other tasks pass through."""

from __future__ import annotations

import json as jsonlib
from typing import TYPE_CHECKING, Any

from invoke import Context

from labkit.errors import UserError
from labkit.tasks.common import finish, lab, labtask

if TYPE_CHECKING:
    from labkit.leases import Lease


def _value(lease: Lease, action: str) -> dict[str, Any]:
    from labkit import leases

    return {"action": action, "holder": lease.holder, "until": lease.until(),
            "left": leases.format_duration(lease.left()), "note": lease.note or None}


@labtask(help={"for_": "how long: 90s, 30m, 2h, 1d (also 1h30m)",
               "note": "what you are doing, shown by `who`",
               "force": "take over nodes leased by someone else"},
         changes=False)
def reserve(ctx: Context, nodes: str | None = None, for_: str = "", note: str = "",
            force: bool = False, inventory: str | None = None, json: bool = False) -> None:
    """Lease nodes for a while so others' tasks leave them alone: reserve -n SEL --for 2h."""
    from labkit import leases

    if not for_:
        raise UserError("how long? give --for DURATION, e.g. --for 2h (90s, 30m, 2h, 1d)")
    seconds = leases.parse_duration(for_)  # before anything else: a bad duration starts nothing
    lab_ = lab(ctx, inventory)
    selected = lab_.select(nodes, change=False, check_secrets=False)
    store = leases.LeaseStore.from_settings(lab_.settings)
    who = leases.holder()

    def action(node: Any) -> dict[str, Any]:
        lease, what = store.reserve(node.name, seconds, note=note, force=force, who=who)
        return _value(lease, what)

    finish(lab_.fan_out(selected, action, label="reserve"), as_json=json,
           columns=("action", "holder", "until", "left"))


@labtask(help={"force": "release nodes leased by someone else"}, changes=False)
def release(ctx: Context, nodes: str | None = None, force: bool = False,
            inventory: str | None = None, json: bool = False) -> None:
    """Give leased nodes back: release -n SEL."""
    from labkit import leases

    lab_ = lab(ctx, inventory)
    selected = lab_.select(nodes, change=False, check_secrets=False)
    store = leases.LeaseStore.from_settings(lab_.settings)
    who = leases.holder()

    def action(node: Any) -> dict[str, Any]:
        return {"action": store.release(node.name, force=force, who=who)}

    finish(lab_.fan_out(selected, action, label="release"), as_json=json, columns=("action",))


@labtask(help={"json": "print a JSON array, one object per active lease"})
def who(ctx: Context, json: bool = False) -> None:
    """Who holds which node, with note and time left (expired leases are cleaned)."""
    from labkit import leases

    lab_ = lab(ctx)
    store = leases.LeaseStore.from_settings(lab_.settings)
    active = store.all()
    if json:
        print(jsonlib.dumps([x.to_json() for x in active], indent=2))
    else:
        print(leases.format_who(active, store.folder))


TASKS = [reserve, release, who]
COLLECTION = None
