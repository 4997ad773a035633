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
    criu     not built yet. It goes in backends/criu.py, listed in NAMES and in ``get``; the
             choice becomes a ``backend`` field of MigrateConfig (validated against NAMES, a
             --matrix key so ``backend=labkit,criu`` compares the two), ``--backend`` in
             tasks/experiment.py, and ``MigrateRun`` asks ``get(cfg.backend)``. Checks a node
             must pass (``criu check``) go first in its ``migrate``, before anything starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from labkit.errors import UserError

if TYPE_CHECKING:
    from labkit.experiment.run import MigrateRun

Backend = Callable[["MigrateRun"], None]

DEFAULT = "labkit"
NAMES = ("labkit",)


def get(name: str) -> Backend:
    """The backend called ``name`` (imported only when asked for)."""
    if name == "labkit":
        from labkit.experiment.backends.labkit import migrate

        return migrate
    raise UserError(f"--backend {name!r}: one of {', '.join(NAMES)}")
