"""Pure tests for kubeprism.core.upstream: tables for the rules, hypothesis for the invariants."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kubeprism.base.net import HostPort
from kubeprism.core.endpoint import (
    FIRST_DECISION_FIGURES,
    LATENCY_EWMA_ALPHA,
    Endpoint,
    EndpointSpec,
    Evidence,
    Health,
    Transition,
)
from kubeprism.core.upstream import Pool, specs_from

H, U, Q = Health.HEALTHY, Health.UNHEALTHY, Health.UNKNOWN
LETTER = {"H": H, "U": U, "?": Q}


def addr(i: int) -> HostPort:
    """A distinct, stable test address."""
    return HostPort(f"10.0.0.{i}", 6443)


def spec(priority: int = 100, *sources: str) -> EndpointSpec:
    return EndpointSpec(priority, frozenset(sources or {"static"}))


def pool_of(
    n: int, healthy_threshold: int = 1, unhealthy_threshold: int = 2, seed: int = 0
) -> Pool:
    pool = Pool(healthy_threshold, unhealthy_threshold, random.Random(seed).random)
    pool.reconcile({addr(i): spec() for i in range(n)})
    return pool


def set_state(
    pool: Pool, i: int, *, priority: int, latency: float | None, active: int, health: Health
) -> None:
    """Put endpoint i straight into a state, as if probes and connections had happened.

    Its latency class is unknown until ``settle(pool)`` decides every class at once.
    """
    ep = pool.endpoints[addr(i)]
    ep.priority, ep.latency, ep.active, ep.health = priority, latency, active, health
    # As many figures of that latency as decide a first class.
    ep.recent = [] if latency is None else [latency] * FIRST_DECISION_FIGURES
    ep.slow = None


def settle(pool: Pool) -> None:
    """Decide the latency classes of a pool put together by ``set_state`` (a no-op reconcile)."""
    pool.reconcile({a: EndpointSpec(ep.priority, ep.sources) for a, ep in pool.endpoints.items()})


def preference(ep: Endpoint) -> tuple[int, bool, float, int]:
    """What orders endpoints of one health, written from the rule (suspects aside)."""
    slow = ep.slow is True
    return (ep.priority, slow, ep.latency or 0.0 if slow else 0.0, ep.active)


def order(pool: Pool) -> list[int]:
    """The candidate order as endpoint numbers."""
    return [int(ep.address.host.rsplit(".", 1)[1]) for ep in pool.candidates()]


# ---------------------------------------------------------------- health state machine


@pytest.mark.parametrize("thresholds", [(1, 1), (1, 2), (2, 3), (5, 5)])
@pytest.mark.parametrize(("ok", "expected"), [(True, H), (False, U)])
def test_first_answer_decides_unknown(
    thresholds: tuple[int, int], ok: bool, expected: Health
) -> None:
    pool = pool_of(1, *thresholds)
    assert pool.endpoints[addr(0)].health is Q
    transition = pool.record_probe(addr(0), ok, 0.001 if ok else None, "first", now=7.0)
    assert transition == Transition(addr(0), Q, expected, "first")
    assert pool.endpoints[addr(0)].health is expected
    assert pool.endpoints[addr(0)].changed_at == 7.0


# (healthy_threshold, unhealthy_threshold, probe results, health after each result)
HYSTERESIS = [
    (2, 3, "+", "H"),
    (2, 3, "-", "U"),
    (2, 3, "+-", "HH"),
    (2, 3, "+--", "HHH"),
    (2, 3, "+---", "HHHU"),
    (2, 3, "+--+---", "HHHHHHU"),
    (2, 3, "+-----", "HHHUUU"),
    (2, 3, "-+", "UU"),
    (2, 3, "-++", "UUH"),
    (2, 3, "-+-+", "UUUU"),
    (2, 3, "-+-++", "UUUUH"),
    (2, 3, "-++---+-++", "UUHHHUUUUH"),
    (1, 1, "+-+-", "HUHU"),
    (1, 2, "+-+--", "HHHHU"),
    (1, 2, "-+", "UH"),
    (3, 1, "-++-+++", "UUUUUUH"),
    (3, 1, "+-", "HU"),
    (4, 4, "+---+----", "HHHHHHHHU"),
]


@pytest.mark.parametrize(("ht", "ut", "results", "states"), HYSTERESIS)
def test_hysteresis_table(ht: int, ut: int, results: str, states: str) -> None:
    assert len(results) == len(states)
    pool = pool_of(1, ht, ut)
    before = Q
    for step, (result, letter) in enumerate(zip(results, states, strict=True)):
        reason = f"step {step}"
        t = pool.record_probe(addr(0), result == "+", 0.002, reason, now=float(step))
        after = pool.endpoints[addr(0)].health
        assert after is LETTER[letter], f"after {results[: step + 1]!r}"
        if after is before:
            assert t is None
        else:
            assert t == Transition(addr(0), before, after, reason)
            assert pool.endpoints[addr(0)].changed_at == float(step)
        before = after


def test_changed_at_only_moves_on_a_transition() -> None:
    pool = pool_of(1, 1, 3)
    pool.record_probe(addr(0), True, None, "ok", now=1.0)
    pool.record_probe(addr(0), True, None, "ok", now=2.0)
    pool.record_probe(addr(0), False, None, "refused", now=3.0)
    assert pool.endpoints[addr(0)].changed_at == 1.0


def test_reason_is_kept_on_every_result() -> None:
    pool = pool_of(1, 2, 3)
    for i, ok in enumerate([True, False, False, True, True]):
        reason = f"reason {i}"
        pool.record_probe(addr(0), ok, None, reason, now=i)
        assert pool.endpoints[addr(0)].reason == reason
    pool.record_dial(addr(0), False, "dial: connection refused", now=9)
    assert pool.endpoints[addr(0)].reason == "dial: connection refused"


def test_streak_counters_reset_on_the_other_outcome() -> None:
    pool = pool_of(1, 5, 5)
    ep = pool.endpoints[addr(0)]
    for _ in range(3):
        pool.record_probe(addr(0), True, None, "ok", now=0)
    assert (ep.successes, ep.failures, ep.probes) == (3, 0, 3)
    pool.record_probe(addr(0), False, None, "timeout", now=0)
    assert (ep.successes, ep.failures, ep.probes) == (0, 1, 4)


# (samples as (ok, latency), expected latency afterwards)
EWMA = [
    ([], None),
    ([(True, 0.01)], 0.01),
    ([(True, None)], None),
    ([(False, 0.5)], None),
    ([(True, 0.01), (True, 0.02)], LATENCY_EWMA_ALPHA * 0.02 + (1 - LATENCY_EWMA_ALPHA) * 0.01),
    ([(True, 0.01), (False, 5.0)], 0.01),
    ([(True, 0.01), (True, None)], 0.01),
    ([(True, 0.004)] * 10, 0.004),
]


@pytest.mark.parametrize(("samples", "expected"), EWMA)
def test_latency_ewma(samples: list[tuple[bool, float | None]], expected: float | None) -> None:
    pool = pool_of(1)
    for ok, latency in samples:
        pool.record_probe(addr(0), ok, latency, "x", now=0)
    assert pool.endpoints[addr(0)].latency == pytest.approx(expected)


@given(st.lists(st.floats(min_value=0, max_value=10), min_size=1, max_size=30))
@settings(max_examples=100, deadline=None)
def test_latency_ewma_stays_within_the_samples(samples: list[float]) -> None:
    pool = pool_of(1)
    for sample in samples:
        pool.record_probe(addr(0), True, sample, "ok", now=0)
    latency = pool.endpoints[addr(0)].latency
    assert latency is not None
    assert min(samples) - 1e-12 <= latency <= max(samples) + 1e-12


# ---------------------------------------------------------------- passive (dial) checks


@pytest.mark.parametrize("first", [None, True, False])
def test_dial_success_never_changes_health(first: bool | None) -> None:
    pool = pool_of(1, 1, 1)
    if first is not None:
        pool.record_probe(addr(0), first, None, "probe", now=0)
    ep = pool.endpoints[addr(0)]
    snapshot = (ep.health, ep.successes, ep.failures, ep.reason, ep.dial_failures_total)
    for _ in range(5):
        assert pool.record_dial(addr(0), True, "connected", now=1) is None
    assert (ep.health, ep.successes, ep.failures, ep.reason, ep.dial_failures_total) == snapshot


def test_dial_success_does_not_break_a_failure_streak() -> None:
    # TCP accepting says nothing about /readyz, so it must not rescue a failing endpoint.
    pool = pool_of(1, 1, 2)
    pool.record_probe(addr(0), True, None, "ok", now=0)
    pool.record_probe(addr(0), False, None, "500", now=1)
    pool.record_dial(addr(0), True, "connected", now=2)
    t = pool.record_probe(addr(0), False, None, "500", now=3)
    assert t == Transition(addr(0), H, U, "500")


def test_dial_failure_counts_like_a_failed_probe() -> None:
    pool = pool_of(1, 1, 2)
    pool.record_probe(addr(0), True, 0.001, "ok", now=0)
    ep = pool.endpoints[addr(0)]
    assert pool.record_probe(addr(0), False, None, "timeout", now=1) is None
    t = pool.record_dial(addr(0), False, "dial: connection refused", now=2)
    assert t == Transition(addr(0), H, U, "dial: connection refused")
    assert ep.dial_failures_total == 1
    assert ep.probes == 2  # a dial is not a probe
    assert ep.latency == 0.001  # and says nothing about latency
    pool.record_dial(addr(0), False, "dial: timeout", now=3)
    assert ep.dial_failures_total == 2
    assert ep.failures == 3


def test_dial_failure_decides_an_unknown_endpoint() -> None:
    pool = pool_of(1, 3, 3)
    t = pool.record_dial(addr(0), False, "dial: no route to host", now=5)
    assert t == Transition(addr(0), Q, U, "dial: no route to host")


@pytest.mark.parametrize(
    "call",
    [
        lambda p, a: p.record_probe(a, True, 0.001, "ok", now=0),
        lambda p, a: p.record_probe(a, False, None, "refused", now=0),
        lambda p, a: p.record_dial(a, True, "ok", now=0),
        lambda p, a: p.record_dial(a, False, "refused", now=0),
    ],
)
def test_results_for_unknown_or_removed_addresses_are_ignored(
    call: Callable[[Pool, HostPort], Transition | None],
) -> None:
    pool = pool_of(2)
    assert call(pool, addr(9)) is None
    removed = pool.reconcile({addr(0): spec()})
    assert [ep.address for ep in removed] == [addr(1)]
    assert call(pool, addr(1)) is None
    assert set(pool.endpoints) == {addr(0)}
    assert removed[0].health is Q and removed[0].probes == 0


# ---------------------------------------------------------------- connection counters


def test_opened_and_closed_counters() -> None:
    pool = pool_of(1)
    ep = pool.endpoints[addr(0)]
    pool.opened(addr(0))
    pool.opened(addr(0))
    assert (ep.active, ep.connections_total) == (2, 2)
    pool.closed(addr(0))
    assert (ep.active, ep.connections_total) == (1, 2)
    for _ in range(3):
        pool.closed(addr(0))
    assert (ep.active, ep.connections_total) == (0, 2)


def test_counters_for_unknown_addresses_are_ignored() -> None:
    pool = pool_of(1)
    pool.opened(addr(5))
    pool.closed(addr(5))
    assert set(pool.endpoints) == {addr(0)}
    assert pool.endpoints[addr(0)].active == 0


@given(st.lists(st.booleans(), max_size=50))
@settings(max_examples=100, deadline=None)
def test_active_never_negative(events: list[bool]) -> None:
    pool = pool_of(1)
    ep = pool.endpoints[addr(0)]
    model = 0
    for is_open in events:
        if is_open:
            pool.opened(addr(0))
            model += 1
        else:
            pool.closed(addr(0))
            model = max(0, model - 1)
        assert ep.active == model >= 0
    assert ep.connections_total == sum(events)


# ---------------------------------------------------------------- membership


def test_reconcile_adds_new_endpoints_as_unknown() -> None:
    pool = Pool()
    assert pool.reconcile({addr(1): spec(5, "dns"), addr(2): spec(7, "static")}) == []
    ep = pool.endpoints[addr(1)]
    assert (ep.health, ep.priority, ep.sources, ep.latency, ep.latency_class) == (
        Q,
        5,
        frozenset({"dns"}),
        None,
        "unknown",
    )
    assert ep.reason == "not checked yet"


def test_reconcile_keeps_what_was_learned_about_staying_endpoints() -> None:
    pool = pool_of(3)
    pool.record_probe(addr(0), True, 0.003, "ok", now=1)
    pool.record_dial(addr(1), False, "refused", now=1)
    pool.opened(addr(0))
    kept = pool.endpoints[addr(0)]
    removed = pool.reconcile(
        {addr(0): spec(1, "dns", "static"), addr(1): spec(), addr(3): spec(200, "k8s")}
    )
    assert [ep.address for ep in removed] == [addr(2)]
    assert pool.endpoints[addr(0)] is kept
    assert (kept.health, kept.latency, kept.active, kept.connections_total) == (H, 0.003, 1, 1)
    assert (kept.priority, kept.sources) == (1, frozenset({"dns", "static"}))
    assert pool.endpoints[addr(1)].health is U
    assert pool.endpoints[addr(1)].dial_failures_total == 1
    assert pool.endpoints[addr(3)].health is Q
    assert set(pool.endpoints) == {addr(0), addr(1), addr(3)}


def test_reconcile_returns_removed_endpoints_with_their_state() -> None:
    pool = pool_of(2)
    pool.record_probe(addr(1), True, 0.2, "ok", now=1)
    pool.opened(addr(1))
    removed = pool.reconcile({})
    assert {ep.address for ep in removed} == {addr(0), addr(1)}
    gone = next(ep for ep in removed if ep.address == addr(1))
    assert (gone.health, gone.active) == (H, 1)  # the caller may still drain its connections
    assert pool.endpoints == {}
    assert pool.reconcile({}) == []


@given(
    st.lists(st.sets(st.integers(0, 8)), min_size=1, max_size=6),
)
@settings(max_examples=100, deadline=None)
def test_reconcile_property(rounds: list[set[int]]) -> None:
    pool = Pool()
    current: set[int] = set()
    for wanted in rounds:
        before = dict(pool.endpoints)
        removed = pool.reconcile({addr(i): spec(i) for i in wanted})
        assert {ep.address for ep in removed} == {addr(i) for i in current - wanted}
        assert set(pool.endpoints) == {addr(i) for i in wanted}
        for i in wanted & current:
            assert pool.endpoints[addr(i)] is before[addr(i)]
        current = wanted


# ---------------------------------------------------------------- selection


def test_empty_pool() -> None:
    pool = Pool()
    assert pool.candidates() == []
    assert pool.panic
    assert pool.healthy_count == 0


# Each endpoint: (priority, latency, active, health letter); expected candidate order.
ORDERING = [
    pytest.param([(2, 0.001, 0, "H"), (1, 0.001, 0, "H")], [1, 0], id="priority"),
    pytest.param([(1, 0.5, 0, "H"), (1, 0.0005, 0, "H")], [1, 0], id="slow class"),
    pytest.param([(1, 0.002, 3, "H"), (1, 0.003, 1, "H")], [1, 0], id="active among equals"),
    pytest.param([(1, 0.010, 2, "H"), (1, 0.019, 1, "H")], [1, 0], id="within 2x: equal"),
    pytest.param([(1, 0.0001, 1, "H"), (1, 0.0009, 0, "H")], [1, 0], id="within margin"),
    pytest.param([(1, 0.5, 0, "H"), (2, 0.00001, 0, "H")], [0, 1], id="priority beats class"),
    pytest.param([(1, 0.002, 9, "H"), (1, 0.02, 0, "H")], [0, 1], id="class beats active"),
    pytest.param(
        [(1, 0.001, 5, "H"), (1, 0.1, 0, "H"), (1, 0.05, 0, "H")], [0, 2, 1], id="slow by latency"
    ),
    pytest.param([(1, None, 0, "H"), (1, 0.9, 5, "H")], [0, 1], id="unmeasured counts as equal"),
    pytest.param([(1, 0.001, 0, "U"), (9, 0.9, 9, "H")], [1, 0], id="healthy before unhealthy"),
    pytest.param([(1, 0.001, 0, "?"), (9, 0.9, 9, "H")], [1, 0], id="healthy before unknown"),
    pytest.param([(1, 0.001, 0, "U"), (9, None, 9, "?")], [1, 0], id="unknown before unhealthy"),
    pytest.param(
        [(1, None, 0, "U"), (2, None, 0, "?"), (3, 0.1, 0, "H"), (1, None, 0, "?")],
        [2, 3, 1, 0],
        id="mixed",
    ),
    pytest.param(
        [(3, 0.5, 0, "U"), (1, 0.5, 0, "U"), (1, 0.001, 2, "U"), (1, 0.001, 1, "U")],
        [3, 2, 1, 0],
        id="panic: unhealthy ordered by preference",
    ),
    pytest.param(
        [(2, None, 0, "?"), (1, None, 0, "?"), (1, None, 4, "?")],
        [1, 2, 0],
        id="panic at start: all unknown",
    ),
]


@pytest.mark.parametrize(("states", "expected"), ORDERING)
def test_candidate_order(
    states: list[tuple[int, float | None, int, str]], expected: list[int]
) -> None:
    pool = pool_of(len(states))
    for i, (priority, latency, active, letter) in enumerate(states):
        set_state(pool, i, priority=priority, latency=latency, active=active, health=LETTER[letter])
    settle(pool)
    for _ in range(3):  # no ties here, so the random tie-break must not change anything
        assert order(pool) == expected


def test_panic_returns_every_endpoint() -> None:
    pool = pool_of(3)
    for i in range(3):
        pool.record_probe(addr(i), False, None, "down", now=0)
    assert pool.panic and pool.healthy_count == 0
    assert sorted(order(pool)) == [0, 1, 2]
    pool.record_probe(addr(1), True, 0.001, "ok", now=1)
    assert not pool.panic and pool.healthy_count == 1
    assert order(pool)[0] == 1
    assert sorted(order(pool)) == [0, 1, 2]  # the unhealthy stay as a last resort


# (layout: one letter per endpoint in insertion order; "T" are the tied healthy ones,
#  "b" healthy but worse priority, "u" unhealthy, "?" unknown)
TIE_LAYOUTS = ["TT", "TTT", "TTb", "TbbbbbbbbT", "bTbbT", "uTuTuT?", "TbuT?T"]


@pytest.mark.parametrize("layout", TIE_LAYOUTS)
def test_random_tie_break_among_exact_ties_is_fair(layout: str) -> None:
    pool = pool_of(len(layout))
    for i, kind in enumerate(layout):
        health = {"T": H, "b": H, "u": U, "?": Q}[kind]
        set_state(pool, i, priority=2 if kind == "b" else 1, latency=0.002, active=0, health=health)
    settle(pool)
    tied = [i for i, kind in enumerate(layout) if kind == "T"]
    calls = 3000
    firsts = Counter(order(pool)[0] for _ in range(calls))
    assert set(firsts) == set(tied)
    for i in tied:  # binomial: 5 standard deviations either way
        share = calls / len(tied)
        assert abs(firsts[i] - share) < 5 * (share * (1 - 1 / len(tied))) ** 0.5, firsts


def test_random_tie_break_also_shares_the_last_resort() -> None:
    pool = pool_of(4)
    for i in range(4):
        set_state(pool, i, priority=1, latency=None, active=0, health=U if i < 2 else Q)
    seen = Counter(tuple(order(pool)) for _ in range(200))
    assert all(o[:2] in {(2, 3), (3, 2)} and o[2:] in {(0, 1), (1, 0)} for o in seen)
    assert len(seen) == 4  # every combination of the two tie-breaks occurs


def test_active_connections_spread_new_connections() -> None:
    # The proxy reports each connection it opens; the next pick then avoids that endpoint.
    pool = pool_of(3)
    for i in range(3):
        pool.record_probe(addr(i), True, 0.002, "ok", now=0)
    for _ in range(30):
        pool.opened(pool.candidates()[0].address)
    assert [pool.endpoints[addr(i)].active for i in range(3)] == [10, 10, 10]


# ---------------------------------------------------------------- specs_from


SPECS = [
    ([], {}),
    ([(addr(1), 100, "static")], {addr(1): EndpointSpec(100, frozenset({"static"}))}),
    (
        [(addr(1), 100, "static"), (addr(1), 10, "dns"), (addr(1), 50, "k8s")],
        {addr(1): EndpointSpec(10, frozenset({"static", "dns", "k8s"}))},
    ),
    (
        [(addr(1), 10, "dns"), (addr(1), 100, "static")],
        {addr(1): EndpointSpec(10, frozenset({"static", "dns"}))},
    ),
    (
        [(addr(1), 1, "dns"), (addr(2), 2, "dns"), (addr(1), 1, "dns")],
        {
            addr(1): EndpointSpec(1, frozenset({"dns"})),
            addr(2): EndpointSpec(2, frozenset({"dns"})),
        },
    ),
]


@pytest.mark.parametrize(("entries", "expected"), SPECS)
def test_specs_from(
    entries: list[tuple[HostPort, int, str]], expected: dict[HostPort, EndpointSpec]
) -> None:
    assert specs_from(entries) == expected
    assert specs_from(reversed(entries)) == expected  # order of sources does not matter


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 300), st.sampled_from("abc"))))
@settings(max_examples=100, deadline=None)
def test_specs_from_property(raw: list[tuple[int, int, str]]) -> None:
    merged = specs_from((addr(i), p, s) for i, p, s in raw)
    assert set(merged) == {addr(i) for i, _, _ in raw}
    for i in {i for i, _, _ in raw}:
        mine = [(p, s) for j, p, s in raw if j == i]
        assert merged[addr(i)] == EndpointSpec(
            min(p for p, _ in mine), frozenset(s for _, s in mine)
        )


# ---------------------------------------------------------------- selection properties

endpoint_states = st.tuples(
    st.integers(0, 3),  # priority
    st.sampled_from([None, 0.00001, 0.0001, 0.0005, 0.001, 0.05, 0.1, 2.0]),
    st.integers(0, 3),  # active
    st.sampled_from([H, U, Q]),
)


def _pool_from(states: list[tuple[int, float | None, int, Health]]) -> Pool:
    pool = pool_of(len(states))
    for i, (priority, latency, active, health) in enumerate(states):
        set_state(pool, i, priority=priority, latency=latency, active=active, health=health)
    settle(pool)
    return pool


@given(st.lists(endpoint_states, max_size=12), st.integers(0, 20))
@settings(max_examples=300, deadline=None)
def test_candidates_properties(
    states: list[tuple[int, float | None, int, Health]], warm: int
) -> None:
    pool = _pool_from(states)
    for _ in range(warm):
        pool.candidates()
    result = pool.candidates()
    # A permutation of all endpoints: nobody is dropped, not even in panic.
    assert sorted(map(id, result)) == sorted(map(id, pool.endpoints.values()))
    health = [ep.health for ep in result]
    n_healthy = health.count(H)
    assert health[:n_healthy] == [H] * n_healthy
    rest = health[n_healthy:]
    assert rest == sorted(rest, key=lambda h: h is U)  # unknown before unhealthy
    keys = [preference(ep) for ep in result[:n_healthy]]
    assert keys == sorted(keys)
    for a, b in zip(result[n_healthy:], result[n_healthy + 1 :], strict=False):
        if a.health is b.health:
            assert preference(a) <= preference(b)
    assert pool.panic == (n_healthy == 0)
    assert pool.healthy_count == n_healthy


@given(st.lists(endpoint_states, min_size=1, max_size=10))
@settings(max_examples=150, deadline=None)
def test_every_member_of_the_best_tie_group_leads(
    states: list[tuple[int, float | None, int, Health]],
) -> None:
    pool = _pool_from(states)
    first = pool.candidates()[0]
    best = [
        id(ep)
        for ep in pool.endpoints.values()
        if (ep.health, preference(ep)) == (first.health, preference(first))
    ]
    firsts = {id(pool.candidates()[0]) for _ in range(len(best) * 40)}
    assert firsts == set(best)  # each leads with chance 1/len: all lead in 40x as many draws


# ---------------------------------------------------------------- hysteresis model


class HysteresisModel:
    """Reference model written from the rules, not from the code."""

    def __init__(self, healthy_threshold: int, unhealthy_threshold: int) -> None:
        self.needed = {True: healthy_threshold, False: unhealthy_threshold}
        self.health = Q
        self.run_of: bool | None = None
        self.run = 0

    def feed(self, ok: bool) -> Health:
        self.run = self.run + 1 if ok == self.run_of else 1
        self.run_of = ok
        target = H if ok else U
        # The first answer decides; later, a change needs exactly `needed` in a row.
        if self.health is Q or (self.health is not target and self.run == self.needed[ok]):
            self.health = target
        return self.health


# Events: ("probe", ok) or ("dial", ok); a successful dial is a no-op for health.
events = st.lists(st.tuples(st.sampled_from(["probe", "dial"]), st.booleans()), max_size=60)


@given(st.integers(1, 4), st.integers(1, 4), events)
@settings(max_examples=300, deadline=None)
def test_health_matches_reference_model(ht: int, ut: int, script: list[tuple[str, bool]]) -> None:
    pool = pool_of(1, ht, ut)
    model = HysteresisModel(ht, ut)
    ep = pool.endpoints[addr(0)]
    dial_failures = 0
    for step, (kind, ok) in enumerate(script):
        before = ep.health
        if kind == "probe":
            t = pool.record_probe(addr(0), ok, 0.001, f"r{step}", now=step)
            expected = model.feed(ok)
        else:
            t = pool.record_dial(addr(0), ok, f"r{step}", now=step)
            dial_failures += not ok
            expected = model.health if ok else model.feed(False)
        assert ep.health is expected
        if expected is before:
            assert t is None
        else:
            assert t == Transition(addr(0), before, expected, f"r{step}")
    assert ep.dial_failures_total == dial_failures


@given(st.integers(1, 6), st.lists(st.booleans(), max_size=80))
@settings(max_examples=200, deadline=None)
def test_healthy_flips_only_after_exactly_threshold_failures(ut: int, results: list[bool]) -> None:
    pool = pool_of(1, 1, ut)
    pool.record_probe(addr(0), True, None, "ok", now=0)
    streak = 0
    for ok in results:
        was = pool.endpoints[addr(0)].health
        pool.record_probe(addr(0), ok, None, "x", now=0)
        now = pool.endpoints[addr(0)].health
        streak = 0 if ok else streak + 1
        if was is H:
            assert (now is U) == (streak == ut)
        else:  # healthy_threshold=1: one success brings it back, failures keep it down
            assert now is (H if ok else U)


# ---------------------------------------------------------------- stateful


class PoolMachine(RuleBasedStateMachine):
    """Random interleavings of everything the proxy, checker and discovery do."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = Pool(2, 2)
        self.opened: Counter[HostPort] = Counter()

    @rule(wanted=st.sets(st.integers(0, 5)), priority=st.integers(0, 2))
    def reconcile(self, wanted: set[int], priority: int) -> None:
        before = set(self.pool.endpoints)
        removed = self.pool.reconcile({addr(i): spec(priority) for i in wanted})
        assert {ep.address for ep in removed} == before - {addr(i) for i in wanted}

    @rule(i=st.integers(0, 5), ok=st.booleans(), latency=st.floats(0, 2))
    def probe(self, i: int, ok: bool, latency: float) -> None:
        t = self.pool.record_probe(addr(i), ok, latency, "probe", now=0)
        if addr(i) not in self.pool.endpoints:
            assert t is None
        if t is not None:
            assert t.old is not t.new and self.pool.endpoints[addr(i)].health is t.new

    @rule(i=st.integers(0, 5), ok=st.booleans())
    def dial(self, i: int, ok: bool) -> None:
        t = self.pool.record_dial(addr(i), ok, "dial", now=0)
        if ok:
            assert t is None

    @precondition(lambda self: bool(self.pool.endpoints))
    @rule()
    def connect(self) -> None:
        self.pool.opened(self.pool.candidates()[0].address)

    @rule(i=st.integers(0, 5))
    def disconnect(self, i: int) -> None:
        self.pool.closed(addr(i))

    @invariant()
    def candidates_are_a_permutation(self) -> None:
        result = self.pool.candidates()
        assert sorted(map(id, result)) == sorted(map(id, self.pool.endpoints.values()))
        healthy = [ep for ep in result if ep.health is H]
        assert result[: len(healthy)] == healthy

    @invariant()
    def counters_are_sane(self) -> None:
        for ep in self.pool.endpoints.values():
            assert 0 <= ep.active <= ep.connections_total
            assert ep.successes == 0 or ep.failures == 0


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_a_suspect_endpoint_gets_new_connections_only_after_clean_ones() -> None:
    pool = pool_of(3, unhealthy_threshold=3)
    for i in range(3):
        pool.record_probe(addr(i), True, 0.005, "ok", 0.0)
    pool.reconcile({addr(0): spec(0), addr(1): spec(100), addr(2): spec(100)})
    assert order(pool)[0] == 0  # best priority
    pool.record_probe(addr(0), False, None, "HTTP 500", 1.0)  # one failure: not enough to flip
    assert pool.endpoints[addr(0)].health is Health.HEALTHY
    assert pool.endpoints[addr(0)].suspect and pool.endpoints[addr(0)].in_doubt
    assert order(pool)[-1] == 0  # still healthy, but asked last
    pool.record_probe(addr(0), True, 0.005, "ok", 2.0)
    assert not pool.endpoints[addr(0)].suspect
    assert order(pool)[0] == 0


