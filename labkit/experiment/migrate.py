"""migrate-test: pre-copy live migration of the workload from one node to another, verified.

Shape of a run (every step also lands in events.jsonl):
  prepare   both nodes, through THE fan-out: power on (if they have a BMC) and wait for SSH,
            sweep what a SIGKILLed earlier controller left running (labkit.janitor; reported on
            stderr, in events.jsonl and the result's leftovers_cleaned), deploy the payloads (a no-op when already in sync) — so both run the same release —
            and record uname/python.
  start     the workload on src (its JSON ready line names pid/addr/size), the source agent
            attached to it (tracker armed on round 0), the restore agent on dst.
  pre-copy  `round` commands; the controller relays the source agent's stdout into the restore
            agent's stdin, peeking at control frames as they pass (FrameScanner); p.haul's stop
            rules decide when to freeze.
  freeze    `final`: the agent SIGSTOPs the workload, sends the last dirty set; the restore agent
            validates, applies, and resumes the workload in-process. downtime = controller time
            from sending `final` to the destination's "resumed" line (an upper bound: it
            includes one command hop and one reply hop).
  verify    SHA-256 of the frozen source region (source agent) == restored region (dst).
            --verify-resume N: both copies run to the same step, their hashes must match.
  baseline  stop-and-copy: a second agent pair copies every page of the (still frozen) source
            into a fresh restore; its downtime is the comparison figure.
  cleanup   always (success, failure, Ctrl-C): quit what answers, then kill every remote
            process we started by its run id (process groups included) and by recorded pid.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit.config import Settings
from labkit.errors import LabkitError, UserError
from labkit.experiment import results as res
from labkit.experiment.config import MigrateConfig, apply_cell, human_size
from labkit.fanout import fan_out
from labkit.inventory import Inventory, Node
from labkit.payloads import stream as st

RELAY_CHUNK = 1 << 20
# slower than this (bytes/s, end to end: relay, apply, hash) a stream counts as stuck
MIN_STREAM_RATE = 4 << 20


class MigrationFailed(LabkitError):
    """The migration ran but did not verify (or a stream was refused)."""


# --- remote processes -------------------------------------------------------------------------
class Remote:
    """A payload process on a node, over one SSH exec channel: stdout read by a thread into
    a queue (JSON lines or raw chunks), stdin written by us, stderr kept for error messages."""

    def __init__(self, client: Any, node: str, cmd: str, label: str, *, raw: bool = False,
                 env: dict[str, str] | None = None):
        self.client = client
        self.node = node
        self.label = label
        self.cmd = cmd
        self.proc = client.open_exec(cmd, env=env)
        self.ch = self.proc.channel
        self.raw = raw
        self.lines: queue.Queue = queue.Queue()
        self.pid: int | None = None
        self._lock = threading.Lock()
        if not raw:
            threading.Thread(target=self._read_lines, daemon=True,
                             name=f"{label}-out").start()

    def _read_lines(self) -> None:
        buf = b""
        try:
            while True:
                data = self.ch.recv(65536)
                if not data:
                    break
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        obj = {"event": "text", "text": line.decode(errors="replace")}
                    self.lines.put(obj)
        except OSError as e:
            self.lines.put({"event": "eof", "error": str(e)})
            return
        self.lines.put({"event": "eof"})

    def send(self, line: str) -> None:
        with self._lock:
            try:
                self.ch.sendall((line + "\n").encode())
            except OSError as e:
                raise MigrationFailed(f"{self.node}: {self.label} is gone ({e}); "
                                      f"{self.stderr_tail()}") from None

    def stderr_tail(self) -> str:
        err = b""
        try:
            while self.ch.recv_stderr_ready():
                err += self.ch.recv_stderr(65536)
        except OSError:
            pass
        self._err = getattr(self, "_err", b"") + err
        lines = [ln for ln in self._err.decode(errors="replace").splitlines() if ln.strip()]
        return ("stderr: " + " | ".join(lines[-3:])) if lines else "no stderr"

    def next(self, timeout: float, what: str) -> dict:
        try:
            obj = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise MigrationFailed(f"{self.node}: {self.label}: no answer within {timeout:.0f}s "
                                  f"waiting for {what}") from None
        if obj.get("event") == "eof":
            time.sleep(0.05)
            raise MigrationFailed(f"{self.node}: {self.label} exited while we waited for {what}"
                                  f" ({self.stderr_tail()})")
        if obj.get("event") == "error" or obj.get("ok") is False:
            raise MigrationFailed(f"{self.node}: {self.label}: {obj.get('error')}")
        return obj

    def call(self, line: str, timeout: float) -> dict:
        """Send a command and return its one-line JSON reply."""
        self.send(line)
        return self.next(timeout, repr(line))

    def kill(self) -> None:
        try:
            self.proc.kill()
        finally:
            try:
                self.proc.close()
            except Exception:  # noqa: BLE001 - cleanup must go on
                pass


class Pump:
    """One migration stream: source agent -> (relay here) -> restore agent, with one queue of
    everything the run waits for: control frames from the source, JSON lines from the dst.

    Nothing that arrives is dropped: an event nobody is waiting for yet goes to a backlog, and
    every ``wait`` first takes the oldest matching event from there. The two sides race — the
    destination can answer (``applied``, ``resumed``, ``verified``) before the relay thread has
    queued the source frame that caused it — so "throw away what I am not waiting for" loses
    exactly the event the *next* wait needs, and that wait then hangs."""

    def __init__(self, src: Remote, dst: Remote, events: res.Events, tag: str):
        self.src, self.dst, self.events, self.tag = src, dst, events, tag
        self.q: queue.Queue = queue.Queue()
        self.scanner = st.FrameScanner()
        self.bytes = 0
        self.applied: dict[int, tuple[float, dict]] = {}
        self.backlog: list[tuple[str, int, dict]] = []  # arrived, not yet taken by a wait
        self.src_closed: tuple[str, dict] | None = None  # the source stream ended (kind, info)
        self.dst_closed = False  # the restore agent's stdout ended
        self.relay = threading.Thread(target=self._relay, daemon=True, name=f"relay-{tag}")
        self.relay.start()
        threading.Thread(target=self._dst_lines, daemon=True, name=f"dst-{tag}").start()

    def _relay(self) -> None:
        src, dst = self.src.ch, self.dst.ch
        try:
            while True:
                data = src.recv(RELAY_CHUNK)
                if not data:
                    break
                # Queue the control frames *before* the destination can see them, so that its
                # answer to a frame is always queued after the frame itself.
                try:
                    frames = self.scanner.feed(data)
                except st.StreamError as e:
                    self._forward(dst, data)  # the restore agent's own complaint is precise
                    self.q.put(("src-bad", 0, {"error": str(e)}))
                    return
                for ftype, obj in frames:
                    self.q.put(("src", ftype, obj))
                self._forward(dst, data)
                self.bytes += len(data)
        except OSError as e:
            self.q.put(("src-eof", 0, {"error": str(e)}))
            return
        self.q.put(("src-eof", 0, {"boundary": self.scanner.at_boundary}))

    @staticmethod
    def _forward(dst: Any, data: bytes) -> None:
        try:
            dst.sendall(data)
        except OSError:
            pass  # the restore agent died: its own error line says why

    def _dst_lines(self) -> None:
        while True:
            obj = self.dst.lines.get()
            self.q.put(("dst", 0, obj))
            if obj.get("event") == "eof":
                return

    @staticmethod
    def _matches(item: tuple[str, int, dict], src_type: int | None, dst_event: str | None,
                 dst_reply: bool) -> bool:
        kind, ftype, obj = item
        if kind == "src":
            return src_type is not None and ftype == src_type
        return (dst_event is not None and obj.get("event") == dst_event) or (
            dst_reply and "ok" in obj)

    def _take(self, src_type: int | None, dst_event: str | None,
              dst_reply: bool) -> dict | None:
        for i, item in enumerate(self.backlog):
            if self._matches(item, src_type, dst_event, dst_reply):
                del self.backlog[i]
                return item[2]
        return None

    def wait(self, timeout: float, what: str, *, src_type: int | None = None,
             dst_event: str | None = None, dst_reply: bool = False) -> dict:
        """The oldest not yet taken event that matches (a source frame of ``src_type``, a
        destination line with ``dst_event`` or, with ``dst_reply``, a command reply); any error
        from either side fails the run, and so does the wanted event not coming in time."""
        end = time.monotonic() + timeout
        while True:
            got = self._take(src_type, dst_event, dst_reply)
            if got is not None:
                return got
            if self.dst_closed:
                raise MigrationFailed(f"{self.dst.node}: restore agent exited while we waited "
                                      f"for {what} ({self.dst.stderr_tail()})")
            if self.src_closed is not None and src_type is not None:
                self._src_gone(*self.src_closed, what)
            left = end - time.monotonic()
            try:
                item = self.q.get(timeout=max(0.0, left))
            except queue.Empty:
                raise MigrationFailed(
                    f"timed out after {timeout:.0f}s waiting for {what} (source agent on "
                    f"{self.src.node}, restore agent on {self.dst.node}, stream "
                    f"{self.tag!r}: {self.bytes} bytes relayed; a peer is stuck, or the "
                    "budget (labkit.command_timeout) is too small)") from None
            self._note(item, what, src_type=src_type, dst_event=dst_event, dst_reply=dst_reply)

    def _note(self, item: tuple[str, int, dict], what: str, *, src_type: int | None,
              dst_event: str | None, dst_reply: bool) -> None:
        """Record one arrival: raise on errors/ends, log it, keep it in the backlog."""
        kind, ftype, obj = item
        now = self.events.now()
        if kind == "src":
            if ftype == st.ERROR:
                raise MigrationFailed(f"{self.src.node}: source agent: {obj.get('error')}")
            if ftype == st.ROUND_END:
                self.events.emit("round-end", stream=self.tag, **_small(obj))
            self.backlog.append(item)
            return
        if kind in ("src-eof", "src-bad"):
            self.src_closed = (kind, obj)
            if kind == "src-eof" and src_type is None and (dst_event or dst_reply):
                return  # the source is done (quit); we wait for the destination only
            self._src_gone(kind, obj, what)
        # dst
        ev = obj.get("event")
        if ev == "eof":
            self.dst_closed = True
            raise MigrationFailed(f"{self.dst.node}: restore agent exited while we waited "
                                  f"for {what} ({self.dst.stderr_tail()})")
        if ev == "error" or obj.get("ok") is False:
            raise MigrationFailed(f"{self.dst.node}: restore refused: {obj.get('error')}")
        if ev == "applied":
            self.applied[int(obj["round"])] = (now, obj)
        if ev:
            self.events.emit(f"dst-{ev}", stream=self.tag, **_small(obj))
        self.backlog.append(item)

    def _src_gone(self, kind: str, obj: dict, what: str) -> None:
        self._drain_dst_errors()  # the dst's complaint is the precise one: prefer it
        if kind == "src-bad":
            raise MigrationFailed(f"stream from {self.src.node} is corrupted: {obj['error']}")
        raise MigrationFailed(f"{self.src.node}: source agent exited while we waited "
                              f"for {what} ({self.src.stderr_tail()})")

    def wait_applied(self, rnd: int, timeout: float) -> None:
        while rnd not in self.applied:
            self.wait(timeout, f"the destination to apply round {rnd}", dst_event="applied")

    def _drain_dst_errors(self) -> None:
        if self.dst_closed:
            return
        try:
            while True:
                item = self.q.get(timeout=0.5)
                kind, _, obj = item
                if kind == "dst" and (obj.get("event") == "error" or obj.get("ok") is False):
                    raise MigrationFailed(f"{self.dst.node}: restore refused: {obj.get('error')}")
                if kind == "dst" and obj.get("event") == "eof":
                    self.dst_closed = True
                    return
                if kind in ("src", "dst"):
                    self.backlog.append(item)
        except queue.Empty:
            return


def _small(obj: dict) -> dict:
    """A peer's message as event fields: its own "event"/"t" must not clobber ours."""
    return {(f"peer_{k}" if k in ("event", "t", "wall") else k): v for k, v in obj.items()
            if k != "ranges"}


