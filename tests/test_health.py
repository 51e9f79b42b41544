"""health/checker.py: HealthChecker with a fake clock, wait and probe; describe_error.

The checker tests never touch the network: a scripted probe answers from a per-endpoint
queue (an empty queue is a probe that hangs), the clock only moves when a scripted probe
says it took time, and the wait records the delay it was asked for and just yields (or
reports a wake-up when a sign arrived). The real probes are tested in test_healthconn.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import random
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from util import eventually

from kubeprism.base import supervise
from kubeprism.base.net import HostPort
from kubeprism.core.cadence import JITTER, Cadence, Intervals
from kubeprism.core.endpoint import EndpointSpec, Evidence, Health, Transition
from kubeprism.core.upstream import Pool
from kubeprism.health.checker import (
    HEALTH_TASK,
    MAX_REASON,
    HealthChecker,
    ProbeResult,
    describe_error,
    is_local_error,
    wait_or_wake,
)

A = HostPort("10.0.0.1", 6443)
B = HostPort("10.0.0.2", 6443)
C = HostPort("10.0.0.3", 6443)
INTERVAL, FAST, DOWN = 10.0, 0.5, 2.0
IV = Intervals(INTERVAL, FAST, DOWN)
# Most checker tests are about health and pace: their good answers carry no latency figure,
# which would add the class-confirming check (MEASURED, test_a_first_figure_is_confirmed_...).
OK = ProbeResult(True, None, "ok")
MEASURED = ProbeResult(True, 0.002, "ok")


def fail(reason: str = "HTTP 500 from /readyz") -> ProbeResult:
    """A failed probe with the given reason."""
    return ProbeResult(False, None, reason)


# ---------------------------------------------------------------------------------------------
# Fakes


class FakeClock:
    """Monotonic time that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Step:
    """One scripted probe: its result (or the exception it raises) and how long it takes."""

    outcome: ProbeResult | Exception
    duration: float = 0.0