def test_in_doubt_covers_both_directions() -> None:
    pool = pool_of(1, healthy_threshold=2, unhealthy_threshold=2)
    ep = pool.endpoints[addr(0)]
    assert not ep.in_doubt  # unknown
    pool.record_probe(addr(0), False, None, "refused", 0.0)
    assert ep.health is Health.UNHEALTHY and not ep.in_doubt
    pool.record_probe(addr(0), True, 0.001, "ok", 1.0)
    assert ep.health is Health.UNHEALTHY and ep.in_doubt and not ep.suspect
    pool.record_probe(addr(0), True, 0.001, "ok", 2.0)
    assert ep.health is Health.HEALTHY and not ep.in_doubt


# ------------------------------------------------------------ passive signs


def test_signs_go_to_the_handler_for_known_endpoints_only() -> None:
    pool = pool_of(2)
    signs: list[tuple[HostPort, str]] = []
    pool.sign(addr(0), "ignored: nobody listens yet")  # the default handler drops it
    pool.on_sign = lambda a, why: signs.append((a, why))
    pool.sign(addr(1), "slow dial (0.60s)")
    pool.sign(addr(9), "not an endpoint")
    pool.record_dial(addr(0), False, "dial failed: connection refused", 1.0)
    pool.record_dial(addr(0), True, "ok", 2.0)  # a working dial is no sign
    assert signs == [(addr(1), "slow dial (0.60s)"), (addr(0), "dial failed: connection refused")]


