"""labkit's pytest plugin (entry point ``pytest11: labkit``): a fake lab per test.

    def test_power(fake_lab):                       # 2 nodes, BMC + SSH, fast delays
        subprocess.run(["labkit", "power", "on"], env=fake_lab.env, check=True)

    def test_big(make_fake_lab):
        lab = make_fake_lab(count=16, ssh=False, power_delay=(0.05, 0.2))

    @pytest.mark.fake_lab(count=4, power_on=True)   # options for the plain `fake_lab` fixture
    def test_four(fake_lab): ...

The lab runs as a real subprocess (``python -m labkit.fake.lab serve``) on free loopback ports in
a temporary folder, exactly as ``invoke lab.up`` runs it; teardown stops it and everything it
started. Users get the same fixture for their own lab tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from labkit.fake import lab as fake_lab_mod
from labkit.fake.control import LabControl

DEFAULTS: dict[str, Any] = {
    "count": 2,
    "power_delay": (0.05, 0.2),
    "boot_delay": 0.2,
    "ssh": True,
    "sshd": "python",
    "power_on": False,
    "seed": 0,
}


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

    def processes(self) -> list[str]:
        """Every process any node of this lab runs right now ("NODE pid PID: CMD"), found by
        the node's environment marker, as its power-off does: for "nothing left running"."""
        from labkit.fake.node import ENV_ROOT, marked_pids

        found = []
        for n in self.nodes:
            root = (self.state_dir / "nodes" / n).resolve()
            for pid in marked_pids(f"{ENV_ROOT}={root}".encode()):
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
                                 power_on=opts["power_on"], seed=opts["seed"])
    info = fake_lab_mod.up(path)
    names = [f"node{i + 1}" for i in range(opts["count"])]
    handle = FakeLabHandle(inventory_path=path, state_dir=Path(info["state_dir"]),
                           control=LabControl(info["state_dir"]), nodes=names,
                           pid=info["pid"], options=opts)
    if opts["power_on"]:
        for n in names:
            handle.control.wait(n, timeout=30, phase="up")
    return handle


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fake_lab(**options): options for the fake_lab fixture "
                   "(count, power_delay, boot_delay, ssh, sshd, power_on, seed)")


@pytest.fixture
def make_fake_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., FakeLabHandle]]:
    """Factory: ``make_fake_lab(count=2, power_delay=(0.05, 0.2), boot_delay=0.2, ssh=True,
    sshd='python', power_on=False, seed=0)`` -> FakeLabHandle. All labs stop at teardown."""
    started: list[FakeLabHandle] = []

    def make(**options: Any) -> FakeLabHandle:
        handle = start_fake_lab(tmp_path_factory.mktemp("fakelab"), **options)
        started.append(handle)
        return handle

    yield make
    for handle in reversed(started):
        handle.stop()


@pytest.fixture
def fake_lab(request: pytest.FixtureRequest,
             make_fake_lab: Callable[..., FakeLabHandle]) -> FakeLabHandle:
    """A running 2-node fake lab (options from ``@pytest.mark.fake_lab(...)``)."""
    marker = request.node.get_closest_marker("fake_lab")
    return make_fake_lab(**(marker.kwargs if marker else {}))