class ScriptedProbe:
    """Answers each endpoint's probes from its own queue; an empty queue hangs the probe."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.queues: dict[HostPort, asyncio.Queue[Step]] = collections.defaultdict(asyncio.Queue)
        self.calls: collections.Counter[HostPort] = collections.Counter()
        self.inflight: collections.Counter[HostPort] = collections.Counter()

    def push(self, address: HostPort, *steps: Step | ProbeResult | Exception) -> None:
        """Script the next outcomes for ``address``."""
        for step in steps:
            self.queues[address].put_nowait(step if isinstance(step, Step) else Step(step))

    def forget(self, address: HostPort) -> None:
        """Nothing kept per endpoint."""

    async def close(self) -> None:
        """Nothing to release."""

    async def __call__(self, address: HostPort) -> ProbeResult:
        self.calls[address] += 1
        self.inflight[address] += 1
        try:
            step = await self.queues[address].get()
        finally:
            self.inflight[address] -= 1
        self.clock.now += step.duration
        if isinstance(step.outcome, Exception):
            raise step.outcome
        return step.outcome


class RecordingWait:
    """Records each requested delay under the calling task's name, then yields; returns
    True (woken) when the event was set meanwhile. Waits longer than ``hold`` last until
    the event wakes them (a slow wait that only a sign ends)."""

    def __init__(self) -> None:
        self.delays: dict[str, list[float]] = collections.defaultdict(list)
        self.hold = float("inf")

    async def __call__(self, event: asyncio.Event, delay: float) -> bool:
        task = asyncio.current_task()
        assert task is not None
        self.delays[task.get_name()].append(delay)
        if delay > self.hold:
            await event.wait()
        await asyncio.sleep(0)
        return event.is_set()


@dataclass
class Harness:
    """A checker wired to fakes, plus everything it reported."""

    pool: Pool
    clock: FakeClock
    probe: ScriptedProbe
    sleep: RecordingWait
    checker: HealthChecker
    transitions: list[Transition]
    observed: list[tuple[HostPort, float, bool]]


def specs(*addresses: HostPort) -> dict[HostPort, EndpointSpec]:
    """Discovery output for ``addresses``, all with the same priority."""
    return {a: EndpointSpec(100, frozenset({"static"})) for a in addresses}


def health_tasks() -> dict[str, asyncio.Task[object]]:
    """Live probe-loop tasks by name."""
    return {
        t.get_name(): t
        for t in asyncio.all_tasks()
        if t.get_name().startswith("health ") and not t.done()
    }


@contextlib.asynccontextmanager
async def harness(
    *addresses: HostPort,
    rand: float | random.Random = 0.5,
    healthy_threshold: int = 1,
    unhealthy_threshold: int = 2,
) -> AsyncIterator[Harness]:
    """A synced checker over ``addresses``; stopped (and checked for leftovers) on exit."""
    pool = Pool(healthy_threshold, unhealthy_threshold)
    pool.reconcile(specs(*addresses))
    clock = FakeClock()
    probe = ScriptedProbe(clock)
    sleep = RecordingWait()
    transitions: list[Transition] = []
    observed: list[tuple[HostPort, float, bool]] = []
    checker = HealthChecker(
        pool,
        probe,
        IV,
        transitions.append,
        observe=lambda a, s, ok: observed.append((a, s, ok)),
        clock=clock,
        wait=sleep,
        rand=rand.random if isinstance(rand, random.Random) else lambda: rand,
    )
    checker.sync()
    try:
        yield Harness(pool, clock, probe, sleep, checker, transitions, observed)
    finally:
        await checker.stop()
    assert health_tasks() == {}


# ---------------------------------------------------------------------------------------------
# HealthChecker


async def test_each_endpoint_has_its_own_loop_and_a_hanging_probe_delays_no_other() -> None:
    async with harness(A, B, C) as h:
        assert set(health_tasks()) == {f"health {a}" for a in (A, B, C)}
        h.probe.push(B, OK, OK, OK)
        h.probe.push(C, fail(), fail(), fail())
        await eventually(lambda: h.pool.endpoints[B].probes == h.pool.endpoints[C].probes == 3)
        assert h.pool.endpoints[B].health is Health.HEALTHY
        assert h.pool.endpoints[C].health is Health.UNHEALTHY
        # A's only probe is still in flight and nothing was recorded for it.
        assert (h.probe.calls[A], h.probe.inflight[A]) == (1, 1)
        assert h.pool.endpoints[A].probes == 0
        assert h.pool.endpoints[A].health is Health.UNKNOWN


async def test_first_pass_waits_for_every_endpoint_and_times_out_false() -> None:
    async with harness(A, B) as h:
        waiter = asyncio.create_task(h.checker.first_pass(timeout=30), name="first pass")
        h.probe.push(B, OK)
        await eventually(lambda: h.pool.endpoints[B].probes == 1)
        assert not waiter.done()
        assert await h.checker.first_pass(timeout=0.05) is False  # A still hangs
        h.probe.push(A, fail())  # a failed first probe still completes the pass
        assert await asyncio.wait_for(waiter, 5) is True
        assert await h.checker.first_pass(timeout=0) is True


@pytest.mark.parametrize("r", [0.0, 0.25, 0.5, 0.75, 0.999999])
async def test_waits_count_from_the_start_of_each_check(r: float) -> None:
    async with harness(A, rand=r) as h:
        h.probe.push(A, Step(OK, duration=0.3), Step(OK, duration=0.2), Step(fail()))
        await eventually(lambda: len(h.sleep.delays[f"health {A}"]) == 3)
        # A random phase first, then the interval stretched by up to JITTER; after the
        # failure the endpoint is in doubt and is checked again after FAST.
        assert h.sleep.delays[f"health {A}"] == pytest.approx(
            [max(FAST, INTERVAL * r) - 0.3, INTERVAL * (1 + JITTER * r) - 0.2, FAST]
        )


async def test_a_first_figure_is_confirmed_at_once_then_the_phase_follows() -> None:
    async with harness(A, rand=0.5) as h:
        h.probe.push(A, MEASURED, MEASURED, MEASURED)
        await eventually(lambda: len(h.sleep.delays[f"health {A}"]) == 3)
        # One latency figure never decides a class: the second comes a fast interval later.
        assert h.sleep.delays[f"health {A}"] == pytest.approx(
            [FAST, INTERVAL * 0.5, INTERVAL * (1 + JITTER * 0.5)]
        )
        assert h.pool.endpoints[A].latency_class == "equal"


async def test_phases_differ_between_nodes() -> None:
    """Nodes restarted together: their second checks spread over the whole interval."""
    firsts = []
    for seed in range(20):
        async with harness(A, rand=random.Random(seed)) as h:
            h.probe.push(A, OK)
            firsts.append((await eventually(lambda: h.sleep.delays[f"health {A}"]))[0])
    assert max(firsts) - min(firsts) > INTERVAL / 2
    assert all(FAST <= f < INTERVAL for f in firsts)


async def test_a_probe_slower_than_the_interval_probes_again_at_once() -> None:
    async with harness(A, rand=0.999999) as h:
        h.probe.push(A, Step(OK, duration=3 * INTERVAL))
        await eventually(lambda: h.probe.calls[A] == 2)
        assert h.sleep.delays[f"health {A}"] == []  # no wait at all


async def test_transitions_only_on_change_with_hysteresis_and_observer_per_probe() -> None:
    script = [MEASURED, fail("f1"), fail("f2"), fail("f3"), fail("f4"), OK, OK, OK]
    async with harness(A, B, healthy_threshold=2, unhealthy_threshold=3) as h:
        h.probe.push(A, *(Step(r, duration=0.01 * (i + 1)) for i, r in enumerate(script)))
        h.probe.push(B, fail("refused"))
        await eventually(lambda: len(h.observed) == len(script) + 1)
    assert [t for t in h.transitions if t.address == A] == [
        Transition(A, Health.UNKNOWN, Health.HEALTHY, "ok"),
        Transition(A, Health.HEALTHY, Health.UNHEALTHY, "f3"),
        Transition(A, Health.UNHEALTHY, Health.HEALTHY, "ok"),
    ]
    # The first answer decides an unknown endpoint, whatever the thresholds.
    assert [t for t in h.transitions if t.address == B] == [
        Transition(B, Health.UNKNOWN, Health.UNHEALTHY, "refused")
    ]
    observed_a = [(s, ok) for a, s, ok in h.observed if a == A]
    assert [s for s, _ in observed_a] == pytest.approx([0.01 * (i + 1) for i in range(8)])
    assert [ok for _, ok in observed_a] == [r.ok for r in script]
    assert h.pool.endpoints[A].reason == "ok"
    assert h.pool.endpoints[A].latency == pytest.approx(MEASURED.latency)


async def test_sync_starts_new_loops_and_cancels_removed_ones() -> None:
    async with harness(A, B) as h:
        await eventually(lambda: h.probe.inflight[A] == h.probe.inflight[B] == 1)
        b_task = health_tasks()[f"health {B}"]
        h.pool.reconcile(specs(B, C))
        h.checker.sync()
        await eventually(lambda: h.probe.inflight[C] == 1)
        await eventually(lambda: h.probe.inflight[A] == 0)  # A's probe was cancelled
        assert set(health_tasks()) == {f"health {B}", f"health {C}"}
        assert health_tasks()[f"health {B}"] is b_task  # a staying endpoint keeps its loop
        assert h.probe.calls == {A: 1, B: 1, C: 1}
        h.probe.push(C, OK)
        await eventually(lambda: h.pool.endpoints[C].health is Health.HEALTHY)


async def test_stop_right_after_sync_removed_every_endpoint_leaves_no_task() -> None:
    async with harness(A, B) as h:
        await eventually(lambda: h.probe.inflight[A] == h.probe.inflight[B] == 1)
        h.pool.reconcile({})
        h.checker.sync()
        await h.checker.stop()
        assert health_tasks() == {}


async def test_a_probe_that_raises_counts_as_failed_and_checking_continues(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="kubeprism.health.checker")
    async with harness(A) as h:
        h.probe.push(A, RuntimeError("checker bug"), OK)
        await eventually(lambda: h.pool.endpoints[A].health is Health.HEALTHY)
        assert len(h.sleep.delays[f"health {A}"]) >= 1  # it waited after the crash too
        # The first answer decides an unknown endpoint: the crash made it unhealthy, with
        # the reason shown; the next good probe made it healthy again.
        assert [(t.new, t.reason) for t in h.transitions] == [
            (Health.UNHEALTHY, "probe error: RuntimeError: checker bug"),
            (Health.HEALTHY, "ok"),
        ]
        assert h.checker._first.is_set()  # the first pass does not hang on a broken probe
    [record] = [r for r in caplog.records if r.name == "kubeprism.health.checker"]
    assert record.levelno == logging.DEBUG  # the transition is the visible log line
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


async def test_a_loop_bug_outside_the_probe_restarts_the_loop_counted_and_checking_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(supervise, "RESTART_FIRST", 0.01)
    crashes: list[int] = []
    after_check = Cadence.after_check

    def buggy(self: Cadence, *args: object) -> float:
        if not crashes:
            crashes.append(1)
            raise RuntimeError("cadence bug")
        return after_check(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Cadence, "after_check", buggy)
    before = supervise.SUPERVISOR.restarts[HEALTH_TASK]
    async with harness(A) as h:
        h.probe.push(A, fail(), OK)
        await eventually(lambda: h.pool.endpoints[A].probes == 2)
        # The restarted loop checked at once and recorded both answers; its task keeps
        # the endpoint's name.
        assert [t.new for t in h.transitions] == [Health.UNHEALTHY, Health.HEALTHY]
        assert set(health_tasks()) == {f"health {A}"}
    assert supervise.SUPERVISOR.restarts[HEALTH_TASK] == before + 1
    assert "task 'health check' failed; restarting it" in caplog.text


async def test_a_probe_failing_for_a_local_reason_is_no_verdict_on_the_endpoint(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Out of fds, a probe cannot even open its socket: that must not mark the endpoint
    down (and close its connections), only be logged, once per spell."""
    local = ProbeResult(False, None, "connect failed: Too many open files", Evidence.LOCAL)
    async with harness(A) as h:
        h.probe.push(A, OK, local, local, local, OK, local)
        await eventually(lambda: h.probe.calls[A] == 7)
        assert h.transitions == [Transition(A, Health.UNKNOWN, Health.HEALTHY, "ok")]
        assert h.pool.endpoints[A].failures == 0
        assert [ok for _a, _s, ok in h.observed] == [True, True]
    warnings = [r.getMessage() for r in caplog.records if r.name == "kubeprism.health.checker"]
    reason = "connect failed: Too many open files"
    assert warnings == [f"cannot probe {A}: {reason} (a local limit, not the endpoint)"] * 2


