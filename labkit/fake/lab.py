"""The fake lab process: every fake BMC and every fake node of an inventory, in ONE process on
ONE event loop, plus the functions tasks and the pytest plugin use to run it.

    python -m labkit.fake.lab serve --inventory PATH     # foreground
    python -m labkit.fake.lab up|down|status --inventory PATH
    python -m labkit.fake.lab generate --count N --state-dir DIR

State (``fake_lab.state_dir``, default ``.lab/`` beside the inventory) is created on first
start: a random BMC password (0600), the lab client key id_ed25519 (+.pub), authorized_keys,
per-node host keys, known_hosts, node roots, console logs; lab.pid, lab.log, control.sock while
running. The password never leaves that file: not in argv, not in the log."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from labkit import inventory as inv
from labkit.errors import LabkitError, UserError
from labkit.fake.control import SOCKET_NAME, ControlServer, LabControl
from labkit.fake.ports import free_port
from labkit.nodeside import killmarked

PID_FILE = "lab.pid"
LOG_FILE = "lab.log"
PASSWORD_FILE = "bmc-password"
CLIENT_KEY = "id_ed25519"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

log = logging.getLogger("labkit.fake.lab")


# --- state folder ----------------------------------------------------------------------------

def state_dir_of(inventory: inv.Inventory) -> Path:
    if inventory.fake_lab is not None:
        return inventory.fake_lab.state_dir
    return inventory.path.parent / ".lab"


def _write_secret(path: Path, data: bytes) -> None:
    """Create a 0600 file atomically-enough (O_EXCL): never world-readable, not even briefly."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def ensure_state(state_dir: Path) -> None:
    """First-start material: password, client key, authorized_keys. Idempotent."""
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "nodes").mkdir(exist_ok=True)
    (state_dir / "console").mkdir(exist_ok=True)
    pw = state_dir / PASSWORD_FILE
    if not pw.exists():
        try:
            _write_secret(pw, secrets.token_urlsafe(15).encode() + b"\n")
        except FileExistsError:
            pass
    key = state_dir / CLIENT_KEY
    if not key.exists() or not key.with_name(CLIENT_KEY + ".pub").exists():
        from labkit.fake.base import ensure_host_key  # paramiko-heavy: only when needed

        ensure_host_key(key)
    os.chmod(key, 0o600)
    auth = state_dir / "authorized_keys"
    pub = key.with_name(CLIENT_KEY + ".pub").read_text()
    if not auth.exists() or auth.read_text() != pub:
        auth.write_text(pub)


def _bmc_password(node: inv.Node, state_dir: Path) -> bytes:
    """The node's configured password source if it resolves, else the lab's generated one."""
    assert node.bmc is not None
    try:
        return node.bmc.password().reveal()
    except LabkitError:
        return (state_dir / PASSWORD_FILE).read_bytes().rstrip(b"\r\n")


# --- the serving process ---------------------------------------------------------------------

