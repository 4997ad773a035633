"""The criu backend: CRIU moves any process tree (``--command``, ``--pid``, or the built-in
workload) by iterative pre-copy, as p.haul drove it, with each step measured and the result
verified before the process runs again.

One node-side driver per node (``payloads/criu_driver.py serve``) runs every CRIU step and
answers in JSON lines: one SSH channel per side for the whole run, as p.haul kept one
``criu swrk`` per side (a new SSH exec costs ~0.9 s on a TCG guest; a driver command costs a
round trip). The protocol is the driver's docstring.

  check     ``criu check`` (+ memory tracking) on both nodes, before anything starts: a node
            where CRIU cannot work is refused (exit 2) with criu's reason.
  start     ``--command``: the driver starts it on src in a copy of the payload folder that
            both nodes hold at one path (/tmp/labkit-criu/<run>.work: CRIU restores a cwd by
            path, and release folders are named by deploy time), own session, stdin
            /dev/null, output to /tmp/labkit-criu/<run>.out, no labkit marker in its
            environment (it is the user's process, not the run's, and outlives the run);
            ``--pid``: taken as it is; else the built-in workload, timed, the same way.
  baseline  (unless --no-stop-and-copy) stop-and-copy first: dump everything while frozen,
            restore held stopped on dst, verify, throw that copy away, let src run on.
  pre-copy  round r: a page server on dst for images dir r+1 (parent ../r), ``criu pre-dump
            --track-mem`` on src sends the pages dirtied since round r-1 straight to it
            (docs/criu-recipe.md measures page server vs copying through the controller).
            p.haul's stop rules (rules.py) decide when to freeze.
  freeze    ``criu dump --leave-stopped`` (pages to dst's page server), the rest of the images
            and every regular file the tree holds open for writing through the controller,
            ``criu restore --leave-stopped`` on dst; every page the final image holds hashed
            (SHA-256 over the lot) in the restored tree and, at the same time, in the frozen
            source; equal, and only then SIGCONT on dst. downtime = controller time from
            sending ``dump`` to the reply of that SIGCONT: freeze to running on dst,
            verification included. Then the images' own bytes (the pre-dump chain) are
            hashed the same way and must match too (slow under TCG, so not in the downtime;
            the source is still frozen, so a mismatch is still undone).
  tcp       (--tcp, built-in workload) the client connects after the spawn; the final dump
            carries the connection and the service address moves in the downtime; the
            baseline hands it back to the source (``tcp_flags``, docs/criu-recipe.md).
  after     success: the source tree is killed; a user's process runs on dst, the built-in
            workload is ended by the run's cleanup. Failure at any step: the restored tree on
            dst is killed, the source tree is SIGCONTed (it runs on src as before), and the
            message names the step and CRIU's reason; its logs go to the results folder
            either way (criu-logs/<node>/). The drivers do the same on their own when the
            controller is lost.
"""

from __future__ import annotations

import base64
import contextlib
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkit.experiment.remote import MigrationFailed, Remote
from labkit.inventory import Node

if TYPE_CHECKING:
    from labkit.experiment.run import MigrateRun

IMAGES_ROOT = "/tmp/labkit-criu"  # on each node: <root>/<run folder>-<node>/N (tmpfs in guests)
OUTPUT_KEEP = 1 << 20  # of the migrated program's output, the tail the results folder keeps
READY_WAIT = 60.0  # the built-in workload's ready line, under TCG


class CriuRefused(MigrationFailed):
    """A node where CRIU cannot work: refused before anything starts, like bad input."""

    exit_code = 2


def migrate(run: MigrateRun) -> None:
    """The backend's entry point (see backends/__init__.py for the contract)."""
    CriuMigration(run).migrate()


