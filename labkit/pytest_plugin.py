"""labkit's pytest plugin (entry point ``pytest11: labkit``): a fake lab per test.

    def test_power(fake_lab):                       # 2 nodes, BMC + SSH, fast delays
        subprocess.run(["labkit", "power", "on"], env=fake_lab.env, check=True)

    def test_big(make_fake_lab):
        lab = make_fake_lab(count=16, ssh=False, power_delay=(0.05, 0.2))

    @pytest.mark.fake_lab(count=4, power_on=True)   # options for the plain `fake_lab` fixture
    def test_four(fake_lab): ...

Fixtures only: the lab itself is started and stopped by ``labkit.fake.harness`` (which
benchmarks and scripts import directly), as a real subprocess on free loopback ports in a
temporary folder, exactly as ``invoke lab.up`` runs it; teardown stops it and everything it
started. Users get the same fixtures for their own lab tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from labkit.fake.harness import DEFAULTS, FakeLabHandle, start_fake_lab

__all__ = ["DEFAULTS", "FakeLabHandle", "fake_lab", "make_fake_lab", "start_fake_lab"]


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
