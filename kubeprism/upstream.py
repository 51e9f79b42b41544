"""Pure upstream state and selection: no sockets, no clock, no event loop.

The proxy asks :meth:`Pool.candidates` for the order in which to dial, and
reports what happened (``record_dial``, ``opened``/``closed``); the health
checker reports probe results (``record_probe``). Every health change comes
back as a :class:`Transition` so the caller can log it and act on it (close
connections). Callers pass ``now`` so tests need no clock.
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from kubeprism.net import HostPort

# Latency tier upper bounds in seconds (<0.1 ms, <1 ms, <10 ms, <100 ms, <1 s, >=1 s):
# decades separate "same host", "same rack", "same DC", "another DC", "struggling".
TIER_BOUNDS = (0.0001, 0.001, 0.01, 0.1, 1.0)
# Tier for an endpoint whose latency is not known yet: after every measured tier.
UNKNOWN_TIER = len(TIER_BOUNDS) + 1
# Weight of the newest sample in the latency average: smooths one slow probe without
# hiding a real, lasting change for more than a few intervals.
LATENCY_EWMA_ALPHA = 0.3


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
    latency: float | None = None
    active: int = 0
    connections_total: int = 0
    dial_failures_total: int = 0
    changed_at: float | None = None
    probes: int = field(default=0)

    @property
    def suspect(self) -> bool:
        """Healthy, but the last check or dial failed (not yet enough to flip)."""
        return self.health is Health.HEALTHY and self.failures > 0

    @property
    def in_doubt(self) -> bool:
        """Between states: recent results disagree with the current state."""
        if self.health is Health.HEALTHY:
            return self.failures > 0
        return self.health is Health.UNHEALTHY and self.successes > 0

    @property
    def tier(self) -> int:
        """Latency tier, 0 (fastest) .. len(TIER_BOUNDS); UNKNOWN_TIER if unmeasured."""
        if self.latency is None:
            return UNKNOWN_TIER
        return bisect.bisect_right(TIER_BOUNDS, self.latency)


class Pool:
    """The set of endpoints, their health with hysteresis, and the selection policy."""

    def __init__(self, healthy_threshold: int = 1, unhealthy_threshold: int = 2) -> None:
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self.endpoints: dict[HostPort, Endpoint] = {}
        self._rotation = 0

    # ------------------------------------------------------------ membership

    def reconcile(self, desired: Mapping[HostPort, EndpointSpec]) -> list[Endpoint]:
        """Make the endpoint set equal to ``desired``; return the removed endpoints.

        Endpoints that stay keep their health, latency and counters: a new
        discovery result must not throw away what the checks learned.
        """
        removed = [ep for addr, ep in self.endpoints.items() if addr not in desired]
        for ep in removed:
            del self.endpoints[ep.address]
        for addr, spec in desired.items():
            kept = self.endpoints.get(addr)
            if kept is None:
                self.endpoints[addr] = Endpoint(addr, spec.priority, spec.sources)
            else:
                kept.priority, kept.sources = spec.priority, spec.sources
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
        the others), by priority, latency tier, then fewest active connections,
        rotating among exact ties so they share the load. The
        others follow as a last resort, so a client is refused only when no
        endpoint accepts. With none healthy (panic), all of them are ordered
        the same way: a broken checker must not be worse than no checker.
        """
        if len(self.endpoints) == 1:  # the common single-VIP setup: nothing to order
            return list(self.endpoints.values())
        self._rotation += 1
        eps = self.endpoints.values()
        healthy = [ep for ep in eps if ep.health is Health.HEALTHY]
        rest = [ep for ep in eps if ep.health is not Health.HEALTHY]
        return _rotate_ties(healthy, _preference, self._rotation) + _rotate_ties(
            rest, _last_resort, self._rotation
        )

    # ------------------------------------------------------------ observations

    def record_probe(
        self, address: HostPort, ok: bool, latency: float | None, reason: str, now: float
    ) -> Transition | None:
        """Feed one active-check result; return the health change it caused, if any."""
        ep = self.endpoints.get(address)
        if ep is None:  # removed while the probe was in flight
            return None
        ep.probes += 1
        if ok and latency is not None:
            ep.latency = (
                latency
                if ep.latency is None
                else LATENCY_EWMA_ALPHA * latency + (1 - LATENCY_EWMA_ALPHA) * ep.latency
            )
        return self._observe(ep, ok, reason, now)

    def record_dial(
        self, address: HostPort, ok: bool, reason: str, now: float
    ) -> Transition | None:
        """Feed the outcome of a real dial (passive check).

        A failed dial counts like a failed probe. A successful one changes no
        health: TCP accepting says nothing about /readyz.
        """
        ep = self.endpoints.get(address)
        if ep is None:
            return None
        if ok:
            return None
        ep.dial_failures_total += 1
        return self._observe(ep, False, reason, now)

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

    def _observe(self, ep: Endpoint, ok: bool, reason: str, now: float) -> Transition | None:
        if ok:
            ep.successes, ep.failures = ep.successes + 1, 0
        else:
            ep.successes, ep.failures = 0, ep.failures + 1
        ep.reason = reason
        new = _next_health(ep, self.healthy_threshold, self.unhealthy_threshold)
        if new is ep.health:
            return None
        transition = Transition(ep.address, ep.health, new, reason)
        ep.health, ep.changed_at = new, now
        return transition


def _preference(ep: Endpoint) -> tuple[bool, int, int, int]:
    # A healthy endpoint whose last check failed is suspect: hysteresis keeps its
    # connections open, but new ones go elsewhere until it answers again.
    return (ep.suspect, ep.priority, ep.tier, ep.active)


def _last_resort(ep: Endpoint) -> tuple[bool, bool, int, int, int]:
    # Unknown before unhealthy: an unchecked endpoint has not failed yet.
    return (ep.health is Health.UNHEALTHY, *_preference(ep))


def _rotate_ties(
    eps: list[Endpoint], key: Callable[[Endpoint], tuple[int, ...]], turn: int
) -> list[Endpoint]:
    """Sort by key; rotate each group of exact ties by ``turn`` so every member leads in turn.

    Rotating the whole list instead would favour a tied endpoint in proportion to the
    number of non-tied endpoints listed before it.
    """
    ordered: list[Endpoint] = []
    for _, group in itertools.groupby(sorted(eps, key=key), key=key):
        tied = list(group)
        start = turn % len(tied)
        ordered += tied[start:] + tied[:start]
    return ordered


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