class CriuMigration:
    """One CRIU migration on a run's behalf (module docstring)."""

    def __init__(self, run: MigrateRun):
        self.run = run
        self.cfg = run.cfg
        self.events = run.events
        self.result = run.result
        # a CRIU step under TCG takes seconds; the run's budget covers the region's transfer
        self.timeout = max(run.timeout, 120.0)
        self.src: Node = run.src_node
        self.dst: Node = run.dst_node
        self.base = f"{IMAGES_ROOT}/{run.folder.name}"
        self.info: dict[str, Any] = {"rounds": [], "images_root": IMAGES_ROOT}
        self.result.criu = self.info
        self.ds: Remote | None = None
        self.dd: Remote | None = None
        self.pid = 0
        self.dst_pid = 0
        self.dst_pids: list[int] = []
        self.address = ""
        self.hello: dict[str, dict[str, Any]] = {}
        self.frozen = False  # the source tree is stopped by a dump of ours
        self.restored: list[int] = []  # pids restored on dst and not yet resumed
        self.output: str | None = None  # the migrated program's output file (--command)
        self.ranges_b64 = ""  # the last final image's pages, for check_image
        self.work: str | None = None  # the payload folder's copy the process runs in
        self.moving = False  # --tcp: the final dump was sent: the address may have moved

    # -- the driver protocol ------------------------------------------------------------------
    def call(self, rem: Remote, line: str, step: str) -> dict[str, Any]:
        """One driver command and its reply; a failure names the node, the step and the
        driver's (CRIU's) one-line reason."""
        self.send(rem, line, step)
        return self.reply(rem, line, step)

    def send(self, rem: Remote, line: str, step: str) -> None:
        self.events.emit("criu", node=rem.node, step=step, cmd=line.split(" --tar-b64")[0])
        rem.error_line = None
        rem.send(line)

    def reply(self, rem: Remote, line: str, step: str) -> dict[str, Any]:
        """The reply to ``line`` (replies to earlier commands a failure left unread are
        skipped: each names its command)."""
        name = line.split(" ", 1)[0]
        while True:
            try:
                obj = rem.next(self.timeout, step)
            except MigrationFailed as e:
                if rem.error_line and not rem.ended.is_set():
                    raise MigrationFailed(f"{rem.node}: {step} failed: {rem.error_line}",
                                          value={**e.value, "step": step}) from None
                raise
            if obj.get("cmd") in (name, None):
                return obj

    def both(self, line: str, step: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The same command on both drivers at once (each its own channel); both replies are
        read before a failure is raised, so neither channel is left a reply behind."""
        assert self.ds is not None and self.dd is not None
        for rem in (self.ds, self.dd):
            self.send(rem, line, step)
        out: list[dict[str, Any]] = []
        failed: MigrationFailed | None = None
        for rem in (self.ds, self.dd):
            try:
                out.append(self.reply(rem, line, step))
            except MigrationFailed as e:
                failed = failed or e
        if failed is not None:
            raise failed
        return out[0], out[1]

    # -- the run ------------------------------------------------------------------------------
    def migrate(self) -> None:
        run, cfg = self.run, self.cfg
        self.ds = run.start(self.src, "criu_driver.py",
                            f"serve --base {shlex.quote(self.node_base(self.src))} --role src",
                            "src criu driver")
        self.dd = run.start(self.dst, "criu_driver.py",
                            f"serve --base {shlex.quote(self.node_base(self.dst))} --role dst",
                            "dst criu driver")
        self.result.backend = "softdirty"  # CRIU's --track-mem: the kernel's soft-dirty bits
        try:
            self.check()
            self.address = self.lan_address()
            self.start_process()
            if cfg.stop_and_copy:
                self.stop_and_copy()
            self.precopy()
            if cfg.verify_resume:
                self.verify_resume()
            self.finish()
            if run.tcp is not None:  # the client's verdict while the workload still serves it
                run.tcp.finish()
        except BaseException:
            self.undo()
            self.tcp_verdict()
            raise
        finally:
            self.collect()

    def node_base(self, node: Node) -> str:
        return f"{self.base}-{node.name}"

    def check(self) -> None:
        """CRIU usable on both nodes, before anything starts (exit 2 with criu's reason)."""
        assert self.ds is not None and self.dd is not None
        hs, hd = self.both("hello", "hello")
        self.hello = {self.src.name: hs, self.dst.name: hd}
        try:
            cs, cd = self.both("check", "criu check")
        except MigrationFailed as e:
            node = e.value.get("node")
            rem = self.ds if node == self.src.name else self.dd
            if rem is not None and rem.error_line and not rem.ended.is_set():
                raise CriuRefused(f"{rem.node}: CRIU cannot work here: {rem.error_line}",
                                  value={**e.value, "step": "criu check"}) from None
            raise
        checks = {self.src.name: cs, self.dst.name: cd}
        self.info.update(version=checks[self.src.name].get("version"),
                         check={n: {k: c.get(k) for k in ("version", "kernel", "thp")}
                                for n, c in checks.items()})
        self.events.emit("criu-check", **self.info["check"])

    def lan_address(self) -> str:
        """Where src's CRIU reaches dst's page server: an address of dst's that is not also
        src's own (guests share a NAT address; the lab LAN is what is left)."""
        own = set(self.hello[self.src.name].get("addresses") or [])
        theirs = [a for a in self.hello[self.dst.name].get("addresses") or [] if a not in own]
        if not theirs:
            listed = ", ".join(self.hello[self.dst.name].get("addresses") or []) or "none"
            raise MigrationFailed(f"{self.dst.name}: no address that {self.src.name} can reach "
                                  f"it by (its addresses: {listed}; {self.src.name}'s: "
                                  f"{', '.join(sorted(own)) or 'none'})")
        self.info["page_server_address"] = theirs[0]
        return theirs[0]

    def start_process(self) -> None:
        """The process to migrate, on src: --pid as it is, --command or the built-in workload
        started by the driver."""
        cfg, run, ev = self.cfg, self.run, self.events
        assert self.ds is not None
        if cfg.pid:
            self.pid = cfg.pid
            ev.emit("criu-pid", pid=self.pid)
            self.info["source"] = {"pid": self.pid}
            return
        # CRIU restores a cwd by its resolved path, and the release folder's name may differ
        # between the nodes (deployed at different times): both get a copy of the payload
        # folder at one path, and the process starts there
        work = self.work = f"{IMAGES_ROOT}/{run.folder.name}.work"
        self.both(f"workspace --path {shlex.quote(work)}", "copying the payload folder")
        self.output = f"{IMAGES_ROOT}/{run.folder.name}.out"
        if cfg.command:
            command, wait = cfg.command, ""
        else:
            ctl = f"{IMAGES_ROOT}/{run.folder.name}.ctl"
            self.info["ctl"] = ctl
            command = (f"exec python3 -u {shlex.quote(work)}/workload.py {run.workload_args()}"
                       f" --stdin ignore --ctl {shlex.quote(ctl)}")
            wait = f" --wait-line {READY_WAIT:g}"
        b64 = base64.b64encode(command.encode()).decode()
        sp = self.call(self.ds, f"spawn --log {shlex.quote(self.output)} --cwd "
                       f"{shlex.quote(work)} --command-b64 {b64}{wait}", "starting the process")
        self.pid = int(sp["pid"])
        if cfg.builtin:
            run.pids[self.src.name].add(self.pid)  # labkit's workload: the run ends it
            ready = sp.get("first_line")
            if not isinstance(ready, dict) or "pid" not in ready:
                raise MigrationFailed(f"{self.src.name}: the workload did not say it was "
                                      f"ready: {ready!r}")
        self.info["source"] = {"pid": self.pid, "output": self.output}
        ev.emit("criu-spawned", pid=self.pid, output=self.output)
        if run.tcp is not None:  # workload_args() made it serve: the client connects now
            run.tcp.connect()

    # -- pre-copy -----------------------------------------------------------------------------
    def round_row(self, rnd: int, kind: str, rep: dict[str, Any], t0: float,
                  t1: float) -> dict[str, Any]:
        wall = t1 - t0
        page_bytes = int(rep.get("page_bytes") or 0)
        self.info["rounds"].append({
            "round": rnd, "kind": kind, "dir": rep.get("dir"),
            "image_bytes": rep.get("image_bytes"), "page_bytes": page_bytes,
            "pages_written": rep.get("pages_written"),
            "pages_skipped_parent": rep.get("pages_skipped_parent"),
            "pages_scanned": rep.get("pages_scanned"), "criu_s": rep.get("seconds"),
            "stats": rep.get("stats")})
        return {"round": rnd, "kind": kind, "pages": int(rep.get("pages_written") or 0),
                "bytes": page_bytes, "scan_ms": 1000 * float(rep.get("memdump_s") or 0),
                "copy_ms": 1000 * float(rep.get("memwrite_s") or 0),
                "freeze_ms": 1000 * float(rep.get("frozen_s") or 0), "wall_ms": 1000 * wall,
                "apply_ms": None, "mib_s": (page_bytes / 2**20 / wall) if wall > 0 else None,
                "t_start": t0, "t_end": t1}

    def page_server(self, n: int) -> str:
        """A page server on dst for images dir n; its HOST:PORT for src's criu."""
        assert self.dd is not None
        ps = self.call(self.dd, f"page-server --round {n} --address {self.address} --port 0",
                       f"starting the page server for round {n - 1}")
        return f"{self.address}:{int(ps['port'])}"

    def precopy(self) -> None:
        cfg, ev, r = self.cfg, self.events, self.result
        assert self.ds is not None
        rows: list[dict[str, Any]] = []
        pages: list[int] = []
        rnd = 0
        while True:
            t0 = ev.now()
            where = self.page_server(rnd + 1)
            rep = self.call(self.ds, f"predump --pid {self.pid} --round {rnd + 1} "
                            f"--page-server {where}", f"pre-dump round {rnd}")
            rows.append(self.round_row(rnd, "precopy", rep, t0, ev.now()))
            pages.append(int(rep.get("pages_written") or 0))
            ev.emit("round", round=rnd, pages=pages[-1], image_bytes=rep.get("image_bytes"))
            reason = cfg.rules.decide(pages)
            rnd += 1
            if reason:
                r.stop_reason = reason
                break
        ev.emit("stop", reason=r.stop_reason, rounds=rnd, pages=pages)
        n = rnd + 1
        where = self.page_server(n)  # before the freeze: not downtime
        t_freeze = ev.emit("freeze")
        parts, rep, root = self.freeze_and_restore(n, where, rnd, "the final dump", final=True)
        rows.append(self.round_row(rnd, "final", rep, t_freeze, t_freeze + parts["dump_s"]))
        assert self.dd is not None
        t = time.monotonic()
        self.call(self.dd, f"resume --pid {root}", "resuming the restored process")
        parts["resume_s"] = time.monotonic() - t
        t_resumed = ev.now()
        self.check_image(n)
        self.dst_pids, self.restored = self.restored, []
        r.downtime_s = t_resumed - t_freeze
        self.info["downtime_parts_ms"] = {k[:-2] + "_ms": round(1000 * v, 3)
                                          for k, v in parts.items()}
        ev.emit("downtime", ms=1000 * r.downtime_s, **self.info["downtime_parts_ms"])
        r.set_rounds(rows, t_freeze, t_resumed)
        self.dst_pid = root

    def tcp_flags(self, final: bool) -> tuple[str, str]:
        """--tcp: the dump's and the restore's extra flags. The final dump carries the
        connection (``--tcp-established``) and gives the address up right after; dst locks
        the connection (CRIU's own rules: the peer's retransmissions are dropped, not reset,
        until the socket is there), takes the address and announces it, then restores (CRIU
        binds the socket to the address, which must be local, and deletes the rules). The
        baseline's dump must carry the connection too (CRIU refuses an established socket
        otherwise) but its copy never runs: restored ``--tcp-close`` (no address needed on
        dst, and its killing sends the client nothing), while the source keeps the address
        and gets its connection back when it resumes (the driver's unlock). Test faults:
        keep-address: src keeps the address and dst holds it unannounced (CRIU cannot
        restore the socket without it local: neither a non-local bind nor IP_FREEBIND gets
        its repair-mode connect a route), so the client's packets still go to src, which
        answers them with a RST once its copy is gone; no-freeze: dst takes the address
        without locking the connection first."""
        tcp = self.run.tcp
        if tcp is None:
            return "", ""
        if not final:
            return " --tcp-established", " --tcp-close"
        keep = tcp.fault == "keep-address"
        return (" --tcp-established" + ("" if keep else f" --give-address {tcp.address}"),
                f" --tcp-established --take-address {tcp.address}"
                + (" --no-announce" if keep else ""))

    def freeze_and_restore(self, n: int, where: str, rnd: int, what: str, *,
                           final: bool = False) -> tuple[dict[str, float], dict[str, Any], int]:
        """Dump the tree (left stopped) into dst's page server, move the rest, restore it held
        stopped on dst and verify it: the downtime's parts, the dump's reply, the restored
        root pid."""
        assert self.ds is not None and self.dd is not None
        parts: dict[str, float] = {}
        dump_x, restore_x = self.tcp_flags(final)
        t = time.monotonic()
        self.frozen = True  # from here the source may be stopped: undo() resumes it
        self.moving = final and bool(dump_x)
        dump = self.call(self.ds, f"dump --pid {self.pid} --round {n} --page-server {where}"
                         f"{dump_x}", what)
        if final and self.run.tcp is not None and self.run.tcp.fault != "no-freeze":
            restore_x += "".join(f" --tcp-conn {c['local']}-{c['peer']}"
                                 for c in dump.get("tcp") or [])
        parts["dump_s"] = time.monotonic() - t
        t = time.monotonic()
        files = [f["path"] for f in dump.get("files") or []]
        pack = self.call(self.ds, f"pack --round {n}"
                         + "".join(f" --file {shlex.quote(p)}" for p in files),
                         "packing the final images")
        up = self.call(self.dd, f"unpack --round {n} --tar-b64 {pack['tar_b64']}",
                       "unpacking the final images")
        parts["copy_s"] = time.monotonic() - t
        self.events.emit("criu-moved", bytes=pack.get("bytes"), files=up.get("files"))
        # the pages to compare are the final image's (its pagemaps list them): the frozen
        # source hashes them while dst restores, then the restored tree hashes the same
        t = time.monotonic()
        rg = self.call(self.dd, f"ranges --round {n}", "listing the image's pages")
        memhash = f"memhash --ranges-b64 {rg['ranges_b64']}"
        self.send(self.ds, memhash, "hashing the frozen source")
        try:
            rs = self.call(self.dd, f"restore --round {n}{restore_x}", "the restore")
            self.restored = [int(p) for p in rs.get("pids") or [rs["pid"]]]
            self.run.pids[self.dst.name].update(self.restored)  # a failure kills them
            parts["restore_s"] = time.monotonic() - t
            t = time.monotonic()
            md = self.call(self.dd, memhash, "hashing the restored memory")
        finally:  # src's reply is read whatever happened: no reply is left on its channel
            ms = self.reply(self.ds, memhash, "hashing the frozen source")
        self.check_hashes(ms, md)
        parts["verify_s"] = time.monotonic() - t
        self.ranges_b64 = rg["ranges_b64"]
        self.info.setdefault("restore", []).append({
            "round": rnd, "pids": self.restored, "pages_restored": rs.get("pages_restored"),
            "restore_s": rs.get("restore_s"), "stats": rs.get("stats"),
            "files_copied": up.get("files"), "final_bytes": pack.get("bytes")})
        if dump_x:
            self.info.setdefault("tcp", []).append({
                "round": rnd, "final": final, "connections": dump.get("tcp"),
                "gave": dump.get("gave"), "took": rs.get("took"), "net_ms": (
                    None if rs.get("net_s") is None else round(1000 * rs["net_s"], 3)),
                "restored": rs.get("tcp"), "restore_flags": restore_x.strip()})
            self.events.emit("criu-tcp", **self.info["tcp"][-1])
        return parts, dump, int(rs["pid"])

    def check_hashes(self, ms: dict[str, Any], md: dict[str, Any]) -> None:
        """Every page the final image holds: the restored (stopped) tree's memory == the
        frozen source's, by SHA-256 over the lot (same pages, same order); else the run
        fails before the restored tree runs."""
        r = self.result
        r.source_sha256, r.restored_sha256 = ms["sha256"], md["sha256"]
        r.verified = ms["sha256"] == md["sha256"] and ms.get("pages") == md.get("pages")
        self.info["verified_pages"] = md.get("pages")
        self.events.emit("verify", match=r.verified, source=ms["sha256"],
                         restored=md["sha256"], pages=md.get("pages"))
        if not r.verified:
            raise MigrationFailed(
                f"verification FAILED: the restored memory {md['sha256'][:16]} "
                f"({md.get('pages')} pages) is not the frozen source's {ms['sha256'][:16]} "
                f"({ms.get('pages')} pages)")

    def check_image(self, n: int) -> None:
        """The images hold what the source held: their own bytes (the chain walked to each
        page's round) hash as the frozen source did. Run after the restored tree runs (it
        reads no memory and is slow under TCG); a mismatch still fails the run, and undo()
        ends the restored tree and resumes the source, which is still frozen."""
        assert self.dd is not None
        ih = self.call(self.dd, f"imagehash --round {n} --ranges-b64 {self.ranges_b64}",
                       "hashing the images")
        self.info["image_sha256"] = ih["sha256"]
        ok = ih["sha256"] == self.result.source_sha256
        self.events.emit("image-check", match=ok, image=ih["sha256"])
        if not ok:
            self.result.verified = False
            raise MigrationFailed(f"verification FAILED: the images {ih['sha256'][:16]} do "
                                  f"not hold what the frozen source did "
                                  f"({str(self.result.source_sha256)[:16]})")

    def stop_and_copy(self) -> None:
        """Baseline, before the pre-copy rounds: the same freeze with no rounds before it (all
        pages cross while frozen). Its restored copy is verified, never resumed (a user's
        program must not run twice) and killed; the source runs on. Downtime: freeze to
        verified."""
        assert self.ds is not None and self.dd is not None
        ev = self.events
        where = self.page_server(1)
        t0 = ev.emit("stop-and-copy-start")
        parts, rep, root = self.freeze_and_restore(1, where, 0, "the stop-and-copy dump")
        t1 = ev.now()
        self.result.stop_copy_downtime_s = t1 - t0
        self.info["stop_and_copy"] = {
            "downtime_parts_ms": {k[:-2] + "_ms": round(1000 * v, 3) for k, v in parts.items()},
            "pages": rep.get("pages_written"), "page_bytes": rep.get("page_bytes")}
        ev.emit("stop-and-copy", ms=1000 * (t1 - t0), pages=rep.get("pages_written"))
        self.check_image(1)
        self.call(self.dd, f"kill --pid {root}", "ending the stop-and-copy copy")
        self.run.pids[self.dst.name].difference_update(self.restored)
        self.restored = []
        rs = self.call(self.ds, f"resume --pid {self.pid}", "resuming the source")
        if rs.get("unlocked"):  # --tcp: its connection unlocked before it runs
            self.info["stop_and_copy"]["tcp_unlocked"] = rs["unlocked"]
        self.frozen = False
        self.both("cleanup", "removing the stop-and-copy images")
        self.result.verified = False

    def verify_resume(self) -> None:
        """Built-in workload: both copies (the frozen source, the running restore) hold, run
        to the same step, and must hash the same (workload.py --ctl: no stdin under CRIU)."""
        assert self.ds is not None and self.dd is not None
        ctl, r, ev = self.info["ctl"], self.result, self.events

        def wlctl(rem: Remote, pid: int, line: str, extra: str = "") -> dict[str, Any]:
            b64 = base64.b64encode(line.encode()).decode()
            return self.call(rem, f"wlctl --pid {pid} --ctl {shlex.quote(ctl)} --line-b64 "
                             f"{b64}{extra}", f"the workload's {line!r}")

        wlctl(self.ds, self.pid, "hold", " --no-wait")  # taken when it runs again
        self.call(self.ds, f"resume --pid {self.pid}", "resuming the source copy")
        self.frozen = False
        held_src = self.call(self.ds, f"wlctl-wait --ctl {shlex.quote(ctl)}",
                             "the source copy to hold")["reply"]
        held_dst = wlctl(self.dd, self.dst_pid, "hold")["reply"]
        target = max(int(held_src["step"]), int(held_dst["step"])) + self.cfg.verify_resume
        hashes = []
        for rem, pid in ((self.ds, self.pid), (self.dd, self.dst_pid)):
            wlctl(rem, pid, f"run-to {target}")
            hashes.append(wlctl(rem, pid, "hash")["reply"]["sha256"])
        r.verify_resume = hashes[0] == hashes[1]
        ev.emit("verify-resume", step=target, match=r.verify_resume, source=hashes[0],
                restored=hashes[1])
        if not r.verify_resume:
            raise MigrationFailed(f"--verify-resume FAILED at step {target}: source "
                                  f"{hashes[0][:16]} != restored {hashes[1][:16]}")

    def finish(self) -> None:
        """Success: the source tree ends; a user's process is left running on dst (not the
        run's: its cleanup must not end it), the built-in workload is ended by the cleanup."""
        assert self.ds is not None
        self.call(self.ds, f"kill --pid {self.pid}", "ending the source copy")
        self.frozen = False
        if not self.cfg.builtin:
            self.run.pids[self.dst.name].difference_update(self.dst_pids)
        if not self.cfg.builtin:
            self.info["migrated"] = {"node": self.dst.name, "pid": self.dst_pid,
                                     "output": self.output}

    # -- failure and the end ------------------------------------------------------------------
    def undo(self) -> None:
        """After a failure at any step: nothing restored stays on dst, and the source runs
        again. Best effort (a dead node cannot be asked); the drivers do the same on their
        own when their channel ends. --tcp after the final dump: dst's copy is killed
        without a word to the client (the driver's kill), dst gives the address up, src
        takes it back and announces it, and its connection is unlocked before it runs."""
        tcp = self.run.tcp
        moved = tcp is not None and self.moving and self.frozen
        give = f"address give --address {tcp.address}" if tcp is not None else ""
        take = f" --take-address {tcp.address}" if moved and tcp is not None else ""
        steps = ((self.dd, f"kill --pid {self.restored[0] if self.restored else 0}",
                  bool(self.restored)),
                 (self.dd, give, moved),
                 (self.ds, f"resume --pid {self.pid}{take}", self.frozen))
        for rem, line, cond in steps:
            if rem is None or not cond or rem.ended.is_set():
                continue
            try:
                rem.call(line, min(self.timeout, 30.0))
                self.events.emit("criu-undo", node=rem.node, cmd=line)
            except Exception as e:  # noqa: BLE001 - undo all we can
                self.events.emit("criu-undo-failed", node=rem.node, error=str(e))
        self.restored = []
        self.frozen = False
        self.moving = False

    def tcp_verdict(self) -> None:
        """After a failure: the client's verdict before collect() ends the workload (after
        an undo the source serves the connection again: kept says whether it survived)."""
        if self.run.tcp is None or self.run.tcp.proc is None:
            return
        with contextlib.suppress(Exception):
            self.run.tcp.finish()

    def collect(self) -> None:
        """The program's output, CRIU's logs into the results folder; the built-in workload
        ended on both nodes (it is the run's, but CRIU gives it no run marker to be killed
        by); images removed, and the run's workspace, output and control files wherever the
        process does not run (on both nodes for the built-in workload); drivers told to
        quit. Never raises: it runs after failures too."""
        folder = self.run.folder
        moved = bool(self.dst_pids)
        if self.output:
            node = self.dst if moved else self.src
            with contextlib.suppress(Exception):
                rr = self.run.pool.get(node).run(
                    f"tail -c {OUTPUT_KEEP} {shlex.quote(self.output)}",
                    timeout=self.run.settings.ssh_timeout + 10)
                (folder / "program.log").write_bytes(rr.stdout)
        if self.cfg.builtin:
            for rem, pid in ((self.ds, self.pid), (self.dd, self.dst_pid)):
                if rem is not None and pid and not rem.ended.is_set():
                    with contextlib.suppress(Exception):
                        rem.call(f"kill --pid {pid}", 30.0)
        files = [f for f in (self.work, self.output, self.info.get("ctl")) if f]
        files += [f"{self.info['ctl']}.reply"] if self.info.get("ctl") else []
        also = {self.ds: files if self.cfg.builtin or moved else [],
                self.dd: files if self.cfg.builtin or not moved else []}
        for rem in (self.ds, self.dd):
            if rem is None or rem.ended.is_set():
                continue
            with contextlib.suppress(Exception):
                logs = rem.call("logs", 30.0).get("logs") or {}
                for rel, text in logs.items():
                    out = folder / "criu-logs" / rem.node / Path(rel)
                    if ".." in Path(rel).parts or Path(rel).is_absolute():
                        continue
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(text)
            with contextlib.suppress(Exception):
                rem.call("cleanup" + "".join(f" --also {shlex.quote(f)}" for f in also[rem]),
                         30.0)
            with contextlib.suppress(Exception):
                rem.quit()