# --- the run ----------------------------------------------------------------------------------
@dataclass
class Result:
    folder: Path
    ok: bool
    config: MigrateConfig
    rounds: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None
    downtime_s: float | None = None
    stop_copy_downtime_s: float | None = None
    total_s: float | None = None
    verified: bool = False
    verify_resume: bool | None = None
    throughput_mib_s: float | None = None
    backend: str | None = None
    source_sha256: str | None = None
    restored_sha256: str | None = None
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    cleaned: list[str] = field(default_factory=list)  # leftovers of interrupted runs, per node

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "error": self.error, "stop_reason": self.stop_reason,
            "downtime_ms": _ms(self.downtime_s),
            "stop_copy_downtime_ms": _ms(self.stop_copy_downtime_s),
            "total_s": self.total_s, "verified": self.verified,
            "verify_resume": self.verify_resume, "throughput_mib_s": self.throughput_mib_s,
            "tracker_backend": self.backend, "source_sha256": self.source_sha256,
            "restored_sha256": self.restored_sha256, "rounds": len(self.rounds),
            "leftovers_cleaned": self.cleaned,
        }

    def summary(self) -> str:
        rows = [[("final" if r["kind"] == "final" else str(r["round"])), str(r["pages"]),
                 f"{r['bytes'] / 2**20:.2f}", f"{r.get('scan_ms') or 0:.2f}",
                 f"{r.get('copy_ms') or 0:.1f}", f"{r.get('wall_ms') or 0:.1f}",
                 f"{r.get('mib_s') or 0:.0f}"] for r in self.rounds]
        out = [f"migrate-test {self.config.src} -> {self.config.dst}: "
               f"{human_size(self.config.size)}, {self.config.rate:g} pages/s "
               f"{self.config.pattern}, tracker {self.backend or self.config.tracker}",
               res.table(rows, ["round", "pages", "MiB", "scan ms", "copy ms", "wall ms",
                                "MiB/s"])]
        if self.ok:
            out.append(f"stopped by: {self.stop_reason}   downtime: "
                       f"{_ms(self.downtime_s)} ms   stop-and-copy downtime: "
                       f"{_ms(self.stop_copy_downtime_s) if self.stop_copy_downtime_s else '-'}"
                       f" ms   throughput: {self.throughput_mib_s or 0:.0f} MiB/s   total: "
                       f"{self.total_s or 0:.2f} s")
            vr = ("" if self.verify_resume is None else
                  f"   verify-resume: {'ok' if self.verify_resume else 'FAILED'}")
            out.append(f"image verified: SHA-256 {str(self.restored_sha256)[:16]}... matches"
                       + vr)
        else:
            out.append(f"FAILED: {self.error}")
        out.append(f"results: {self.folder}")
        return "\n".join(out)