def test_a_changed_endpoint_set_is_a_sign_for_the_endpoints_that_stay() -> None:
    pool = pool_of(3)
    signs: list[HostPort] = []
    pool.on_sign = lambda a, _why: signs.append(a)
    pool.reconcile({addr(i): spec() for i in range(3)})  # the same set: no sign
    assert signs == []
    pool.reconcile({addr(i): spec() for i in (0, 1)})
    assert signs == [addr(0), addr(1)]
    signs.clear()
    pool.reconcile({addr(i): spec() for i in (0, 1, 5)})
    assert signs == [addr(0), addr(1)]  # the new one gets its first check anyway


# ------------------------------------------------------------------ evidence (overload)


def healthy_pool(n: int) -> tuple[Pool, list[tuple[HostPort, str]]]:
    """n healthy endpoints (each answered at t=0); the passive signs the pool gives."""
    pool = pool_of(n)
    signs: list[tuple[HostPort, str]] = []
    pool.on_sign = lambda address, why: signs.append((address, why))
    for i in range(n):
        pool.record_probe(addr(i), True, None, "ok", now=0.0)
    return pool, signs


def test_correlated_timeouts_close_nothing() -> None:
    pool, _ = healthy_pool(3)
    transitions = [
        pool.record_probe(addr(i), False, None, "timed out", now=t, evidence=Evidence.TIMEOUT)
        for t in (1.0, 1.3, 1.6)
        for i in range(3)
    ]
    assert transitions == [None] * 9
    for ep in pool.endpoints.values():
        assert ep.health is H and ep.suspect and ep.late
        assert ep.held_total == 2  # the 2nd and 3rd timeouts would have tripped it
        assert "held: no other endpoint answered" in ep.reason
    assert pool.overloaded
    assert not pool.panic


