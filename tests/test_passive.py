"""passive.py: stalled forwarded connections as passive signs, sweep by sweep.

The sweeps run on fake connections (byte counts only) with a scripted out-of-order
counter; one test reads TCP_INFO from a real socket.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from util import eventually

from kubeprism.base.net import HostPort
from kubeprism.health.passive import (
    SWEEP_PERIOD,
    Connection,
    StallWatch,
    out_of_order_segments,
)

A = HostPort("10.0.0.1", 6443)
B = HostPort("10.0.0.2", 6443)
T = 0.5  # stallTimeout
NO_ANSWER = f"a forwarded request got no answer at all for {T:g}s"
HOLED = f"a forwarded request got out-of-order segments and no progress for {T:g}s"


@dataclass
class FakePump:
    """Just the byte count a pump keeps."""

    moved: int = 0


@dataclass(eq=False)
class FakeConn:
    """A forwarded connection: byte counts both ways, and its kernel's out-of-order count."""

    address: HostPort
    pumps: tuple[FakePump, FakePump] = field(default_factory=lambda: (FakePump(), FakePump()))
    ooo: int = 0
    # Only an identity here (the out-of-order counter is scripted): never connected.
    upstream: socket.socket = field(default_factory=socket.socket)

    def client_sends(self, n: int) -> None:
        self.pumps[0].moved += n

    def server_sends(self, n: int) -> None:
        self.pumps[1].moved += n


@pytest.fixture
def rig() -> Iterator[Rig]:
    """A Rig whose sockets are closed afterwards."""
    made = Rig()
    try:
        yield made
    finally:
        made.close()


class Rig:
    """A StallWatch over fake connections, recording reports and close looks."""

    def __init__(self) -> None:
        self.signs: list[tuple[HostPort, str]] = []
        self.looks = 0
        self.conns: list[FakeConn] = []
        self.watch = StallWatch(T, lambda a, why: self.signs.append((a, why)), self._ooo)

    def _ooo(self, sock: socket.socket) -> int:
        self.looks += 1
        return next(c.ooo for c in self.conns if c.upstream is sock)

    def conn(self, address: HostPort = A) -> FakeConn:
        c = FakeConn(address)
        self.conns.append(c)
        return c

    def sweep(self, *times: float, only: list[FakeConn] | None = None) -> None:
        for t in times:
            self.watch.sweep(self.conns if only is None else only, t)

    def close(self) -> None:
        for c in self.conns:
            c.upstream.close()


def test_a_handshake_never_answered_is_reported_once_after_the_timeout(rig: Rig) -> None:
    c = rig.conn()
    c.client_sends(500)  # a TLS ClientHello; the server's flight never arrives
    rig.sweep(0.0, 0.25)
    assert rig.signs == []
    rig.sweep(0.5, 0.75, 5.0)
    assert rig.signs == [(A, NO_ANSWER)]
    assert rig.looks == 1


def test_a_stuck_answer_with_segments_out_of_order_is_reported(rig: Rig) -> None:
    """The request crosses a session ticket; the answer's full-size head vanishes, its
    small tail arrives out of order."""
    c = rig.conn()
    c.client_sends(500)
    c.server_sends(1000)
    rig.sweep(0.0)
    c.client_sends(300)  # the request ...
    rig.sweep(0.25)
    c.server_sends(250)  # ... and, a sweep later, the server's tickets
    c.ooo = 1  # the tail of the answer
    rig.sweep(0.5, 0.75)
    assert rig.signs == []
    rig.sweep(1.0)
    assert rig.signs == [(A, HOLED)]


def test_a_slow_or_quiet_answer_costs_one_look_and_no_report(rig: Rig) -> None:
    watch, slow = rig.conn(A), rig.conn(B)
    for c in (watch, slow):
        c.client_sends(400)
        c.server_sends(4000)
    rig.sweep(0.0)
    watch.client_sends(40)  # an HTTP/2 WINDOW_UPDATE after an event: never answered
    slow.client_sends(300)  # a LIST the server takes seconds over
    rig.sweep(0.25, 0.5, 0.75, 1.0, 5.0)
    assert (rig.signs, rig.looks) == ([], 2)
    slow.server_sends(90_000)  # the answer, at last
    rig.sweep(5.25, 9.0)
    assert (rig.signs, rig.looks) == ([], 2)


def test_reordering_counts_once_per_connection(rig: Rig) -> None:
    """A path that reorders now and then: its first close look cannot tell old reordering
    from new (one check, a false alarm); after that only new out-of-order segments count."""
    c = rig.conn()
    c.client_sends(400)
    c.server_sends(4000)
    c.ooo = 3
    rig.sweep(0.0, 0.5)
    assert rig.signs == [(A, HOLED)]
    for t in (1.0, 2.0, 3.0):
        c.client_sends(300)
        rig.sweep(t)
        c.server_sends(2000)
        rig.sweep(t + 0.25, t + 0.75)
    assert len(rig.signs) == 1
    assert rig.looks == 4


def test_connections_that_close_are_forgotten_and_tiny_clients_ignored(rig: Rig) -> None:
    gone, tiny = rig.conn(A), rig.conn(B)
    gone.client_sends(400)
    tiny.client_sends(10)  # not a request
    rig.sweep(0.0)
    rig.sweep(0.25, 1.0, only=[tiny])
    assert rig.signs == []
    assert [c.address for c in rig.watch._marks] == [B]


def test_a_real_socket_reports_its_out_of_order_count() -> None:
    with socket.socket() as listener, socket.socket() as client:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
        with server:
            server.sendall(b"in order")
            assert client.recv(100) == b"in order"
            assert out_of_order_segments(client) == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert out_of_order_segments(udp) == 0  # not TCP: unknown


async def test_the_task_sweeps_until_cancelled_and_does_nothing_while_switched_off(
    rig: Rig,
) -> None:
    rig.watch.timeout = SWEEP_PERIOD
    c = rig.conn()
    c.client_sends(400)
    conns: list[Connection] = [c]
    loop = asyncio.get_running_loop()
    task = loop.create_task(rig.watch.run(lambda: conns, loop.time), name="stall sweeper")
    try:
        await eventually(lambda: rig.signs, timeout=5)
        rig.watch.timeout = 0.0
        await eventually(lambda: not rig.watch._marks, timeout=5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert rig.signs == [(A, f"a forwarded request got no answer at all for {SWEEP_PERIOD:g}s")]
