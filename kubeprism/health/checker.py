"""Active health checks: one probe loop per endpoint, paced by cadence.py, feeding upstream.Pool.

Probes run concurrently (a slow endpoint never delays the others), each bounded by its
timeout. Passive signs (``sign``: a failed dial, a reset or stalled forwarded connection,
a changed endpoint set) and the loss of an endpoint's health connection
(``connection_lost``) wake its loop early. Only state *changes* are logged, with the
reason, because a node would log every few seconds otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from kubeprism.base.net import LOCAL_ERRNOS, HostPort
from kubeprism.base.supervise import supervised
from kubeprism.core.cadence import Cadence, Intervals
from kubeprism.core.endpoint import Evidence, Transition
from kubeprism.core.patience import Verdict
from kubeprism.core.upstream import Pool
from kubeprism.health.stall import Judgement, StallMeter, judged_timeout

logger = logging.getLogger(__name__)

# Keep a reason short enough for a log line and a /upstreams cell.
MAX_REASON = 160
# kubeprism_task_restarts_total{task} label of every endpoint's check loop (one label for
# all of them: endpoints come and go, the metric's series must not).
HEALTH_TASK = "health check"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of one probe."""

    ok: bool
    latency: float | None
    reason: str
    evidence: Evidence = Evidence.ANSWER  # what a failure rests on (core.endpoint.Evidence)

    @property
    def local(self) -> bool:
        """Failed on this host (out of fds, ...): no verdict on the endpoint."""
        return self.evidence is Evidence.LOCAL


@dataclass
class HealthCost:
    """What the checks cost the API servers, per endpoint: read by the metrics at scrape
    time, and kept across probe replacements (a reload)."""

    handshakes: collections.Counter[HostPort] = field(default_factory=collections.Counter)
    requests: collections.Counter[HostPort] = field(default_factory=collections.Counter)

    def forget(self, address: HostPort) -> None:
        """Drop a retired endpoint's counts."""
        self.handshakes.pop(address, None)
        self.requests.pop(address, None)


class Probe(Protocol):
    """One check of one endpoint; ``forget`` drops what is kept for a removed endpoint."""

    async def __call__(self, address: HostPort) -> ProbeResult: ...

    def forget(self, address: HostPort) -> None: ...

    async def close(self) -> None: ...


ProbeObserver = Callable[[HostPort, float, bool], None]
# Sleep for the delay unless the event is set first; True when woken by the event.
Waiter = Callable[[asyncio.Event, float], Awaitable[bool]]


async def wait_or_wake(event: asyncio.Event, delay: float) -> bool:
    """The real Waiter."""
    try:
        async with asyncio.timeout(delay):
            await event.wait()
    except TimeoutError:
        return False
    return True


