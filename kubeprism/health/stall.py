"""Knowing when kubeprism itself could not run, and timeouts that allow for it.

The measure is the event-loop thread's *run-queue wait*: the second field of
``/proc/thread-self/schedstat``, nanoseconds the thread spent runnable but waiting for a
CPU. It was chosen over the alternatives because it is about this thread alone and costs
one ``pread`` of a file kept open (~2 us): CPU pressure (PSI, system-wide or per cgroup)
says that *some* task waited, and is near 100 % on any busy node even when kubeprism
itself gets its CPU at once, so it would excuse real timeouts; a steady heartbeat timer
costs wakeups all the time. What run-queue wait cannot see, a pause (SIGSTOP, a frozen
VM), shows as lateness of the timers a waiting check sets anyway (patience.Budget).

:func:`judged_timeout` is ``asyncio.timeout`` with that judgement: it gives up only once
the time this process could run reaches the timeout, never while an answer is waiting in
the kernel, and says whether it ran out conclusively or only for want of CPU.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import termios
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kubeprism.core.patience import STEP, Budget, Verdict

logger = logging.getLogger(__name__)

SCHEDSTAT = "/proc/thread-self/schedstat"


class StallMeter:
    """The calling thread's run-queue wait, in seconds (0 where the kernel has none).

    Called from the event loop's thread (checks and scrapes run there). The file is
    opened for each reading (~6 us; a kept fd saves 5 us but would have to be opened on
    the right thread and closed by whoever owns the meter).
    """

    def __init__(self, path: str = SCHEDSTAT) -> None:
        self.path = path
        self._broken = False

    def runq(self) -> float:
        """Seconds this thread has waited for a CPU so far (monotonic)."""
        if self._broken:
            return 0.0
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return int(os.read(fd, 128).split()[1]) / 1e9
            finally:
                os.close(fd)
        except (OSError, ValueError, IndexError) as exc:
            # No schedstat (an old or stripped kernel): stalls show as lateness alone.
            logger.warning(
                "cannot read %s (%s): stalls are judged by timer lateness alone", self.path, exc
            )
            self._broken = True
            return 0.0


def bytes_waiting(sock: socket.socket | None) -> bool:
    """True when the kernel holds received bytes on ``sock`` that nobody has read yet."""
    if sock is None:
        return False
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    except (OSError, ValueError):
        return False
    return buf[0] > 0


@dataclass(slots=True)
class Judgement:
    """What a judged wait found: how it ran out (None while it has not), and the socket
    whose waiting bytes would be an answer (set by the caller once it has one)."""

    verdict: Verdict | None = None
    sock: socket.socket | None = None


@contextlib.asynccontextmanager
async def judged_timeout(timeout: float, meter: StallMeter) -> AsyncIterator[Judgement]:
    """Like ``asyncio.timeout(timeout)``: raises TimeoutError when the budget runs out,
    and ``Judgement.verdict`` says whether that was conclusive."""
    loop = asyncio.get_running_loop()
    budget = Budget(timeout, loop.time(), meter.runq())
    judgement = Judgement()
    handle: asyncio.TimerHandle | None = None

    async with asyncio.timeout(None) as scope:

        def look(due: float) -> None:
            nonlocal handle
            now = loop.time()
            budget.step_fired(due, now)
            decision = budget.decide(now, meter.runq(), bytes_waiting(judgement.sock))
            if isinstance(decision, Verdict):
                judgement.verdict = decision
                handle = None
                scope.reschedule(now)  # expire now: the body is cancelled, TimeoutError
            else:
                handle = loop.call_at(now + decision, look, now + decision)

        # Steps from the start, so that a pause anywhere in the wait shows as lateness.
        first = budget.started + min(STEP, timeout)
        handle = loop.call_at(first, look, first)
        try:
            yield judgement
        finally:
            if handle is not None:
                handle.cancel()
