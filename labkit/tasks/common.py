"""What every task shares: resolving inventory + settings from Invoke's context, turning labkit
errors into one-line messages with the right exit code, printing fan-out outcomes, and THE
lease check.

Exit codes: 0 all ok, 1 any node failed / operation failed, 2 usage or inventory error.

Leases: a task that takes nodes (``nodes``, ``node``, ``src``, ``dst``) must say whether it
changes them: ``@labtask(changes=True)`` (it then takes ``force``) or ``@labtask(changes=False)``
(read-only); a task that does not say is refused when it is defined. A task gets its nodes from
:meth:`Lab.select` / :meth:`Lab.named`, whose ``change=`` keyword has no default: with
``change=True`` a node leased by someone else is refused (one line naming node and holder,
exit 1) before anything is started, unless ``force``. That is the one lease check; no task calls
``labkit.leases.check`` itself.

Start-up cost: every ``labkit`` command imports this module and every task module to build
the namespace, so they import only what defining a task needs (Invoke); the inventory, fan-out
and everything a task body uses are imported when a task runs."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from invoke import Context, task
from invoke.exceptions import Exit

from labkit import signals
from labkit.config import Settings
from labkit.errors import LabkitError, UserError

if TYPE_CHECKING:
    from labkit.fanout import Outcome
    from labkit.inventory import Inventory, Node

# Help strings shared by every task that takes these options.
HELP = {
    "inventory": "inventory file (default: $LABKIT_INVENTORY or ./inventory.yaml)",
    "nodes": "nodes: comma list of names, globs (node*), or @group; default all",
    "json": "print a JSON array, one object per node",
    "force": "act on nodes leased by someone else",
}

# Parameters through which a task is told which nodes to act on.
NODE_PARAMS = ("nodes", "node", "src", "dst")

# What the running task declared (labtask(changes=...)); Lab reads it to catch a task declared
# read-only that selects nodes to change.
_DECLARED: ContextVar[bool | None] = ContextVar("labkit_task_changes", default=None)


@dataclass
class Lab:
    """The pieces a task needs, resolved once per invocation."""

    ctx: Context
    settings: Settings
    inventory_path: str | None
    changes: bool | None = None  # the running task's declaration, if any

    _inv: Inventory | None = None

    def inventory(self, check_secrets: bool = True) -> Inventory:
        if self._inv is None:
            from labkit import inventory as inv

            self._inv = inv.load(self.inventory_path, check_secrets=check_secrets)
        return self._inv

    def select(self, selector: str | None, *, change: bool, force: bool = False,
               check_secrets: bool = True) -> list[Node]:
        """The nodes ``selector`` names. ``change``: the task is about to change them (power,
        deploy, run, attach ...): a node leased by someone else is refused, unless ``force``
        (then a warning). Read-only tasks pass ``change=False``."""
        nodes = self.inventory(check_secrets).select(selector)
        self._leases(nodes, change, force)
        return nodes

    def named(self, names: Iterable[str], *, change: bool, force: bool = False,
              check_secrets: bool = True) -> list[Node]:
        """Nodes by exact name (``--src``/``--dst``, ``console NODE``), with :meth:`select`'s
        lease rule. An unknown name is a usage error."""
        inv = self.inventory(check_secrets)
        nodes = [inv.node(n) for n in names]
        self._leases(nodes, change, force)
        return nodes

    def need_ssh(self, nodes: Sequence[Node], why: str) -> None:
        """Refuse, before anything is started, when ``why`` (``--wait ssh``) needs SSH on a
        node that has no ``ssh:`` block: powering the lab on to then fail per node is the
        opposite of a usage error."""
        missing = [n for n in nodes if n.ssh is None]
        if missing:
            shown = ", ".join(f"{n.name} ({n.source})" for n in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise UserError(f"{why} needs SSH, but {shown}{more} "
                            f"{'has' if len(missing) == 1 else 'have'} no ssh: block")

    def _leases(self, nodes: list[Node], change: bool, force: bool) -> None:
        if not change:
            return
        if self.changes is False:
            raise RuntimeError("a task declared read-only (labtask(changes=False)) selects "
                               "nodes to change; declare changes=True and take --force")
        from labkit import leases

        leases.check(nodes, self.settings, force)

    def fan_out(self, nodes: Sequence[Any], action: Callable[[Any], dict | None], label: str,
                **kw: Any) -> list[Outcome]:
        from labkit.fanout import fan_out

        return fan_out(nodes, action, parallel=self.settings.parallel, label=label,
                       progress=self.settings.progress, **kw)


def lab(ctx: Context, inventory: str | None = None) -> Lab:
    cfg = ctx.config.get("labkit", {}) if hasattr(ctx, "config") else {}
    return Lab(ctx=ctx, settings=Settings.from_mapping(cfg), inventory_path=inventory,
               changes=_DECLARED.get())


def finish(outcomes: list[Outcome], *, as_json: bool = False, columns: Sequence[str] = ()) -> None:
    """Print the per-node table (or JSON) and exit non-zero if any node failed."""
    from labkit.fanout import report

    code = report(outcomes, as_json=as_json, columns=columns)
    if code:
        raise Exit(code=code)


def labtask(*args: Any, changes: bool | None = None, **kwargs: Any):
    """``@task`` plus labkit's error contract: a LabkitError becomes ``error: <one line>`` on
    stderr and its exit code; no traceback for anything the user can fix.

    ``changes``: required for a task that takes nodes (see the module docstring). True: the
    task may change them, takes ``force``, and selects with ``Lab.select(change=...)``; False:
    it only reads them. Kept on the task object as ``.changes`` for the tests that walk the
    namespace."""
    def wrap(fn: Callable) -> Any:
        # Invoke refuses help for options a task lacks: only add help for parameters it has.
        import inspect

        params = inspect.signature(fn).parameters
        takes = [p for p in NODE_PARAMS if p in params]
        if takes and changes is None:
            raise TypeError(f"task {fn.__name__} takes {', '.join(takes)}: declare "
                            "labtask(changes=True) (lease-checked, takes force) or "
                            "labtask(changes=False) (read-only)")
        if changes and "force" not in params:
            raise TypeError(f"task {fn.__name__} changes nodes: it must take force "
                            "(act on nodes leased by someone else)")
        help_ = dict(kwargs.get("help") or {})
        for k, v in HELP.items():
            if k in params:
                help_.setdefault(k, v)
        kwargs["help"] = help_

        @functools.wraps(fn)
        def body(*a: Any, **kw: Any) -> Any:
            token = _DECLARED.set(changes)
            try:
                # Ctrl-C, SIGTERM, SIGHUP: one line and exit 128 + signal, all in signals.call
                return signals.call(fn, *a, **kw)
            except LabkitError as e:
                from labkit.secrets import scrub

                print(f"error: {scrub(str(e))}", file=sys.stderr)
                raise Exit(code=e.exit_code) from None
            except BrokenPipeError:
                # output piped into `head` and friends: stop quietly, like any Unix tool
                from labkit.cli import silence_stdout

                silence_stdout()
                raise Exit(code=141) from None
            finally:
                _DECLARED.reset(token)
        t = task(body, **kwargs)
        t.changes = changes
        return t

    if args and callable(args[0]) and len(args) == 1 and not kwargs.get("pre"):
        fn = args[0]
        return wrap(fn)
    return wrap