class _LogWriter(io.TextIOBase):
    """sys.stdout replacement: pyghmi prints repr()s and tracebacks; they belong in the log."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def write(self, s: str) -> int:
        if s.strip():
            self.logger.info("%s", s.rstrip())
        return len(s)


class LabServer:
    """Builds every BMC and node of an inventory on one loop and answers the control socket."""

    def __init__(self, inventory_path: str | os.PathLike):
        from labkit.fake.bmc import FakeBmc
        from labkit.fake.loop import Loop

        self.inventory = inv.load(inventory_path, check_secrets=False)
        self.state_dir = state_dir_of(self.inventory)
        ensure_state(self.state_dir)
        spec = self.inventory.fake_lab or inv.FakeLabSpec(state_dir=self.state_dir)
        self.loop = Loop()
        self.bmcs: dict[str, Any] = {}
        self.nodes: dict[str, Any] = {}
        self._build_nodes(spec)
        try:
            for name, node in self.inventory.nodes.items():
                if node.bmc is None:
                    continue
                self.bmcs[name] = FakeBmc(
                    name, loop=self.loop, host=node.bmc.host, port=node.bmc.port,
                    user=node.bmc.user, password=_bmc_password(node, self.state_dir),
                    node=self.nodes.get(name), power_delay=spec.power_delay,
                    boot_delay=spec.boot_delay,
                    console_log=self.state_dir / "console" / f"{name}.log",
                    seed=spec.seed, log=logging.getLogger(f"labkit.fake.bmc.{name}"))
        except OSError as e:
            self.close()
            raise LabkitError(f"cannot bind fake BMC {name} on "
                              f"{node.bmc.host}:{node.bmc.port}: {e.strerror}") from None
        self.control = ControlServer(self.loop, self.state_dir / SOCKET_NAME, self.handle)
        for name, node in self.inventory.nodes.items():
            power = str(node.fake.get("power", "off")).lower()
            if name in self.bmcs and power in ("on", "true"):
                self.bmcs[name]._schedule("on", delay=0)
            elif name not in self.bmcs and name in self.nodes:
                self.nodes[name].start()  # SSH-only node: always "powered"

    def _build_nodes(self, spec: inv.FakeLabSpec) -> None:
        ssh_nodes = {n: node for n, node in self.inventory.nodes.items() if node.ssh is not None}
        if not ssh_nodes:
            return
        # lazy: paramiko and friends
        from labkit.fake.base import ensure_host_key
        from labkit.fake.openssh import OpenSshNode
        from labkit.fake.sshd import PythonSshNode

        cls = OpenSshNode if spec.sshd == "openssh" else PythonSshNode
        if spec.kind == "vm":
            from labkit.fake import vmimage

            why = vmimage.have_qemu(spec.kernel)
            if why is not None:  # refuse to start, rather than fail every power-on later
                raise LabkitError(f"fake_lab kind vm: {why}")
        known: list[str] = []
        for index, (name, node) in enumerate(ssh_nodes.items()):
            assert node.ssh is not None
            root = self.state_dir / "nodes" / name
            root.mkdir(parents=True, exist_ok=True)
            host_key = self.state_dir / "nodes" / f"{name}.host_key"
            key = ensure_host_key(host_key)
            host = node.ssh.host if node.ssh.port == 22 else f"[{node.ssh.host}]:{node.ssh.port}"
            known.append(f"{host} {key.get_name()} {key.get_base64()}\n")
            log = logging.getLogger(f"labkit.fake.node.{name}")
            if spec.kind == "vm":
                from labkit.fake.vm import VmNode, VmSpec

                vspec = VmSpec(memory=spec.memory, cpus=spec.cpus, kernel=spec.kernel,
                               boot_timeout=spec.boot_timeout, lan_port=spec.lan_port,
                               cmdline=f"{spec.kernel_args} {node.fake.get('kernel_args', '')}",
                               acpi=bool(node.fake.get("acpi", True)))
                self.nodes[name] = VmNode(name, root, node.ssh.host, node.ssh.port, host_key,
                                          self.state_dir / "authorized_keys", log,
                                          index=index + 1, spec=vspec,
                                          cache=self.state_dir / "vm-cache",
                                          user=node.ssh.user)
                continue
            self.nodes[name] = cls(name, root, node.ssh.host, node.ssh.port, host_key,
                                   self.state_dir / "authorized_keys", log)
        (self.state_dir / "known_hosts").write_text("".join(known))

    # --- control ops (run on the loop thread) ---------------------------------------------
    def _targets(self, request: dict) -> list[str]:
        sel = request.get("node", "*")
        if sel in ("*", "@all", None):
            return list(self.bmcs)
        names = [s.strip() for s in str(sel).split(",") if s.strip()]
        for n in names:
            if n not in self.bmcs:
                raise UserError(f"unknown node {n!r} (fake BMCs: {', '.join(self.bmcs)})")
        return names

    def handle(self, request: dict) -> dict:
        op = request.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "status":
            nodes = {n: b.status() for n, b in self.bmcs.items()}
            for n, node in self.nodes.items():
                if n not in nodes:
                    nodes[n] = {"power": None, "ssh": bool(node.up)}
            return {"ok": True, "pid": os.getpid(), "nodes": nodes,
                    "inventory": str(self.inventory.path)}
        if op == "fault":
            keys = ("drop", "busy", "hang", "refuse_password", "down", "power_delay", "clear")
            unknown = set(request) - set(keys) - {"op", "node"}
            if unknown:
                raise UserError(f"unknown fault(s): {', '.join(sorted(unknown))}")
            changes = {k: request[k] for k in keys if k in request}
            targets = self._targets(request)
            for n in targets:
                try:
                    self.bmcs[n].set_faults(**changes)
                except ValueError as e:
                    raise UserError(str(e)) from None
            return {"ok": True, "nodes": {n: self.bmcs[n].faults.to_json() for n in targets}}
        if op == "user":
            name, privilege = request.get("name"), request.get("privilege")
            if not isinstance(name, str) or not isinstance(privilege, str):
                raise UserError("user: give name and privilege (callback|user|operator|admin)")
            targets = self._targets(request)
            for n in targets:
                try:
                    self.bmcs[n].add_user(name, privilege)
                except ValueError as e:
                    raise UserError(str(e)) from None
            return {"ok": True, "nodes": targets}
        if op == "cold_reset":
            targets = self._targets(request)
            for n in targets:
                self.bmcs[n].cold_reset()
            return {"ok": True, "nodes": targets}
        if op == "power":
            action = request.get("action")
            if action not in ("on", "off", "soft", "reset", "cycle"):
                raise UserError("power action must be on, off, soft, reset or cycle")
            out = {}
            for n in self._targets(request):
                b = self.bmcs[n]
                code = b._request(action)
                if request.get("now") and b.pending is not None:
                    b._schedule(b.pending, delay=0)
                out[n] = code or 0
            return {"ok": True, "codes": out}
        if op == "console":
            (name,) = self._targets(request)
            path = self.state_dir / "console" / f"{name}.log"
            tail = int(request.get("tail", 65536))
            data = path.read_bytes() if path.exists() else b""
            return {"ok": True, "text": data[-tail:].decode("utf-8", "replace")}
        if op == "shutdown":
            self.loop.call_later(0.05, self.loop.stop)
            return {"ok": True}
        raise UserError(f"unknown op {op!r}")

    # --- run / stop -----------------------------------------------------------------------
    def run(self) -> None:
        pid_file = self.state_dir / PID_FILE
        # pid and start time: together they name this process for as long as the machine runs
        # (a pid alone may be reused after a crash or a reboot; down() must not signal that)
        me = os.getpid()
        pid_file.write_text(f"{me} {_start_time(me) or ''}".strip() + "\n")
        log.info("fake lab up: %d BMC(s), %d SSH node(s), pid %d", len(self.bmcs),
                 len(self.nodes), os.getpid())
        try:
            self.loop.run()
        finally:
            self.close()
            try:
                if pid_file.read_text().split()[:1] == [str(os.getpid())]:
                    pid_file.unlink()
            except OSError:
                pass
            log.info("fake lab stopped")

    def close(self) -> None:
        control = getattr(self, "control", None)
        if control is not None:
            control.close()
        for b in self.bmcs.values():
            b.close()
        for node in self.nodes.values():
            try:
                node.close()
            except Exception:
                log.exception("closing node %s", getattr(node, "name", node))


def serve(inventory_path: str | os.PathLike) -> int:
    """Foreground server (what ``up`` spawns). Logs go to STATE_DIR/lab.log."""
    inventory = inv.load(inventory_path, check_secrets=False)
    state_dir = state_dir_of(inventory)
    state_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(state_dir / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("paramiko").setLevel(logging.WARNING)
    sys.stdout = _LogWriter(logging.getLogger("labkit.fake.stdout"))
    server = LabServer(inventory_path)

    def on_signal(signum: int, frame: Any) -> None:
        server.loop.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.run()
    return 0


# --- managing the background process ---------------------------------------------------------

def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot), or None when there is no such process."""
    st = killmarked.stat(pid)
    return (st[0], st[3]) if st is not None else None