def _ms(s: float | None) -> float | None:
    return None if s is None else round(s * 1000, 3)


def wait_budget(settings: Settings, size: int) -> float:
    """How long one wait of a run (a round, a hash, a reply) may take before the run fails
    naming what it waited for: SSH slack plus the whole region moved and hashed at a floor
    rate of MIN_STREAM_RATE, capped by ``labkit.command_timeout`` (0: no cap). A peer that dies
    fails at once (its channel closes); this bounds one that is alive but stuck."""
    budget = 3 * settings.ssh_timeout + size / MIN_STREAM_RATE
    if settings.command_timeout and settings.command_timeout > 0:
        budget = min(budget, settings.command_timeout)
    return max(1.0, budget)


def payload_dir(node: Node) -> str:
    from labkit.deploy import remote_workdir

    return f"{remote_workdir(node)}/payloads/current"


def _py(node: Node, script: str, args: str) -> str:
    return f"cd {shlex.quote(payload_dir(node))} && exec python3 -u {script} {args}"


class MigrateRun:
    """One migrate-test run; ``run()`` always cleans up and writes the results folder."""

    def __init__(self, inventory: Inventory, settings: Settings, config: MigrateConfig, *,
                 folder: Path | None = None, deploy: bool = True, power: bool = True,
                 pool: Any = None, prepared: dict | None = None):
        self.inv = inventory
        self.settings = settings
        self.cfg = config
        self.src_node = inventory.node(config.src)
        self.dst_node = inventory.node(config.dst)
        for n in (self.src_node, self.dst_node):
            if n.ssh is None:
                raise UserError(f"{n.name}: no ssh: section in {inventory.path}")
        self.folder = folder or res.new_folder(settings.results_dir, "migrate-test")
        self.events = res.Events(self.folder / "events.jsonl")
        self.deploy = deploy
        self.power = power
        self._own_pool = pool is None
        if pool is None:
            from labkit.ssh import ConnectionPool

            pool = ConnectionPool(settings)
        self.pool = pool
        self.prepared = prepared
        self.remotes: list[Remote] = []
        self.pids: dict[str, set[int]] = {config.src: set(), config.dst: set()}
        self.timeout = wait_budget(settings, config.size)
        self.result = Result(self.folder, False, config)

    # -- prepare ---------------------------------------------------------------------------
    def prepare(self) -> dict[str, Any]:
        """Power + SSH + deploy + facts for both nodes, in parallel through THE fan-out."""
        if self.prepared is not None:
            return self.prepared
        self.prepared = prepare_nodes([self.src_node, self.dst_node], self.settings, self.pool,
                                      deploy=self.deploy, power=self.power, events=self.events)
        self._report_leftovers(self.prepared)
        return self.prepared

    def _report_leftovers(self, info: dict[str, Any]) -> None:
        """Say (stderr, events.jsonl, the result) what the sweep cleaned on each node."""
        from labkit.janitor import describe

        for name, facts in sorted(info.get("nodes", {}).items()):
            if facts.get("leftovers_error"):
                line = f"{name}: could not check for leftovers of an interrupted run: " \
                       f"{facts['leftovers_error']}"
                self.events.emit("leftovers-error", node=name, error=facts["leftovers_error"])
            else:
                cleaned = facts.get("leftovers") or []
                line = describe(name, cleaned)
                if line is None:
                    continue
                self.events.emit("leftovers-cleaned", node=name, message=line,
                                 processes=[c for c in cleaned if c["kind"] == "process"],
                                 files=[c["path"] for c in cleaned if c["kind"] == "files"])
            self.result.cleaned.append(line)
            print(line, file=sys.stderr, flush=True)

    def _start(self, node: Node, script: str, args: str, label: str, *,
               env: dict[str, str] | None = None, raw: bool = False) -> Remote:
        r = Remote(self.pool.get(node), node.name, _py(node, script, args), label, env=env,
                   raw=raw)
        self.remotes.append(r)
        self.events.emit("start", node=node.name, what=label, cmd=f"{script} {args}")
        return r

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> Result:
        t_start = time.monotonic()
        r = self.result
        try:
            self.events.emit("config", **self.cfg.to_json())
            info = self.prepare()
            r.info = info
            self._migrate()
            r.ok = True
        except KeyboardInterrupt:
            r.error = "interrupted"
            self.events.emit("interrupted")
            raise
        except LabkitError as e:
            r.error = str(e)
            self.events.emit("failed", error=str(e))
            raise
        finally:
            r.total_s = round(time.monotonic() - t_start, 3)
            self.cleanup()
            self.write()
        return r

    def _migrate(self) -> None:
        cfg, r, ev, T = self.cfg, self.result, self.events, self.timeout
        src, dst = self.src_node, self.dst_node
        wl_args = (f"run --size {cfg.size} --rate {cfg.rate:g} --pattern {cfg.pattern} "
                   f"--hot-fraction {cfg.hot_fraction:g} --seed {cfg.seed} --slot {cfg.slot} "
                   f"--batch {cfg.batch}" + ("" if cfg.steps_per_round else " --timed"))
        wl = self._start(src, "workload.py", wl_args, "workload")
        ready = wl.next(T, "the workload's ready line")
        wpid = int(ready["pid"])
        self.pids[src.name].add(wpid)
        ev.emit("workload-ready", pid=wpid, addr=hex(ready["addr"]), size=ready["size"])
        env = {"LABKIT_AGENT_CORRUPT": cfg.corrupt} if cfg.corrupt else None
        sa = self._start(src, "agent.py", f"source --pid {wpid} --tracker {cfg.tracker}",
                         "source agent", env=env, raw=True)
        da = self._start(dst, "agent.py", "restore --live", "restore agent")
        pump = Pump(sa, da, ev, "precopy")
        hello = pump.wait(T, "the restore agent's hello", dst_event="hello")
        r.backend = hello.get("backend")
        ev.emit("tracker", backend=r.backend)

        # pre-copy rounds
        pages_hist: list[int] = []
        starts: dict[int, float] = {}
        ends: list[dict] = []
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
        self.pids[dst.name].add(int(resumed["pid"]))
        r.downtime_s = t_resumed - t_freeze
        ev.emit("downtime", ms=r.downtime_s * 1000, step=resumed.get("step"))
        restored = pump.wait(T, "the restored region's hash", dst_event="restored")
        sa.send("verify")
        ver = pump.wait(T, "the source region's hash", src_type=st.VERIFY)
        verified = pump.wait(T, "the verification", dst_event="verified")
        r.source_sha256, r.restored_sha256 = ver["sha256"], restored["sha256"]
        r.verified = bool(verified.get("match")) and ver["sha256"] == restored["sha256"]
        ev.emit("verify", match=r.verified, source=ver["sha256"], restored=restored["sha256"])
        self._rounds(ends, starts, pump, t_freeze, t_resumed)
        if not r.verified:
            raise MigrationFailed(f"image verification FAILED: frozen source {ver['sha256'][:16]}"
                                  f" != restored {restored['sha256'][:16]}")
        sa.send("quit")
        pump.wait(T, "the restored workload to serve", dst_event="serving")
        frozen_step = int(ver.get("step", resumed.get("step", 0)))

        if cfg.stop_and_copy:
            self._stop_and_copy(src, dst, wpid, ver["sha256"])
        if cfg.verify_resume:
            self._verify_resume(wl, pump, src, wpid, frozen_step)
        # orderly ends (cleanup kills whatever ignores them)
        for rem, line in ((wl, "quit"), (da, "quit")):
            try:
                rem.send(line)
            except MigrationFailed:
                pass

    def _rounds(self, ends: list[dict], starts: dict[int, float], pump: Pump, t_freeze: float,
                t_resumed: float) -> None:
        rows = []
        total_bytes = 0
        total_wall = 0.0
        for end in ends:
            rnd = int(end["round"])
            applied = pump.applied.get(rnd)
            t_end = applied[0] if applied else end["t_src_end"]
            wall = t_end - starts[rnd]
            row = {"round": rnd, "kind": "final" if end.get("final") else "precopy",
                   "pages": int(end["pages"]), "bytes": int(end["bytes"]),
                   "scan_ms": 1000 * float(end.get("scan_s") or 0),
                   "copy_ms": 1000 * float(end.get("copy_s") or 0),
                   "freeze_ms": 1000 * float(end.get("freeze_s") or 0),
                   "wall_ms": 1000 * wall,
                   "apply_ms": 1000 * float(applied[1].get("apply_s", 0)) if applied else None,
                   "mib_s": (end["bytes"] / 2**20 / wall) if wall > 0 else None,
                   "t_start": starts[rnd], "t_end": t_end}
            rows.append(row)
            if not end.get("final"):
                total_bytes += row["bytes"]
                total_wall += wall
        self.result.rounds = rows
        first = rows[0]
        # throughput of the transfer: the full round 0 (the only one big enough to measure it)
        self.result.throughput_mib_s = first["mib_s"]
        self.result.info["timeline"] = {"freeze_t": t_freeze, "resumed_t": t_resumed}

    def _stop_and_copy(self, src: Node, dst: Node, wpid: int, frozen_sha: str) -> None:
        """Baseline: every page of the frozen source through a fresh agent pair."""
        ev, T = self.events, self.timeout
        sa = self._start(src, "agent.py", f"source --pid {wpid} --tracker none",
                         "stop-and-copy source agent", raw=True)
        da = self._start(dst, "agent.py", "restore --live", "stop-and-copy restore agent")
        pump = Pump(sa, da, ev, "stop-and-copy")
        pump.wait(T, "the stop-and-copy restore agent's hello", dst_event="hello")
        t0 = ev.emit("stop-and-copy-start")
        sa.send("final all")
        end = pump.wait(T, "the stop-and-copy round", src_type=st.ROUND_END)
        resumed = pump.wait(T, "the stop-and-copy restore", dst_event="resumed")
        self.pids[dst.name].add(int(resumed["pid"]))
        t1 = ev.now()
        self.result.stop_copy_downtime_s = t1 - t0
        restored = pump.wait(T, "the stop-and-copy hash", dst_event="restored")
        ev.emit("stop-and-copy", ms=1000 * (t1 - t0), pages=end["pages"],
                match=restored["sha256"] == frozen_sha)
        if restored["sha256"] != frozen_sha:
            raise MigrationFailed("stop-and-copy baseline restored a different image")
        sa.send("quit")
        try:
            pump.wait(T, "the stop-and-copy restore to serve", dst_event="serving")
            da.send("quit")
        except MigrationFailed:
            pass

    def _verify_resume(self, wl: Remote, pump: Pump, src: Node, wpid: int,
                       frozen_step: int) -> None:
        """Both copies run to frozen_step + N from the same frozen state; hashes must match."""
        cfg, ev, T = self.cfg, self.events, self.timeout
        target = frozen_step + cfg.verify_resume
        wl.send("hold")  # queued while frozen: wins over any overdue timed step after SIGCONT
        self.pool.get(src).check(f"kill -CONT {wpid}", timeout=self.settings.ssh_timeout)
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

    # -- cleanup + results -----------------------------------------------------------------
    def cleanup(self) -> None:
        """Kill every remote process this run started: one sweep per node, by run id (every
        descendant carries it, setsid'd or not) and by recorded pid, repeated until nothing is
        left. Retried once over a fresh connection: under load a pooled transport can be stuck
        in a re-key, and a cleanup that silently fails leaves a 1 GiB workload behind."""
        from labkit.ssh import SshClient

        ids: dict[str, list[str]] = {}
        for rem in self.remotes:
            ids.setdefault(rem.node, []).append(rem.proc.run_id)
        names = sorted(set(ids) | {n for n, p in self.pids.items() if p})
        for name in names:
            script = kill_script(ids.get(name, []), sorted(self.pids.get(name, ())))
            node = self.inv.node(name)
            for attempt in range(2):
                try:
                    if attempt == 0:
                        r = self.pool.get(node).run(script, timeout=2 * self.settings.ssh_timeout)
                    else:
                        self.pool.drop(node)
                        with SshClient.connect(node, self.settings) as c:
                            r = c.run(script, timeout=2 * self.settings.ssh_timeout)
                    if r.exit_code == 0:
                        break
                    self.events.emit("cleanup-retry", node=name, exit=r.exit_code)
                except Exception as e:  # noqa: BLE001 - keep cleaning the rest
                    self.events.emit("cleanup-error", node=name, error=str(e))
        for rem in self.remotes:
            try:
                rem.proc.close()
            except Exception:  # noqa: BLE001
                pass
        self.events.emit("cleanup", processes=len(self.remotes))
        if self._own_pool:
            self.pool.close_all()

    def write(self) -> None:
        r = self.result
        run = {"task": "migrate-test", "config": self.cfg.to_json(), "result": r.to_json(),
               "nodes": (r.info or {}).get("nodes", {}),
               "payload": (r.info or {}).get("payload", {}),
               "tracker_backend": r.backend, "labkit_version": _version()}
        try:
            res.write_json(self.folder / "run.json", run)
            res.write_rounds(self.folder / "rounds.csv", r.rounds)
            if r.rounds:
                from labkit.experiment import plots

                title = (f"{human_size(self.cfg.size)} {self.cfg.rate:g} pages/s "
                         f"{self.cfg.pattern} ({r.backend})")
                plots.plot_rounds(self.folder / "rounds.png", r.rounds, title)
                tl = r.info.get("timeline", {})
                plots.plot_timeline(self.folder / "timeline.png", r.rounds, tl.get("freeze_t"),
                                    tl.get("resumed_t"), title)
        finally:
            self.events.close()


