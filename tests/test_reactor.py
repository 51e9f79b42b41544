"""reactor.py: the forwarding engine's own epoll set, on a real loop with real sockets.

What it promises: a registration lives as long as its socket (few epoll_ctl per
connection), an event read for a socket closed meanwhile never reaches the socket that
reuses its number, an error on a direction nobody waits for still ends the connection,
a hang-up nobody waits for is parked instead of reported again and again, and after a
wakeup it serves what comes on its own set first, yet never keeps the loop waiting.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

from test_proxy_unit import NamedEcho, healthy_pool, serving
from util import count_epoll, eventually

from kubeprism.forward.reactor import IN, OUT, Port, Reactor


async def test_a_proxied_connection_costs_at_most_four_epoll_ctl() -> None:
    """uvloop's add_reader/add_writer cost 18 per connection; haproxy pays ~4."""
    async with NamedEcho("A") as a, serving(healthy_pool(a.address)) as rig:
        counting = count_epoll(rig.proxy.reactor)  # opened when the listener was registered
        rounds = 20
        for _ in range(rounds):
            client = await rig.connect()
            await client.echo(b"ping")
            client.sock.shutdown(socket.SHUT_WR)
            await client.wait_closed_by_peer()
            client.sock.close()
            rig.clients.remove(client)
            await eventually(lambda: rig.proxy.active == 0)
        assert rig.proxy.stats.forwarded == rounds
        # add upstream (dial), mod upstream (connected: read it), add client, mod on the
        # first FIN; no DEL: closing removes a socket from the set.
        assert counting.ctl.count("del") == 0
        assert len(counting.ctl) <= 4 * rounds, counting.ctl


async def test_an_event_for_a_socket_closed_in_the_same_poll_is_not_delivered() -> None:
    reactor = Reactor(asyncio.get_running_loop())
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    seen: list[str] = []
    extra: list[socket.socket] = []

    def handler(mine: socket.socket, other: socket.socket) -> Any:
        def on_events(_events: int) -> None:
            mine.recv(16)
            seen.append("first")
            # Close the other one, whose event this poll already read; a new socket takes
            # its number, as an accept in the same wakeup would.
            number = other.fileno()
            reactor.forget(number)
            other.close()
            e, f = socket.socketpair()
            extra.extend((e, f))
            assert number in (e.fileno(), f.fileno())  # the lowest free number is reused
            reactor.watch(number, IN, lambda _e: seen.append("reused"))

        return on_events

    b.send(b"x")
    d.send(b"x")
    try:
        reactor.watch(a.fileno(), IN, handler(a, c))
        reactor.watch(c.fileno(), IN, handler(c, a))
        await eventually(lambda: seen)
        for _ in range(3):  # more polls: the new socket has nothing to read
            await asyncio.sleep(0)
        assert seen == ["first"]
    finally:
        for sock in (a, b, c, d, *extra):
            if sock.fileno() >= 0:
                reactor.forget(sock.fileno())
            sock.close()
        reactor.close()


class Side:
    """A stand-in for a pump: records what the port asked of it."""

    def __init__(self) -> None:
        self.done = False
        self.calls: list[str] = []
        self.failed: list[int] = []

    def on_readable(self, _events: int) -> None:
        self.calls.append("readable")

    def on_writable(self) -> None:
        self.calls.append("writable")

    def fail(self, exc: OSError) -> None:
        self.failed.append(exc.errno or 0)
        self.done = True


async def test_a_hang_up_nobody_waits_for_is_parked_then_delivered_when_wanted() -> None:
    reactor = Reactor(asyncio.get_running_loop())
    ours, theirs = socket.socketpair()
    port, side = Port(reactor, ours), Side()
    port.reader = port.writer = side
    try:
        port.join()
        assert reactor.mask(ours.fileno()) == 0
        theirs.close()  # EPOLLHUP: reported even with an empty mask
        await eventually(lambda: reactor.mask(ours.fileno()) is None, message="never parked")
        polls = reactor.polls
        for _ in range(5):
            await asyncio.sleep(0)
        assert reactor.polls == polls  # parked: not reported again
        assert side.calls == [] and side.failed == []
        port.want(IN, True)  # a side waits again: the hang-up reaches it
        await eventually(lambda: side.calls)
        assert side.calls[0] == "readable"
    finally:
        port.leave()
        ours.close()
        reactor.close()


async def test_a_reset_on_a_direction_nobody_waits_for_ends_it_at_once() -> None:
    loop = asyncio.get_running_loop()
    reactor = Reactor(loop)
    listener = socket.create_server(("127.0.0.1", 0))
    theirs = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    port, side = Port(reactor, ours), Side()
    port.reader = port.writer = side
    try:
        port.join()
        port.want(OUT, True)
        await eventually(lambda: side.calls)  # writable: the port works
        port.want(OUT, False)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        theirs.close()  # RST while nothing waits on ours
        await eventually(lambda: side.failed, message="the reset was not noticed")
        assert side.failed == [104]  # ECONNRESET
    finally:
        port.leave()
        for sock in (ours, listener):
            sock.close()
        reactor.close()


async def test_what_comes_while_it_lingers_is_served_before_the_loop_runs_again() -> None:
    """After a wakeup with work the reactor waits on its own set (LINGER), not the loop's:
    an event that comes meanwhile is served in the same turn, before a callback the first
    handler gave the loop."""
    loop = asyncio.get_running_loop()
    reactor = Reactor(loop)
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    order: list[str] = []

    def on_a(_events: int) -> None:
        a.recv(16)
        order.append("a")
        loop.call_soon(order.append, "loop")
        d.send(b"x")  # c is readable from now on

    def on_c(_events: int) -> None:
        c.recv(16)
        order.append("c")

    try:
        reactor.watch(a.fileno(), IN, on_a)
        reactor.watch(c.fileno(), IN, on_c)
        b.send(b"x")
        await eventually(lambda: len(order) == 3, message=f"order so far: {order}")
        assert order == ["a", "c", "loop"]
    finally:
        for sock in (a, c):
            reactor.forget(sock.fileno())
        for sock in (a, b, c, d):
            sock.close()
        reactor.close()


async def test_the_loop_gets_its_turn_while_events_keep_coming() -> None:
    """A socket that stays readable (nobody reads it: level-triggered, it is reported at
    every poll) keeps the reactor busy; the loop still runs its callbacks (HOLD)."""
    loop = asyncio.get_running_loop()
    reactor = Reactor(loop)
    a, b = socket.socketpair()
    served = [0]
    turns: list[int] = []

    def on_a(_events: int) -> None:
        served[0] += 1

    def loop_turn() -> None:
        turns.append(served[0])
        if len(turns) < 3:
            loop.call_soon(loop_turn)

    try:
        b.send(b"never read")
        reactor.watch(a.fileno(), IN, on_a)
        await eventually(lambda: served[0] > 0)
        loop.call_soon(loop_turn)
        await eventually(lambda: len(turns) == 3, message="the reactor kept the loop waiting")
        assert turns[-1] > turns[0]  # the reactor served in between: both had their turns
    finally:
        reactor.forget(a.fileno())
        a.close()
        b.close()
        reactor.close()
