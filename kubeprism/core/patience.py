"""How long to wait for an answer: a timeout that counts only the time we could run.

Pure (no clock, no I/O): the caller passes the time and what the stall meter says. A
plain timer cannot tell a server that did not answer from a process that could not
listen: on a node whose CPUs are saturated kubeprism may wait hundreds of milliseconds
for a CPU at every wakeup, and a timer that expires meanwhile reads that wait as the
server's silence. A :class:`Budget` therefore subtracts from the time elapsed the time
this process was kept from running (its run-queue wait, and how late its own timers
fired: a pause such as SIGSTOP or a frozen VM shows only there) and gives up only when
the time it *could* run reaches the timeout. An answer already waiting in the kernel is
never a timeout either. If the stall does not end, the check ends *inconclusive* after
``CAP_FACTOR`` timeouts of wall time: no verdict, the check is simply repeated.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# While a check is still waiting, look at the meter this often: the error of the lateness
# measure is at most one step, and a check that answers sooner (nearly all) costs no step.
STEP = 0.1
# An answer that is waiting in the kernel gets this long to be read before it counts.
GRACE = 0.05
# Give up judging after this many timeouts of wall time: a stall that long (a node that
# gives us almost no CPU, a paused VM) leaves the check without a verdict.
CAP_FACTOR = 10.0
# Less than this left is nothing left: the loop's timers have millisecond resolution.
RESOLUTION = 0.001


class Verdict(enum.Enum):
    """How a budget ran out."""

    TIMED_OUT = "timed out"  # we could run for the whole timeout and heard nothing
    INCONCLUSIVE = "inconclusive"  # the wall-time cap came first: we were stalled


@dataclass(slots=True)
class Budget:
    """One wait for an answer: ``timeout`` seconds of time this process could run."""

    timeout: float
    started: float  # monotonic seconds at the start
    runq_at_start: float  # the meter's run-queue wait at the start, in seconds
    late: float = 0.0  # how late this wait's own steps fired, summed

    def stalled(self, runq: float) -> float:
        """Seconds of this wait during which we could not run.

        Run-queue wait counts every wakeup's wait for a CPU; lateness also sees a pause
        (a stopped process is not on the run queue). Each mostly contains the other, so
        the larger one is taken, never the sum.
        """
        return max(runq - self.runq_at_start, self.late)

    def ran(self, now: float, runq: float) -> float:
        """Seconds of this wait during which we could run."""
        return max(0.0, now - self.started - self.stalled(runq))

    def step_fired(self, due: float, now: float) -> None:
        """A step scheduled for ``due`` fired at ``now``."""
        self.late += max(0.0, now - due)

    def decide(self, now: float, runq: float, answer_waiting: bool) -> float | Verdict:
        """Seconds to wait before looking again, or how the budget ran out."""
        if now - self.started >= self.timeout * CAP_FACTOR:
            return Verdict.INCONCLUSIVE
        if answer_waiting:
            return GRACE
        left = self.timeout - self.ran(now, runq)
        if left < RESOLUTION:
            return Verdict.TIMED_OUT
        return min(STEP, left)
