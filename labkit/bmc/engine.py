"""Many BMCs at once from one thread: every node's IPMI session is a small state machine and one
selector loop drives them all, the way FreeIPMI's ipmipower does it.

    outcomes = power_status(nodes, settings)            # -> [Outcome], in the nodes' order
    outcomes = power_action(nodes, "off", settings, wait=True)
    outcomes = Engine(settings).run(nodes, lambda n: ops.boot_device(n), label="boot")

Why not threads (``labkit.fanout.fan_out`` + ``PowerClient``): a login is ~7 small UDP round
trips and ~1 ms of Python; with one thread per BMC most of that millisecond went to thread start,
lock hand-offs and GIL switches, and two cores were shared with the BMCs. Here a session costs
only its packets' work (pyghmi builds, checks and encrypts them) and waiting is free.

The protocol stays pyghmi's (``AsyncSession`` is its simple session with the three blocking
places replaced: the constructor does no I/O, the privilege request after RAKP4 and every
command take a callback instead of waiting, and packets are read without blocking). What every
BMC call in labkit does is kept, step by step, from ``PowerClient._call``:

- the retry policy (``labkit.retry``): each command has its own retry window, capped backoff with
  jitter, and the BMC retry predicate (``labkit.bmc.session.is_retryable``); a wrong password is
  not retried;
- ``settings.min_interval`` between commands to one BMC (``MinInterval.reserve``), shared with a
  ``PowerClient`` when one is passed in;
- a per-attempt deadline of ``settings.bmc_timeout`` (a reused session gets STALE_SESSION_AFTER,
  then a fresh login), pyghmi's retransmission (``Retransmit``) inside it;
- a failed attempt handled by the same function as PowerClient's (``session.attempt_failed``:
  translated, named by node; a session that failed in any way but a clean completion code is
  thrown away);
- one ``Outcome`` per node (``labkit.fanout``'s type, error text and progress line).

A node's work is an *op* (``labkit.bmc.ops``, shared with PowerClient): a generator that yields
``Cmd`` (one IPMI request: the engine sends it, retries it under the policy and sends back the
response data) or ``Sleep``, and returns the node's result dict. A command whose retries are
spent is thrown into the op, which may catch it (``ops.wait_for`` keeps polling until its own
deadline).

The password is read from the node's Secret at login and handed to pyghmi in-process as bytes;
it never appears in argv, environment, logs or error text.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import time
from collections.abc import Callable, Sequence
from typing import Any

from pyghmi.exceptions import IpmiException
from pyghmi.ipmi.private import simplesession as _simple

from labkit.bmc import ops
from labkit.bmc.ops import Cmd, Op, Sleep
from labkit.bmc.session import (
    STALE_SESSION_AFTER,
    BmcTimeout,
    Privilege,
    Retransmit,
    attempt_failed,
    check_reply,
    is_retryable,
)
from labkit.config import Settings
from labkit.errors import LabkitError, NodeError, UserError
from labkit.fanout import Outcome, Progress, error_text
from labkit.inventory import Node
from labkit.retry import MinInterval, RetryClock, RetryPolicy

log = logging.getLogger("labkit.power")

MIN_ATTEMPT = 0.2  # an attempt started at the end of the window still gets this long


# -- the session ------------------------------------------------------------------------------------

class AsyncSession(Privilege, Retransmit, _simple.Session):
    """pyghmi's simple RMCP+ session, driven from outside: ``start()`` sends the first login
    packet, ``on_readable()`` feeds it what arrived, ``on_login(result)`` reports the login
    ({'success': True} or {'error': text}), ``command(..., callback)`` sends one request."""

    def __init__(self, host: str, port: int, user: bytes, password: bytes,
                 on_login: Callable[[dict[str, Any]], None]):
        self._deferred = True
        self._resend_at = None
        self._later: list[tuple[Callable[[dict[str, Any]], None], dict[str, Any]]] = []
        self.socket = None
        # With onlogon set, pyghmi's constructor would still log in and wait; login() below
        # makes that first call a no-op, so the constructor only allocates the socket.
        super().__init__(bmc=host, userid=user, password=password, port=port,
                         onlogon=on_login)
        self.socket.setblocking(False)

    def login(self) -> None:
        if self._deferred:  # the call from pyghmi's constructor
            self._deferred = False
            self.logging = False
            return
        super().login()

    def start(self) -> None:
        super().login()

    def _req_priv_level(self) -> None:
        """After RAKP4: ask for the privilege level without waiting (pyghmi blocks here)."""
        self.logged = 1
        self.logoutexpiry = None
        self.raw_command(netfn=0x6, command=0x3B, data=[self.privlevel],
                         callback=self._reply_to(self._got_priv_level))

    def _reply_to(self, fn: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        """pyghmi calls a command's callback from inside its packet parser, which afterwards
        clears "the" expected-reply entry, by then the entry of any request the callback sent:
        its reply would be dropped. So replies are queued and handled after the packet."""
        def queue(response: dict[str, Any]) -> None:
            self.incommand = False
            self._later.append((fn, response))

        return queue

    def _got_priv_level(self, response: dict[str, Any]) -> None:
        code = response.get("code", 0)
        if code in (0x80, 0x81) and self.privlevel > 2:  # settle for operator, then user
            self.privlevel -= 1
            self.raw_command(netfn=0x6, command=0x3B, data=[self.privlevel],
                             callback=self._reply_to(self._got_priv_level))
            return
        self.logging = False
        if code or "error" in response:
            self.logged = 0
            text = _simple.get_ipmi_error(
                response, suffix=f" while requesting privilege level {self.privlevel}")
            self.onlogon({"error": text or response.get("error") or f"code 0x{code:02X}"})
            return
        self.onlogon({"success": True})

    def command(self, netfn: int, cmd: int, data: tuple[int, ...],
                callback: Callable[[dict[str, Any]], None]) -> None:
        self.raw_command(netfn=netfn, command=cmd, data=data, callback=self._reply_to(callback))

    def on_readable(self) -> None:
        """Handle one datagram, read without blocking. One per call: a session rarely has two
        queued, and the (level-triggered) selector reports the socket again if it has; reading
        until EAGAIN cost a failed syscall and an exception per packet."""
        if self.socket is None:
            return
        try:
            data, addr = self.socket.recvfrom(3000)
        except BlockingIOError:
            return
        pkt = bytearray(data)
        if len(pkt) > 4 and pkt[0] == 6 and pkt[2:4] == b"\xff\x07":
            self._handle_ipmi_packet(pkt, sockaddr=addr)
        while self._later:
            fn, response = self._later.pop(0)
            fn(response)


# -- one node's run ------------------------------------------------------------------------------

class _Job:
    """One node: its op, its session, the command in flight and its retry clock."""

    def __init__(self, engine: Engine, index: int, node: Node, op: Op):
        self.engine = engine
        self.index = index
        self.node = node
        self.op = op
        self.t0 = time.monotonic()
        self.session: AsyncSession | None = None
        self.cmd: Cmd | None = None
        self.clock: RetryClock | None = None
        self.attempts = 0
        self.attempt_end = 0.0
        self.waiting = False  # a packet exchange (login or command) is in flight
        self.wake: Callable[[], None] | None = None
        self.wake_at: float | None = None
        self.done = False
        assert node.bmc is not None
        self.host, self.port, self.user = node.bmc.host, node.bmc.port, node.bmc.user

    # -- the op ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._step(lambda: next(self.op))

    def _step(self, advance: Callable[[], Cmd | Sleep]) -> None:
        try:
            step = advance()
        except StopIteration as stop:
            self._finish(True, stop.value or {}, None)
            return
        except Exception as e:  # the op gave up: this node's outcome, never the run's
            self._finish(False, dict(e.value) if isinstance(e, LabkitError) else {}, e)
            return
        if isinstance(step, Sleep):
            self._at(time.monotonic() + step.seconds, lambda: self._step(lambda: next(self.op)))
        else:
            self.cmd = step
            self.clock = self.engine.policy.clock(step.deadline)
            self.attempts = 0
            self._attempt()

    def _finish(self, ok: bool, value: dict[str, Any], err: BaseException | None) -> None:
        self.done = True
        self.wake = None
        if self.session is not None:
            self.engine.forget(self.session)
            self.session.close(logout=True)
            self.session = None
        self.engine.finished(self, Outcome(self.node.name, ok, value,
                                           error_text(err) if err else None,
                                           time.monotonic() - self.t0))

    # -- one attempt of the current command (PowerClient._call's attempt) --------------------------

    def _attempt(self) -> None:
        pause = self.engine.interval.reserve((self.host, self.port))
        if pause > 0:
            self._at(time.monotonic() + pause, self._go)
        else:
            self._go()

    def _go(self) -> None:
        assert self.clock is not None
        self.attempts += 1
        now = time.monotonic()
        s = self.engine.settings
        session = self.session
        reuse = session is not None and session.logged and not session.broken
        budget = min(s.bmc_timeout, STALE_SESSION_AFTER) if reuse else s.bmc_timeout
        self.attempt_end = min(now + budget, max(self.clock.end, now + MIN_ATTEMPT))
        self.waiting = True
        try:
            if reuse:
                self._send()
            else:
                self._drop()
                assert self.node.bmc is not None
                password = self.node.bmc.password().reveal()
                self.session = AsyncSession(self.host, self.port, self.user.encode(), password,
                                            self._logged_in)
                self.engine.watch(self.session, self)
                self.session.start()
        except Exception as e:
            self._failed(e)
            return
        self._rearm()

    def _logged_in(self, result: dict[str, Any]) -> None:
        if self.done or not self.waiting:
            return
        if "error" in result:
            self._failed(IpmiException(result["error"]))
            return
        self._send()

    def _send(self) -> None:
        assert self.cmd is not None and self.session is not None
        cmd = self.cmd
        session = self.session

        def reply(response: dict[str, Any]) -> None:
            if self.done or session is not self.session or not self.waiting:
                return
            try:
                data = check_reply(response, cmd.netfn, cmd.cmd, cmd.data)
            except Exception as e:
                self._failed(e)
                return
            self.waiting = False
            self.wake = None
            self._step(lambda: self.op.send(data))

        try:
            session.command(cmd.netfn, cmd.cmd, cmd.data, reply)
        except Exception as e:
            self._failed(e)

    def _failed(self, e: BaseException) -> None:
        """An attempt failed: retry under the policy, or hand the error to the op."""
        self.waiting = False
        self.wake = None
        bmc = self.node.bmc
        assert bmc is not None and self.clock is not None
        err = attempt_failed(e, self.node.name, bmc.host, bmc.port, bmc.user, self._drop)
        if is_retryable(err):
            sleep = self.clock.next_delay()
            if sleep is not None:
                log.debug("%s: attempt %d failed (%s); retrying in %.2f s", self.node.name,
                          self.attempts, err, sleep)
                self._at(time.monotonic() + sleep, self._attempt)
                return
        self._step(lambda: self.op.throw(err))

    def _drop(self) -> None:
        if self.session is not None:
            self.engine.forget(self.session)
            self.session.close(logout=False)
            self.session = None

    # -- time -----------------------------------------------------------------------------------------

    def _at(self, when: float, fn: Callable[[], None]) -> None:
        self.wake = fn
        self.wake_at = when
        self.engine.schedule(when, self)

    def _rearm(self) -> None:
        """While a packet is in flight, wake at the resend time or the attempt's deadline."""
        if not self.waiting or self.done:
            return
        when = self.attempt_end
        s = self.session
        if s is not None and s.lastpayload is not None and s._resend_at is not None:
            when = min(when, s._resend_at)
        if self.wake_at != when or self.wake != self._tick:
            self._at(when, self._tick)

    def _tick(self) -> None:
        if not self.waiting or self.done:
            return
        now = time.monotonic()
        s = self.session
        if now >= self.attempt_end or s is None:
            phase = "command" if s is not None and s.logged else "login"
            self._failed(BmcTimeout(f"timeout: no answer to {phase} before the deadline"))
            return
        if s.lastpayload is not None and s._resend_at is not None and now >= s._resend_at:
            try:
                s._timedout()
            except Exception as e:
                self._failed(e)
                return
        self._rearm()

    def readable(self) -> None:
        s = self.session
        if s is None:
            return
        try:
            s.on_readable()
        except Exception as e:
            if not self.done and self.waiting:
                self._failed(e)
            return
        if not self.done and self.waiting and self.session is s:
            self._rearm()


