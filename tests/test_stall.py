"""stall.py and the stall-aware checks: real loops, real sockets, real TLS; the stall source
is real (/proc) or a fake that says "kubeprism could not run at all".

The probes under a stall are tested in test_healthconn.py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path

import pytest
from util import eventually

from kubeprism.base.net import HostPort
from kubeprism.base.sockets import DialOptions
from kubeprism.core.endpoint import Endpoint
from kubeprism.core.patience import CAP_FACTOR, Verdict
from kubeprism.forward.dial import Dial, DialTimers
from kubeprism.forward.reactor import Reactor
from kubeprism.health.stall import StallMeter, bytes_waiting, judged_timeout


class NoCpu(StallMeter):
    """A stall source for a process that could not run at all: its run-queue wait grows
    exactly as fast as the clock."""

    def runq(self) -> float:
        return time.monotonic()


def test_the_real_meter_reads_this_threads_run_queue_wait() -> None:
    meter = StallMeter()
    first = meter.runq()
    for _ in range(3):
        time.sleep(0.001)  # wake up a few times: each wakeup may wait a little
    assert 0.0 <= first <= meter.runq()


def test_a_kernel_without_schedstat_is_logged_once_and_counts_no_stall(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    meter = StallMeter(str(tmp_path / "missing"))
    with caplog.at_level(logging.WARNING):
        assert (meter.runq(), meter.runq()) == (0.0, 0.0)
    assert [r.getMessage() for r in caplog.records if "timer lateness" in r.getMessage()] == [
        f"cannot read {tmp_path / 'missing'} ([Errno 2] No such file or directory: "
        f"'{tmp_path / 'missing'}'): stalls are judged by timer lateness alone"
    ]


def test_bytes_waiting_sees_unread_bytes_only() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert not bytes_waiting(a)
        b.send(b"answer")
        assert bytes_waiting(a)
        a.recv(16)
        assert not bytes_waiting(a)
    assert not bytes_waiting(None)
    assert not bytes_waiting(a)  # closed: no verdict from it


async def test_an_unstalled_wait_times_out_conclusively() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with judged_timeout(0.1, StallMeter()) as judgement:
            await asyncio.Event().wait()
    assert judgement.verdict is Verdict.TIMED_OUT
    assert time.monotonic() - started >= 0.09


async def test_a_wait_that_could_not_run_ends_inconclusive_at_the_cap() -> None:
    timeout = 0.05
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with judged_timeout(timeout, NoCpu()) as judgement:
            await asyncio.Event().wait()
    assert judgement.verdict is Verdict.INCONCLUSIVE
    assert time.monotonic() - started >= timeout * CAP_FACTOR * 0.9


async def test_a_wait_that_ends_in_time_leaves_no_timer_behind() -> None:
    loop = asyncio.get_running_loop()
    async with judged_timeout(5.0, StallMeter()) as judgement:
        await asyncio.sleep(0)
    assert judgement.verdict is None
    assert not [h for h in getattr(loop, "_scheduled", []) if not h.cancelled()]


# ------------------------------------------------------------------ dials


class DialLog:
    """A DialOwner that writes down what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, HostPort]] = []
        self.won: list[socket.socket] = []

    def dial_succeeded(
        self, dial: Dial, upstream: socket.socket, address: HostPort, seconds: float
    ) -> None:
        self.events.append(("succeeded", address))
        self.won.append(upstream)

    def dial_failed(self, address: HostPort, seconds: float, exc: OSError) -> None:
        self.events.append(("failed", address))

    def dial_overtaken(self, address: HostPort, seconds: float) -> None:
        self.events.append(("overtaken", address))

    def dial_exhausted(self, dial: Dial) -> None:
        self.events.append(("exhausted", HostPort("", 0)))


async def test_a_connect_the_kernel_finished_during_a_stall_is_no_dial_timeout() -> None:
    loop = asyncio.get_running_loop()
    owner = DialLog()
    with socket.create_server(("127.0.0.1", 0)) as listener, socket.socket() as client:
        address = HostPort("127.0.0.1", listener.getsockname()[1])
        opts = DialOptions.of(0.1, 1, 1, 1, 2.0)
        reactor = Reactor(loop)
        candidates = [Endpoint(address, 0, frozenset())]
        timers = DialTimers(loop, time.monotonic)
        dial = Dial(timers, reactor, owner, opts, time.monotonic, client, candidates)
        dial.start()
        # The loop stalls past the dial timeout (on purpose); the kernel connects meanwhile.
        time.sleep(0.3)  # noqa: ASYNC251
        await eventually(lambda: owner.events)
        for sock in owner.won:
            reactor.forget(sock.fileno())
            sock.close()
        reactor.close()
        timers.close()
    assert owner.events == [("succeeded", address)]
