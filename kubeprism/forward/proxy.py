"""Admission, pick-and-dial with failover, per-connection lifecycle, idle sweep, drain.

Sockets here are raw and non-blocking, driven by readiness callbacks; the
upstream core (upstream.Pool) decides where to go, this module only dials,
pumps and reports back what happened.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Final

from kubeprism.base.net import LOCAL_ERRNOS, HostPort
from kubeprism.core.endpoint import Evidence, Health, Transition
from kubeprism.core.upstream import Pool
from kubeprism.forward.arming import Arming
from kubeprism.forward.connection import (
    CloseReason,
    Connection,
    ConnectionContext,
    Frozen,
    set_linger_rst,
)
from kubeprism.forward.dial import Dial, DialTimers
from kubeprism.forward.listeners import Acceptor
from kubeprism.forward.pipes import PipePool
from kubeprism.forward.proxytypes import ProxySettings, ProxyStats, dial_options
from kubeprism.forward.reactor import Reactor
from kubeprism.forward.splice import Mode, PumpContext

__all__ = ["DialObserver", "Proxy", "ProxySettings", "ProxyStats"]

logger = logging.getLogger(__name__)

# Shortest pause between idle sweeps, however short idleTimeout is.
MIN_SWEEP_PERIOD: Final = 0.05
# A dial slower than this share of dialTimeout is a passive sign, even though it worked.
SLOW_DIAL_SHARE = 0.5  # not Final: a test varies it (Final ones are inlined when compiled)
# After an unexpected error in the data path, further ones are only counted for this
# long: a traceback per connection would flood the journal.
INTERNAL_ERROR_QUIET: Final = 60.0


DialObserver = Callable[[HostPort, float, bool], None]


class Proxy:
    """Accepts client connections and forwards each to an upstream endpoint."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pool: Pool,
        settings: ProxySettings,
        on_transition: Callable[[Transition], None],
        observe_dial: DialObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.loop = loop
        self.pool = pool
        self.settings = settings
        self.stats = ProxyStats()
        self.reactor = Reactor(loop, self._reactor_failed)
        self.pumps = PumpContext(self.reactor, settings.mode)
        self._on_transition = on_transition
        self.observe_dial = observe_dial or (lambda _a, _s, _ok: None)
        self._clock = clock
        self._conn_ctx = ConnectionContext(
            self.pumps,
            clock,
            self.stats.upstream_bytes,
            self.stats.client_bytes,
            self._forget,
            pool.sign,
        )
        self._acceptor = Acceptor(loop, self.reactor, self._admit, self._accept_failed)
        self._by_endpoint: dict[HostPort, set[Connection]] = {}
        self._forwarding = 0  # connections in _by_endpoint (counted: asked per accept)
        self._dialing: set[Dial] = set()
        self._dial_timers = DialTimers(loop, clock)
        self._dial_options = dial_options(settings)
        self._arming = Arming(loop, lambda: self._dial_options)
        self._local_trouble = False
        self._internal_trouble = False
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._closed = False
        # Futures of wait_drained() callers (shutdown): nothing to touch per connection.
        self._drain_waiters: list[asyncio.Future[None]] = []

    # ------------------------------------------------------------ listening

    @property
    def active(self) -> int:
        """Client connections being dialed or forwarded."""
        return len(self._dialing) + self._forwarding

    @property
    def mode(self) -> Mode:
        """The forwarding mode new connections get."""
        return self.pumps.mode

    @property
    def pipes(self) -> PipePool:
        """The splice pipe pool."""
        return self.pumps.pipes

    def serve(self, listeners: list[socket.socket]) -> None:
        """Start accepting on already bound, listening sockets."""
        self._acceptor.serve(listeners)
        self._schedule_sweep()

    def update(self, settings: ProxySettings) -> None:
        """New settings (a reload): the mode and dial options apply to new connections,
        idleTimeout to every connection from now on."""
        self.settings = settings
        self.pumps.mode = settings.mode
        self._dial_options = dial_options(settings)
        self._schedule_sweep()

    def stop_accepting(self) -> None:
        """Stop taking new connections; the listening sockets stay open for the owner."""
        self._acceptor.stop()

    def _accept_failed(self) -> None:
        self.stats.accept_errors += 1

    def _admit(self, client: socket.socket) -> None:
        self.stats.accepted += 1
        if self.active >= self.settings.max_connections:
            self.stats.rejected += 1
            set_linger_rst(client)
            client.close()
            return
        dial: Dial | None = None
        try:
            # Non-blocking from accept (fastio.accept); TCP_NODELAY comes from the
            # listener: Linux copies it to accepted sockets.
            candidates = self.pool.candidates()
            dial = Dial(
                self._dial_timers,
                self.reactor,
                self,
                self._dial_options,
                self._clock,
                client,
                candidates,
            )
            self._dialing.add(dial)
            dial.start()
        except Exception:
            # Whatever went wrong, the client is closed and its slot given back; a dial
            # that already finished (forwarding or exhausted) owns its client instead.
            if dial is None or dial in self._dialing:
                if dial is not None:
                    self._dialing.discard(dial)
                    dial.cancel()
                client.close()
                self._check_drained()
            self._unexpected("accepting a connection")

    # ------------------------------------------------------------ dialing

    def dial_succeeded(
        self, dial: Dial, upstream: socket.socket, address: HostPort, seconds: float
    ) -> None:
        """A candidate accepted: start forwarding."""
        self._dialing.discard(dial)
        if self._local_trouble:
            self._local_trouble = False
            logger.info("dialing works again")
        self.observe_dial(address, seconds, True)
        if seconds >= SLOW_DIAL_SHARE * self.settings.dial_timeout:
            self.pool.sign(address, f"slow dial ({seconds:.2f}s)")
        try:
            self._start(dial.client, upstream, address)
        except Exception:
            dial.client.close()
            self.reactor.forget(upstream.fileno())
            upstream.close()
            self._check_drained()
            self._unexpected(f"starting to forward to {address}")

    def dial_failed(self, address: HostPort, seconds: float, exc: OSError) -> None:
        """One candidate failed: the passive health check, unless it was our own fault."""
        if exc.errno in LOCAL_ERRNOS:
            self.stats.local_dial_errors += 1
            if not self._local_trouble:  # one line per episode, not one per connection
                self._local_trouble = True
                logger.warning("cannot dial %s: %s (a local limit, not the upstream)", address, exc)
            return
        self.stats.dial_failures += 1
        self.observe_dial(address, seconds, False)
        if isinstance(exc, TimeoutError):
            # Not an answer: held like a timed-out check while every server is silent.
            evidence, reason = (
                Evidence.TIMEOUT,
                f"dial timed out after {self.settings.dial_timeout:g}s",
            )
        else:
            evidence, reason = Evidence.ANSWER, f"dial failed: {(exc.strerror or str(exc)).lower()}"
        transition = self.pool.record_dial(address, False, reason, self._clock(), evidence)
        if transition is not None:
            self._on_transition(transition)

    def dial_overtaken(self, address: HostPort, seconds: float) -> None:
        """A staggered dial connected elsewhere first: the slow endpoint is suspect."""
        self.stats.dials_overtaken += 1
        if self.pool.record_overtaken(address):  # one line per episode
            logger.info(
                "dial to %s still not connected after %.0f ms while another endpoint "
                "answered; suspect until it passes a check",
                address,
                seconds * 1000,
            )

    def dial_exhausted(self, dial: Dial) -> None:
        """No candidate accepted: the client is closed (the only way it notices anything)."""
        self._dialing.discard(dial)
        self.stats.no_upstream += 1
        logger.debug("no upstream accepted a connection; closing the client")
        dial.client.close()
        self._check_drained()

    def _unexpected(
        self, what: str, outcome: str = "the client was closed", exc: Exception | None = None
    ) -> None:
        """A bug or a hostile input in the data path: counted, logged once per episode."""
        self.stats.internal_errors += 1
        if not self._internal_trouble:
            self._internal_trouble = True
            logger.error("unexpected error %s; %s", what, outcome, exc_info=exc or True)
            self.loop.call_later(INTERNAL_ERROR_QUIET, self._internal_quiet)

    def _reactor_failed(self, fd: int, exc: Exception) -> None:
        """A handler raised (a bug): counted and logged like any data-path surprise."""
        self._unexpected(f"handling events of fd {fd}", "it is no longer watched", exc)

    def _internal_quiet(self) -> None:
        self._internal_trouble = False

    # ------------------------------------------------------------ connections

    def _start(
        self,
        client: socket.socket,
        upstream: socket.socket,
        address: HostPort,
        frozen: Frozen | None = None,
    ) -> None:
        conn = Connection(self._conn_ctx, client, upstream, address)  # raising: caller closes
        self.stats.forwarded += frozen is None
        self.pool.opened(address)
        self._by_endpoint.setdefault(address, set()).add(conn)
        self._forwarding += 1
        if frozen is None:  # an adopted socket kept its options
            self._arming.add(upstream)
        try:
            conn.start(frozen)
        except Exception:
            conn.close()
            self._unexpected(f"forwarding to {address}")

    def _forget(self, conn: Connection) -> None:
        """Called once by Connection.close()."""
        conns = self._by_endpoint.get(conn.address)
        if conns is not None and conn in conns:
            conns.remove(conn)
            self._forwarding -= 1
            if not conns:
                del self._by_endpoint[conn.address]
        self.pool.closed(conn.address)
        self._check_drained()

    def _check_drained(self) -> None:
        if not self.active and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    # ------------------------------------------------------------ handover

    def freeze_all(self) -> list[Frozen]:
        """Stop reading everywhere and give up every connection without closing it."""
        frozen = []
        for dial in list(self._dialing):
            dial.cancel()
            frozen.append(Frozen(dial.client))
        self._dialing.clear()
        for conns in list(self._by_endpoint.values()):
            frozen.extend(conn.freeze() for conn in list(conns))
        return frozen

    def adopt(self, frozen: Frozen) -> bool:
        """Resume a connection of the previous process; False if its endpoint is gone."""
        if frozen.upstream is None or frozen.address is None:
            frozen.client.setblocking(False)  # what a fresh accept gives _admit
            self._admit(frozen.client)  # never dialed: dial now, like a fresh accept
            return True
        # A fresh process knows no health yet: an endpoint that is down is closed as
        # usual when its first probes fail (handle_transition).
        if frozen.address not in self.pool.endpoints:
            self.stats.closed[CloseReason.REMOVED] += 1  # closed by the caller
            return False
        self.stats.adopted += 1
        self._start(frozen.client, frozen.upstream, frozen.address, frozen)
        return True

    def connections(self) -> Iterator[Connection]:
        """Every forwarded connection (for sweeps outside the proxy)."""
        for conns in self._by_endpoint.values():
            yield from conns

    def connections_to(self, address: HostPort) -> int:
        """Live connections forwarded to ``address``."""
        return len(self._by_endpoint.get(address, ()))

    def close_connections_to(self, address: HostPort, reason: CloseReason, why: str) -> int:
        """Close (and count) every client connection forwarded to ``address``; return how many."""
        conns = list(self._by_endpoint.get(address, ()))
        for conn in conns:
            conn.close(reset_upstream=True)
        self.stats.closed[reason] += len(conns)
        if conns:
            logger.info("closed %d connection(s) to %s: %s", len(conns), address, why)
        return len(conns)

    def handle_transition(self, transition: Transition) -> None:
        """Close the connections of an endpoint that just turned unhealthy (if enabled)."""
        if self.settings.close_on_unhealthy and transition.new is Health.UNHEALTHY:
            why = f"endpoint unhealthy ({transition.reason})"
            self.close_connections_to(transition.address, CloseReason.UNHEALTHY, why)

    def _schedule_sweep(self) -> None:
        """(Re)arm the idle sweep for the current idleTimeout; a timer, so a reload that
        shortens idleTimeout takes effect at once instead of after the old period."""
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        timeout = self.settings.idle_timeout
        if timeout > 0 and not self._closed:
            period = max(MIN_SWEEP_PERIOD, timeout / 2)
            self._sweep_timer = self.loop.call_later(period, self._sweep)

    def _sweep(self) -> None:
        """Close connections that moved no byte for idle_timeout (off by default)."""
        self._sweep_timer = None
        now, timeout = self._clock(), self.settings.idle_timeout
        for conns in list(self._by_endpoint.values()):
            for conn in list(conns):
                if conn.idle_for(now) >= timeout:
                    self.stats.closed[CloseReason.IDLE] += 1
                    conn.close()
        self._schedule_sweep()

    # ------------------------------------------------------------ shutdown

    async def wait_drained(self) -> None:
        """Return once no client connection is open."""
        if self.active:
            waiter = self.loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def close_all(self) -> int:
        """Close every connection, cancel dials in progress and the idle sweep; return how
        many connections were open. Nothing is left to wait for: dials and sweeps are
        callbacks and timers, not tasks."""
        left = self.active
        self._closed = True
        for dial in list(self._dialing):
            dial.cancel()
            dial.client.close()
        self._dialing.clear()
        for conns in list(self._by_endpoint.values()):
            for conn in list(conns):
                conn.close()
        self._schedule_sweep()
        self._check_drained()
        self.pumps.pipes.close()
        self.reactor.close()
        self._arming.close()
        self._dial_timers.close()
        return left
