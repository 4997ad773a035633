"""Shared test setup. The `fake_lab` fixture comes from labkit's own pytest plugin
(labkit/pytest_plugin.py), the same one users get."""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--stress", action="store", nargs="?", const="200", default=None,
                     help="repeat the fault scenarios N times (default 200) instead of 20")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``make test`` (tests/suite.py) each of its two pytest processes keeps its half:
    the guest tests (marker vm) or the rest; deselected like ``-m``, so every other way of
    selecting tests still applies."""
    half = os.environ.get("LABKIT_SUITE_HALF")
    if half not in ("vm", "rest"):
        return
    keep, drop = [], []
    for item in items:
        (keep if (item.get_closest_marker("vm") is not None) == (half == "vm") else drop
         ).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
