"""Waiting for a booting node's SSH to accept us."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from labkit.config import Settings
from labkit.errors import RetryableError
from labkit.inventory import Node
from labkit.retry import RetryPolicy
from labkit.ssh.client import SshClient
from labkit.ssh.errors import SshUnreachable


def wait_ssh(node: Node, settings: Settings, deadline: float, *,
             ssh_config: Path | None = None,
             on_retry: Callable[[int, BaseException, float], None] | None = None) -> None:
    """Wait until the node's SSH accepts and authenticates us, retrying refused/reset/timeout
    (what a booting node looks like) through the retry policy, until ``deadline`` (a
    time.monotonic() value). A host key or auth problem fails at once; giving up raises
    SshUnreachable naming the node. What the node printed meanwhile (its console) is the
    caller's to add: ``labkit.bringup`` watches it."""
    t0 = time.monotonic()
    policy = RetryPolicy(window=max(0.0, deadline - t0), first_delay=0.2,
                         max_delay=min(2.0, settings.retry_max_delay))

    def attempt() -> None:
        left = deadline - time.monotonic()
        SshClient.connect(node, settings, ssh_config=ssh_config,
                          timeout=max(0.5, min(settings.ssh_timeout, left))).close()

    try:
        policy.call(attempt, retryable=lambda e: isinstance(e, RetryableError),
                    on_retry=on_retry, deadline=deadline)
    except SshUnreachable as e:
        raise SshUnreachable(f"{node.name}: SSH did not come up within "
                             f"{time.monotonic() - t0:.0f}s ({e})") from None
