"""When to check an endpoint next: the pure scheduling core of the health checker.

No clock, no event loop, no randomness of its own: the checker passes ``now`` and a
random number in [0, 1), so every rule here is a table test. Three paces:

- *slow* (``interval``, 5 s by default) while an endpoint is healthy and nothing looks
  wrong; the first slow wait after start-up is a random fraction of it, so a fleet
  restarted together does not check in lockstep;
- *fast* (``fastInterval``, 250 ms) while results disagree with the current state, once
  after an endpoint's first latency figure (its class is provisional until a second), and
  right after a passive sign (a failed or slow dial, a reset or stalled forwarded
  connection, a lost health connection, a changed endpoint set);
- *backing off* while an endpoint is down: from ``fastInterval`` doubling up to
  ``unhealthyInterval`` (1 s), so a server that comes back is in use again within ~1 s
  while a fleet does not hammer one that stays down.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubeprism.core.endpoint import Endpoint, Health

# Waits only ever grow by up to this fraction: thousands of nodes drift apart instead of
# checking in step, and the mean slow rate stays below 1/interval (the cost budget).
JITTER = 0.1


@dataclass(frozen=True, slots=True)
class Intervals:
    """The three paces, in seconds."""

    ready: float
    fast: float
    unhealthy: float


@dataclass(slots=True)
class Cadence:
    """One endpoint's schedule; the checker asks it how long to wait."""

    intervals: Intervals
    phased: bool = False  # the random phase has been taken
    down_streak: int = 0  # failed checks in a row while down: the backoff exponent
    due: float | None = None  # a passive sign asked for a check by this time
    last_start: float | None = None

    def after_check(
        self,
        started: float,
        now: float,
        ep: Endpoint | None,
        local: bool,
        rand: float,
        inconclusive: bool = False,
    ) -> float:
        """Seconds to wait after a check that started at ``started`` and ended at ``now``.

        ``ep`` is the endpoint after the result was recorded (None once removed); ``local``
        says the check could not run for a reason of this host (out of fds, ...);
        ``inconclusive`` that it ran out of time while this process was kept from running:
        that check is repeated at once (it already waited up to ten timeouts).
        """
        self.due = None
        self.last_start = started
        if inconclusive and ep is not None:
            return 0.0
        gap = self._gap(ep, local, rand)
        return max(0.0, started + gap - now)

    def _gap(self, ep: Endpoint | None, local: bool, rand: float) -> float:
        iv = self.intervals
        if ep is None or local:
            # No verdict to act on: neither hurry nor go quiet for a whole slow interval.
            return iv.unhealthy * (1 + JITTER * rand)
        if ep.in_doubt:
            self.down_streak = 0
            return iv.fast
        if ep.health is Health.UNHEALTHY:
            gap = min(iv.unhealthy, iv.fast * 2.0**self.down_streak)
            if gap < iv.unhealthy:  # stop counting at the cap (and never overflow)
                self.down_streak += 1
            return gap * (1 + JITTER * rand)
        self.down_streak = 0
        if ep.provisional:
            # A second figure soon: a class on one figure is provisional, and the first
            # one is often inflated (concurrent TLS handshakes of the first pass).
            return iv.fast
        if not self.phased:
            self.phased = True
            # At least one fast interval, so the phase never means two checks back to back.
            return max(iv.fast, iv.ready * rand)
        return iv.ready * (1 + JITTER * rand)

    def on_sign(self, now: float, urgent: bool = False) -> float:
        """A passive sign: seconds from ``now`` until the next check should start.

        Urgent signs (the health connection was lost) check at once; the others keep one
        fast interval after the last check, so a burst of signs costs one check per
        fast interval, not one per sign.
        """
        due = now if urgent or self.last_start is None else self.last_start + self.intervals.fast
        self.due = due if self.due is None else min(self.due, due)
        return max(0.0, self.due - now)

    def wait_for_sign(self, now: float) -> float | None:
        """Seconds from ``now`` until a check asked for by a sign is due; None: none asked."""
        return None if self.due is None else max(0.0, self.due - now)