def _socket_budget() -> int:
    """Sessions in flight that the open-files limit allows (one socket each), leaving room for
    everything else the process holds; a run over more nodes queues the rest."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 256
    if soft == resource.RLIM_INFINITY:
        return 1 << 16
    return max(16, soft - 128)


# -- the loop -------------------------------------------------------------------------------------------

class Engine:
    """Runs ops over many nodes in the calling thread. ``interval`` may be shared with a
    PowerClient so that min_interval holds across both."""

    def __init__(self, settings: Settings | None = None, interval: MinInterval | None = None):
        self.settings = settings or Settings()
        s = self.settings
        self.policy = RetryPolicy(window=s.retry_window, first_delay=s.retry_first_delay,
                                  max_delay=s.retry_max_delay)
        self.interval = interval or MinInterval(s.min_interval)
        self._sel: selectors.BaseSelector | None = None
        self._timers: list[tuple[float, int, _Job]] = []
        self._seq = itertools.count()
        self._outcomes: list[Outcome | None] = []
        self._bar: Progress | None = None
        self._running = 0

    def run(self, nodes: Sequence[Node], make_op: Callable[[Node], Op], *,
            label: str = "working", progress: str | None = None,
            parallel: int | None = None) -> list[Outcome]:
        """One Outcome per node, in the nodes' order. ``parallel`` caps the sessions in flight
        (default: all nodes at once, as ipmipower; each costs a socket, not a thread)."""
        if not nodes:
            return []
        self._outcomes = [None] * len(nodes)
        self._bar = Progress(label, len(nodes), progress or self.settings.progress)
        self._sel = selectors.DefaultSelector()
        self._timers = []
        pending = list(enumerate(nodes))
        pending.reverse()
        cap = max(1, min(parallel or len(nodes), _socket_budget()))
        jobs: list[_Job] = []
        try:
            while pending or self._running:
                while pending and self._running < cap:
                    i, node = pending.pop()
                    self._start(i, node, make_op, jobs)
                if self._running:
                    self._spin()
        finally:
            for job in jobs:
                if not job.done and job.session is not None:
                    job.session.close(logout=True)
            self._sel.close()
            self._sel = None
            self._bar.close()
        return [o for o in self._outcomes if o is not None]

    def _start(self, i: int, node: Node, make_op: Callable[[Node], Op], jobs: list[_Job]) -> None:
        t0 = time.monotonic()
        try:
            if node.bmc is None:
                raise NodeError(f"{node.name}: no bmc: section in the inventory")
            op = make_op(node)
        except Exception as e:
            self._outcomes[i] = Outcome(node.name, False, {}, error_text(e),
                                        time.monotonic() - t0)
            assert self._bar is not None
            self._bar.update(False)
            return
        job = _Job(self, i, node, op)
        jobs.append(job)
        self._running += 1
        job.start()

    def _spin(self) -> None:
        """One turn: wait for packets or the next timer, handle them, run due timers."""
        assert self._sel is not None
        timers = self._timers
        timeout = max(0.0, timers[0][0] - time.monotonic()) if timers else None
        for key, _ in self._sel.select(timeout):
            key.data.readable()
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            when, _, job = heapq.heappop(timers)
            if job.done or job.wake_at != when or job.wake is None:
                continue  # superseded
            fn, job.wake = job.wake, None
            fn()

    # -- called by jobs -----------------------------------------------------------------------------

    def schedule(self, when: float, job: _Job) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), job))

    def watch(self, session: AsyncSession, job: _Job) -> None:
        assert self._sel is not None
        self._sel.register(session.socket, selectors.EVENT_READ, job)

    def forget(self, session: AsyncSession) -> None:
        if self._sel is not None and session.socket is not None:
            try:
                self._sel.unregister(session.socket)
            except (KeyError, ValueError):
                pass

    def finished(self, job: _Job, outcome: Outcome) -> None:
        self._outcomes[job.index] = outcome
        self._running -= 1
        assert self._bar is not None
        self._bar.update(outcome.ok)


# -- the verbs over many nodes ------------------------------------------------------------------------

def power_status(nodes: Sequence[Node], settings: Settings | None = None, *,
                 label: str = "power-status", progress: str | None = None,
                 interval: MinInterval | None = None) -> list[Outcome]:
    """Every node's chassis power state, all BMCs at once: [Outcome(value={"power": ...})]."""
    return Engine(settings, interval).run(nodes, ops.status_op, label=label, progress=progress)