INCONCLUSIVE = ProbeResult(False, None, "no verdict: stalled", Evidence.INCONCLUSIVE)
TIMED_OUT = ProbeResult(False, None, "timed out after 0.8s", Evidence.TIMEOUT)


async def test_a_stalled_check_is_no_verdict_is_retried_at_once_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "kubeprism.health.checker")
    async with harness(A, B, rand=0.0) as h:
        h.probe.push(B, OK)
        h.probe.push(A, OK, INCONCLUSIVE, INCONCLUSIVE, INCONCLUSIVE, OK)
        await eventually(lambda: h.probe.calls[A] == 6)
        ep = h.pool.endpoints[A]
        assert sorted(h.transitions, key=lambda t: str(t.address)) == [
            Transition(A, Health.UNKNOWN, Health.HEALTHY, "ok"),
            Transition(B, Health.UNKNOWN, Health.HEALTHY, "ok"),
        ]
        assert (ep.failures, ep.inconclusive_total, ep.late) == (0, 3, False)
        # The phase, then no wait at all after each of the three inconclusive checks (the
        # fake wait records only real waits), then the slow interval after the good one.
        assert h.sleep.delays[f"health {A}"] == pytest.approx([FAST, INTERVAL])
        assert [ok for a, _s, ok in h.observed if a == A] == [True, True]  # no failure seen
    lines = [r.getMessage() for r in caplog.records if r.name == "kubeprism.health.checker"]
    assert [line.split(" (")[0] for line in lines] == [
        "checks are late: this node looks overloaded",
        "checks are on time again",
    ]