def _start_time(pid: int) -> int | None:
    st = _proc_stat(pid)
    return st[1] if st is not None else None


def _is_lab_process(pid: int) -> bool:
    """Is ``pid`` running ``... labkit.fake.lab serve ...`` (what ``up`` starts)?"""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(a == b"labkit.fake.lab" and argv[i + 1:i + 2] == [b"serve"]
               for i, a in enumerate(argv))


def _lab(state_dir: Path) -> tuple[int, int] | None:
    """(pid, start time) of the lab that lab.pid names, or None when the file is missing or
    garbage or names a process that is not that lab: a stale file (the lab crashed, or the
    machine rebooted) whose pid now belongs to something else, which must never be signalled.
    The start time recorded beside the pid must match; a file without one (older labkit) is
    believed only if the process runs ``labkit.fake.lab serve``, as the lab always does."""
    try:
        fields = (state_dir / PID_FILE).read_text().split()
        pid = int(fields[0])
        recorded = int(fields[1]) if len(fields) > 1 else None
    except (OSError, ValueError, IndexError):
        return None
    st = _proc_stat(pid)
    if st is None or st[0] in "ZX" or recorded not in (None, st[1]):
        return None
    if not _is_lab_process(pid):
        return None
    return pid, st[1]


def _pid(state_dir: Path) -> int | None:
    """The running lab's pid, or None (see ``_lab``)."""
    lab = _lab(state_dir)
    return lab[0] if lab is not None else None