def power_action(nodes: Sequence[Node], action: str, settings: Settings | None = None, *,
                 wait: bool = False, label: str | None = None, progress: str | None = None,
                 interval: MinInterval | None = None) -> list[Outcome]:
    """on | off | soft | reset | cycle over every node at once, with PowerClient's results
    ({"power", "changed", "confirmed"}); ``wait`` waits for the BMC to report the new state
    (waiting for SSH is above the BMC layer: ``labkit.bringup.power_on``/``power_cycle``)."""
    if action not in ops.ACTIONS:
        raise UserError(f"power action {action!r}: expected one of {', '.join(ops.ACTIONS)}")
    engine = Engine(settings, interval)
    make = ops.ACTIONS[action]
    return engine.run(nodes, lambda n: make(n, engine.settings, wait),
                      label=label or f"power-{action}", progress=progress)


def set_boot_device(nodes: Sequence[Node], device: str, settings: Settings | None = None, *,
                    persistent: bool = False, label: str = "boot-device",
                    progress: str | None = None,
                    interval: MinInterval | None = None) -> list[Outcome]:
    """The boot override on every node at once (see ops.set_boot_device)."""
    ops.check_boot_device(device)  # a usage error before any BMC is touched
    return Engine(settings, interval).run(
        nodes, lambda n: ops.set_boot_device(n, device, persistent), label=label,
        progress=progress)
