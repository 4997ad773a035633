"""Tasks: migrate-test (pre-copy live migration, verified) and dirty-rate (exact dirty rate of a
process on a node). Parsing and printing only: the work is in labkit.experiment."""

from __future__ import annotations

import json as jsonlib
from typing import TYPE_CHECKING, Any

from invoke import Context
from invoke.exceptions import Exit

from labkit.errors import UserError
from labkit.tasks import args
from labkit.tasks.common import lab, labtask

if TYPE_CHECKING:
    from labkit.inventory import Node

MIGRATE_HELP = {
    "src": "node the workload starts on",
    "dst": "node it migrates to",
    "size": "workload region size (64M, 256M, 1G)",
    "rate": "pages/s the workload dirties",
    "pattern": "uniform | hotset | sequential",
    "hot_fraction": "hotset: fraction of pages that get most writes",
    "tracker": "auto | uffd | softdirty | compare",
    "max_rounds": "stop rule: pre-copy rounds at most (p.haul: 8)",
    "min_pages": "stop rule: freeze once a round dirties this few pages (p.haul: 64)",
    "max_growth": "stop rule: freeze when a round grows by more than this %% (p.haul: 10)",
    "seed": "workload RNG seed",
    "verify_resume": "after the migration, run both copies STEPS steps and compare hashes",
    "steps_per_round": "drive the workload by steps (deterministic rounds) instead of time",
    "no_stop_and_copy": "skip the stop-and-copy baseline",
    "matrix": "grid, e.g. 'size=64M,256M rate=1000,20000 pattern=uniform,hotset'",
    "no_deploy": "do not deploy payloads (fail if the nodes differ)",
    "backend": "labkit (its own agents, the default) | criu (CRIU pre-dump rounds, any process)",
    "command": "criu: start this shell command on --src (in the payload folder, its own "
               "session) and migrate it",
    "pid": "criu: migrate this running process on --src (with its children)",
    "tcp": "the workload also serves a TCP stream to a client off both nodes; the connection "
           "must survive the move (run.json: tcp)",
    "tcp_freeze": "--tcp: packets that arrive while frozen are dropped (the client "
                  "retransmits; default) or held and released (labkit backend, NFQUEUE)",
    "tcp_address": "--tcp: the service address that moves (default on a vm fake lab: "
                   "10.77.0.200)",
    "tcp_port": "--tcp: the service port (default 7077)",
}


@labtask(help=MIGRATE_HELP, name="migrate-test", auto_shortflags=False, changes=True)
def migrate_test(c: Context, inventory: str | None = None, src: str = "node1",
                 dst: str = "node2", size: str = "256M", rate: str = "5000",
                 pattern: str = "uniform", hot_fraction: str = "0.1", tracker: str = "auto",
                 max_rounds: str = "8", min_pages: str = "64", max_growth: str = "10",
                 seed: str = "1", verify_resume: str = "0", steps_per_round: str = "0",
                 no_stop_and_copy: bool = False, matrix: str = "", no_deploy: bool = False,
                 backend: str = "labkit", command: str = "", pid: str = "",
                 tcp: bool = False, tcp_freeze: str = "drop", tcp_address: str = "",
                 tcp_port: str = "7077", json: bool = False, force: bool = False) -> None:
    """Migrate a memory-dirtying workload (or, with --backend criu, any process: --command,
    --pid) between two nodes by pre-copy; verify; report.

    Both nodes are changed (powered on, swept, deployed, a workload started and killed), so a
    lease someone else holds on either refuses the run (every --matrix cell uses the same two
    nodes) unless --force."""
    from labkit.experiment import (
        RunFailed,
        build_config,
        parse_matrix,
        run_matrix,
        run_migrate_test,
    )

    # every argument is checked before anything is started
    cfg = build_config(src=src, dst=dst, size=size, rate=rate, pattern=pattern,
                       hot_fraction=hot_fraction, seed=seed, tracker=tracker,
                       max_rounds=max_rounds, min_pages=min_pages, max_growth=max_growth,
                       verify_resume=verify_resume, steps_per_round=steps_per_round,
                       stop_and_copy=not no_stop_and_copy, backend=backend, command=command,
                       pid=pid, tcp=tcp, tcp_freeze=tcp_freeze, tcp_address=tcp_address,
                       tcp_port=tcp_port)
    cells = parse_matrix(matrix) if matrix else None
    if cells is not None:
        from labkit.experiment.config import apply_cell

        for cell in cells:
            apply_cell(cfg, cell)
    lab_ = lab(c, inventory)
    args.writable_folder(lab_.settings.results_dir, "results folder (labkit.results_dir)")
    lab_.named([cfg.src, cfg.dst], change=True, force=force)  # unknown node: UserError now
    inv = lab_.inventory()
    if cells is not None:
        folder, rows = run_matrix(inv, lab_.settings, cfg, cells, deploy=not no_deploy,
                                  out=print)
        if json:
            print(jsonlib.dumps(rows, indent=2, default=str))
        print(f"matrix results: {folder}")
        if not all(r.get("ok") for r in rows):
            raise Exit(code=1)
        return
    try:
        result = run_migrate_test(inv, lab_.settings, cfg, deploy=not no_deploy)
    except RunFailed as e:
        if json and "result" in e.value:  # the JSON still comes (ok false, the failure)
            print(jsonlib.dumps({**e.value["result"], "folder": e.value["folder"]}, indent=2))
        raise
    if json:
        print(jsonlib.dumps({**result.to_json(), "folder": str(result.folder)}, indent=2))
    else:
        print(result.summary())


@labtask(name="dirty-rate", help={"pid": "process id on the node",
                                  "seconds": "measurement window",
                                  "tracker": "auto | uffd | softdirty | compare"},
         changes=True)
def dirty_rate(c: Context, inventory: str | None = None, nodes: str | None = None,
               pid: str | None = None, seconds: str = "5", tracker: str = "auto",
               json: bool = False, force: bool = False) -> None:
    """Dirty rate (MiB/s of distinct pages written) of a process on nodes (-n), over an exact
    window (`window_s`; its instants in --json) unless `method` says otherwise.

    The tracker attaches to the process (ptrace, userfaultfd or soft-dirty bits): that changes
    someone's running process, so a node leased by someone else is refused unless --force."""
    from labkit.experiment import dirty
    from labkit.experiment.config import TRACKERS
    from labkit.ssh import SshClient
    from labkit.tasks.common import finish

    if pid is None:
        raise UserError("--pid: give the process id on the node")
    pid_ = args.integer(pid, "--pid", minimum=1)
    secs = args.seconds(seconds, "--seconds")
    if tracker not in TRACKERS:
        raise UserError(f"--tracker {tracker!r}: one of {', '.join(TRACKERS)}")
    lab_ = lab(c, inventory)
    selected = lab_.select(nodes, change=True, force=force)

    def act(node: Node) -> dict[str, Any]:
        with SshClient.connect(node, lab_.settings) as client:
            return dirty.dirty_rate(node, client, pid_, secs, tracker)

    outcomes = lab_.fan_out(selected, act, label="dirty-rate")
    finish(outcomes, as_json=json, columns=dirty.COLUMNS)


TASKS = [migrate_test, dirty_rate]
COLLECTION = None