async def test_timeouts_of_every_endpoint_at_once_close_nothing() -> None:
    async with harness(A, B, C, rand=0.0) as h:
        for address in (A, B, C):
            h.probe.push(address, OK, *[Step(TIMED_OUT, 0.8)] * 4)
        await eventually(lambda: all(h.probe.calls[a] == 6 for a in (A, B, C)))
        assert all(t.new is Health.HEALTHY for t in h.transitions)
        assert all(ep.late and ep.suspect for ep in h.pool.endpoints.values())


async def test_a_timeout_counts_once_another_endpoint_answers() -> None:
    async with harness(A, B, rand=0.0) as h:
        h.probe.push(A, OK, Step(TIMED_OUT, 0.8))
        await eventually(lambda: h.probe.calls[A] == 3)  # one timeout: suspect, B asked
        h.probe.push(B, OK, Step(OK, 0.01))  # B answers after A began failing
        await eventually(lambda: h.probe.calls[B] == 3)
        h.probe.push(A, Step(TIMED_OUT, 0.8))
        await eventually(lambda: len(h.transitions) == 3)
        assert h.transitions[-1] == Transition(
            A, Health.HEALTHY, Health.UNHEALTHY, "timed out after 0.8s"
        )


async def test_stop_cancels_loops_with_probes_in_flight() -> None:
    async with harness(A, B, C) as h:
        await eventually(lambda: sum(h.probe.inflight.values()) == 3)
        await h.checker.stop()
        assert health_tasks() == {}
        assert sum(h.probe.inflight.values()) == 0


