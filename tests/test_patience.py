"""Pure tests for kubeprism.core.patience: a timeout that counts only the time we could run.

A fake clock (plain numbers) and a fake stall source (the run-queue figure passed in).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubeprism.core.patience import CAP_FACTOR, GRACE, STEP, Budget, Verdict

TIMEOUT = 0.8
T0 = 100.0


def budget(runq: float = 5.0) -> Budget:
    return Budget(TIMEOUT, T0, runq)


def test_an_unstalled_timeout_is_a_timeout() -> None:
    assert budget().decide(T0 + TIMEOUT, 5.0, False) is Verdict.TIMED_OUT


def test_before_the_timeout_it_looks_again_within_a_step() -> None:
    assert budget().decide(T0 + 0.05, 5.0, False) == pytest.approx(STEP)
    assert budget().decide(T0 + 0.75, 5.0, False) == pytest.approx(0.05)


def test_a_stalled_timeout_is_no_timeout_yet() -> None:
    # 0.6 s of the 0.8 s were spent waiting for a CPU: 0.2 s ran, 0.6 s are left.
    b = budget()
    assert b.decide(T0 + TIMEOUT, 5.6, False) == pytest.approx(STEP)
    assert b.ran(T0 + TIMEOUT, 5.6) == pytest.approx(0.2)
    # The budget runs out once the time it could run reaches the timeout.
    assert b.decide(T0 + 1.4, 5.6, False) is Verdict.TIMED_OUT


def test_a_pause_shows_as_lateness_where_the_run_queue_sees_nothing() -> None:
    b = budget()
    b.step_fired(T0 + STEP, T0 + 3.0)  # stopped (SIGSTOP, a frozen VM) for ~2.9 s
    assert b.stalled(5.0) == pytest.approx(2.9)
    assert b.decide(T0 + 3.0, 5.0, False) == pytest.approx(STEP)


def test_lateness_and_run_queue_wait_are_not_added_up() -> None:
    b = budget()
    b.step_fired(T0 + STEP, T0 + 0.5)  # this wakeup waited 0.4 s for a CPU ...
    assert b.stalled(5.4) == pytest.approx(0.4)  # ... which the run queue counted too


def test_an_answer_waiting_in_the_kernel_is_never_a_timeout() -> None:
    assert budget().decide(T0 + 5 * TIMEOUT, 5.0, True) == GRACE


def test_a_stall_that_does_not_end_leaves_the_check_inconclusive() -> None:
    cap = T0 + CAP_FACTOR * TIMEOUT
    fully_stalled = 5.0 + CAP_FACTOR * TIMEOUT
    assert budget().decide(cap - 0.01, fully_stalled, False) == pytest.approx(STEP)
    assert budget().decide(cap, fully_stalled, False) is Verdict.INCONCLUSIVE
    assert budget().decide(cap, 5.0, True) is Verdict.INCONCLUSIVE


@given(
    elapsed=st.floats(0, 20),
    stalled=st.floats(0, 20),
    late=st.floats(0, 20),
    waiting=st.booleans(),
)
def test_it_never_gives_up_before_the_timeout_nor_waits_past_the_cap(
    elapsed: float, stalled: float, late: float, waiting: bool
) -> None:
    b = Budget(TIMEOUT, T0, 1.0, late)
    decision = b.decide(T0 + elapsed, 1.0 + stalled, waiting)
    if elapsed < TIMEOUT:
        assert not isinstance(decision, Verdict)
    if elapsed >= CAP_FACTOR * TIMEOUT:
        assert decision is Verdict.INCONCLUSIVE
    if decision is Verdict.TIMED_OUT:
        assert not waiting and b.ran(T0 + elapsed, 1.0 + stalled) >= TIMEOUT
    if not isinstance(decision, Verdict):
        assert 0 < decision <= STEP
