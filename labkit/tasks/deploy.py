"""Task: deploy — ship the payload bundle to nodes (delta upload, build, atomic switch), check
drift, or roll back. The logic lives in labkit.deploy; this only wires options to it."""

from __future__ import annotations

import sys

from invoke import Context

from labkit.errors import UserError
from labkit.tasks.common import finish, lab, labtask

HELP = {
    "check": "report drift per node (missing / stale / modified on node / in sync); "
             "changes nothing; exit 1 if any node is not in sync",
    "rollback": "switch each node back to its previous release",
}


@labtask(help=dict(HELP), changes=True)
def deploy(c: Context, inventory: str | None = None, nodes: str | None = None,
           check: bool = False, rollback: bool = False, json: bool = False,
           force: bool = False) -> None:
    """Ship payloads to nodes: delta upload, build, atomic switch (--check, --rollback).

    The payloads are the inventory's `payloads:` or config labkit.payloads, default labkit's
    own. Only what changed is uploaded, into a new release; the build (labkit.deploy_build,
    default a python compile check) runs before `current` is switched atomically; `previous`
    is kept for --rollback. Deploy and --rollback change the nodes (leased nodes are refused
    unless --force); --check only reads them."""
    if check and rollback:
        raise UserError("--check and --rollback exclude each other")
    action = "check" if check else "rollback" if rollback else "deploy"
    lab_ = lab(c, inventory)
    selected = lab_.select(nodes, change=action != "check", force=force)
    from labkit import deploy as dp

    cfg = c.config.get("labkit", {}) if hasattr(c, "config") else {}
    deployer = dp.deployer_for(lab_.settings, cfg, lab_.inventory(), action)
    if deployer.bundle is not None and not json:
        print(dp.describe_bundle(deployer.bundle), file=sys.stderr)
    outcomes = deployer.run(selected, action)
    finish(outcomes, as_json=json, columns=dp.columns_for(action))


TASKS = [deploy]
COLLECTION = None