async def test_speed_up_while_in_doubt_and_back_once_settled() -> None:
    async with harness(A, unhealthy_threshold=3, healthy_threshold=2, rand=0.0) as h:
        h.probe.push(A, OK, OK, fail(), fail(), fail(), OK, OK, OK)
        await eventually(lambda: len(h.sleep.delays[f"health {A}"]) == 8)
        # phase | healthy | suspect | suspect | down | recovering | back | steady
        assert h.sleep.delays[f"health {A}"] == pytest.approx(
            [FAST, INTERVAL, FAST, FAST, FAST, FAST, INTERVAL, INTERVAL]
        )


async def test_a_down_endpoint_backs_off_to_the_unhealthy_interval() -> None:
    async with harness(A, rand=0.0) as h:
        h.probe.push(A, *(fail("connection refused") for _ in range(6)))
        await eventually(lambda: len(h.sleep.delays[f"health {A}"]) == 6)
        assert h.sleep.delays[f"health {A}"] == pytest.approx(
            [FAST, 2 * FAST, DOWN, DOWN, DOWN, DOWN]
        )
        assert h.pool.endpoints[A].health is Health.UNHEALTHY


@contextlib.asynccontextmanager
async def slow_wait(*addresses: HostPort) -> AsyncIterator[Harness]:
    """A harness whose endpoints were checked twice (OK) and now sleep the slow interval,
    until a sign wakes them."""
    async with harness(*addresses, rand=0.0) as h:
        h.sleep.hold = 1.0
        for a in addresses:
            h.probe.push(a, OK, OK)
        for a in addresses:
            await eventually(slept(h, a, [FAST, INTERVAL]))
        yield h


def slept(h: Harness, address: HostPort, delays: list[float]) -> Callable[[], bool]:
    """A predicate: the loop of ``address`` has waited exactly these delays so far."""
    return lambda: h.sleep.delays[f"health {address}"] == delays


async def test_a_sign_wakes_a_slow_loop_for_one_fast_check() -> None:
    async with slow_wait(A, B) as h:
        h.clock.now += 0.1
        h.probe.push(A, fail("timed out after 0.8s"))
        h.pool.sign(A, "a forwarded request got no answer for 1s")
        await eventually(lambda: h.pool.endpoints[A].suspect)
        # Woken, it waits out the rest of one fast interval after the last check; after
        # the failure the endpoint is in doubt: fast checks.
        await eventually(lambda: len(h.sleep.delays[f"health {A}"]) == 4)
        assert h.sleep.delays[f"health {A}"][2:] == pytest.approx([FAST - 0.1, FAST])
        assert h.probe.calls[B] == 2  # the other endpoint was left alone
        h.pool.sign(C, "not an endpoint")  # ignored
        h.probe.push(A, OK)
        await eventually(lambda: len(h.sleep.delays[f"health {A}"]) == 5)
        assert h.sleep.delays[f"health {A}"][-1] == INTERVAL  # clearly healthy: slow again


async def test_a_failed_dial_is_a_sign_through_the_pool() -> None:
    async with slow_wait(A) as h:
        h.pool.record_dial(A, False, "dial timed out after 1s", h.clock())
        assert h.pool.endpoints[A].suspect
        await eventually(lambda: h.probe.calls[A] == 3)  # checked at once (clock stood still)


