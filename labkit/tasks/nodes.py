"""Tasks on nodes over SSH: ``run``.

``invoke run -n SEL -- CMD...`` (or ``labkit run ...``): the words after ``--`` are joined with
spaces like ssh does, so ``-- 'cat x | wc -l'`` and ``-- cat x '|' wc -l`` mean the same."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from invoke import Context

from labkit.errors import UserError
from labkit.tasks import args
from labkit.tasks.common import finish, lab, labtask

if TYPE_CHECKING:
    from labkit.fanout import Outcome


def run_on_nodes(lab_: Any, nodes: list, command: str, *, timeout: float | None,
                 stream: bool, cancel: threading.Event,
                 out_dir: Path | None = None) -> list[Outcome]:
    """The fan-out of ``run``: one pooled connection per node, the command everywhere at once
    through ``RemoteShell.run``, a node's non-zero exit or timeout is that node's failure.
    Output goes where ``labkit.ssh.output.NodeOutput`` sends it as it arrives, and the result
    holds only the last ``KEEP`` bytes of each stream (``*_truncated``: how many it lacks)."""
    from labkit.ssh import CommandFailed, ConnectionPool
    from labkit.ssh.output import KEEP, NodeOutput

    lock = threading.Lock()
    pool = ConnectionPool(lab_.settings)

    def action(node: Any) -> dict[str, Any]:
        client = pool.get(node)
        with NodeOutput(node.name, lock, stream=stream, out_dir=out_dir) as out:
            r = client.run(command, timeout=timeout, on_stdout=out.stdout,
                           on_stderr=out.stderr, cancel=cancel, keep=KEEP)
        value = {**r.to_json(), "stdout_truncated": r.stdout_truncated,
                 "stderr_truncated": r.stderr_truncated}
        if not r.ok:
            raise CommandFailed(r.reason(), value)
        return value

    try:
        return lab_.fan_out(nodes, action, label="run")
    finally:
        pool.close_all()


@labtask(help={
    "timeout": "seconds before the remote command is killed (default labkit.command_timeout)",
    "json": "print a JSON array with exit_code, stdout, stderr per node (no streaming; the "
            "last 1 MiB of each stream, *_truncated: bytes left out)",
    "out": "folder to write every node's whole output to, as NODE.stdout and NODE.stderr",
}, changes=True)
def run(ctx: Context, nodes: str | None = None, inventory: str | None = None,
        timeout: str | None = None, json: bool = False, force: bool = False,
        out: str | None = None) -> None:
    """Run a shell command on nodes in parallel: invoke run -n SEL -- CMD..."""
    from labkit import signals
    from labkit.ssh.output import output_dir

    command = (getattr(ctx, "remainder", "") or "").strip()
    if not command:
        raise UserError("nothing to run: give the command after --, e.g. run -n node1 -- uptime")
    seconds = args.seconds(timeout, "--timeout") if timeout is not None else None
    lab_ = lab(ctx, inventory)
    selected = lab_.select(nodes, change=True, force=force)
    out_dir = output_dir(out) if out is not None else None
    # Ctrl-C, SIGTERM, SIGHUP (labkit.signals): every node's run loop sees the cancel event and
    # kills its remote processes while the main thread is interrupted; the fan-out waits for
    # the workers, which now return within a round trip.
    outcomes = run_on_nodes(lab_, selected, command, timeout=seconds, stream=not json,
                            cancel=signals.cancel_event(), out_dir=out_dir)
    finish(outcomes, as_json=json, columns=("exit_code",))


TASKS = [run]
COLLECTION = None
