"""One migrate-test run, whatever the backend: its phases, its time budget, its cleanup and its
results folder.

Shape of a run (every step also lands in events.jsonl):
  prepare   both nodes (prepare.py): power, leftover sweep, deploy, facts.
  migrate   the backend (backends/; today the built-in ``labkit`` one) starts the workload and
            whatever moves it, runs the pre-copy rounds under the stop rules, freezes, resumes
            on dst, verifies, and fills the Result.
  cleanup   always (success, failure, Ctrl-C): kill every remote process the run started, by
            its run id (setsid'd and double-forked descendants included) and by recorded pid,
            with THE kill-by-marker (``labkit.nodeside.killmarked``) on each node.
  write     run.json, rounds.csv, events.jsonl, plots (results.py, plots.py).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkit.config import Settings
from labkit.errors import LabkitError, UserError
from labkit.experiment import backends
from labkit.experiment import results as res
from labkit.experiment.config import MigrateConfig
from labkit.experiment.prepare import prepare_nodes, report_leftovers
from labkit.experiment.remote import MigrationFailed, Peers, Remote, payload_command
from labkit.experiment.results import Result
from labkit.inventory import Inventory, Node

if TYPE_CHECKING:
    from labkit.experiment.tcp import TcpSession
    from labkit.ssh import ShellPool

# slower than this (bytes/s, end to end: relay, apply, hash) a stream counts as stuck
MIN_STREAM_RATE = 4 << 20


class RunFailed(MigrationFailed):
    """A run failed: the cause's one-line message and exit code, its report data, and
    ``value["folder"]``, the results folder (written either way); ``value["result"]``, when
    given, is the run's result as JSON (what run.json and ``--json`` hold: ok false, the
    error and its ``failure`` object). Message and value are scrubbed of secrets
    (``results.scrubbed``): they quote peers' stderr, and tasks print them as they are."""

    def __init__(self, cause: LabkitError, folder: Path,
                 result: dict[str, Any] | None = None):
        value = {**cause.value, "folder": str(folder)}
        if result is not None:
            value["result"] = result
        super().__init__(res.scrubbed(str(cause)), value=res.scrubbed(value))
        self.exit_code = cause.exit_code


def failure_report(error: LabkitError, phase: str) -> dict[str, Any]:
    """run.json's ``error`` object: the message, the step the run was at (what it waited
    for, else its phase), and, when a process of the run is to blame, its node, its label,
    how it ended and the last lines of its stderr."""
    v = error.value
    return {"message": str(error), "step": v.get("step") or phase, "node": v.get("node"),
            "peer": v.get("peer"), "exit_status": v.get("exit_status"),
            "stderr": list(v.get("stderr") or [])}


def wait_budget(settings: Settings, size: int) -> float:
    """How long one wait of a run (a round, a hash, a reply) may take before the run fails
    naming what it waited for: SSH slack plus the whole region moved and hashed at a floor
    rate of MIN_STREAM_RATE, capped by ``labkit.command_timeout`` (0: no cap). A peer that dies
    fails at once (its channel closes); this bounds one that is alive but stuck."""
    budget = 3 * settings.ssh_timeout + size / MIN_STREAM_RATE
    if settings.command_timeout and settings.command_timeout > 0:
        budget = min(budget, settings.command_timeout)
    return max(1.0, budget)


def kill_command(run_ids: list[str], pids: list[int]) -> str | None:
    """The command that ends, on one node, what a run started there: every process whose
    environment carries one of ``run_ids`` as its LABKIT_RUN (and the process groups they
    lead), and the recorded ``pids``, scanning again until none is left. It exits 1, naming
    the survivors in its JSON line, if something outlives its budget. None: nothing to kill."""
    from labkit import nodeside
    from labkit.ssh import RUN_VAR

    args: list[str] = []
    for i in run_ids:
        if i.isalnum():  # "LABKIT_RUN=" alone would be a prefix: every run's processes
            args += ["--marker", f"{RUN_VAR}={i}"]
    for p in pids:
        args += ["--pid", str(int(p))]
    return nodeside.command("killmarked", *args, fast=True) if args else None


def _survivors(stdout: bytes) -> list[int]:
    """The pids killmarked could not end, from its JSON line (none if it printed none)."""
    for line in reversed(stdout.decode(errors="replace").splitlines()):
        try:
            return [int(p) for p in json.loads(line).get("survivors", [])]
        except (ValueError, AttributeError, TypeError):
            continue
    return []


