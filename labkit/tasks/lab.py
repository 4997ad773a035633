"""Tasks: lab (filled in by its owner)."""

from __future__ import annotations

TASKS: list = []
COLLECTION = None
