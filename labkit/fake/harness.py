"""Fake labs for tests and benchmarks, on free loopback ports in a folder of their own.

* ``start_fake_lab(folder, **options) -> FakeLabHandle``: the whole lab (BMCs + nodes) as a
  real background process (``python -m labkit.fake.lab serve``), exactly as ``invoke lab.up``
  runs it; the pytest plugin's fixtures and ``bench/`` use it.
* ``SshNodeSet``: SSH-only nodes in this process, for tests of the SSH layer that need no BMC.

Both talk to what they start only as the controller would (inventory, SSH, the control
socket). ``start_with_pid`` starts a process under a chosen, just-freed pid: what tests of
"never signal a reaped pid" need to make pid reuse happen on purpose."""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkit.fake import lab as fake_lab_mod
from labkit.fake.base import ENV_ROOT
from labkit.fake.control import LabControl
from labkit.fake.ports import free_port
from labkit.nodeside import killmarked

if TYPE_CHECKING:
    from labkit.fake.openssh import OpenSshNode
    from labkit.fake.sshd import PythonSshNode

__all__ = ["DEFAULTS", "FakeLabHandle", "SshNodeSet", "start_fake_lab", "start_with_pid"]

DEFAULTS: dict[str, Any] = {
    "count": 2,
    "power_delay": (0.05, 0.2),
    "boot_delay": 0.2,
    "ssh": True,
    "sshd": "python",
    "power_on": False,
    "seed": 0,
    "kind": "process",  # "vm": QEMU guests (labkit/fake/vm.py)
    "vm": None,  # vm knobs: {"memory": MiB, "cpus": N, "kernel": ..., "boot_timeout": s}
}


# --- the whole lab, as a process -------------------------------------------------------------

@dataclass
class FakeLabHandle:
    """A running fake lab. ``env`` holds LABKIT_INVENTORY for subprocesses (merged over
    os.environ); ``control`` talks to the lab's control socket."""

    inventory_path: Path
    state_dir: Path
    control: LabControl
    nodes: list[str]
    pid: int
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "LABKIT_INVENTORY": str(self.inventory_path)}

    @property
    def password_file(self) -> Path:
        return self.state_dir / fake_lab_mod.PASSWORD_FILE

    def password(self) -> bytes:
        """The BMC password, for in-process clients (never put it in argv: use -f FILE)."""
        return self.password_file.read_bytes().rstrip(b"\r\n")

    def inventory(self) -> Any:
        from labkit import inventory

        return inventory.load(self.inventory_path)

    def bmc(self, node: str) -> tuple[str, int]:
        spec = self.inventory().node(node).bmc
        return spec.host, spec.port

    def ssh(self, node: str) -> tuple[str, int]:
        spec = self.inventory().node(node).ssh
        return spec.host, spec.port

    def status(self, node: str | None = None) -> dict[str, Any]:
        st = self.control.status()
        return st[node] if node else st

    def wait(self, node: str, timeout: float = 30.0, **want: Any) -> dict[str, Any]:
        return self.control.wait(node, timeout=timeout, **want)

    def power_on_all(self, timeout: float = 30.0) -> None:
        """Power every node on at once (no IPMI round trip) and wait until SSH is up."""
        self.control.power("*", "on", now=True)
        for n in self.nodes:
            self.control.wait(n, timeout=timeout, phase="up")

    def node_marker(self, node: str) -> bytes:
        """The environment entry every process of ``node`` carries (its power-off kills by it)."""
        return f"{ENV_ROOT}={(self.state_dir / 'nodes' / node).resolve()}".encode()

    def processes(self) -> list[str]:
        """Every process any node of this lab runs right now ("NODE pid PID: CMD"), found by
        the node's environment marker, as its power-off does: for "nothing left running"."""
        found = []
        for n in self.nodes:
            for pid in killmarked.marked([self.node_marker(n)]):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                except OSError:
                    continue
                found.append(f"{n} pid {pid}: {cmd.decode(errors='replace')[:100]}")
        return found

    def stop(self) -> None:
        fake_lab_mod.down(state_dir=self.state_dir)


