"""migrate-test: pre-copy live migration of a deterministic workload between two lab nodes,
verified by SHA-256, with per-round measurements, results folder and plots.

    from labkit.experiment import build_config, run_migrate_test
    result = run_migrate_test(inventory, settings, build_config(src="node1", dst="node2"))
    print(result.summary())

Which file holds what:

    config.py     MigrateConfig from flags or a --matrix cell, validated before anything starts
    run.py        MigrateRun: the run's phases, wait budget, cleanup, write; run_migrate_test
    prepare.py    prepare_nodes: power, leftover sweep, deploy, node facts
    backends/     how the state moves (a backend per file): labkit.py, the built-in agents;
                  criu.py goes beside it (the contract: backends/__init__.py)
    relay.py      Pump: the controller relay between the built-in backend's two agents
    remote.py     Remote: a payload process on a node; MigrationFailed
    rules.py      StopRules: when pre-copy stops and the workload freezes (p.haul's rules)
    results.py    Result, and the results folder (run.json, rounds.csv, events.jsonl)
    plots.py      rounds.png, timeline.png, summary.png
    matrix.py     run_matrix: --matrix, one run per cell, summary.csv
    channel.py    measure_channel_rate: the raw channel rate a migration is judged by
"""

from labkit.experiment.channel import measure_channel_rate
from labkit.experiment.config import MigrateConfig, build_config, parse_matrix, parse_size
from labkit.experiment.matrix import run_matrix
from labkit.experiment.remote import MigrationFailed
from labkit.experiment.results import Result
from labkit.experiment.rules import StopRules
from labkit.experiment.run import RunFailed, run_migrate_test

__all__ = ["MigrateConfig", "MigrationFailed", "Result", "RunFailed", "StopRules",
           "build_config", "measure_channel_rate", "parse_matrix", "parse_size", "run_matrix",
           "run_migrate_test"]
