"""The built-in backend: labkit's own agents (``payloads/agent.py``) move the workload's one
region, whose address is fixed, from src to dst.

  start     the workload on src (``run.start_workload``), the source agent attached to it
            (tracker armed on round 0), the restore agent on dst.
  pre-copy  ``round`` commands; the controller relays the source agent's stdout into the
            restore agent's stdin, peeking at control frames as they pass (relay.Pump); p.haul's
            stop rules (rules.py) decide when to freeze.
  freeze    ``final``: the agent SIGSTOPs the workload, sends the last dirty set; the restore
            agent validates, applies, and resumes the workload in-process. downtime = controller
            time from sending ``final`` to the destination's "resumed" line (an upper bound: it
            includes one command hop and one reply hop).
  verify    SHA-256 of the frozen source region (source agent) == restored region (dst).
            --verify-resume N: both copies run to the same step, their hashes must match.
  baseline  stop-and-copy: a second agent pair copies every page of the (still frozen) source
            into a fresh restore; its downtime is the comparison figure.
  --tcp     the agents carry the workload's connection too (payloads/agent.py's docstring: the
            SOCKET frame, the address move, --tcp-freeze drop|hold); the restored workload runs
            timed so it goes on serving records, and the client's verdict is taken before it is
            told to quit. The baseline's agents never touch the socket.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from labkit.experiment.relay import Pump
from labkit.experiment.remote import MigrationFailed, Remote
from labkit.inventory import Node
from labkit.payloads import stream as st

if TYPE_CHECKING:
    from labkit.experiment.run import MigrateRun


def migrate(run: MigrateRun) -> None:
    """The backend's entry point (see backends/__init__.py for the contract)."""
    LabkitMigration(run).migrate()