def start_fake_lab(folder: Path, **options: Any) -> FakeLabHandle:
    """Generate an inventory under ``folder`` and start the lab; see DEFAULTS for options."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown fake lab option(s): {', '.join(sorted(unknown))}")
    opts = {**DEFAULTS, **options}
    pd = opts["power_delay"]
    pd = (float(pd), float(pd)) if isinstance(pd, (int, float)) else (float(pd[0]), float(pd[1]))
    if pd[1] <= 0:
        raise ValueError("power_delay must not be 0: a fake that answers instantly tests no "
                         "wait logic")
    opts["power_delay"] = pd
    path = fake_lab_mod.generate(opts["count"], folder, ssh=opts["ssh"], power_delay=pd,
                                 boot_delay=opts["boot_delay"], sshd=opts["sshd"],
                                 power_on=opts["power_on"], seed=opts["seed"],
                                 kind=opts["kind"], vm=opts["vm"])
    info = fake_lab_mod.up(path)
    names = [f"node{i + 1}" for i in range(opts["count"])]
    handle = FakeLabHandle(inventory_path=path, state_dir=Path(info["state_dir"]),
                           control=LabControl(info["state_dir"]), nodes=names,
                           pid=info["pid"], options=opts)
    if opts["power_on"]:
        for n in names:
            handle.control.wait(n, timeout=30, phase="up")
    return handle


# --- pid reuse, on purpose --------------------------------------------------------------------

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")


def start_with_pid(pid: int, argv: list[str], tries: int = 50,
                   **popen: Any) -> subprocess.Popen | None:
    """Start ``argv`` as process ``pid`` (which must be free: a reaped process's), by setting
    the kernel's last-allocated pid just below it; None where that is not allowed (not root,
    or no /proc/sys/kernel/ns_last_pid) or another process on the machine kept taking the pid.
    A process that got another pid is ended and waited for before the next try."""
    for _ in range(tries):
        try:
            NS_LAST_PID.write_text(str(pid - 1))
        except OSError:
            return None
        p = subprocess.Popen(argv, **popen)
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    return None


# --- a bare SSH lab in this process (no BMCs) ------------------------------------------------

class SshNodeSet:
    """N fake nodes with SSH only, plus an inventory listing them, in one folder: what tests of
    the SSH layer need before (or without) a full fake lab with BMC power. Laid out like the
    lab's state folder (id_ed25519, known_hosts, nodes/NAME/, nodes/NAME.host_key).

        with SshNodeSet(tmp_path, ["node1", "node2"]) as lab:
            subprocess.run(["labkit", "-i", lab.inventory_path, "run", "--", "uptime"])
    """

    def __init__(self, folder: Path, names: list[str], *, kind: str = "python",
                 known: bool = True, start: bool = True, log: logging.Logger | None = None):
        from labkit.fake.base import ensure_host_key
        from labkit.fake.openssh import OpenSshNode
        from labkit.fake.sshd import PythonSshNode

        self.folder = Path(folder)
        self.state_dir = self.folder / ".lab"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.key = self.state_dir / "id_ed25519"
        if not self.key.exists():
            ensure_host_key(self.key)  # same format as a client key: an ed25519 OpenSSH key
        self.authorized_keys = self.state_dir / "authorized_keys"
        self.authorized_keys.write_text(self.key.with_name("id_ed25519.pub").read_text())
        self.known_hosts = self.state_dir / "known_hosts"
        cls = {"python": PythonSshNode, "openssh": OpenSshNode}[kind]
        self.log = log or logging.getLogger("labkit.fake.node")
        self.nodes: dict[str, PythonSshNode | OpenSshNode] = {}
        for name in names:
            port = free_port()
            self.nodes[name] = cls(name, self.state_dir / "nodes" / name, "127.0.0.1", port,
                                   self.state_dir / "nodes" / f"{name}.host_key",
                                   self.authorized_keys, self.log)
        lines = []
        for n in self.nodes.values():
            key = ensure_host_key(n.host_key_path)
            if known:
                lines.append(f"[127.0.0.1]:{n.port} {key.get_name()} {key.get_base64()}\n")
        self.known_hosts.write_text("".join(lines))
        self.inventory_path = self.folder / "inventory.yaml"
        self.inventory_path.write_text(self.inventory_text())
        if start:
            self.start()

    def inventory_text(self, **ssh_extra: Any) -> str:
        out = ["nodes:\n"]
        for name, n in self.nodes.items():
            out.append(f"  {name}:\n    ssh:\n      host: 127.0.0.1\n      port: {n.port}\n"
                       f"      key_file: {self.key}\n      known_hosts: {self.known_hosts}\n")
            for k, v in ssh_extra.items():
                out.append(f"      {k}: {v}\n")
        return "".join(out)

    def start(self) -> None:
        for n in self.nodes.values():
            n.start()

    def stop(self) -> None:
        for n in self.nodes.values():
            n.stop()

    def close(self) -> None:
        for n in self.nodes.values():
            n.close()

    def __enter__(self) -> SshNodeSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
