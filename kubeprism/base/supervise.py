"""Background tasks that cannot die quietly, and the retry pacing they share.

Every long-running loop (the EndpointSlice watch, DNS refresh, each endpoint's health
check, the stall sweeper) runs under `supervised()`: an unexpected exception is logged
with its traceback (once per distinct error, not once per restart), counted by task name,
and the loop started again after a jittered, doubling delay. The data path never depends
on one of them staying alive; this keeps them alive anyway.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any

logger = logging.getLogger(__name__)

# Restart delays: quick enough that a one-off bug costs a second, slow enough that a
# bug hit on every start costs a log line and a restart per minute, not a busy loop.
RESTART_FIRST = 1.0
RESTART_MAX = 60.0
RESTART_JITTER = 0.2
# A run this long before failing was progress: the next restart is quick again.
RESTART_RESET_AFTER = 60.0

LoopFactory = Callable[[], Coroutine[Any, Any, None]]


class Backoff:
    """Doubling delays with jitter; reset() only after real progress."""

    def __init__(self, first: float, last: float, jitter: float) -> None:
        self.first, self.last, self.jitter = first, last, jitter
        self._next = first

    def next(self) -> float:
        """The delay to wait now (jittered), doubling the following one."""
        delay = self._next * (1 + self.jitter * (2 * random.random() - 1))
        self._next = min(self._next * 2, self.last)
        return delay

    def reset(self) -> None:
        """Progress was made: the next failure waits the shortest delay again."""
        self._next = self.first


class Pacer:
    """A token bucket: at most `rate` requests per second after a burst of `burst`.

    A backstop under a backoff: whatever sequence of answers a server gives, no more
    than this many requests are sent.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._stamp: float | None = None

    async def wait(self) -> None:
        """Return when a request may be sent."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._stamp is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1:
            await asyncio.sleep((1 - self._tokens) / self.rate)
            self._tokens, self._stamp = 1.0, loop.time()
        self._tokens -= 1


class Supervisor:
    """Runs named loops, restarting one that raises; counts the restarts per name."""

    def __init__(self) -> None:
        self.restarts: collections.Counter[str] = collections.Counter()

    def start(
        self, name: str, factory: LoopFactory, task_name: str | None = None
    ) -> asyncio.Task[None]:
        """Run ``factory()`` until it returns or is cancelled, restarts counted under
        ``name``; the asyncio task is called ``task_name`` (default: ``name``), so loops
        of one kind (one per endpoint) share a counter but stay told apart in tracebacks."""
        coro = self._keep(name, factory)
        return asyncio.get_running_loop().create_task(coro, name=task_name or name)

    async def _keep(self, name: str, factory: LoopFactory) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(RESTART_FIRST, RESTART_MAX, RESTART_JITTER)
        logged: str | None = None
        while True:
            started = loop.time()
            try:
                await factory()
                return
            except Exception as exc:
                self.restarts[name] += 1
                if loop.time() - started >= RESTART_RESET_AFTER:
                    backoff.reset()
                delay = backoff.next()
                error = f"{type(exc).__name__}: {exc}"
                if error != logged:  # the same bug again is counted, not logged again
                    logged = error
                    logger.exception("task %r failed; restarting it in %.1fs", name, delay)
                else:
                    logger.debug(
                        "task %r failed again (%s); restarting in %.1fs", name, error, delay
                    )
            await asyncio.sleep(delay)


# One per process: the restart counts are exported as kubeprism_task_restarts_total.
SUPERVISOR = Supervisor()


def supervised(name: str, factory: LoopFactory, task_name: str | None = None) -> asyncio.Task[None]:
    """Start a loop under the process's supervisor."""
    return SUPERVISOR.start(name, factory, task_name)