class LabkitMigration:
    """One migration by the built-in agents, on a run's behalf."""

    def __init__(self, run: MigrateRun):
        self.run = run
        self.cfg = run.cfg
        self.events = run.events
        self.timeout = run.timeout
        self.result = run.result

    def migrate(self) -> None:
        run, cfg, r, ev, T = self.run, self.cfg, self.result, self.events, self.timeout
        src, dst = run.src_node, run.dst_node
        wl, wpid = run.start_workload()
        env = {"LABKIT_AGENT_CORRUPT": cfg.corrupt} if cfg.corrupt else {}
        tcp_args = dst_args = ""
        if run.tcp is not None:
            tcp_args = f" --tcp {run.tcp.address}:{run.tcp.port} --tcp-freeze {run.tcp.freeze}"
            # the resumed copy must keep stepping: a record goes out after every timed step
            dst_args = tcp_args + ("" if cfg.steps_per_round else " --timed")
            if run.tcp.fault:
                env["LABKIT_TCP_FAULT"] = run.tcp.fault
        sa = run.start(src, "agent.py", f"source --pid {wpid} --tracker {cfg.tracker}{tcp_args}",
                       "source agent", env=env or None, raw=True)
        da = run.start(dst, "agent.py", f"restore --live{dst_args}", "restore agent",
                       env=env or None)
        pump = Pump(sa, da, ev, "precopy")
        hello = pump.wait(T, "the restore agent's hello", dst_event="hello")
        r.backend = hello.get("backend")
        ev.emit("tracker", backend=r.backend)

        # pre-copy rounds
        pages_hist: list[int] = []
        starts: dict[int, float] = {}
        ends: list[dict[str, Any]] = []
        rnd = 0
        while True:
            if cfg.steps_per_round and rnd > 0:
                wl.call(f"step {cfg.steps_per_round}", T)
            starts[rnd] = ev.now()
            sa.send("round")
            end = pump.wait(T, f"the end of round {rnd}", src_type=st.ROUND_END)
            end["t_src_end"] = ev.now()
            ends.append(end)
            # like p.haul's pre-dump into the page server: a round is done when the destination
            # holds it, so no backlog is left to drain (and be counted) after the freeze
            pump.wait_applied(int(end["round"]), T)
            pages_hist.append(int(end["pages"]))
            reason = cfg.rules.decide(pages_hist)
            rnd += 1
            if reason:
                r.stop_reason = reason
                break
        ev.emit("stop", reason=r.stop_reason, rounds=rnd, pages=pages_hist)

        # freeze + final round + resume on dst
        if cfg.steps_per_round:
            wl.call(f"step {cfg.steps_per_round}", T)
        t_freeze = ev.emit("freeze")
        starts[rnd] = t_freeze
        sa.send("final")
        end = pump.wait(T, "the final round", src_type=st.ROUND_END)
        end["t_src_end"] = ev.now()
        ends.append(end)
        resumed = pump.wait(T, "the restored workload", dst_event="resumed")
        t_resumed = ev.now()
        run.pids[dst.name].add(int(resumed["pid"]))
        r.downtime_s = t_resumed - t_freeze
        ev.emit("downtime", ms=r.downtime_s * 1000, step=resumed.get("step"))
        if run.tcp is not None:
            sock = pump.wait(T, "the saved TCP connection", src_type=st.SOCKET)
            ev.emit("tcp-moved", **sock.get("summary", {}), freeze=sock.get("freeze"),
                    fault=sock.get("fault"), give_ms=1000 * float(sock.get("give_s") or 0),
                    save_ms=1000 * float(sock.get("save_s") or 0),
                    **{f"dst_{k.removesuffix('_s')}_ms": 1000 * float(v)
                       for k, v in (resumed.get("tcp") or {}).items() if k.endswith("_s")})
        restored = pump.wait(T, "the restored region's hash", dst_event="restored")
        sa.send("verify")
        ver = pump.wait(T, "the source region's hash", src_type=st.VERIFY)
        verified = pump.wait(T, "the verification", dst_event="verified")
        r.source_sha256, r.restored_sha256 = ver["sha256"], restored["sha256"]
        r.verified = bool(verified.get("match")) and ver["sha256"] == restored["sha256"]
        ev.emit("verify", match=r.verified, source=ver["sha256"], restored=restored["sha256"])
        r.set_rounds(self._round_rows(ends, starts, pump), t_freeze, t_resumed)
        if not r.verified:
            raise MigrationFailed(f"image verification FAILED: frozen source {ver['sha256'][:16]}"
                                  f" != restored {restored['sha256'][:16]}")
        sa.quit()
        pump.wait(T, "the restored workload to serve", dst_event="serving")
        frozen_step = int(ver.get("step", resumed.get("step", 0)))

        if cfg.stop_and_copy:
            self._stop_and_copy(src, dst, wpid, ver["sha256"])
        if cfg.verify_resume:
            self._verify_resume(wl, pump, src, wpid, frozen_step)
        if run.tcp is not None:
            run.tcp.finish()  # the client's verdict while the restored workload still serves
        # orderly ends (cleanup kills whatever ignores them)
        for rem in (wl, da):
            try:
                rem.quit()
            except MigrationFailed:
                pass

    @staticmethod
    def _round_rows(ends: list[dict[str, Any]], starts: dict[int, float],
                    pump: Pump) -> list[dict[str, Any]]:
        """The source agent's round-end frames as result rows; a round ends when the
        destination has applied it."""
        rows = []
        for end in ends:
            rnd = int(end["round"])
            applied = pump.applied.get(rnd)
            t_end = applied[0] if applied else end["t_src_end"]
            wall = t_end - starts[rnd]
            rows.append({
                "round": rnd, "kind": "final" if end.get("final") else "precopy",
                "pages": int(end["pages"]), "bytes": int(end["bytes"]),
                "scan_ms": 1000 * float(end.get("scan_s") or 0),
                "copy_ms": 1000 * float(end.get("copy_s") or 0),
                "freeze_ms": 1000 * float(end.get("freeze_s") or 0),
                "wall_ms": 1000 * wall,
                "apply_ms": 1000 * float(applied[1].get("apply_s", 0)) if applied else None,
                "mib_s": (end["bytes"] / 2**20 / wall) if wall > 0 else None,
                "t_start": starts[rnd], "t_end": t_end})
        return rows

    def _stop_and_copy(self, src: Node, dst: Node, wpid: int, frozen_sha: str) -> None:
        """Baseline: every page of the frozen source through a fresh agent pair."""
        run, ev, T = self.run, self.events, self.timeout
        sa = run.start(src, "agent.py", f"source --pid {wpid} --tracker none",
                       "stop-and-copy source agent", raw=True)
        da = run.start(dst, "agent.py", "restore --live", "stop-and-copy restore agent")
        pump = Pump(sa, da, ev, "stop-and-copy")
        pump.wait(T, "the stop-and-copy restore agent's hello", dst_event="hello")
        t0 = ev.emit("stop-and-copy-start")
        sa.send("final all")
        end = pump.wait(T, "the stop-and-copy round", src_type=st.ROUND_END)
        resumed = pump.wait(T, "the stop-and-copy restore", dst_event="resumed")
        run.pids[dst.name].add(int(resumed["pid"]))
        t1 = ev.now()
        self.result.stop_copy_downtime_s = t1 - t0
        restored = pump.wait(T, "the stop-and-copy hash", dst_event="restored")
        ev.emit("stop-and-copy", ms=1000 * (t1 - t0), pages=end["pages"],
                match=restored["sha256"] == frozen_sha)
        if restored["sha256"] != frozen_sha:
            raise MigrationFailed("stop-and-copy baseline restored a different image")
        sa.quit()
        try:
            pump.wait(T, "the stop-and-copy restore to serve", dst_event="serving")
            da.quit()
        except MigrationFailed:
            run.peers.retire(da)  # the baseline is measured: what its restore does now is moot

    def _verify_resume(self, wl: Remote, pump: Pump, src: Node, wpid: int,
                       frozen_step: int) -> None:
        """Both copies run to frozen_step + N from the same frozen state; hashes must match."""
        run, cfg, ev, T = self.run, self.cfg, self.events, self.timeout
        target = frozen_step + cfg.verify_resume
        wl.send("hold")  # queued while frozen: wins over any overdue timed step after SIGCONT
        run.pool.get(src).check(f"kill -CONT {wpid}", timeout=run.settings.ssh_timeout)
        held = wl.next(T, "the source workload to hold")
        if int(held["step"]) > target:
            raise MigrationFailed(f"source ran to step {held['step']} past {target} before "
                                  "holding; use a larger --verify-resume")
        wl.call(f"run-to {target}", T)
        src_hash = wl.call("hash", T)
        pump.dst.send(f"run-to {target}")
        pump.wait(T, "the restored workload to run", dst_reply=True)
        pump.dst.send("hash")
        dst_hash = pump.wait(T, "the restored workload's hash", dst_reply=True)
        ok = src_hash["sha256"] == dst_hash["sha256"]
        self.result.verify_resume = ok
        ev.emit("verify-resume", step=target, match=ok, source=src_hash["sha256"],
                restored=dst_hash["sha256"])
        if not ok:
            raise MigrationFailed(f"--verify-resume FAILED at step {target}: source "
                                  f"{src_hash['sha256'][:16]} != restored "
                                  f"{dst_hash['sha256'][:16]}")
