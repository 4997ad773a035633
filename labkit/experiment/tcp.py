"""migrate-test --tcp: the client that must stay connected, and the service address that moves.

The workload (``payloads/workload.py --tcp-serve``) serves numbered records that depend on its
migrated memory (``payloads/tcpstream.py``); the client (``payloads/tcp_client.py``) runs here,
on the controller, off both nodes, connected before the migration and reading throughout. It
checks every byte and reports what it saw; the run only reads its verdict.

Why the client is on the controller: a client on src or dst would share a kernel with one end
of the move and see nothing of the network. A vm fake lab's LAN is a QEMU multicast group the
controller is not on, so the client runs inside a lan port (``labkit/lanport.py``: its own
network namespace, a tap bridged to that group, 10.77.0.250); on a real lab the controller is
expected to reach the service address directly.

The service address starts on src (``netmove.py take`` before the workload starts) and is
given up on both nodes at cleanup; moving it during the freeze is the backend's job, on the
node side, where the freeze is."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkit.errors import UserError
from labkit.experiment.remote import MigrationFailed, payload_command

if TYPE_CHECKING:
    from labkit.experiment.run import MigrateRun
    from labkit.inventory import Inventory, Node

PAYLOADS = Path(__file__).resolve().parent.parent / "payloads"
VM_SERVICE_ADDRESS = "10.77.0.200"  # on the vm fake lab's LAN (guests are 10.77.0.1..)
VM_CLIENT_ADDRESS = "10.77.0.250/24"
VM_LAN_GROUP = "230.0.77.1"  # labkit/fake/vm.py's multicast group
FAULTS = ("keep-address", "no-freeze")  # test-only: LABKIT_TCP_FAULT
DRAIN_S = 10.0  # after "stop": how long the client waits for the echo to cover its messages


def fault() -> str:
    """The test-only fault switch (LABKIT_TCP_FAULT), checked: a typo must not pass for a
    normal run."""
    value = os.environ.get("LABKIT_TCP_FAULT", "")
    if value and value not in FAULTS:
        raise UserError(f"LABKIT_TCP_FAULT={value!r}: one of {', '.join(FAULTS)} (a test "
                        "switch)")
    return value


def service_address(inv: Inventory, address: str) -> str:
    """The address that moves: --tcp-address, else the vm fake lab's. Process-kind fake nodes
    share the controller's kernel and network stack: there is no connection to move."""
    spec = inv.fake_lab
    if spec is not None and spec.kind != "vm":
        raise UserError(f"--tcp needs nodes with their own network stack: the fake lab in "
                        f"{inv.path} has {spec.kind}-kind nodes, which share this machine's "
                        "kernel (use a vm fake lab: fake_lab: {kind: vm}, or real nodes)")
    if spec is not None and not spec.lan_port:
        raise UserError(f"--tcp: the vm fake lab in {inv.path} has no LAN (fake_lab.lan_port)")
    if address:
        return address
    if spec is not None:
        return VM_SERVICE_ADDRESS
    raise UserError("--tcp on real nodes: give --tcp-address, a free address on the LAN "
                    "both nodes share (it moves from --src to --dst)")


