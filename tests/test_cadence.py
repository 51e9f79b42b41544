"""cadence.py: when an endpoint is checked next, as tables (no clock, no loop)."""

from __future__ import annotations

import pytest

from kubeprism.base.net import HostPort
from kubeprism.core.cadence import JITTER, Cadence, Intervals
from kubeprism.core.endpoint import Endpoint, Health

IV = Intervals(ready=5.0, fast=0.25, unhealthy=1.0)
A = HostPort("10.0.0.1", 6443)


def endpoint(health: Health, successes: int = 0, failures: int = 0) -> Endpoint:
    """An endpoint in the given state, as the pool leaves it after recording a result."""
    ep = Endpoint(A, 100, frozenset({"static"}), health=health)
    ep.successes, ep.failures = successes, failures
    return ep


HEALTHY = endpoint(Health.HEALTHY, successes=1)
SUSPECT = endpoint(Health.HEALTHY, failures=1)
DOWN = endpoint(Health.UNHEALTHY, failures=3)
RECOVERING = endpoint(Health.UNHEALTHY, successes=1)


def gaps(cadence: Cadence, eps: list[Endpoint], rand: float = 0.0) -> list[float]:
    """The waits after checks that each took no time."""
    return [cadence.after_check(10.0, 10.0, ep, False, rand) for ep in eps]


@pytest.mark.parametrize("rand", [0.0, 0.3, 0.999])
def test_the_first_slow_wait_is_a_random_phase_then_the_interval_plus_jitter(rand: float) -> None:
    cadence = Cadence(IV)
    first, second, third = gaps(cadence, [HEALTHY] * 3, rand)
    assert first == pytest.approx(max(IV.fast, IV.ready * rand))
    assert second == third == pytest.approx(IV.ready * (1 + JITTER * rand))


def test_a_first_latency_figure_is_confirmed_a_fast_interval_later_then_the_phase() -> None:
    one_figure = endpoint(Health.HEALTHY, successes=1)
    one_figure.recent, one_figure.slow, one_figure.provisional = [0.03], False, True
    two_figures = endpoint(Health.HEALTHY, successes=2)
    two_figures.recent, two_figures.slow = [0.03, 0.002], False
    cadence = Cadence(IV)
    assert gaps(cadence, [one_figure, two_figures, two_figures], 0.5) == pytest.approx(
        [IV.fast, IV.ready * 0.5, IV.ready * (1 + JITTER * 0.5)]
    )


def test_phases_spread_over_the_whole_interval() -> None:
    firsts = [gaps(Cadence(IV), [HEALTHY], r / 100)[0] for r in range(100)]
    assert min(firsts) == IV.fast  # never two checks back to back
    assert max(firsts) > 0.95 * IV.ready
    assert len(set(firsts)) > 90


def test_jitter_only_stretches_so_the_mean_rate_stays_under_one_per_interval() -> None:
    cadence = Cadence(IV, phased=True)
    waits = [gaps(cadence, [HEALTHY], r / 100)[0] for r in range(100)]
    assert min(waits) == IV.ready
    assert max(waits) <= IV.ready * (1 + JITTER)


def test_the_wait_counts_from_the_start_of_the_check() -> None:
    cadence = Cadence(IV, phased=True)
    assert cadence.after_check(10.0, 10.3, HEALTHY, False, 0.0) == pytest.approx(IV.ready - 0.3)
    # A check slower than the gap is followed at once by the next one.
    assert cadence.after_check(10.0, 20.0, SUSPECT, False, 0.0) == 0.0


def test_speed_up_while_in_doubt_and_back_once_settled() -> None:
    cadence = Cadence(IV, phased=True)
    # healthy | suspect | suspect (then down) ... | recovering | back | steady
    waits = gaps(cadence, [HEALTHY, SUSPECT, RECOVERING, HEALTHY, HEALTHY])
    assert waits == [IV.ready, IV.fast, IV.fast, IV.ready, IV.ready]


def test_a_down_endpoint_is_checked_with_backoff_up_to_the_unhealthy_interval() -> None:
    cadence = Cadence(IV, phased=True)
    waits = gaps(cadence, [DOWN] * 6)
    assert waits == [0.25, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert cadence.down_streak == 2  # stops counting at the cap
    # Any other state restarts the backoff.
    assert gaps(cadence, [SUSPECT, DOWN]) == [IV.fast, 0.25]
    assert gaps(cadence, [HEALTHY, DOWN]) == [IV.ready, 0.25]


def test_down_waits_are_jittered_too() -> None:
    cadence = Cadence(IV, down_streak=5)
    assert gaps(cadence, [DOWN], rand=0.5) == [pytest.approx(IV.unhealthy * (1 + JITTER / 2))]


@pytest.mark.parametrize(("ep", "local"), [(None, False), (HEALTHY, True)])
def test_no_verdict_waits_the_unhealthy_interval(ep: Endpoint | None, local: bool) -> None:
    cadence = Cadence(IV)
    assert cadence.after_check(10.0, 10.0, ep, local, 0.0) == IV.unhealthy
    assert not cadence.phased  # the phase is taken by the first real verdict


def test_a_sign_asks_for_a_check_one_fast_interval_after_the_last() -> None:
    cadence = Cadence(IV)
    assert cadence.wait_for_sign(0.0) is None
    assert cadence.on_sign(3.0) == 0.0  # never checked: at once
    gaps(cadence, [HEALTHY])  # a check started at 10.0
    assert cadence.wait_for_sign(10.0) is None  # the check answered the sign
    assert cadence.on_sign(10.1) == pytest.approx(0.15)
    assert cadence.on_sign(10.2) == pytest.approx(0.05)  # the earlier due time holds
    assert cadence.wait_for_sign(10.2) == pytest.approx(0.05)
    assert cadence.on_sign(11.0) == 0.0  # long past: at once
    assert cadence.wait_for_sign(12.0) == 0.0


def test_an_urgent_sign_asks_for_a_check_at_once() -> None:
    cadence = Cadence(IV)
    gaps(cadence, [HEALTHY])
    assert cadence.on_sign(10.01, urgent=True) == 0.0
    assert cadence.wait_for_sign(10.01) == 0.0
