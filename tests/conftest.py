"""Shared test setup. The `fake_lab` fixture comes from labkit's own pytest plugin
(labkit/pytest_plugin.py), the same one users get."""
