"""Pure upstream state and selection: no sockets, no clock, no event loop.

The proxy asks :meth:`Pool.candidates` for the order in which to dial, and
reports what happened (``record_dial``, ``record_overtaken``, ``opened``/``closed``);
the health checker reports probe results (``record_probe``) and latency figures
(``record_latency``: any source of a plain number of seconds, the same source for
every endpoint). Every health change comes back as a :class:`Transition` so the
caller can log it and act on it (close connections). Callers pass ``now`` so tests
need no clock, and may pass ``rand`` so tests need no luck.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from kubeprism.net import HostPort

# Weight of the newest sample in the latency average: smooths one slow probe without
# hiding a real, lasting change for more than a few intervals.
LATENCY_EWMA_ALPHA = 0.3
# Latency classes are relative to the best endpoint of the same priority, never fixed
# bounds: with fixed bounds (the old decades) 0.9 ms and 1.1 ms landed in different
# classes and every node sent everything to one server. An endpoint is *equal* while
# within EQUAL_FACTOR (or EQUAL_MARGIN) of the best and *slow* once at SLOW_FACTOR (and
# SLOW_MARGIN) or more; in between it keeps its class. The band (1.5x wide) is as wide as
# a +-20 % swing end to end, so jitter alone cannot carry an endpoint across both bounds.
EQUAL_FACTOR = 2.0
SLOW_FACTOR = 3.0
# Below a millisecond a factor is probe noise (scheduling, TLS CPU), not distance; and a few
# milliseconds of a busy API server's answer must not put it in the slow class, where it gets
# no new connections (fault 3 showed every request herded onto one server by 2-5 ms of noise).
EQUAL_MARGIN = 0.001
SLOW_MARGIN = 0.010
# Classes are judged on an endpoint's *floor*, the lowest of its last FLOOR_FIGURES
# figures, not on the average: noise (a busy server or node, the first pass's concurrent
# TLS handshakes) only ever adds latency, while distance is in every figure. Measured in the
# fault suite under CPU load, three identical servers' first figures were 1.5-30 ms and
# the average put one of them in the slow class for the whole scenario.
FLOOR_FIGURES = 3
# A class decided on fewer figures is provisional: it orders new connections at once (a far
# server gets none even right after start-up) but is decided afresh at every turn, with no
# hold, until this many figures confirm it (the checker takes the second one a fast
# interval after the first): one inflated figure costs a server ~250 ms, not a hold.
FIRST_DECISION_FIGURES = 2
# How long latency must stay across a bound before the class changes. Demotion is quick
# (a slower server should stop taking new connections soon); promotion must prove itself.
DEMOTE_HOLD = 3.0
PROMOTE_HOLD = 10.0
# Staggered dials: wait this many latencies for a connect before trying the next
# endpoint too; within [MIN, MAX] (RFC 8305 uses 250 ms when nothing is known). A lost SYN
# costs a whole second (the initial RTO), so a connect late by a few RTTs is not coming.
ATTEMPT_DELAY_FACTOR = 4.0
ATTEMPT_DELAY_MIN = 0.05
ATTEMPT_DELAY_MAX = 0.25


class Evidence(enum.Enum):
    """What a check's outcome rests on: whether it may count against a server."""

    # The server, or the kernel on its behalf, said so: an answer (200, 5xx), a refusal, a
    # reset, a TLS alert, EOF, a keepalive or TCP_USER_TIMEOUT verdict. Conclusive.
    ANSWER = "answer"
    # Our own timer ran out while this process could run: conclusive, unless every other
    # server is silent too (then the node is the likelier cause: see Pool.record_probe).
    TIMEOUT = "timeout"
    # Our own timer ran out while this process was kept from running (CPU starvation, a
    # pause): no verdict at all, the check is simply repeated.
    INCONCLUSIVE = "inconclusive"
    # This host's own limits (out of fds, memory): no verdict on the server either.
    LOCAL = "local"


class Health(enum.Enum):
    """What the checks currently believe about an endpoint."""

    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """What discovery says about an endpoint: where it came from and how preferred."""

    priority: int
    sources: frozenset[str]


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of an endpoint's health, with the reason for it."""

    address: HostPort
    old: Health
    new: Health
    reason: str


