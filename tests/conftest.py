"""Shared test setup. The `fake_lab` fixture comes from labkit's own pytest plugin
(labkit/pytest_plugin.py), the same one users get."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--stress", action="store", nargs="?", const="200", default=None,
                     help="repeat the fault scenarios N times (default 200) instead of 20")
