"""An endpoint as the pure core knows it: health, evidence, and its latency class.

No sockets, no clock, no event loop (the pool in upstream.py passes ``now``). The latency
class state machine lives here beside the fields it decides.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from kubeprism.base.net import HostPort

# Weight of the newest sample in the latency average: smooths one slow probe without
# hiding a real, lasting change for more than a few intervals.
LATENCY_EWMA_ALPHA: Final = 0.3
# Latency classes are relative to the best endpoint of the same priority, never fixed
# bounds: with fixed bounds (the old decades) 0.9 ms and 1.1 ms landed in different
# classes and every node sent everything to one server. An endpoint is *equal* while
# within EQUAL_FACTOR (or EQUAL_MARGIN) of the best and *slow* once at SLOW_FACTOR (and
# SLOW_MARGIN) or more; in between it keeps its class. The band (1.5x wide) is as wide as
# a +-20 % swing end to end, so jitter alone cannot carry an endpoint across both bounds.
EQUAL_FACTOR: Final = 2.0
SLOW_FACTOR: Final = 3.0
# Below a millisecond a factor is probe noise (scheduling, TLS CPU), not distance; and a few
# milliseconds of a busy API server's answer must not put it in the slow class, where it gets
# no new connections (fault 3 showed every request herded onto one server by 2-5 ms of noise).
EQUAL_MARGIN: Final = 0.001
SLOW_MARGIN: Final = 0.010
# Classes are judged on an endpoint's *floor*, the lowest of its last FLOOR_FIGURES
# figures, not on the average: noise (a busy server or node, the first pass's concurrent
# TLS handshakes) only ever adds latency, while distance is in every figure. Measured in the
# fault suite under CPU load, three identical servers' first figures were 1.5-30 ms and
# the average put one of them in the slow class for the whole scenario.
FLOOR_FIGURES: Final = 3
# A class decided on fewer figures is provisional: it orders new connections at once (a far
# server gets none even right after start-up) but is decided afresh at every turn, with no
# hold, until this many figures confirm it (the checker takes the second one a fast
# interval after the first): one inflated figure costs a server ~250 ms, not a hold.
FIRST_DECISION_FIGURES: Final = 2
# How long latency must stay across a bound before the class changes. Demotion is quick
# (a slower server should stop taking new connections soon); promotion must prove itself.
DEMOTE_HOLD: Final = 3.0
PROMOTE_HOLD: Final = 10.0
# Staggered dials: wait this many latencies for a connect before trying the next
# endpoint too; within [MIN, MAX] (RFC 8305 uses 250 ms when nothing is known). A lost SYN
# costs a whole second (the initial RTO), so a connect late by a few RTTs is not coming.
ATTEMPT_DELAY_FACTOR: Final = 4.0
ATTEMPT_DELAY_MIN: Final = 0.05
ATTEMPT_DELAY_MAX: Final = 0.25


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


def add_figure(ep: Endpoint, seconds: float) -> None:
    """One more latency figure: into the average and the floor's memory."""
    ep.latency = (
        seconds
        if ep.latency is None
        else LATENCY_EWMA_ALPHA * seconds + (1 - LATENCY_EWMA_ALPHA) * ep.latency
    )
    ep.recent.append(seconds)
    del ep.recent[:-FLOOR_FIGURES]


def settle(ep: Endpoint, latency: float, best: float, now: float | None) -> None:
    """The class state machine: a first or provisional decision is at once, later a
    crossing must hold."""
    if latency <= best or ep.slow is None or ep.provisional:
        # The best is equal by definition; a first decision is no crossing of a bound.
        ep.slow, ep.crossed_at = latency > best and at_slow_bound(latency, best), None
        ep.provisional = len(ep.recent) < FIRST_DECISION_FIGURES
        return
    if ep.slow:
        across, hold = latency <= max(EQUAL_FACTOR * best, best + EQUAL_MARGIN), PROMOTE_HOLD
    else:
        across, hold = at_slow_bound(latency, best), DEMOTE_HOLD
    if not across:
        ep.crossed_at = None
    elif now is None or (ep.crossed_at is not None and now - ep.crossed_at >= hold):
        ep.slow, ep.crossed_at = not ep.slow, None
    elif ep.crossed_at is None:
        ep.crossed_at = now


def at_slow_bound(latency: float, best: float) -> bool:
    """At or past the bound where an endpoint becomes slow."""
    return latency >= max(SLOW_FACTOR * best, best + SLOW_MARGIN)
