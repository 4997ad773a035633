"""Migration backends: how a run moves the workload's state from src to dst.

A backend is ``migrate(run)``, called with a prepared ``run.MigrateRun`` (nodes powered,
swept, deployed). It starts what it needs through ``run.start()`` (so the run's cleanup kills
all of it, whatever happens), records pids it learns of in ``run.pids``, runs the pre-copy
rounds under ``run.cfg.rules`` (rules.py), freezes, resumes the workload on dst, verifies the
image, and fills ``run.result`` (rounds as ``results.ROUND_COLUMNS`` rows via
``Result.set_rounds``, stop_reason, downtime_s, the hashes, verified; stop_copy_downtime_s when
``cfg.stop_and_copy``). On any failure it raises ``remote.MigrationFailed`` with one line
naming the node and the step; it never cleans up itself.

    labkit   backends/labkit.py: labkit's own agents and tracker, streamed through the
             controller (relay.py). The default.
    criu     backends/criu.py: CRIU pre-dump rounds into a page server on dst, driven by one
             node-side driver per node (payloads/criu_driver.py); migrates any process tree
             (``--command``, ``--pid``) or the built-in workload. ``criu check`` on both nodes
             goes first, before anything starts.

The choice is MigrateConfig's ``backend`` (``--backend``, a --matrix key, so
``backend=labkit,criu`` compares the two on the same workload).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from labkit.errors import UserError
from labkit.experiment.config import BACKENDS

if TYPE_CHECKING:
    from labkit.experiment.run import MigrateRun

Backend = Callable[["MigrateRun"], None]

DEFAULT = "labkit"
NAMES = BACKENDS


def get(name: str) -> Backend:
    """The backend called ``name`` (imported only when asked for)."""
    if name == "labkit":
        from labkit.experiment.backends.labkit import migrate

        return migrate
    if name == "criu":
        from labkit.experiment.backends.criu import migrate

        return migrate
    raise UserError(f"--backend {name!r}: one of {', '.join(NAMES)}")