def _log_tail(state_dir: Path, lines: int = 5) -> str:
    try:
        text = (state_dir / LOG_FILE).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def up(inventory_path: str | os.PathLike, timeout: float = START_TIMEOUT) -> dict[str, Any]:
    """Start the lab in the background unless it already runs; return {pid, state_dir, ...}
    once the control socket answers."""
    inventory = inv.load(inventory_path, check_secrets=False)
    state_dir = state_dir_of(inventory)
    control = LabControl(state_dir)
    pid = _pid(state_dir)
    if pid is not None and control.ping():
        return {"pid": pid, "state_dir": str(state_dir), "started": False}
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / PID_FILE).unlink(missing_ok=True)
    logf = open(state_dir / LOG_FILE, "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "labkit.fake.lab", "serve", "--inventory",
             str(Path(inventory_path).resolve())],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True)
    finally:
        logf.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LabkitError(f"fake lab exited at start (code {proc.returncode}): "
                              f"{_log_tail(state_dir)}")
        if (state_dir / PID_FILE).exists() and control.ping():
            return {"pid": proc.pid, "state_dir": str(state_dir), "started": True}
        time.sleep(0.02)
    proc.kill()
    raise LabkitError(f"fake lab did not become ready in {timeout}s: {_log_tail(state_dir)}")