def kill_script(run_ids: list[str], pids: list[int]) -> str:
    """sh: SIGKILL the processes of our runs (matched by LABKIT_RUN in their environment, and
    their process groups) and the recorded pids, until none is left; exit 1 if some survive."""
    ids = " ".join(i for i in run_ids if i.isalnum())
    ps = " ".join(str(int(p)) for p in pids)
    return (f"ids='{ids}'; pids='{ps}'; i=0; while [ $i -lt 20 ]; do left=''; "
            "for id in $ids; do left=\"$left $(grep -lzx \"LABKIT_RUN=$id\" "
            "/proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3)\"; done; "
            "for x in $pids; do [ -d /proc/$x ] && left=\"$left $x\"; done; "
            "left=$(echo $left); [ -z \"$left\" ] && exit 0; "
            "for x in $left; do kill -KILL -- -$x 2>/dev/null; kill -KILL $x 2>/dev/null; done; "
            "sleep 0.05; i=$((i+1)); done; exit 1")


def _version() -> str:
    import labkit

    return getattr(labkit, "__version__", "?")


def prepare_nodes(nodes: list[Node], settings: Settings, pool: Any, *, deploy: bool = True,
                  power: bool = True, events: res.Events | None = None,
                  sweep: bool = True) -> dict[str, Any]:
    """Power on + wait for SSH, sweep what a SIGKILLed controller left (``labkit.janitor``:
    processes of dead controllers of this host, their temp folders), deploy (in sync ->
    nothing sent), node facts. Fails with one line naming the node(s) that could not be
    prepared."""
    from labkit.deploy import Deployer, bundle_paths, collect_bundle, remote_workdir

    bundle = collect_bundle(bundle_paths(None, [])) if deploy else None
    deployer = Deployer(settings, bundle, connect=lambda n: pool.get(n)) if bundle else None

    def act(node: Node) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if power and node.bmc is not None:
            from labkit.bmc.power import PowerClient

            with PowerClient(settings) as pc:
                out["power"] = pc.on(node, wait="ssh")
        client = pool.get(node)
        if sweep:
            from labkit import janitor

            try:
                out["leftovers"] = janitor.sweep(client, workdir=remote_workdir(node))
            except Exception as e:  # noqa: BLE001 - a failed sweep is reported, not fatal
                out["leftovers_error"] = str(e)
        if deployer is not None:
            d = deployer.deploy_node(node)
            out["release"] = d.get("release")
            out["revision"] = d.get("revision")
            out["deploy"] = d.get("state")
        facts = client.check("uname -srm; python3 -c 'import sys; print(sys.version.split()[0])';"
                             " nproc", timeout=settings.ssh_timeout + 10)
        lines = facts.stdout.decode(errors="replace").splitlines() + ["", "", ""]
        out.update(uname=lines[0], python=lines[1], cpus=lines[2])
        return out

    outcomes = fan_out(nodes, act, parallel=settings.parallel, label="prepare",
                       progress=settings.progress)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise LabkitError("; ".join(f"{o.node}: {o.error}" for o in failed))
    info = {"nodes": {o.node: o.value for o in outcomes}}
    # a release id is <time>-<content digest>: equal content may carry different times
    contents = {str(o.value.get("release")).rsplit("-", 1)[-1] for o in outcomes}
    if deploy and len(contents) != 1:
        raise LabkitError("nodes run different payload releases: "
                          + ", ".join(f"{o.node} {o.value.get('release')}" for o in outcomes))
    info["payload"] = {"releases": {o.node: o.value.get("release") for o in outcomes},
                       "revision": bundle.revision if bundle else None,
                       "dirty": bundle.dirty if bundle else None,
                       "digest": bundle.digest if bundle else None}
    if events:
        events.emit("prepared", **info)
    return info


