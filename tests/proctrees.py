"""Process trees for the kill-by-marker tests (test_nodeside, test_sweep): real processes that
hide from every handle but their environment, and a wait for the pid each one writes."""

from __future__ import annotations

import time
from pathlib import Path

# leaves its process group with setsid and double-forks, so the grandchild is re-parented to
# init: only the environment (which every process inherits) still says whose it is. Writes the
# top's pid to ARGV1.top and the grandchild's to ARGV1.gc.
TREE = r"""
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        if os.fork() == 0:
            open(sys.argv[1] + ".gc", "w").write(str(os.getpid()))
            time.sleep(600)
        os._exit(0)
    time.sleep(600)
open(sys.argv[1] + ".top", "w").write(str(os.getpid()))
time.sleep(600)
"""


def wait_pid(path: Path, timeout: float = 10) -> int:
    """The pid a process wrote to ``path``, once it has (the file is its ready signal)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.01)
    raise AssertionError(f"{path} never written")
