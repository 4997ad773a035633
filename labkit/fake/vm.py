"""A fake node that is a real machine: a QEMU guest running its own Linux kernel, powered by
the fake BMC, reached over SSH (a real sshd inside the guest), its serial port on SOL.

Why a guest: a process node shares the controller's kernel, network stack and page cache; on
this host's kernel soft-dirty and CRIU do not work at all. A guest has its own 6.1 kernel
(soft-dirty, CRIU, its own TCP stack), so those code paths run for real.

The guest's root is the host's filesystem over 9p with a tmpfs overlay (nothing to download or
build but a ~3 MB initramfs, ``fake/vmimage.py``); its disk is a per-node folder exported
read-write over 9p and mounted at /lab (HOME is /lab/home), so a power-off loses RAM and
processes and keeps the disk. Networks: QEMU user-mode NIC for the controller's way in (the
node's inventory ssh port forwarded to the guest's port 22), and a lab LAN shared by every
guest of the lab: a QEMU multicast socket on loopback (no root, no bridge, nothing leaves the
machine), 10.77.0.N/24.

QEMU runs under ``fake/sshd_watchdog.py`` (the power supply the OpenSSH nodes use): closing its
stdin, or the lab dying however it dies, kills the guest. The serial port and QMP are unix
sockets the node listens on and QEMU connects to at start, so not a byte of the boot log is
lost and a QEMU that exits is seen at once (EOF)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from labkit.fake import sshd_watchdog, vmimage
from labkit.fake.base import SWEEP_INTERVAL, FakeNode, _username, ensure_host_key

WATCHDOG = Path(sshd_watchdog.__file__).resolve()
CONNECT_TIMEOUT = 20.0  # QEMU's start-up until it connects its serial port and QMP
LAN_NET = "10.77.0"


@dataclass(frozen=True)
class VmSpec:
    """The knobs of a guest node (inventory ``fake_lab: {kind: vm, ...}``)."""

    memory: int = 1024  # MiB
    cpus: int = 1
    kernel: str | None = None  # a vmlinuz path or version; default: newest with modules
    boot_timeout: float = 120.0
    lan_port: int = 0  # UDP port of the lab LAN's multicast group (0: no LAN)
    cmdline: str = ""  # extra kernel command line (tests: a panic at boot)
    acpi: bool = True  # False: the guest ignores the ACPI power button


class VmNode(FakeNode):
    """One guest. ``start``/``stop`` are the BMC's power; ``acpi_shutdown``, ``reset`` and
    ``running`` the rest of what a machine does. Console bytes go to ``console`` (set by the
    BMC); ``on_ready`` once the guest's boot says its sshd is up; ``on_exit`` when the guest
    powers itself off, panics or QEMU dies (never for a power-off the BMC asked for)."""

    machine = True  # the BMC relays this node's serial port and follows its state

    def __init__(self, name: str, root: Path, host: str, port: int, host_key: Path,
                 authorized_keys: Path, log: logging.Logger, *, index: int,
                 spec: VmSpec, cache: Path, user: str | None = None):
        super().__init__(name, root, host, port, host_key, authorized_keys, log)
        self.index = index
        self.spec = spec
        self.cache = cache
        self.user = user or _username()
        self.disk = self.root / "disk"
        self.run_dir = self.root / "vm"
        self.console: Callable[[bytes], None] | None = None
        self.on_ready: Callable[[], None] | None = None
        self.on_exit: Callable[[int], None] | None = None
        self._proc: subprocess.Popen | None = None
        self._serial: socket.socket | None = None
        self._qmp: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._qmp_lock = threading.Lock()
        self._closed = False
        self.pid: int | None = None  # QEMU's, for lab.status
        self.generation = 0  # bumps on every start: a late on_exit names the boot it ended

    @property
    def lan_address(self) -> str:
        return f"{LAN_NET}.{self.index}"

    @property
    def up(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    running = up

    def _command(self, serial: Path, qmp: Path) -> list[str]:
        kernel = vmimage.find_kernel(self.spec.kernel)
        initrd = vmimage.initrd(kernel, self.cache)
        qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
        mac = f"52:54:00:77:{self.index >> 8 & 0xff:02x}:{self.index & 0xff:02x}"
        append = (f"console=ttyS0 panic=-1 loglevel=6 edd=off transparent_hugepage=madvise "
                  f"labkit.node={self.name} labkit.user={self.user} "
                  f"labkit.lan={self.lan_address}/24 labkit.lanmac={mac} "
                  f"labkit.acpi={int(self.spec.acpi)} labkit.hide={','.join(self._hidden())} "
                  f"{self.spec.cmdline}")
        cmd = [qemu, "-name", f"labkit-{self.name}", "-nodefaults", "-nographic",
               "-no-reboot", "-cpu", "max", "-m", str(self.spec.memory),
               "-smp", str(self.spec.cpus),
               "-kernel", str(kernel.image), "-initrd", str(initrd), "-append", append.strip(),
               "-fsdev", "local,id=r,path=/,security_model=none,readonly=on,multidevs=remap",
               "-device", "virtio-9p-pci,fsdev=r,mount_tag=hostroot",
               "-fsdev", f"local,id=d,path={self.disk},security_model=none,multidevs=remap",
               "-device", "virtio-9p-pci,fsdev=d,mount_tag=labdisk",
               # restrict=on: the guest reaches nothing through this NIC (not the host's
               # loopback, not the internet); the controller still comes in by the forward
               "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:{self.host}:{self.port}-:22",
               "-device", "virtio-net-pci,netdev=n0,romfile=",
               "-chardev", f"socket,id=s,path={serial},server=off",
               "-serial", "chardev:s",
               "-chardev", f"socket,id=q,path={qmp},server=off",
               "-mon", "chardev=q,mode=control"]
        if self.spec.lan_port:
            cmd += ["-netdev", f"socket,id=n1,mcast=230.0.77.1:{self.spec.lan_port},"
                               "localaddr=127.0.0.1",
                    "-device", f"virtio-net-pci,netdev=n1,mac={mac},romfile="]
        return cmd

    def _hidden(self) -> list[str]:
        """Host paths the guest must not read through its view of the host's root: the lab's
        state folder (its SSH key, the BMC password) and the users' ~/.ssh. The guest mounts
        an empty tmpfs over each (guest/init.sh)."""
        paths = {str(self.root.parent.parent), os.path.expanduser("~/.ssh"), "/root/.ssh"}
        for p in paths:
            if not p.startswith("/") or any(c.isspace() or c == "," for c in p):
                raise RuntimeError(f"guest nodes need a state folder path without spaces or "
                                   f"commas: {p!r}")
        return sorted(paths)

    def _prepare_disk(self) -> None:
        """The node's disk: its host key (the same on every boot, so known_hosts holds) and the
        lab's authorized keys, where the guest's sshd reads them."""
        etc = self.disk / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        (self.disk / "home").mkdir(exist_ok=True)
        ensure_host_key(self.host_key_path)
        for src, dst in ((self.host_key_path, etc / "ssh_host_ed25519_key"),
                         (self.authorized_keys, etc / "authorized_keys")):
            data = src.read_bytes()
            if not dst.exists() or dst.read_bytes() != data:
                tmp = dst.with_suffix(".tmp")
                tmp.write_bytes(data)
                tmp.chmod(0o600)
                os.replace(tmp, dst)

    def start(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"fake node {self.name} is closed")
            if self.up:
                return
            self._prepare_disk()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            serial_path, qmp_path = self.run_dir / "serial.sock", self.run_dir / "qmp.sock"
            cmd = self._command(serial_path, qmp_path)  # a missing kernel fails here, cleanly
            env = {**os.environ, self.marker.split(b"=", 1)[0].decode(): str(self.root)}
            log_path = self.run_dir / "qemu.log"
            listeners: list[socket.socket] = []
            try:
                for path in (serial_path, qmp_path):
                    path.unlink(missing_ok=True)
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    listeners.append(s)
                    s.bind(str(path))
                    s.listen(1)
                with open(log_path, "ab") as logf:
                    self._proc = subprocess.Popen(
                        [sys.executable, "-I", "-S", str(WATCHDOG), "--marker",
                         self.marker.decode(), "--interval", str(SWEEP_INTERVAL), "--", *cmd],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf, env=env,
                        start_new_session=True, close_fds=True)
                self._serial = self._accept(listeners[0])
                self._qmp = self._accept(listeners[1])
                self.pid = _child_of(self._proc.pid)
                self._qmp_command("qmp_capabilities")
            except BaseException as e:
                self.stop()
                tail = log_path.read_text(errors="replace")[-500:].strip() \
                    if log_path.exists() else ""
                raise RuntimeError(f"QEMU for node {self.name} did not start: "
                                   f"{tail or e}") from None
            finally:
                for s in listeners:
                    s.close()
            self.generation += 1
            self._reader = threading.Thread(target=self._read_serial,
                                            args=(self._serial, self.generation),
                                            name=f"serial-{self.name}", daemon=True)
            self._reader.start()
            self.log.info("node %s: guest powered on (qemu pid %s)", self.name, self.pid)

    def _accept(self, listener: socket.socket) -> socket.socket:
        """QEMU connecting to us; a QEMU that exited (or never started) fails at once."""
        end = time.monotonic() + CONNECT_TIMEOUT
        listener.settimeout(0.1)
        while True:
            try:
                return listener.accept()[0]
            except TimeoutError:
                if self._proc is None or self._proc.poll() is not None:
                    raise RuntimeError("QEMU exited") from None
                if time.monotonic() > end:
                    raise RuntimeError(f"QEMU did not connect in {CONNECT_TIMEOUT:.0f} s") \
                        from None

    def _read_serial(self, conn: socket.socket, generation: int) -> None:
        """Serial port → console, until QEMU closes it (the guest is gone: powered itself off,
        panicked with panic=-1 -no-reboot, or was killed)."""
        ready = f"labkit-boot: {self.name} up".encode()
        tail = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            if self.console is not None:
                self.console(data)
            if tail is not None:
                tail = (tail + data)[-4096:]
                if ready in tail:
                    tail = None
                    if self.on_ready is not None:
                        self.on_ready()
        with self._lock:
            mine = self._serial is conn
        if mine and self.on_exit is not None:
            self.on_exit(generation)  # the BMC drops it if a newer boot has started meanwhile

    def console_input(self, data: bytes) -> None:
        conn = self._serial
        if conn is not None:
            try:
                conn.sendall(data)
            except OSError:
                pass

    def _qmp_command(self, command: str) -> dict:
        """One QMP command; events that arrive meanwhile are skipped."""
        with self._qmp_lock:
            conn = self._qmp
            if conn is None:
                raise RuntimeError(f"node {self.name}: guest is off")
            conn.settimeout(5.0)
            f = conn.makefile("rwb")
            try:
                if command == "qmp_capabilities":
                    f.readline()  # the greeting
                f.write(json.dumps({"execute": command}).encode() + b"\n")
                f.flush()
                while True:
                    line = f.readline()
                    if not line:
                        raise RuntimeError(f"node {self.name}: QMP closed")
                    reply = json.loads(line)
                    if "return" in reply or "error" in reply:
                        return reply
            finally:
                f.close()

    def acpi_shutdown(self) -> None:
        """Press the power button: the guest decides (its acpid powers it off; one that
        ignores the button stays on, as hardware does)."""
        try:
            self._qmp_command("system_powerdown")
        except (OSError, RuntimeError, ValueError) as e:
            self.log.info("node %s: ACPI power button not delivered: %s", self.name, e)

    def stop(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
            serial, self._serial = self._serial, None
            qmp, self._qmp = self._qmp, None
            self.pid = None
        for s in (serial, qmp):
            if s is not None:
                s.close()
        self._power_off(proc, "guest")

    def close(self) -> None:
        with self._lock:
            self._closed = True  # first: a start queued on the BMC's worker must not begin
        self.stop()


def _child_of(pid: int) -> int | None:
    """QEMU's pid: the watchdog's only child."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
        return int(kids[0]) if kids else None
    except (OSError, ValueError):
        return None