# --- public API -------------------------------------------------------------------------------
def run_migrate_test(inventory: Inventory, settings: Settings, config: MigrateConfig,
                     **kw: Any) -> Result:
    """One verified pre-copy migration; raises MigrationFailed/LabkitError on failure (the
    results folder is written either way: see the error's ``.value['folder']``)."""
    config.validate()
    run = MigrateRun(inventory, settings, config, **kw)
    try:
        return run.run()
    except LabkitError as e:
        e.value["folder"] = str(run.folder)
        raise


def run_matrix(inventory: Inventory, settings: Settings, base: MigrateConfig,
               cells: list[dict[str, Any]], *, deploy: bool = True,
               out: Any = None) -> tuple[Path, list[dict[str, Any]]]:
    """Every cell of the grid (validated up front, so a typo starts nothing), each in its own
    folder under one matrix folder, plus summary.csv and summary.png."""
    from labkit.ssh import ConnectionPool

    configs = [apply_cell(base, c) for c in cells]
    folder = res.new_folder(settings.results_dir, "migrate-matrix")
    rows: list[dict[str, Any]] = []
    with ConnectionPool(settings) as pool:
        prepared = None
        for i, cfg in enumerate(configs):
            sub = folder / f"{i + 1:02d}-{cfg.name().replace('=', '').replace('/', '_')}"
            sub.mkdir()
            run = MigrateRun(inventory, settings, cfg, folder=sub, deploy=deploy, pool=pool,
                             prepared=prepared)
            row: dict[str, Any] = {"label": cfg.name(), "size": cfg.size, "rate": cfg.rate,
                                   "pattern": cfg.pattern, "folder": sub.name}
            try:
                r = run.run()
                prepared = run.prepared
                row.update(r.to_json())
            except LabkitError as e:
                prepared = run.prepared
                row.update(ok=False, error=str(e))
            rows.append(row)
            if out:
                out(f"[{i + 1}/{len(configs)}] {row['label']}: "
                    + (f"downtime {row.get('downtime_ms')} ms, {row.get('rounds')} rounds"
                       if row.get("ok") else f"FAILED: {row.get('error')}"))
    columns = ["label", "size", "rate", "pattern", "ok", "rounds", "stop_reason", "downtime_ms",
               "stop_copy_downtime_ms", "throughput_mib_s", "total_s", "tracker_backend",
               "verified", "error", "folder"]
    res.write_summary_csv(folder / "summary.csv", rows, columns)
    from labkit.experiment import plots

    plots.plot_matrix(folder / "summary.png", rows)
    return folder, rows