@dataclass(slots=True)
class Endpoint:
    """Everything learned about one endpoint (an IP address and port)."""

    address: HostPort
    priority: int
    sources: frozenset[str]
    health: Health = Health.UNKNOWN
    reason: str = "not checked yet"
    successes: int = 0
    failures: int = 0
    latency: float | None = None  # the average, for display and attempt delays
    recent: list[float] = field(default_factory=list)  # the last FLOOR_FIGURES figures
    active: int = 0
    connections_total: int = 0
    dial_failures_total: int = 0
    changed_at: float | None = None
    probes: int = field(default=0)
    # Latency class: None until measured, then False (equal to the best) or True (slow);
    # provisional while decided on fewer than FIRST_DECISION_FIGURES figures.
    slow: bool | None = None
    provisional: bool = False
    # Since when the latency has been across the bound that would change the class.
    crossed_at: float | None = None
    # A dial to it was overtaken by a later one (staggered dials): suspect, not failed.
    overtaken: bool = False
    # When it last answered anything (a success or a server-side failure): evidence that
    # this node could run a check then. None: never.
    answered_at: float | None = None
    # Since when its current streak of failures runs (None: not failing).
    failing_since: float | None = None
    # The last check could not judge it: inconclusive (we were stalled) or a timeout held
    # because no other server answered either (the node looks overloaded).
    late: bool = False
    inconclusive_total: int = 0
    held_total: int = 0

    @property
    def suspect(self) -> bool:
        """Healthy, but the last check or dial failed or stalled (not enough to flip)."""
        return self.health is Health.HEALTHY and (self.failures > 0 or self.overtaken)

    @property
    def in_doubt(self) -> bool:
        """Between states: recent results disagree with the current state."""
        if self.health is Health.HEALTHY:
            return self.suspect
        return self.health is Health.UNHEALTHY and self.successes > 0

    @property
    def floor(self) -> float | None:
        """The lowest recent latency figure: what the class is judged on."""
        return min(self.recent) if self.recent else None

    @property
    def latency_class(self) -> str:
        """ "equal" (shares new connections), "slow" (only without an equal one), "unknown"."""
        return "unknown" if self.slow is None else "slow" if self.slow else "equal"

    @property
    def attempt_delay(self) -> float:
        """How long a dial to it may take before the next endpoint is dialled as well."""
        if self.latency is None:
            return ATTEMPT_DELAY_MAX
        delay = ATTEMPT_DELAY_FACTOR * self.latency
        return min(ATTEMPT_DELAY_MAX, max(ATTEMPT_DELAY_MIN, delay))