async def test_a_changed_endpoint_set_is_a_sign_for_the_endpoints_that_stay() -> None:
    async with slow_wait(A, B) as h:
        h.pool.reconcile(specs(A))
        h.checker.sync()
        await eventually(lambda: h.probe.calls[A] == 3)


async def test_losing_the_health_connection_by_reset_is_a_failure_and_checks_at_once() -> None:
    async with slow_wait(A) as h:
        h.checker.connection_lost(A, "health connection reset by the server", failure=True)
        assert h.pool.endpoints[A].suspect
        assert h.pool.endpoints[A].reason == "health connection reset by the server"
        await eventually(lambda: h.probe.calls[A] == 3)  # checked again at once
        assert h.sleep.delays[f"health {A}"] == [FAST, INTERVAL]
        h.probe.push(A, OK)
        await eventually(lambda: not h.pool.endpoints[A].suspect)
        assert [t.new for t in h.transitions] == [Health.HEALTHY]


async def test_an_orderly_close_of_the_health_connection_is_no_failure() -> None:
    """A server's idle timeout closes the connection: check at once, count nothing."""
    async with slow_wait(A) as h:
        h.checker.connection_lost(A, "server closed the health connection", failure=False)
        assert not h.pool.endpoints[A].suspect
        assert h.pool.endpoints[A].failures == 0
        await eventually(lambda: h.probe.calls[A] == 3)
        h.checker.connection_lost(C, "not an endpoint", failure=False)  # ignored


async def test_new_intervals_apply_to_running_loops() -> None:
    async with harness(A, rand=0.0) as h:
        h.checker.set_intervals(Intervals(20.0, 1.0, 4.0))
        h.probe.push(A, OK, OK)
        await eventually(lambda: len(h.sleep.delays[f"health {A}"]) == 2)
        assert h.sleep.delays[f"health {A}"] == [1.0, 20.0]


# ---------------------------------------------------------------------------------------------
# describe_error


def _verify_error(message: str) -> ssl.SSLCertVerificationError:
    # What the ssl module raises: the full text plus the actionable verify_message.
    exc = ssl.SSLCertVerificationError(
        1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message} (_ssl.c:1006)"
    )
    exc.verify_message = message
    return exc


HOSTNAME_MISMATCH = "Hostname mismatch, certificate is not valid for 'kubernetes'."


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (TimeoutError(), "timed out after 0.8s"),
        (_verify_error(HOSTNAME_MISMATCH), f"TLS certificate rejected: {HOSTNAME_MISMATCH}"),
        (ssl.SSLError(1, "WRONG_VERSION_NUMBER"), "TLS error: WRONG_VERSION_NUMBER"),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "connection refused"),
        (OSError(errno.ENETUNREACH, "Network unreachable"), "connect failed: Network unreachable"),
        (OSError("no errno"), "connect failed: no errno"),
        (ValueError("bad\n   value"), "ValueError: bad value"),
        (RuntimeError("x" * 500), "RuntimeError: " + "x" * (MAX_REASON - 17) + "..."),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else "",
)
def test_describe_error(exc: BaseException, reason: str) -> None:
    assert describe_error(exc, 0.8) == reason
    assert len(reason) <= MAX_REASON


@pytest.mark.parametrize(
    ("exc", "local"),
    [
        (OSError(errno.EMFILE, "Too many open files"), True),
        (OSError(errno.ENFILE, "Too many open files in system"), True),
        (OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"), True),
        (ConnectionRefusedError(111, "Refused"), False),
        (OSError(errno.EHOSTUNREACH, "No route to host"), False),
        (TimeoutError(), False),
    ],
    ids=lambda v: str(getattr(v, "errno", v)),
)
def test_local_errors_are_told_apart(exc: BaseException, local: bool) -> None:
    assert is_local_error(exc) is local


async def test_the_real_wait_ends_on_its_delay_or_when_woken() -> None:
    event = asyncio.Event()
    assert await wait_or_wake(event, 0.01) is False
    asyncio.get_running_loop().call_soon(event.set)
    assert await wait_or_wake(event, 30) is True
