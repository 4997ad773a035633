"""Invoke entry point: `invoke --list`. The tasks live in labkit/tasks/ so that the installed
`labkit` command runs exactly the same ones."""

from labkit.tasks import namespace as ns  # noqa: F401  (Invoke looks for `ns`)
