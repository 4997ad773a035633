"""The baseline a migration's throughput is judged by: the raw SSH channel rate from src
through the controller to dst, over the same relay path a migration streams through."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from labkit.config import Settings
from labkit.errors import LabkitError
from labkit.experiment.relay import RELAY_CHUNK
from labkit.inventory import Inventory

if TYPE_CHECKING:
    from labkit.ssh import ShellPool


def measure_channel_rate(inventory: Inventory, settings: Settings, src: str, dst: str,
                         nbytes: int, pool: ShellPool | None = None) -> float:
    """Bytes/s of ``head -c N /dev/zero`` on src piped through the controller into
    ``cat > /dev/null`` on dst, in the relay's chunk size, timed until dst has it all.
    ``pool``: the caller's shells (kept open); None opens a pool for this measurement only."""
    from labkit.ssh import ConnectionPool

    own = pool is None
    pool = pool or ConnectionPool(settings)
    s_node, d_node = inventory.node(src), inventory.node(dst)
    sp = pool.get(s_node).open_exec(f"head -c {int(nbytes)} /dev/zero")
    dp = pool.get(d_node).open_exec("cat > /dev/null; echo done")
    try:
        t0 = time.monotonic()
        got = 0
        while True:
            data = sp.channel.recv(RELAY_CHUNK)
            if not data:
                break
            dp.channel.sendall(data)
            got += len(data)
        dp.channel.shutdown_write()
        dp.channel.recv(64)  # "done": everything reached the far side
        secs = time.monotonic() - t0
    finally:
        for p in (sp, dp):
            p.kill()
            p.close()
        if own:
            pool.close_all()
    if got != nbytes:
        raise LabkitError(f"channel test moved {got} of {nbytes} bytes")
    return got / secs
