"""Staggered dials (dial.py through proxy.py, in-process on uvloop, real loopback sockets).

Black holes (listeners with a full accept queue: Linux drops the SYN) stand in for a
silent server; the proof that a dial was staggered rather than timed out is that no
failure was counted, so nothing here asserts on timing.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from test_proxy_unit import NamedEcho, black_hole, healthy_pool, serving
from util import eventually

from kubeprism.base.net import HostPort
from kubeprism.core.endpoint import Health
from kubeprism.forward.dial import MAX_ATTEMPTS_IN_FLIGHT


@contextlib.contextmanager
def black_holes(n: int) -> Iterator[list[HostPort]]:
    """n distinct silent endpoints."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(black_hole()) for _ in range(n)]


@contextlib.contextmanager
def unaccepted_listener() -> Iterator[tuple[socket.socket, HostPort]]:
    """A listener nobody accepts on: any connect to it waits in its queue, to be seen."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        yield sock, HostPort("127.0.0.1", sock.getsockname()[1])


async def test_a_silent_first_choice_is_overtaken_not_waited_for() -> None:
    signs: list[tuple[HostPort, str]] = []
    with black_holes(1) as [hole]:
        async with NamedEcho("A") as a, serving(healthy_pool(hole, a.address)) as rig:
            rig.pool.on_sign = lambda address, why: signs.append((address, why))
            client = await rig.connect()  # dial_timeout is 2 s: a timeout would count
            assert client.upstream == "A"
            await client.echo(b"served by the next one")
            stats = rig.proxy.stats
            assert (stats.dial_failures, stats.dials_overtaken) == (0, 1)
            ep = rig.ep(hole)
            assert ep.suspect and ep.failures == 0 and ep.health is Health.HEALTHY
            assert [(d[0], d[2]) for d in rig.dials] == [(a.address, True)]
            assert not rig.transitions
            # Suspect now: the next client goes straight to A, and nothing is dialled twice.
            assert rig.pool.candidates()[0].address == a.address
            again = await rig.connect()
            assert again.upstream == "A"
            assert stats.dials_overtaken == 1
            # One passive sign, so that the health checker looks at it soon.
            assert [address for address, _why in signs] == [hole]


async def test_a_fast_first_connect_starts_nothing_else() -> None:
    with unaccepted_listener() as (second, address):
        async with NamedEcho("A") as a, serving(healthy_pool(a.address, address)) as rig:
            for _ in range(5):
                client = await rig.connect()
                assert client.upstream == "A"
            assert rig.proxy.stats.dials_overtaken == 0
            assert [d[0] for d in rig.dials] == [a.address] * 5
            try:
                second.accept()[0].close()
                raise AssertionError("the second endpoint was dialled")
            except BlockingIOError:
                pass  # its queue is empty: no connect reached it


async def test_attempts_in_flight_are_bounded() -> None:
    n = MAX_ATTEMPTS_IN_FLIGHT + 1
    with black_holes(n) as holes:
        async with (
            NamedEcho("A") as a,
            serving(healthy_pool(*holes, a.address), dial_timeout=0.3) as rig,
        ):
            client = await rig.connect()
            assert client.upstream == "A"
            stats = rig.proxy.stats
            # A comes after n holes: it could start only once two of the first three timed
            # out; every hole either timed out or was overtaken by A.
            assert stats.dial_failures >= n - MAX_ATTEMPTS_IN_FLIGHT + 1
            assert stats.dial_failures + stats.dials_overtaken == n


async def test_all_silent_fails_the_client_after_the_timeouts() -> None:
    with black_holes(2) as holes:
        async with serving(healthy_pool(*holes), dial_timeout=0.3) as rig:
            client = await rig.connect(greet=False)
            await client.wait_closed_by_peer()
            await eventually(lambda: rig.proxy.active == 0)
            stats = rig.proxy.stats
            assert (stats.no_upstream, stats.dial_failures, stats.dials_overtaken) == (1, 2, 0)
            assert all(rig.ep(h).failures == 1 for h in holes)


async def test_close_all_cancels_every_attempt_in_flight() -> None:
    with black_holes(3) as holes:
        async with serving(healthy_pool(*holes), dial_timeout=30.0) as rig:
            await rig.connect(greet=False)
            # The staggered attempts start one attempt delay (50 ms here) after another.
            await eventually(lambda: len(rig.proxy._dialing) == 1)
            await eventually(lambda: len(next(iter(rig.proxy._dialing))._attempts) == 3)
            assert rig.proxy.close_all() == 1
            assert rig.proxy.stats.dial_failures == 0
        # The leak check (leakcheck.py) sees that no socket of the three attempts is left open.
