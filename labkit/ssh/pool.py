"""One connection per node within a run, shared by the threads of a fan-out."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from labkit.config import Settings
from labkit.inventory import Node
from labkit.ssh.client import SshClient


@dataclass
class ConnectionPool:
    """One connection per node within a run, shared by threads; reconnects a dead one."""

    settings: Settings
    ssh_config: Path | None = None
    _clients: dict[str, SshClient] = field(default_factory=dict)
    _locks: dict[str, threading.Lock] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, node: Node) -> SshClient:
        with self._lock:
            lock = self._locks.setdefault(node.name, threading.Lock())
        with lock:
            c = self._clients.get(node.name)
            if c is not None and c.active:
                return c
            if c is not None:
                c.close()
            c = SshClient.connect(node, self.settings, ssh_config=self.ssh_config)
            self._clients[node.name] = c
            return c

    def drop(self, node: Node | str) -> None:
        """Forget (and close) a node's connection, e.g. after powering it off."""
        name = node if isinstance(node, str) else node.name
        with self._lock:
            c = self._clients.pop(name, None)
        if c is not None:
            c.close()

    def close_all(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            c.close()

    def __enter__(self) -> ConnectionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_all()

