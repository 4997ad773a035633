"""The old home of migrate-test, kept so ``from labkit.experiment.migrate import ...`` still
works. The code now lives in files named for what they do: see ``labkit/experiment/__init__.py``.
"""

from labkit.experiment.channel import measure_channel_rate
from labkit.experiment.matrix import run_matrix
from labkit.experiment.prepare import prepare_nodes
from labkit.experiment.relay import RELAY_CHUNK, Pump
from labkit.experiment.remote import MigrationFailed, Remote, payload_dir
from labkit.experiment.results import Result
from labkit.experiment.run import (
    MIN_STREAM_RATE,
    MigrateRun,
    RunFailed,
    run_migrate_test,
    wait_budget,
)

__all__ = ["MIN_STREAM_RATE", "RELAY_CHUNK", "MigrateRun", "MigrationFailed", "Pump", "Remote",
           "Result", "RunFailed", "measure_channel_rate", "payload_dir", "prepare_nodes",
           "run_matrix", "run_migrate_test", "wait_budget"]