class TcpSession:
    """The client and the service address of one run (``run.tcp``)."""

    def __init__(self, run: MigrateRun):
        self.run = run
        cfg = run.cfg
        self.address = service_address(run.inv, cfg.tcp_address)
        self.port = cfg.tcp_port
        self.freeze = cfg.tcp_freeze
        self.fault = fault()
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.stderr: list[str] = []
        self.connected_t: float | None = None
        self.result: dict[str, Any] | None = None
        self._taken: set[str] = set()

    # -- the address ------------------------------------------------------------------------
    def _netmove(self, node: Node, verb: str) -> None:
        run = self.run
        # --port: first clear the packet holds (a killed restore agent's, hold mode) and CRIU
        # connection locks (a killed criu's or driver's) left for the service, which would
        # drop its packets on that node from then on
        cmd = payload_command(node, "netmove.py",
                              f"{verb} --address {self.address} --port {self.port}")
        r = run.pool.get(node).run(cmd, timeout=3 * run.settings.ssh_timeout)
        if r.exit_code != 0:
            why = (r.stderr or r.stdout or b"").decode(errors="replace").strip().splitlines()
            raise MigrationFailed(f"{node.name}: cannot {verb} the service address "
                                  f"{self.address}: {why[-1] if why else f'exit {r.exit_code}'}",
                                  value={"node": node.name, "step": f"tcp {verb}"})
        self.run.events.emit(f"tcp-{verb}", node=node.name, address=self.address)

    def setup(self) -> None:
        """The service address on src only, before the workload binds it."""
        run = self.run
        self._taken.update({run.src_node.name, run.dst_node.name})  # cleanup gives up both
        self._netmove(run.dst_node, "give")
        self._netmove(run.src_node, "take")

    # -- the client -------------------------------------------------------------------------
    def client_argv(self) -> list[str]:
        argv = [sys.executable, "-u", str(PAYLOADS / "tcp_client.py"), "--connect",
                f"{self.address}:{self.port}", "--seed", str(self.run.cfg.seed),
                "--drain", f"{DRAIN_S:g}"]
        spec = self.run.inv.fake_lab
        if spec is None:
            return argv
        from labkit.lanport import lan_command

        return lan_command(VM_LAN_GROUP, spec.lan_port, VM_CLIENT_ADDRESS, argv)

    def connect(self) -> None:
        """Start the client and wait until it is connected (the workload is listening)."""
        run = self.run
        argv = self.client_argv()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        threading.Thread(target=self._read_stdout, daemon=True, name="tcp-client").start()
        threading.Thread(target=self._read_stderr, daemon=True, name="tcp-client-err").start()
        run.events.emit("tcp-client-start", address=self.address, port=self.port)
        line = self._next(run.timeout, "connected")
        self.connected_t = run.events.emit("tcp-connected", **{k: v for k, v in line.items()
                                                                 if k != "event"})
        # the stream flows before the migration starts: a stall later is the migration's
        line = self._next(run.timeout, "first_record")
        run.events.emit("tcp-flowing", **{k: v for k, v in line.items() if k != "event"})

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                obj = json.loads(raw)
            except ValueError:
                self.stderr.append(raw.decode(errors="replace").rstrip())
                continue
            if isinstance(obj, dict):
                self.lines.put(obj)
        self.lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.stderr.append(raw.decode(errors="replace").rstrip())
            del self.stderr[:-20]

    def _next(self, timeout: float, event: str) -> dict[str, Any]:
        """The client's next line of kind ``event`` (others are logged); its end or silence
        fails the run naming it."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            try:
                obj = self.lines.get(timeout=max(0.0, left))
            except queue.Empty:
                raise MigrationFailed(f"the TCP client: no {event!r} line in {timeout:.0f} s",
                                      value={"step": f"tcp client {event}",
                                             "stderr": self.stderr[-5:]}) from None
            if obj is None:
                self.lines.put(None)
                code = self.proc.wait() if self.proc else None
                last = self.stderr[-1] if self.stderr else f"exit status {code}"
                raise MigrationFailed(f"the TCP client ended before {event!r}: {last}",
                                      value={"step": f"tcp client {event}",
                                             "stderr": self.stderr[-5:]})
            if obj.get("event") == event:
                return obj
            self.run.events.emit("tcp-client", **obj)

    def finish(self) -> dict[str, Any]:
        """Stop the client, take its verdict into the result (run.json ``tcp``); a connection
        that was not kept fails the run (exit 1). Idempotent: a backend that must end the
        workload itself calls it first."""
        if self.result is not None:
            return self.result
        run = self.run
        if self.proc is None:
            self.result = {"kept": False, "error": "the client never started"}
            run.result.tcp = self.result
            return self.result
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"stop\n")
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            line = self._next(DRAIN_S + run.timeout, "result")
        except MigrationFailed as e:
            line = {"kept": False, "error": str(e)}
        out = {k: v for k, v in line.items() if k != "event"}
        out.update(address=self.address, port=self.port, freeze=self.freeze,
                   **({"fault": self.fault} if self.fault else {}))
        self._place_gaps(out)
        self.result = out
        run.result.tcp = out
        run.events.emit("tcp", **out)
        if not out.get("kept"):
            errors = out.get("errors") or []
            why = errors[0] if errors else out.get("error") or "see run.json tcp"
            raise MigrationFailed(f"the TCP connection was not kept: {why}",
                                  value={"step": "tcp client"})
        return out

    def _place_gaps(self, out: dict[str, Any]) -> None:
        tl = self.run.result.info.get("timeline") or {}
        place_gaps(out, time.time() - self.run.events.now(),
                   tl.get("freeze_t"), tl.get("resumed_t"))

    def close(self) -> None:
        """Cleanup: the client (and its lan port) ended, the address given up everywhere."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()
        for name in sorted(self._taken):
            try:
                self._netmove(self.run.inv.node(name), "give")
            except Exception as e:  # noqa: BLE001 - keep cleaning up
                self.run.events.emit("cleanup-error", node=name, error=str(e))


def place_gaps(out: dict[str, Any], offset: float,
               freeze: float | None, resumed: float | None) -> None:
    """The client's stalls (its wall clock, less ``offset``) in run seconds, for the timeline
    beside the downtime; and ``freeze_gap_ms``, the longest stall that overlaps the migration's
    own freeze (the criu backend's stop-and-copy baseline freezes the source too, earlier, and
    may be the longest stall of all). ``out`` is the client's result, changed in place."""

    def placed(gap: Any) -> list[float] | None:
        if (isinstance(gap, list) and len(gap) in (2, 3)
                and all(isinstance(g, (int, float)) and not isinstance(g, bool)
                        for g in gap)):
            return [round(g - offset, 6) for g in gap[:2]]
        return None

    if (gap_t := placed(out.get("gap"))) is not None:
        out["gap_t"] = gap_t
    gaps = out.pop("gaps", None) or []  # raw: run.json keeps the two that matter
    if freeze is None or resumed is None:
        return
    best: tuple[list[float], float] | None = None  # (placed, length in ms)
    for gap in gaps:
        g = placed(gap)
        if g is None or not (g[0] <= resumed and g[1] >= freeze):
            continue
        # the client's own length (monotonic, rounded as its max_gap_ms is), so the two
        # compare exactly; the wall-clock ends only place the stall on the timeline
        ms = gap[2] if len(gap) == 3 else round(1000 * (gap[1] - gap[0]), 3)
        if best is None or ms > best[1]:
            best = (g, ms)
    if best is not None:
        out["freeze_gap_t"], out["freeze_gap_ms"] = best
