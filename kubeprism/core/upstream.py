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

import random
from collections.abc import Callable, Iterable, Mapping

from kubeprism.base.net import HostPort
from kubeprism.core.endpoint import (
    Endpoint,
    EndpointSpec,
    Evidence,
    Health,
    Transition,
    add_figure,
    settle,
)


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
            add_figure(ep, latency)
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
            add_figure(ep, seconds)
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
                settle(ep, min(ep.recent), best[ep.priority][1], now)


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