def measure_channel_rate(inventory: Inventory, settings: Settings, src: str, dst: str,
                         nbytes: int, pool: Any = None) -> float:
    """The raw SSH channel rate src -> controller -> dst (bytes/s), over the same relay path
    the migration uses: `head -c N /dev/zero` on src piped into `cat > /dev/null` on dst."""
    from labkit.ssh import ConnectionPool

    own = pool is None
    pool = pool or ConnectionPool(settings)
    s_node, d_node = inventory.node(src), inventory.node(dst)
    sp = pool.get(s_node).open_exec(f"head -c {int(nbytes)} /dev/zero")
    dp = pool.get(d_node).open_exec("cat > /dev/null; echo done")
    try:
        t0 = time.monotonic()
        got = 0
        while True:
            data = sp.channel.recv(RELAY_CHUNK)
            if not data:
                break
            dp.channel.sendall(data)
            got += len(data)
        dp.channel.shutdown_write()
        dp.channel.recv(64)  # "done": everything reached the far side
        secs = time.monotonic() - t0
    finally:
        for p in (sp, dp):
            p.kill()
            p.close()
        if own:
            pool.close_all()
    if got != nbytes:
        raise LabkitError(f"channel test moved {got} of {nbytes} bytes")
    return got / secs


def corrupt_from_env() -> str:
    """The agent corruption test hook may also come from the controller's environment."""
    return os.environ.get("LABKIT_AGENT_CORRUPT", "")