def test_a_timeout_asks_the_other_endpoints_to_check_now_while_it_matters() -> None:
    pool, signs = healthy_pool(3)
    pool.record_probe(addr(0), False, None, "timed out", now=1.0, evidence=Evidence.TIMEOUT)
    assert sorted(a for a, _ in signs) == [addr(1), addr(2)]
    signs.clear()
    pool.record_probe(addr(1), True, None, "ok", now=1.1)  # the others answer: corroborated
    pool.record_probe(addr(0), False, None, "timed out", now=2.0, evidence=Evidence.TIMEOUT)
    assert pool.endpoints[addr(0)].health is U
    pool.record_probe(addr(0), False, None, "timed out", now=3.0, evidence=Evidence.TIMEOUT)
    assert signs == []  # neither a corroborated nor a down server's timeouts ask anyone


def test_an_unstalled_timeout_counts_once_another_endpoint_answered() -> None:
    pool, _ = healthy_pool(3)
    a = addr(0)
    assert pool.record_probe(a, False, None, "timed out", 1.0, Evidence.TIMEOUT) is None
    pool.record_probe(addr(1), True, None, "ok", now=1.1)  # the node can run checks
    t = pool.record_probe(a, False, None, "timed out", 1.4, Evidence.TIMEOUT)
    assert t == Transition(a, H, U, "timed out")
    assert not pool.endpoints[a].late