class MigrateRun:
    """One migrate-test run; ``run()`` always cleans up and writes the results folder.

    What a backend uses: ``cfg``, ``settings``, ``events``, ``timeout`` (the budget of one
    wait), ``src_node``/``dst_node``, ``pool``, ``result``; ``start()`` for every process it
    runs on a node (so cleanup kills it) and ``pids`` for pids it learns of."""

    def __init__(self, inventory: Inventory, settings: Settings, config: MigrateConfig, *,
                 folder: Path | None = None, deploy: bool = True, power: bool = True,
                 pool: ShellPool | None = None,  # None: the run opens (and closes) its own
                 prepared: dict[str, Any] | None = None):
        self.inv = inventory
        self.settings = settings
        self.cfg = config
        self.src_node = inventory.node(config.src)
        self.dst_node = inventory.node(config.dst)
        for n in (self.src_node, self.dst_node):
            if n.ssh is None:
                raise UserError(f"{n.name}: no ssh: section in {inventory.path}")
        self.backend = backends.get(config.backend)
        self.tcp: TcpSession | None = None
        if config.tcp:
            from labkit.experiment.tcp import TcpSession

            self.tcp = TcpSession(self)  # a refusal (exit 2) comes before anything is made
        self.folder = folder or res.new_folder(settings.results_dir, "migrate-test")
        self.events = res.Events(self.folder / "events.jsonl")
        self.deploy = deploy
        self.power = power
        self._own_pool = pool is None
        if pool is None:
            from labkit.ssh import ConnectionPool

            pool = ConnectionPool(settings)
        self.pool: ShellPool = pool
        self.prepared = prepared
        self.remotes: list[Remote] = []
        # every process the run starts: any of them ending unasked fails the run's waits
        self.peers = Peers(self.events)
        self.phase = "prepare"
        self.pids: dict[str, set[int]] = {config.src: set(), config.dst: set()}
        self.timeout = wait_budget(settings, config.size)
        self.result = Result(self.folder, False, config)

    # -- phases ----------------------------------------------------------------------------
    def run(self) -> Result:
        """Prepare, migrate, clean up, write. A LabkitError comes out as RunFailed (same
        message and exit code, plus the results folder and the result as JSON); Ctrl-C as
        KeyboardInterrupt, after the cleanup."""
        t_start = time.monotonic()
        r = self.result
        failed: LabkitError | None = None
        try:
            self.events.emit("config", **self.cfg.to_json())
            self.phase = "prepare"
            r.info = self.prepare()
            self.phase = "migrate"
            if self.tcp is not None:
                self.tcp.setup()
            try:
                self.backend(self)
            except LabkitError:
                self._tcp_verdict()  # what the client saw of a failed migration, for run.json
                raise
            if self.tcp is not None:
                self.phase = "tcp"
                self.tcp.finish()
            r.ok = True
        except KeyboardInterrupt:
            r.error = "interrupted"
            self.events.emit("interrupted")
            raise
        except LabkitError as e:
            failed = e
            r.error = str(e)
            r.failure = failure_report(e, self.phase)
            self.events.emit("failed", error=str(e),
                             **{k: v for k, v in r.failure.items() if k != "message"})
        finally:
            r.total_s = round(time.monotonic() - t_start, 3)
            self.cleanup()
            self.write()
        if failed is not None:
            raise RunFailed(failed, self.folder, r.to_json()) from failed
        return r

    def _tcp_verdict(self) -> None:
        if self.tcp is None or self.tcp.proc is None:
            return
        try:
            self.tcp.finish()
        except LabkitError:
            pass  # the migration's own error is the one to report

    def prepare(self) -> dict[str, Any]:
        """Power + SSH + deploy + facts for both nodes, in parallel through THE fan-out (once
        per matrix: later cells are handed the first cell's ``prepared``)."""
        if self.prepared is not None:
            return self.prepared
        self.prepared = prepare_nodes([self.src_node, self.dst_node], self.settings, self.pool,
                                      deploy=self.deploy, power=self.power, events=self.events)
        self.result.cleaned += report_leftovers(self.prepared, self.events)
        return self.prepared

    def start(self, node: Node, script: str, args: str, label: str, *,
              env: dict[str, str] | None = None, raw: bool = False) -> Remote:
        """Run payload ``script`` on ``node``; cleanup will kill it and all it starts."""
        r = Remote(self.pool.get(node), node.name, payload_command(node, script, args), label,
                   env=env, raw=raw, peers=self.peers)
        self.remotes.append(r)
        self.events.emit("start", node=node.name, what=label, cmd=f"{script} {args}")
        return r

    def workload_args(self) -> str:
        """The built-in workload's arguments, as configured (after ``workload.py``)."""
        cfg = self.cfg
        return (f"run --size {cfg.size} --rate {cfg.rate:g} --pattern {cfg.pattern} "
                f"--hot-fraction {cfg.hot_fraction:g} --seed {cfg.seed} --slot {cfg.slot} "
                f"--batch {cfg.batch}" + ("" if cfg.steps_per_round else " --timed")
                + (f" --tcp-serve {self.tcp.address}:{self.tcp.port}" if self.tcp else ""))

    def start_workload(self) -> tuple[Remote, int]:
        """The built-in workload on src, as configured; returns it once it is ready (its
        region mapped at the fixed address), with its pid."""
        wl = self.start(self.src_node, "workload.py", self.workload_args(), "workload")
        ready = wl.next(self.timeout, "the workload's ready line")
        pid = int(ready["pid"])
        self.pids[self.src_node.name].add(pid)
        self.events.emit("workload-ready", pid=pid, addr=hex(ready["addr"]), size=ready["size"])
        if self.tcp is not None:
            self.tcp.connect()
        return wl, pid

    # -- cleanup + results -----------------------------------------------------------------
    def cleanup(self) -> None:
        """Kill every remote process this run started: one killmarked per node, by run id
        (every descendant carries it, setsid'd or not) and by recorded pid. Retried once over a
        fresh connection: under load a pooled transport can be stuck in a re-key, and a cleanup
        that silently fails leaves a 1 GiB workload behind; what survives both is said on
        stderr and in events.jsonl."""
        from labkit.ssh import SshClient

        self.peers.close()  # what cleanup ends is not a peer dying
        ids: dict[str, list[str]] = {}
        for rem in self.remotes:
            ids.setdefault(rem.node, []).append(rem.proc.run_id)
        names = sorted(set(ids) | {n for n, p in self.pids.items() if p})
        for name in names:
            cmd = kill_command(ids.get(name, []), sorted(self.pids.get(name, ())))
            if cmd is None:
                continue
            node = self.inv.node(name)
            left = ""
            for attempt in range(2):
                try:
                    if attempt == 0:
                        r = self.pool.get(node).run(cmd, timeout=2 * self.settings.ssh_timeout)
                    else:
                        self.pool.drop(node)
                        with SshClient.connect(node, self.settings) as c:
                            r = c.run(cmd, timeout=2 * self.settings.ssh_timeout)
                    if r.exit_code == 0:
                        left = ""
                        break
                    survivors = _survivors(r.stdout)
                    left = (f"processes {', '.join(map(str, survivors))} survived" if survivors
                            else f"the kill exited {r.exit_code}")
                    self.events.emit("cleanup-retry", node=name, exit=r.exit_code,
                                     survivors=survivors)
                except Exception as e:  # noqa: BLE001 - keep cleaning the rest
                    left = str(e)
                    self.events.emit("cleanup-error", node=name, error=str(e))
            if left:
                self.events.emit("cleanup-failed", node=name, error=left)
                print(f"{name}: could not end every process of this run: {left}",
                      file=sys.stderr, flush=True)
        for rem in self.remotes:
            try:
                rem.proc.close()
            except Exception:  # noqa: BLE001
                pass
        if self.tcp is not None:
            self.tcp.close()
        self.events.emit("cleanup", processes=len(self.remotes))
        if self._own_pool:
            self.pool.close_all()

    def write(self) -> None:
        r = self.result
        run = {"task": "migrate-test", "config": self.cfg.to_json(), "result": r.to_json(),
               "nodes": (r.info or {}).get("nodes", {}),
               "payload": (r.info or {}).get("payload", {}),
               "backend": self.cfg.backend, "tracker_backend": r.backend,
               "labkit_version": _version(), "error": r.failure,
               **({"criu": r.criu} if r.criu is not None else {}),
               **({"tcp": r.tcp} if r.tcp is not None else {})}
        try:
            res.write_json(self.folder / "run.json", run)
            res.write_rounds(self.folder / "rounds.csv", r.rounds)
            if r.rounds:
                from labkit.experiment import plots

                title = f"{r.what()} ({self.cfg.backend}" + (
                    f", {r.backend})" if r.backend else ")")
                plots.plot_rounds(self.folder / "rounds.png", r.rounds, title)
                tl = r.info.get("timeline", {})
                plots.plot_timeline(self.folder / "timeline.png", r.rounds, tl.get("freeze_t"),
                                    tl.get("resumed_t"), title,
                                    stall=(r.tcp or {}).get("freeze_gap_t")
                                    or (r.tcp or {}).get("gap_t"))
        finally:
            self.events.close()


def _version() -> str:
    import labkit

    return getattr(labkit, "__version__", "?")


def run_migrate_test(inventory: Inventory, settings: Settings, config: MigrateConfig, *,
                     folder: Path | None = None, deploy: bool = True, power: bool = True,
                     pool: ShellPool | None = None,  # None: the run opens (and closes) its own
                     prepared: dict[str, Any] | None = None) -> Result:
    """One verified pre-copy migration. Raises RunFailed (a MigrationFailed: the cause's
    message and exit code; ``.value['folder']`` is the results folder, written either way)."""
    config.validate()
    return MigrateRun(inventory, settings, config, folder=folder, deploy=deploy, power=power,
                      pool=pool, prepared=prepared).run()