def short(text: str) -> str:
    """One line of at most MAX_REASON characters."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def is_own_timeout(exc: BaseException) -> bool:
    """Our own timer ran out (asyncio's TimeoutError carries no errno; the kernel's
    ETIMEDOUT, a keepalive or TCP_USER_TIMEOUT verdict, does)."""
    return isinstance(exc, TimeoutError) and exc.errno is None


def describe_error(exc: BaseException, timeout: float) -> str:
    """A reason a person can act on: refused, timed out, which TLS problem."""
    if is_own_timeout(exc):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, TimeoutError):
        return "connection timed out (no answer to retransmissions or keepalive probes)"
    if isinstance(exc, ssl.SSLCertVerificationError):
        # verify_message is the actionable part ("Hostname mismatch, ... 'name'"); the full
        # text's "[SSL: CERTIFICATE_VERIFY_FAILED] ..." prefix pushed it past MAX_REASON.
        return short(f"TLS certificate rejected: {exc.verify_message or exc}")
    if isinstance(exc, ssl.SSLError):
        return short(f"TLS error: {exc}")
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError):
        return short(f"connect failed: {exc.strerror or exc}")
    return short(f"{type(exc).__name__}: {exc}")


def is_local_error(exc: BaseException) -> bool:
    """True when the error is this host's (EMFILE, ENOMEM, ...), not the endpoint's."""
    return isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS


def failed(exc: BaseException, timeout: float, judgement: Judgement | None = None) -> ProbeResult:
    """The result of a probe that raised, with what it rests on."""
    if is_own_timeout(exc):
        if judgement is not None and judgement.verdict is Verdict.INCONCLUSIVE:
            reason = f"no verdict: kubeprism could hardly run while waiting {timeout:g}s"
            return ProbeResult(False, None, reason, Evidence.INCONCLUSIVE)
        return ProbeResult(False, None, describe_error(exc, timeout), Evidence.TIMEOUT)
    evidence = Evidence.LOCAL if is_local_error(exc) else Evidence.ANSWER
    return ProbeResult(False, None, describe_error(exc, timeout), evidence)


class TcpProbe:
    """Connect only; the latency is the connect time."""

    def __init__(self, timeout: float, cost: HealthCost | None = None) -> None:
        self.timeout = timeout
        self.cost = cost if cost is not None else HealthCost()
        self.meter = StallMeter()

    async def __call__(self, address: HostPort) -> ProbeResult:
        started = time.monotonic()
        self.cost.handshakes[address] += 1
        judgement = None
        try:
            async with judged_timeout(self.timeout, self.meter) as judgement:
                _reader, writer = await asyncio.open_connection(address.host, address.port)
        except (OSError, TimeoutError) as exc:
            return failed(exc, self.timeout, judgement)
        latency = time.monotonic() - started
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return ProbeResult(True, latency, "ok")

    def forget(self, address: HostPort) -> None:
        """Nothing is kept per endpoint."""

    async def close(self) -> None:
        """Nothing to release."""


@dataclass
class _Loop:
    """One endpoint's probe loop: its task, schedule and wake-up call."""

    cadence: Cadence
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class HealthChecker:
    """Runs a probe loop per endpoint of the pool and reports results to it."""

    def __init__(
        self,
        pool: Pool,
        probe: Probe,
        intervals: Intervals,
        on_transition: Callable[[Transition], None],
        observe: ProbeObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        wait: Waiter = wait_or_wake,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.pool = pool
        pool.on_sign = self.sign  # passive signs reported to the pool wake a loop here
        self.probe = probe
        self.intervals = intervals
        self._on_transition = on_transition
        self._observe = observe or (lambda _a, _s, _ok: None)
        self._clock, self._wait, self._rand = clock, wait, rand
        self._loops: dict[HostPort, _Loop] = {}
        # Loops cancelled by sync() but not finished yet: stop() must wait for them too.
        self._retired: set[asyncio.Task[None]] = set()
        self._first = asyncio.Event()
        # Endpoints whose last probe could not run for a local reason (logged once per spell).
        self._local_failures: set[HostPort] = set()
        self._late = False  # the pool's overloaded flag as last logged

    def sync(self) -> None:
        """Start loops for new endpoints and stop those of removed ones."""
        for address in list(self._loops):
            if address not in self.pool.endpoints:
                task = self._loops.pop(address).task
                assert task is not None
                task.cancel()
                self._retired.add(task)
                task.add_done_callback(self._retired.discard)
                self.probe.forget(address)
        for address in self.pool.endpoints:
            if address not in self._loops:
                loop = self._loops[address] = _Loop(Cadence(self.intervals))
                loop.task = supervised(
                    HEALTH_TASK, functools.partial(self._run, address, loop), f"health {address}"
                )
        self._update_first()

    def set_intervals(self, intervals: Intervals) -> None:
        """New paces (a reload); each loop takes them at its next wait."""
        self.intervals = intervals
        for loop in self._loops.values():
            loop.cadence.intervals = intervals

    def sign(self, address: HostPort, reason: str, urgent: bool = False) -> None:
        """A passive sign that something may be wrong with ``address``: check it soon."""
        loop = self._loops.get(address)
        if loop is None:
            return
        logger.debug("checking %s sooner: %s", address, reason)
        loop.cadence.on_sign(self._clock(), urgent)
        loop.wake.set()

    def connection_lost(self, address: HostPort, reason: str, failure: bool) -> None:
        """The health connection to ``address`` ended between checks.

        A reset or a keepalive timeout counts as a failed check (the endpoint becomes
        suspect at once); an orderly close may be the server's idle timeout and is no
        failure. Either way the endpoint is checked again at once, over a fresh connection.
        """
        if failure:
            self._record(address, ProbeResult(False, None, reason))
        self.sign(address, reason, urgent=True)

    def _update_first(self) -> None:
        if all(ep.probes for ep in self.pool.endpoints.values()):
            self._first.set()

    async def first_pass(self, timeout: float) -> bool:
        """Wait until every endpoint has been probed once; False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._first.wait()
        except TimeoutError:
            return False
        return True

    async def check_once(self, address: HostPort) -> ProbeResult:
        """Probe one endpoint now and record the result."""
        started = self._clock()
        try:
            result = await self.probe(address)
        except Exception as exc:  # a probe bug counts as a failed probe, and checking goes on
            logger.debug("probe of %s raised", address, exc_info=True)
            result = ProbeResult(False, None, short(f"probe error: {type(exc).__name__}: {exc}"))
        if result.local:
            if address not in self._local_failures:
                logger.warning(
                    "cannot probe %s: %s (a local limit, not the endpoint)", address, result.reason
                )
            self._local_failures.add(address)
            return result
        self._local_failures.discard(address)
        if result.evidence is Evidence.INCONCLUSIVE:
            self.pool.record_inconclusive(address, result.reason)
            self._note_lateness(result.reason)
            return result
        self._observe(address, self._clock() - started, result.ok)
        self._record(address, result)
        return result

    def _record(self, address: HostPort, result: ProbeResult) -> None:
        transition = self.pool.record_probe(
            address, result.ok, result.latency, result.reason, self._clock(), result.evidence
        )
        self._update_first()
        self._note_lateness(result.reason)
        if transition is not None:
            self._on_transition(transition)

    def _note_lateness(self, reason: str) -> None:
        """One line when checks start and stop being unable to judge (not one per check)."""
        late = self.pool.overloaded
        if late == self._late:
            return
        self._late = late
        if late:
            logger.warning(
                "checks are late: this node looks overloaded (%s); no endpoint is taken down "
                "and no connection closed on our own timeouts until a server gives a sign",
                reason,
            )
        else:
            logger.info("checks are on time again")

    async def _run(self, address: HostPort, loop: _Loop) -> None:
        delay = 0.0  # the first check at once: start-up waits for it
        while True:
            await self._pause(loop, delay)
            started = self._clock()
            local = inconclusive = False
            try:
                evidence = (await self.check_once(address)).evidence
                local, inconclusive = evidence is Evidence.LOCAL, evidence is Evidence.INCONCLUSIVE
            except Exception:  # a checker bug must not stop checking
                logger.exception("health check of %s failed unexpectedly", address)
            ep = self.pool.endpoints.get(address)
            delay = loop.cadence.after_check(
                started, self._clock(), ep, local, self._rand(), inconclusive
            )

    async def _pause(self, loop: _Loop, delay: float) -> None:
        """Wait ``delay``, cut short by a passive sign asking for an earlier check."""
        deadline = self._clock() + delay
        while True:
            now = self._clock()
            delay = deadline - now
            asked = loop.cadence.wait_for_sign(now)
            if asked is not None:
                delay = min(delay, asked)
            if delay <= 0:
                return
            loop.wake.clear()
            if not await self._wait(loop.wake, delay):
                return

    async def stop(self) -> None:
        """Cancel every probe loop and wait for them."""
        tasks = [loop.task for loop in self._loops.values() if loop.task is not None]
        tasks += self._retired
        self._loops.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
