"""migrate-test: pre-copy live migration of a deterministic workload between two lab nodes,
verified by SHA-256, with per-round measurements, results folder and plots.

    from labkit.experiment import build_config, run_migrate_test
    result = run_migrate_test(inventory, settings, build_config(src="node1", dst="node2"))
    print(result.summary())
"""

from labkit.experiment.config import MigrateConfig, build_config, parse_matrix, parse_size
from labkit.experiment.migrate import (
    MigrationFailed,
    Result,
    measure_channel_rate,
    run_matrix,
    run_migrate_test,
)
from labkit.experiment.rules import StopRules

__all__ = ["MigrateConfig", "MigrationFailed", "Result", "StopRules", "build_config",
           "measure_channel_rate", "parse_matrix", "parse_size", "run_matrix",
           "run_migrate_test"]