def down(inventory_path: str | os.PathLike | None = None, *, state_dir: Path | None = None,
         timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the lab; True if one was running. Polite first (control op), then SIGTERM, then
    SIGKILL of the whole process group (nodes' children included). Every signal goes only to
    the process lab.pid named, checked by its start time just before: a stale lab.pid is
    removed and reported as "not running", and nothing is signalled."""
    if state_dir is None:
        state_dir = state_dir_of(inv.load(inventory_path, check_secrets=False))
    lab = _lab(state_dir)
    if lab is None:
        (state_dir / PID_FILE).unlink(missing_ok=True)
        return False
    try:
        LabControl(state_dir, timeout=3).shutdown()
    except LabkitError:
        _signal(lab, signal.SIGTERM)
    if not _wait_gone(lab, timeout):
        _signal(lab, signal.SIGTERM)
        if not _wait_gone(lab, 2.0):
            _signal(lab, signal.SIGKILL, group=True)
            _wait_gone(lab, 2.0)
    (state_dir / PID_FILE).unlink(missing_ok=True)
    (state_dir / SOCKET_NAME).unlink(missing_ok=True)
    return True


def _signal(lab: tuple[int, int], sig: int, group: bool = False) -> None:
    """Signal the lab (and with ``group`` its process group, which it leads) if it is still
    the process of that start time: once it has exited its pid may name another process."""
    pid, start = lab
    if _start_time(pid) != start:
        return
    if group:
        try:
            os.killpg(pid, sig)
            return
        except OSError:
            pass  # not a group leader (run in the foreground): the lab alone
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(lab: tuple[int, int], timeout: float) -> bool:
    """Wait until the lab has exited (a zombie counts: it runs no more). Our own child (tests)
    is reaped here."""
    pid, start = lab
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)  # our child (tests): reap it
            if done:
                return True
        except ChildProcessError:
            pass
        st = _proc_stat(pid)
        if st is None or st[1] != start or st[0] in "ZX":
            return True
        time.sleep(0.02)
    return False


def status(inventory_path: str | os.PathLike) -> dict[str, Any] | None:
    """Per-node status from the running lab, or None when it is not running."""
    state_dir = state_dir_of(inv.load(inventory_path, check_secrets=False))
    if _pid(state_dir) is None:
        return None
    try:
        return LabControl(state_dir).status()
    except LabkitError:
        return None


# --- generated labs --------------------------------------------------------------------------

def generate(count: int, state_dir: str | os.PathLike, *, bmc_base: int | None = None,
             ssh_base: int | None = None, ssh: bool = True,
             power_delay: tuple[float, float] = (1.0, 3.0), boot_delay: float = 1.5,
             sshd: str = "python", power_on: bool = False, seed: int = 0,
             prefix: str = "node", rack_size: int = 8, kind: str = "process",
             vm: dict[str, Any] | None = None) -> Path:
    """Write STATE_DIR/inventory.yaml for ``count`` nodes (BMC on UDP, SSH on TCP, all on
    127.0.0.1; free ports unless bases are given) whose state folder is STATE_DIR itself.
    ``kind="vm"``: the nodes are QEMU guests (``vm``: memory, cpus, kernel, boot_timeout) on a
    lab LAN of their own (a free UDP port for its multicast group)."""
    if count < 1:
        raise UserError("count must be >= 1")
    if sshd not in ("python", "openssh"):
        raise UserError("sshd must be python or openssh")
    if kind not in ("process", "vm"):
        raise UserError("kind must be process or vm")
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    names = [f"{prefix}{i + 1}" for i in range(count)]
    out = ["# generated by labkit.fake.lab.generate: a fake lab on loopback\n",
           "defaults:\n",
           "  bmc: {user: admin, password_file: bmc-password}\n",
           "  ssh: {key_file: id_ed25519, known_hosts: known_hosts}\n",
           "fake_lab:\n",
           "  state_dir: .\n",
           f"  power_delay: [{power_delay[0]}, {power_delay[1]}]\n",
           f"  boot_delay: {boot_delay}\n",
           f"  sshd: {sshd}\n",
           f"  seed: {seed}\n"]
    if kind == "vm":
        out.append("  kind: vm\n")
        out.append(f"  lan_port: {free_port(socket.SOCK_DGRAM)}\n")
        for key, value in (vm or {}).items():
            if value is not None:
                out.append(f"  {key}: {json.dumps(value)}\n")
    out.append("groups:\n")
    for r in range(0, count, rack_size):
        out.append(f"  rack{r // rack_size + 1}: [{', '.join(names[r:r + rack_size])}]\n")
    out.append("nodes:\n")
    for i, name in enumerate(names):
        bport = bmc_base + i if bmc_base else free_port(socket.SOCK_DGRAM)
        out.append(f"  {name}:\n    bmc: {{host: 127.0.0.1, port: {bport}}}\n")
        if ssh:
            sport = ssh_base + i if ssh_base else free_port(socket.SOCK_STREAM)
            out.append(f"    ssh: {{host: 127.0.0.1, port: {sport}}}\n")
        if power_on:
            out.append("    fake: {power: on}\n")
    path = state / "inventory.yaml"
    path.write_text("".join(out))
    return path


# --- command line ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labkit.fake.lab", description=__doc__.split(
        "\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("serve", "up", "down", "status"):
        sp = sub.add_parser(name)
        sp.add_argument("--inventory", "-i", default=None)
    g = sub.add_parser("generate")
    g.add_argument("--count", type=int, default=4)
    g.add_argument("--state-dir", default=".lab")
    g.add_argument("--no-ssh", action="store_true")
    a = p.parse_args(argv)
    try:
        if a.cmd == "serve":
            return serve(inv.find_inventory(a.inventory))
        if a.cmd == "up":
            print(json.dumps(up(inv.find_inventory(a.inventory))))
        elif a.cmd == "down":
            print("stopped" if down(inv.find_inventory(a.inventory)) else "not running")
        elif a.cmd == "status":
            print(json.dumps(status(inv.find_inventory(a.inventory)), indent=2))
        elif a.cmd == "generate":
            print(generate(a.count, a.state_dir, ssh=not a.no_ssh))
    except LabkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