class Pool:
    """The set of endpoints, their health with hysteresis, and the selection policy."""

    def __init__(
        self,
        healthy_threshold: int = 1,
        unhealthy_threshold: int = 2,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self.endpoints: dict[HostPort, Endpoint] = {}
        self._rand = rand
        # Told of every passive sign (a failed or slow dial, a reset or stalled forwarded
        # connection, a changed endpoint set): the health checker then checks sooner.
        self.on_sign: Callable[[HostPort, str], None] = _ignore_sign

    # ------------------------------------------------------------ membership

    def reconcile(self, desired: Mapping[HostPort, EndpointSpec]) -> list[Endpoint]:
        """Make the endpoint set equal to ``desired``; return the removed endpoints.

        Endpoints that stay keep their health, latency and counters: a new
        discovery result must not throw away what the checks learned.
        """
        removed = [ep for addr, ep in self.endpoints.items() if addr not in desired]
        for ep in removed:
            del self.endpoints[ep.address]
        kept = list(self.endpoints)
        for addr, spec in desired.items():
            known = self.endpoints.get(addr)
            if known is None:
                self.endpoints[addr] = Endpoint(addr, spec.priority, spec.sources)
            else:
                known.priority, known.sources = spec.priority, spec.sources
        self._classify(None)
        if removed or len(kept) != len(self.endpoints):
            # API servers come and go from the set while they restart: look again now.
            for addr in kept:
                self.sign(addr, "endpoint set changed")
        return removed

    # ------------------------------------------------------------ selection

    @property
    def panic(self) -> bool:
        """True when no endpoint is healthy: then every endpoint is a candidate."""
        return not any(ep.health is Health.HEALTHY for ep in self.endpoints.values())

    @property
    def healthy_count(self) -> int:
        """How many endpoints are healthy."""
        return sum(ep.health is Health.HEALTHY for ep in self.endpoints.values())

    def candidates(self) -> list[Endpoint]:
        """Endpoints in the order to dial them for one new connection.

        Healthy endpoints first (suspect ones, whose last check failed, after
        the others), by priority, latency class (slow ones by latency), then
        fewest active connections, ties broken at random: every node decides
        alone, and a fixed tie-break would send every node's first connection
        to the same server. The others follow as a last resort, so a client is
        refused only when no endpoint accepts. With none healthy (panic), all
        of them are ordered the same way: a broken checker must not be worse
        than no checker.
        """
        if len(self.endpoints) == 1:  # the common single-VIP setup: nothing to order
            return list(self.endpoints.values())
        rand = self._rand
        healthy: list[Endpoint] = []
        rest: list[Endpoint] = []
        for ep in self.endpoints.values():
            (healthy if ep.health is Health.HEALTHY else rest).append(ep)
        healthy.sort(key=lambda ep: (*_preference(ep), rand()))
        rest.sort(key=lambda ep: (ep.health is Health.UNHEALTHY, *_preference(ep), rand()))
        return healthy + rest

    # ------------------------------------------------------------ observations

    def record_probe(
        self,
        address: HostPort,
        ok: bool,
        latency: float | None,
        reason: str,
        now: float,
        evidence: Evidence = Evidence.ANSWER,
    ) -> Transition | None:
        """Feed one active-check result; return the health change it caused, if any.

        ``evidence`` TIMEOUT (our own timer, while we could run) counts like a failure,
        except that it never takes a healthy endpoint down while no *other* endpoint has
        answered since this one began failing: every server going silent at once is first
        a sign about this node (overloaded, its own network), and closing every connection
        would only make every client reconnect into the same trouble. Such a timeout is
        *held* (the endpoint stays suspect, its connections stay open, the others are asked
        to check now) until another endpoint answers or this one gives a server-side sign.
        """
        ep = self.endpoints.get(address)
        if ep is None:  # removed while the probe was in flight
            return None
        ep.probes += 1
        if ok and latency is not None:
            _add_figure(ep, latency)
        transition = self._observe(ep, ok, reason, now, evidence)
        if transition is None and ok and latency is not None:
            self._classify(now)
        return transition

    def record_inconclusive(self, address: HostPort, reason: str) -> None:
        """A check that could not judge ``address`` (we were stalled): no verdict, counted."""
        ep = self.endpoints.get(address)
        if ep is not None:
            ep.inconclusive_total += 1
            ep.late = True
            if ep.health is Health.UNKNOWN:
                ep.reason = reason

    @property
    def overloaded(self) -> bool:
        """Some endpoint's last check could not judge it (see Endpoint.late)."""
        return any(ep.late for ep in self.endpoints.values())

    def record_latency(self, address: HostPort, seconds: float, now: float) -> None:
        """Feed one latency figure (a probe's duration, a smoothed RTT, ...) of ``address``."""
        ep = self.endpoints.get(address)
        if ep is not None:
            _add_figure(ep, seconds)
            self._classify(now)

    def record_overtaken(self, address: HostPort) -> bool:
        """A dial to ``address`` was still connecting when a later one won; True if news.

        Suspect (new connections go elsewhere first) until a check succeeds, but no
        failure: a slow connect is a reason to look, not yet a verdict.
        """
        ep = self.endpoints.get(address)
        if ep is None or ep.overtaken:
            return False
        ep.overtaken = True
        self.sign(address, "a dial was overtaken by a later one")
        return True

    def record_dial(
        self,
        address: HostPort,
        ok: bool,
        reason: str,
        now: float,
        evidence: Evidence = Evidence.ANSWER,
    ) -> Transition | None:
        """Feed the outcome of a real dial (passive check).

        A failed dial counts like a failed probe (a timed-out one is held like a timed-out
        probe). A successful one changes no health: TCP accepting says nothing about /readyz.
        """
        ep = self.endpoints.get(address)
        if ep is None:
            return None
        if ok:
            return None
        ep.dial_failures_total += 1
        transition = self._observe(ep, False, reason, now, evidence)
        self.sign(address, reason)
        return transition

    def sign(self, address: HostPort, reason: str) -> None:
        """Report a passive sign of trouble at ``address`` (to ``on_sign``)."""
        if address in self.endpoints:
            self.on_sign(address, reason)

    def opened(self, address: HostPort) -> None:
        """A proxied connection to ``address`` was established."""
        ep = self.endpoints.get(address)
        if ep is not None:
            ep.active += 1
            ep.connections_total += 1

    def closed(self, address: HostPort) -> None:
        """A proxied connection to ``address`` ended."""
        ep = self.endpoints.get(address)
        if ep is not None and ep.active > 0:
            ep.active -= 1

    # ------------------------------------------------------------ state machine

    def _observe(
        self, ep: Endpoint, ok: bool, reason: str, now: float, evidence: Evidence
    ) -> Transition | None:
        if ok:
            ep.successes, ep.failures, ep.overtaken = ep.successes + 1, 0, False
            ep.failing_since = None
        else:
            ep.successes, ep.failures = 0, ep.failures + 1
            if ep.failing_since is None:
                ep.failing_since = now
        if evidence is Evidence.ANSWER:
            ep.answered_at = now
        ep.late = False
        ep.reason = reason
        new = _next_health(ep, self.healthy_threshold, self.unhealthy_threshold)
        if evidence is Evidence.TIMEOUT and ep.health is Health.HEALTHY and self._alone(ep):
            # Ask the others now: their answers tell this node's trouble from this server's.
            # (Only while it matters: a down server's timeouts cost the others nothing.)
            for other in self.endpoints:
                if other != ep.address:
                    self.sign(other, f"{ep.address} timed out")
            if new is Health.UNHEALTHY:
                ep.late, ep.held_total = True, ep.held_total + 1
                ep.reason = f"{reason} (held: no other endpoint answered either)"
                return None
        if new is ep.health:
            return None
        transition = Transition(ep.address, ep.health, new, reason)
        ep.health, ep.changed_at = new, now
        self._classify(None)
        return transition

    def _alone(self, ep: Endpoint) -> bool:
        """No other endpoint answered since ``ep`` began failing (and there is another)."""
        since = ep.failing_since
        others = [o for o in self.endpoints.values() if o is not ep]
        return bool(others) and not any(
            o.answered_at is not None and since is not None and o.answered_at > since
            for o in others
        )

    def _classify(self, now: float | None) -> None:
        """Settle every endpoint's latency class against the best floor of its priority.

        ``now`` None: the endpoint set or a health state changed, which is no noise to
        wait out, so pending crossings are decided at once.
        """
        best: dict[int, tuple[bool, float]] = {}
        for ep in self.endpoints.values():
            if ep.recent:
                # The best healthy endpoint is the reference; without one, the best of all.
                key = (ep.health is not Health.HEALTHY, min(ep.recent))
                old = best.get(ep.priority)
                best[ep.priority] = key if old is None else min(old, key)
        for ep in self.endpoints.values():
            if ep.recent:
                _settle(ep, min(ep.recent), best[ep.priority][1], now)


def _add_figure(ep: Endpoint, seconds: float) -> None:
    """One more latency figure: into the average and the floor's memory."""
    ep.latency = (
        seconds
        if ep.latency is None
        else LATENCY_EWMA_ALPHA * seconds + (1 - LATENCY_EWMA_ALPHA) * ep.latency
    )
    ep.recent.append(seconds)
    del ep.recent[:-FLOOR_FIGURES]


def _settle(ep: Endpoint, latency: float, best: float, now: float | None) -> None:
    """The class state machine: a first or provisional decision is at once, later a
    crossing must hold."""
    if latency <= best or ep.slow is None or ep.provisional:
        # The best is equal by definition; a first decision is no crossing of a bound.
        ep.slow, ep.crossed_at = latency > best and _at_slow_bound(latency, best), None
        ep.provisional = len(ep.recent) < FIRST_DECISION_FIGURES
        return
    if ep.slow:
        across, hold = latency <= max(EQUAL_FACTOR * best, best + EQUAL_MARGIN), PROMOTE_HOLD
    else:
        across, hold = _at_slow_bound(latency, best), DEMOTE_HOLD
    if not across:
        ep.crossed_at = None
    elif now is None or (ep.crossed_at is not None and now - ep.crossed_at >= hold):
        ep.slow, ep.crossed_at = not ep.slow, None
    elif ep.crossed_at is None:
        ep.crossed_at = now


def _at_slow_bound(latency: float, best: float) -> bool:
    return latency >= max(SLOW_FACTOR * best, best + SLOW_MARGIN)


def _ignore_sign(_address: HostPort, _reason: str) -> None:
    """The sign handler of a pool nobody checks."""


def _preference(ep: Endpoint) -> tuple[bool, int, bool, float, int]:
    # A healthy endpoint whose last check failed is suspect: hysteresis keeps its
    # connections open, but new ones go elsewhere until it answers again. Unknown
    # latency counts as equal: at start-up the first server measured must not take all.
    slow = ep.slow is True
    return (ep.suspect, ep.priority, slow, (ep.floor or 0.0) if slow else 0.0, ep.active)


def _next_health(ep: Endpoint, healthy_threshold: int, unhealthy_threshold: int) -> Health:
    """Hysteresis: thresholds guard a known state; the first answer decides an unknown one."""
    if ep.health is Health.UNKNOWN:
        return Health.HEALTHY if ep.successes else Health.UNHEALTHY
    if ep.health is Health.HEALTHY and ep.failures >= unhealthy_threshold:
        return Health.UNHEALTHY
    if ep.health is Health.UNHEALTHY and ep.successes >= healthy_threshold:
        return Health.HEALTHY
    return ep.health


def specs_from(entries: Iterable[tuple[HostPort, int, str]]) -> dict[HostPort, EndpointSpec]:
    """Merge (address, priority, source) triples: best priority wins, sources add up."""
    merged: dict[HostPort, EndpointSpec] = {}
    for address, priority, source in entries:
        old = merged.get(address)
        if old is None:
            merged[address] = EndpointSpec(priority, frozenset({source}))
        else:
            merged[address] = EndpointSpec(min(old.priority, priority), old.sources | {source})
    return merged
