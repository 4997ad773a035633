"""The baseline a migration's throughput is judged by: the raw SSH channel rate from src
through the controller to dst, over the same relay path a migration streams through."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from labkit.config import Settings
from labkit.errors import LabkitError
from labkit.experiment.remote import Remote
from labkit.inventory import Inventory
from labkit.ssh.run import CHANNEL_GONE
from labkit.ssh.shell import READ_SIZE

if TYPE_CHECKING:
    from labkit.ssh import ShellPool


def measure_channel_rate(inventory: Inventory, settings: Settings, src: str, dst: str,
                         nbytes: int, pool: ShellPool | None = None) -> float:
    """Bytes/s of ``head -c N /dev/zero`` on src piped through the controller into
    ``cat > /dev/null`` on dst, in the relay's chunk size, timed until dst has it all.
    ``pool``: the caller's shells (kept open); None opens a pool for this measurement only.

    Either end dying fails the measurement at once, naming it, how it ended and its stderr
    (a sink that died used to be read as "everything arrived"); one that stalls fails after
    the run's wait budget for that many bytes."""
    from labkit.experiment.run import wait_budget
    from labkit.ssh import ConnectionPool

    own = pool is None
    pool = pool or ConnectionPool(settings)
    s_node, d_node = inventory.node(src), inventory.node(dst)
    what = f"the channel test's {int(nbytes)} bytes"
    sp = Remote(pool.get(s_node), src, f"head -c {int(nbytes)} /dev/zero", "channel source",
                raw=True)
    dp = Remote(pool.get(d_node), dst, "cat > /dev/null; echo done", "channel sink", raw=True)
    budget = wait_budget(settings, nbytes)
    got = 0
    try:
        for p in (sp, dp):
            p.ch.settimeout(budget)
        t0 = time.monotonic()
        try:
            while True:
                data = sp.ch.recv(READ_SIZE)
                if not data:
                    break
                dp.ch.sendall(data)
                got += len(data)
            dp.ch.shutdown_write()
            done = b""
            while not done.endswith(b"\n"):  # "done": everything reached the far side
                more = dp.ch.recv(64)
                if not more:
                    break
                done += more
        except CHANNEL_GONE as e:  # a closed channel, a dead connection, the budget (timeout)
            for p in (dp, sp):
                if p.ch.closed or p.ch.exit_status_ready():
                    raise p.gone(what) from None
            why = str(e) or ("timed out" if isinstance(e, TimeoutError) else "connection lost")
            raise LabkitError(f"channel test {src} -> {dst}: {why} after "
                              f"{got} of {nbytes} bytes") from None
        secs = time.monotonic() - t0
        if done.strip() != b"done":
            raise dp.gone(what)
        sp.stdout_closed()
        if sp.exit_status != 0:
            raise sp.gone(what)
    finally:
        for p in (sp, dp):
            p.kill()
        if own:
            pool.close_all()
    if got != nbytes:
        raise LabkitError(f"channel test moved {got} of {nbytes} bytes")
    return got / secs
