"""Task: ``sync`` — stash, pull, re-apply, never losing local work (logic in labkit/sync.py)."""

from __future__ import annotations

import json as jsonlib
import os
import sys

from invoke import Context
from invoke.exceptions import Exit

from labkit.errors import UserError
from labkit.tasks.common import finish, lab, labtask


@labtask(help={
    "repo": "the checkout to sync (default: config labkit.research_tree, else the current "
            "directory's repository; with --nodes: a path on each node, relative to its login dir, "
            "same default, else the login dir itself)",
    "dry_run": "say what would happen; changes nothing but remote-tracking refs (it fetches)",
    "no_fetch": "with --dry-run: do not even fetch, use the last fetched upstream",
    "rebase": "rebase local commits onto the upstream instead of fast-forward only",
    "merge": "merge the upstream (may create a merge commit) instead of fast-forward only",
    "json": "print the report (or the per-node array) as JSON",
    "nodes": "sync the checkout on these nodes over SSH instead of the local one",
    "force": "with --nodes: sync nodes leased by someone else",
}, changes=True)
def sync(ctx: Context, repo: str | None = None, dry_run: bool = False, json: bool = False,
         nodes: str | None = None, inventory: str | None = None, rebase: bool = False,
         merge: bool = False, no_fetch: bool = False, force: bool = False) -> None:
    """git stash -u, pull (fast-forward only by default), stash apply --index; never loses work.

    With --nodes the checkouts on those nodes change, so a node leased by someone else is
    refused unless --force; --dry-run changes nothing there but remote-tracking refs and is
    not refused. Without --nodes only your own checkout changes: no lease applies."""
    from labkit import sync as syncmod

    if rebase and merge:
        raise UserError("give at most one of --rebase and --merge")
    if no_fetch and not dry_run:
        raise UserError("--no-fetch only makes sense with --dry-run (a sync must fetch)")
    mode = "rebase" if rebase else "merge" if merge else "ff-only"
    lab_ = lab(ctx, inventory)
    tree = repo or lab_.settings.research_tree or None
    if nodes is not None:
        selected = lab_.select(nodes, change=not dry_run, force=force, check_secrets=False)
        outcomes = syncmod.sync_nodes(lab_.settings, selected, tree, mode=mode,
                                      dry_run=dry_run, fetch=not no_fetch)
        finish(outcomes, as_json=json, columns=("status", "before", "after", "pulled",
                                                "stashed", "conflicts"))
        return
    if tree:
        tree = os.path.expanduser(tree)
    try:
        rep = syncmod.sync_repo(tree, mode=mode, dry_run=dry_run, fetch=not no_fetch,
                                timeout=lab_.settings.command_timeout)
    except syncmod.SyncInterrupted as e:
        # the clean-up ran: say where the local changes are, then end as interrupted
        print(jsonlib.dumps(e.report.to_json(), indent=2) if json
              else syncmod.format_report(e.report), flush=True)
        raise
    if rep.exit_code == 2 and not json:
        # a refusal is a usage error: one line on stderr, like every other task
        print(f"error: {('dry run: ' if rep.dry_run else '') + rep.message}", file=sys.stderr)
        raise Exit(code=2)
    print(jsonlib.dumps(rep.to_json(), indent=2) if json else syncmod.format_report(rep))
    if rep.exit_code:
        raise Exit(code=rep.exit_code)


TASKS = [sync]
COLLECTION = None
