"""What every task shares: resolving inventory + settings from Invoke's context, turning labkit
errors into one-line messages with the right exit code, and printing fan-out outcomes.

Exit codes: 0 all ok, 1 any node failed / operation failed, 2 usage or inventory error."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from invoke import Context, task
from invoke.exceptions import Exit

from labkit import inventory as inv
from labkit.config import Settings
from labkit.errors import LabkitError
from labkit.fanout import Outcome, fan_out, report
from labkit.secrets import scrub

# Help strings shared by every task that takes these options.
HELP = {
    "inventory": "inventory file (default: $LABKIT_INVENTORY or ./inventory.yaml)",
    "nodes": "nodes: comma list of names, globs (node*), or @group; default all",
    "json": "print a JSON array, one object per node",
    "force": "act on nodes leased by someone else",
}


@dataclass
class Lab:
    """The pieces a task needs, resolved once per invocation."""

    ctx: Context
    settings: Settings
    inventory_path: str | None

    _inv: inv.Inventory | None = None

    def inventory(self, check_secrets: bool = True) -> inv.Inventory:
        if self._inv is None:
            self._inv = inv.load(self.inventory_path, check_secrets=check_secrets)
        return self._inv

    def select(self, selector: str | None) -> list[inv.Node]:
        return self.inventory().select(selector)

    def fan_out(self, nodes: Sequence[Any], action: Callable[[Any], dict | None], label: str,
                **kw: Any) -> list[Outcome]:
        return fan_out(nodes, action, parallel=self.settings.parallel, label=label,
                       progress=self.settings.progress, **kw)


def lab(ctx: Context, inventory: str | None = None) -> Lab:
    cfg = ctx.config.get("labkit", {}) if hasattr(ctx, "config") else {}
    return Lab(ctx=ctx, settings=Settings.from_mapping(cfg), inventory_path=inventory)


def finish(outcomes: list[Outcome], *, as_json: bool = False, columns: Sequence[str] = ()) -> None:
    """Print the per-node table (or JSON) and exit non-zero if any node failed."""
    code = report(outcomes, as_json=as_json, columns=columns)
    if code:
        raise Exit(code=code)


def labtask(*args: Any, **kwargs: Any):
    """``@task`` plus labkit's error contract: a LabkitError becomes ``error: <one line>`` on
    stderr and its exit code; no traceback for anything the user can fix."""
    def wrap(fn: Callable) -> Any:
        # Invoke refuses help for options a task lacks: only add help for parameters it has.
        import inspect

        params = inspect.signature(fn).parameters
        help_ = dict(kwargs.get("help") or {})
        for k, v in HELP.items():
            if k in params:
                help_.setdefault(k, v)
        kwargs["help"] = help_

        @functools.wraps(fn)
        def body(*a: Any, **kw: Any) -> Any:
            try:
                return fn(*a, **kw)
            except LabkitError as e:
                print(f"error: {scrub(str(e))}", file=sys.stderr)
                raise Exit(code=e.exit_code) from None
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                raise Exit(code=130) from None
            except BrokenPipeError:
                # output piped into `head` and friends: stop quietly, like any Unix tool
                import os

                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                raise Exit(code=141) from None
        return task(body, **kwargs)

    if args and callable(args[0]) and len(args) == 1 and not kwargs.get("pre"):
        fn = args[0]
        return wrap(fn)
    return wrap
