"""THE free-port picker of the fake lab and its tests."""

from __future__ import annotations

import socket
import threading

_handed_out: set[tuple[int, int]] = set()
_lock = threading.Lock()


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port the kernel says is free now (TCP for ``SOCK_STREAM``, UDP for ``SOCK_DGRAM``),
    never the same one twice per process: the kernel happily hands a just-closed ephemeral port
    out again, which once gave two nodes one BMC port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(1000):
        with socket.socket(family, kind) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        with _lock:
            if (kind, port) not in _handed_out:
                _handed_out.add((kind, port))
                return port
    raise OSError("no free port found")