def test_an_answer_before_the_failures_began_does_not_count_as_corroboration() -> None:
    pool, _ = healthy_pool(2)
    a = addr(0)
    pool.record_probe(a, False, None, "timed out", 1.0, Evidence.TIMEOUT)
    assert pool.record_probe(a, False, None, "timed out", 1.3, Evidence.TIMEOUT) is None
    assert pool.endpoints[a].held_total == 1


def test_a_server_side_failure_during_correlated_timeouts_still_counts() -> None:
    pool, _ = healthy_pool(3)
    a = addr(0)
    for i in range(3):
        pool.record_probe(addr(i), False, None, "timed out", 1.0, Evidence.TIMEOUT)
    t = pool.record_probe(a, False, None, "HTTP 500 from /readyz", 1.3)  # an answer
    assert t == Transition(a, H, U, "HTTP 500 from /readyz")


def test_a_single_endpoint_counts_its_timeouts() -> None:
    pool, _ = healthy_pool(1)
    a = addr(0)
    pool.record_probe(a, False, None, "timed out", 1.0, Evidence.TIMEOUT)
    assert pool.record_probe(a, False, None, "timed out", 1.3, Evidence.TIMEOUT) == Transition(
        a, H, U, "timed out"
    )


def test_timed_out_dials_are_held_like_timed_out_checks() -> None:
    pool, _ = healthy_pool(2)
    a = addr(0)
    for now in (1.0, 1.2, 1.4):
        assert pool.record_dial(a, False, "dial timed out", now, Evidence.TIMEOUT) is None
    assert pool.endpoints[a].held_total == 2
    assert pool.record_dial(a, False, "dial failed: connection refused", 1.5) == Transition(
        a, H, U, "dial failed: connection refused"
    )


def test_an_inconclusive_check_changes_no_health_and_is_counted() -> None:
    pool, _ = healthy_pool(2)
    a = addr(0)
    pool.record_inconclusive(a, "no verdict")
    ep = pool.endpoints[a]
    assert (ep.health, ep.failures, ep.inconclusive_total, ep.late) == (H, 0, 1, True)
    assert not ep.suspect and pool.overloaded
    pool.record_probe(a, True, None, "ok", now=2.0)
    assert not ep.late and not pool.overloaded
    pool.record_inconclusive(addr(9), "gone")  # a removed endpoint: nothing to count


def test_an_inconclusive_first_check_leaves_the_endpoint_unknown_with_the_reason() -> None:
    pool = pool_of(1)
    pool.record_inconclusive(addr(0), "no verdict: kubeprism could hardly run")
    ep = pool.endpoints[addr(0)]
    assert (ep.health, ep.reason) == (Q, "no verdict: kubeprism could hardly run")
