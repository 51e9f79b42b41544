"""proxy.py in-process on uvloop: a real listener, real upstream echo servers on 127.0.0.1.

Each upstream greets with its name ("A\\n") and then echoes, so a client knows where the
proxy sent it. The Pool is filled by hand (reconcile + record_probe); no health checker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import itertools
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from util import eventually, open_fds

from kubeprism.base.net import HostPort
from kubeprism.core.endpoint import EndpointSpec, Health, Transition
from kubeprism.core.upstream import Pool
from kubeprism.forward import fastio, listeners
from kubeprism.forward import proxy as proxy_module
from kubeprism.forward.arming import ARM_AFTER
from kubeprism.forward.connection import CloseReason
from kubeprism.forward.listeners import ACCEPT_BACKOFF
from kubeprism.forward.proxy import Proxy, ProxySettings

SETTINGS = ProxySettings(
    dial_timeout=2.0,
    mode="splice",
    keepalive_idle=5.0,
    keepalive_interval=2.0,
    keepalive_count=3,
    user_timeout=10.0,
    max_connections=100,
    idle_timeout=0.0,
    close_on_unhealthy=True,
)


# ---------------------------------------------------------------------------------------------
# Upstreams and clients


class NamedEcho:
    """Greets each connection with '<name>\\n', then echoes; on exit every connection is reset.

    A plain Protocol rather than streams: no per-connection task to cancel at teardown.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.live: set[asyncio.Transport] = set()
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> HostPort:
        """Where it listens."""
        return HostPort("127.0.0.1", self.port)

    async def __aenter__(self) -> NamedEcho:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Echo(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for transport in list(self.live):
            transport.abort()
        await eventually(lambda: not self.live, message=f"{self.name}: connections gone")
        await self._server.wait_closed()


class _Echo(asyncio.Protocol):
    def __init__(self, server: NamedEcho) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport quacks like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.server.live.add(self.transport)
        self.transport.write(f"{self.server.name}\n".encode())

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> None:
        return None  # close once the echo is flushed: FIN back after the client's FIN

    def connection_lost(self, exc: Exception | None) -> None:
        assert self.transport is not None
        self.server.live.discard(self.transport)


class Client:
    """A raw non-blocking client socket with helpers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.upstream = ""

    async def hello(self) -> str:
        """Read the upstream's greeting line; return its name."""
        line = b""
        while not line.endswith(b"\n"):
            data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 1), 5)
            assert data, f"closed before the greeting (got {line!r})"
            line += data
        self.upstream = line.decode().strip()
        return self.upstream

    async def echo(self, data: bytes) -> None:
        """Send ``data`` and read it back."""
        await self.loop.sock_sendall(self.sock, data)
        got = bytearray()
        while len(got) < len(data):
            chunk = await asyncio.wait_for(self.loop.sock_recv(self.sock, len(data) - len(got)), 5)
            assert chunk, "closed in the middle of an echo"
            got += chunk
        assert got == data

    async def wait_closed_by_peer(self, timeout: float = 5.0) -> None:
        """Wait for EOF or a reset from the proxy."""
        async with asyncio.timeout(timeout):
            try:
                while await self.loop.sock_recv(self.sock, 65536):
                    pass
            except ConnectionResetError:
                pass


@dataclass
class Rig:
    """A serving Proxy, its pool and listener, and what it reported."""

    proxy: Proxy
    pool: Pool
    listener: socket.socket
    port: int
    transitions: list[Transition] = field(default_factory=list)
    dials: list[tuple[HostPort, float, bool]] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)

    async def connect(self, greet: bool = True) -> Client:
        """A new client of the proxy; with ``greet``, wait until an upstream greeted it."""
        sock = socket.socket()
        sock.setblocking(False)
        client = Client(sock)
        self.clients.append(client)
        await client.loop.sock_connect(sock, ("127.0.0.1", self.port))
        if greet:
            await client.hello()
        return client

    def ep(self, address: HostPort) -> Any:
        """The pool's endpoint record."""
        return self.pool.endpoints[address]


def specs(*addresses: HostPort, tied: bool = False) -> dict[HostPort, EndpointSpec]:
    """Endpoint specs preferring ``addresses`` in the order given (or all equal if ``tied``)."""
    return {a: EndpointSpec(0 if tied else i, frozenset({"test"})) for i, a in enumerate(addresses)}


def healthy_pool(*addresses: HostPort, unhealthy_threshold: int = 2, tied: bool = False) -> Pool:
    """A pool with ``addresses`` healthy (equal latency), preferred as ``specs`` says."""
    pool = Pool(healthy_threshold=1, unhealthy_threshold=unhealthy_threshold)
    pool.reconcile(specs(*addresses, tied=tied))
    for address in addresses:
        pool.record_probe(address, True, 0.0005, "ok", 0.0)
    return pool


@contextlib.asynccontextmanager
async def serving(pool: Pool, **overrides: Any) -> AsyncIterator[Rig]:
    """A Proxy serving on 127.0.0.1; torn down like the daemon does, then checked."""
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    transitions: list[Transition] = []
    dials: list[tuple[HostPort, float, bool]] = []
    proxy = Proxy(
        loop,
        pool,
        dataclasses.replace(SETTINGS, **overrides),
        transitions.append,
        observe_dial=lambda a, s, ok: dials.append((a, s, ok)),
    )
    rig = Rig(proxy, pool, listener, listener.getsockname()[1], transitions, dials)
    rig.proxy.serve([listener])
    try:
        yield rig
    finally:
        rig.proxy.stop_accepting()
        rig.proxy.close_all()
        for client in rig.clients:
            client.sock.close()
        listener.close()
    assert rig.proxy.active == 0
    assert all(ep.active == 0 for ep in pool.endpoints.values())


@contextlib.contextmanager
def refusing_port() -> Iterator[HostPort]:
    """Bound but not listening: connects are refused and nobody else can take the port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield HostPort("127.0.0.1", sock.getsockname()[1])


@contextlib.contextmanager
def black_hole() -> Iterator[HostPort]:
    """A listener with a full accept queue: Linux drops further SYNs, so dials hang."""
    with socket.socket() as sock, socket.socket() as filler:
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)  # room for one queued connection, never accepted
        filler.settimeout(5)
        filler.connect(sock.getsockname())
        yield HostPort("127.0.0.1", sock.getsockname()[1])


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["splice", "copy"])
async def test_forwards_and_counts_active_connections(mode: str) -> None:
    async with NamedEcho("A") as a, serving(healthy_pool(a.address), mode=mode) as rig:
        clients = [await rig.connect() for _ in range(3)]
        for i, client in enumerate(clients):
            assert client.upstream == "A"
            await client.echo(bytes([i]) * 100_000)
        assert rig.proxy.active == rig.ep(a.address).active == 3
        assert rig.proxy.connections_to(a.address) == 3
        assert (rig.proxy.stats.accepted, rig.proxy.stats.forwarded) == (3, 3)

        clients[0].sock.close()  # FIN both ways through the proxy, then it forgets the pair
        await eventually(lambda: rig.proxy.active == rig.ep(a.address).active == 2)
        assert rig.proxy.connections_to(a.address) == 2
        await clients[1].echo(b"still here")
        for client in clients[1:]:
            client.sock.shutdown(socket.SHUT_WR)
            await client.wait_closed_by_peer()
        await eventually(lambda: rig.proxy.active == rig.ep(a.address).active == 0)
        assert rig.ep(a.address).connections_total == 3
        stats = rig.proxy.stats
        assert stats.upstream_bytes.value == 3 * 100_000 + len(b"still here")
        assert stats.client_bytes.value == 3 * (2 + 100_000) + len(b"still here")


async def test_socket_options_on_both_legs() -> None:
    """NODELAY both ways at once; keepalive and TCP_USER_TIMEOUT on the upstream leg, as
    configured, once the connection has lived ARM_AFTER (at most twice that)."""
    async with NamedEcho("A") as a, serving(healthy_pool(a.address)) as rig:
        await rig.connect()
        started = time.monotonic()
        [conn] = rig.proxy._by_endpoint[a.address]
        tcp = socket.IPPROTO_TCP
        assert conn.client.getsockopt(tcp, socket.TCP_NODELAY)
        up = conn.upstream
        assert up.getsockopt(tcp, socket.TCP_NODELAY)
        assert not up.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)  # not yet
        await eventually(lambda: up.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 3)
        assert ARM_AFTER - 0.1 <= time.monotonic() - started <= 2 * ARM_AFTER + 0.5
        assert rig.proxy._arming.armed == 1
        assert up.getsockopt(tcp, socket.TCP_KEEPIDLE) == SETTINGS.keepalive_idle
        assert up.getsockopt(tcp, socket.TCP_KEEPINTVL) == SETTINGS.keepalive_interval
        assert up.getsockopt(tcp, socket.TCP_KEEPCNT) == SETTINGS.keepalive_count
        assert up.getsockopt(tcp, socket.TCP_USER_TIMEOUT) == SETTINGS.user_timeout * 1000


async def test_close_connections_to_closes_only_that_endpoint() -> None:
    async with (
        NamedEcho("A") as a,
        NamedEcho("B") as b,
        serving(healthy_pool(a.address, b.address, tied=True)) as rig,
    ):
        # Tied endpoints: the fewest-active rule alternates between them.
        clients = [await rig.connect() for _ in range(4)]
        on_a = [c for c in clients if c.upstream == "A"]
        on_b = [c for c in clients if c.upstream == "B"]
        assert (len(on_a), len(on_b)) == (2, 2)

        assert rig.proxy.close_connections_to(a.address, CloseReason.REMOVED, "test") == 2
        for client in on_a:
            await client.wait_closed_by_peer()
        for client in on_b:
            await client.echo(b"unaffected")
        assert (rig.proxy.connections_to(a.address), rig.proxy.connections_to(b.address)) == (0, 2)
        assert (rig.ep(a.address).active, rig.ep(b.address).active) == (0, 2)
        assert rig.proxy.active == 2
        await eventually(lambda: not a.live, message="A saw its connections reset")
        assert rig.proxy.close_connections_to(a.address, CloseReason.REMOVED, "again") == 0
        assert rig.proxy.stats.closed[CloseReason.REMOVED] == 2


@pytest.mark.parametrize("close_on_unhealthy", [True, False])
async def test_unhealthy_transition_closes_connections_only_when_enabled(
    close_on_unhealthy: bool,
) -> None:
    async with (
        NamedEcho("A") as a,
        NamedEcho("B") as b,
        serving(
            healthy_pool(a.address, b.address, unhealthy_threshold=1, tied=True),
            close_on_unhealthy=close_on_unhealthy,
        ) as rig,
    ):
        first, second = await rig.connect(), await rig.connect()
        to_a, to_b = (first, second) if first.upstream == "A" else (second, first)
        assert (to_a.upstream, to_b.upstream) == ("A", "B")

        down = rig.pool.record_probe(a.address, False, None, "HTTP 500 from /readyz", 1.0)
        assert down is not None
        assert down.new is Health.UNHEALTHY
        rig.proxy.handle_transition(down)
        if close_on_unhealthy:
            await to_a.wait_closed_by_peer()
            assert rig.proxy.stats.closed[CloseReason.UNHEALTHY] == 1
            assert rig.proxy.connections_to(a.address) == 0
        else:
            await to_a.echo(b"pinned stream survives")
            assert rig.proxy.stats.closed[CloseReason.UNHEALTHY] == 0
            assert rig.proxy.connections_to(a.address) == 1
        await to_b.echo(b"unaffected")

        up = rig.pool.record_probe(b.address, True, 0.001, "ok", 2.0)
        assert up is None  # B was healthy already: no transition, nothing to do
        recovered = rig.pool.record_probe(a.address, True, 0.001, "ok", 3.0)
        assert recovered is not None
        rig.proxy.handle_transition(recovered)  # becoming healthy closes nothing
        await to_b.echo(b"still unaffected")


async def test_refused_first_endpoint_is_skipped_transparently() -> None:
    with refusing_port() as refused:
        async with (
            NamedEcho("A") as a,
            serving(healthy_pool(refused, a.address, unhealthy_threshold=1)) as rig,
        ):
            client = await rig.connect()
            assert client.upstream == "A"
            await client.echo(b"served despite the refusal")
            stats = rig.proxy.stats
            assert (stats.dial_failures, stats.no_upstream) == (1, 0)
            assert rig.ep(refused).dial_failures_total == 1
            assert [(d[0], d[2]) for d in rig.dials] == [(refused, False), (a.address, True)]
            [transition] = rig.transitions
            assert (transition.address, transition.old, transition.new) == (
                refused,
                Health.HEALTHY,
                Health.UNHEALTHY,
            )
            assert transition.reason.startswith("dial failed")
            # Now unhealthy, the refusing endpoint is only a last resort: no second failure.
            again = await rig.connect()
            assert again.upstream == "A"
            assert stats.dial_failures == 1


async def test_all_refused_closes_the_client() -> None:
    with refusing_port() as r1, refusing_port() as r2:
        async with serving(healthy_pool(r1, r2)) as rig:
            client = await rig.connect(greet=False)
            await client.wait_closed_by_peer()
            await eventually(lambda: rig.proxy.active == 0)
            stats = rig.proxy.stats
            assert (stats.no_upstream, stats.dial_failures, stats.forwarded) == (1, 2, 0)


async def test_max_connections_rejects_extra_clients() -> None:
    async with NamedEcho("A") as a, serving(healthy_pool(a.address), max_connections=2) as rig:
        first, _second = await rig.connect(), await rig.connect()
        # The reset may even beat the client's connect() to completion.
        with contextlib.suppress(ConnectionResetError):
            extra = await rig.connect(greet=False)
            await extra.wait_closed_by_peer()
        assert rig.proxy.stats.rejected == 1
        assert rig.proxy.active == 2
        first.sock.close()
        await eventually(lambda: rig.proxy.active == 1)
        replacement = await rig.connect()
        await replacement.echo(b"room again")
        assert rig.proxy.stats.rejected == 1


async def test_idle_timeout_closes_idle_connections_only() -> None:
    idle_timeout = 0.3
    async with (
        NamedEcho("A") as a,
        serving(healthy_pool(a.address), idle_timeout=idle_timeout) as rig,
    ):
        busy, idle = await rig.connect(), await rig.connect()
        stop = asyncio.Event()

        async def keep_busy() -> None:
            while not stop.is_set():
                await busy.echo(b"b" * 4096)

        chatter = asyncio.create_task(keep_busy(), name="busy client")
        last_activity = time.monotonic()
        await idle.echo(b"one last message")
        await idle.wait_closed_by_peer(timeout=5)
        closed_after = time.monotonic() - last_activity
        stop.set()
        await chatter
        # Closed for being idle, and not before it was idle for idle_timeout.
        assert closed_after >= idle_timeout
        assert rig.proxy.stats.closed[CloseReason.IDLE] == 1
        await busy.echo(b"the busy one is still open")
        assert rig.proxy.active == 1


class FlakyAccept:
    """fastio.accept, failing with ``error`` the first ``failures`` times (swapped in for
    the acceptor's accept: the compiled engine's sockets cannot be faked)."""

    def __init__(self, error: int, failures: int) -> None:
        self.error = error
        self.failures = failures
        self.calls: list[tuple[float, str]] = []

    def __call__(self, listener: socket.socket) -> int:
        if self.failures:
            self.failures -= 1
            self.calls.append((time.monotonic(), "failed"))
            raise OSError(self.error, "simulated")
        fd = fastio.accept(listener)
        self.calls.append((time.monotonic(), "accepted" if fd >= 0 else "empty"))
        return fd


@pytest.mark.parametrize("error", [errno.EMFILE, errno.ENFILE])
async def test_accept_resource_errors_pause_accepting_then_recover(
    error: int, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="kubeprism.forward.listeners")
    failures = 3
    listener = FlakyAccept(error, failures)
    monkeypatch.setattr(listeners, "accept", listener)
    async with NamedEcho("A") as a, serving(healthy_pool(a.address)) as rig:
        client = await rig.connect()  # served once the failures are used up
        await client.echo(b"served after the pause")
        outcomes = [what for _, what in listener.calls]
        # Level-triggered readiness would call accept() in a tight loop; the pause means
        # exactly one call per failure, then one accept and one empty accept.
        assert outcomes == ["failed"] * failures + ["accepted", "empty"]
        times = [t for t, _ in listener.calls]
        gaps = [later - earlier for earlier, later in itertools.pairwise(times[: failures + 1])]
        assert all(gap >= ACCEPT_BACKOFF * 0.9 for gap in gaps), gaps
        assert rig.proxy.stats.accept_errors == failures
        # One warning for the episode, not one per failed accept.
        assert sum("pausing accepts" in m for m in caplog.messages) == 1
        assert "accepting connections again" in caplog.messages

        second = await rig.connect()
        await second.echo(b"and keeps serving")
        assert rig.proxy.stats.accept_errors == failures


async def test_close_all_leaves_no_tasks_and_no_fds() -> None:
    async with NamedEcho("A") as a:
        fds_before = open_fds()
        with black_hole() as hole:
            pool = healthy_pool(a.address)
            async with serving(pool, idle_timeout=30.0, dial_timeout=30.0) as rig:
                established = [await rig.connect() for _ in range(2)]
                # Now only the black hole is left: the next client's dial hangs.
                pool.reconcile(specs(hole))
                pool.record_probe(hole, True, 0.0005, "ok", 0.0)
                dialing = await rig.connect(greet=False)
                await eventually(lambda: rig.proxy.active == 3)
                assert rig.proxy.stats.forwarded == 2
                # Dials, pumps and the idle sweep are callbacks and timers: no task at all.
                assert asyncio.all_tasks() == {asyncio.current_task()}
                assert len(rig.proxy._dialing) == 1

                rig.proxy.stop_accepting()
                assert rig.proxy.close_all() == 3
                assert rig.proxy.active == 0
                await asyncio.wait_for(rig.proxy.wait_drained(), 1)
                for client in [*established, dialing]:
                    await client.wait_closed_by_peer()
                assert rig.proxy.stats.dial_failures == 0  # cancelled, not failed
        await eventually(lambda: not a.live, message="upstream saw both connections end")
        assert open_fds() == fds_before


async def test_a_shorter_idle_timeout_applies_at_once_on_update() -> None:
    """Regression: the sweeper read idleTimeout once, so a reload from 3600 s to 0.2 s
    kept sweeping every 1800 s."""
    async with NamedEcho("A") as a, serving(healthy_pool(a.address), idle_timeout=3600.0) as rig:
        client = await rig.connect()
        rig.proxy.update(dataclasses.replace(SETTINGS, idle_timeout=0.2))
        await client.wait_closed_by_peer(timeout=5)
        assert rig.proxy.stats.closed[CloseReason.IDLE] == 1


async def test_a_dial_raising_a_non_oserror_closes_the_client_and_frees_its_slot() -> None:
    """Port 65536 makes connect() raise OverflowError: each client is closed, no fd or slot
    is kept, and a valid endpoint after it still serves."""
    bad = HostPort("127.0.0.1", 65536)
    async with NamedEcho("A") as a:
        fds_before = open_fds()
        async with serving(healthy_pool(bad), max_connections=5) as rig:
            for _ in range(20):  # 4x max_connections: a leaked slot would refuse the last ones
                client = await rig.connect(greet=False)
                await client.wait_closed_by_peer()
                client.sock.close()
            await eventually(lambda: rig.proxy.active == 0)
            stats = rig.proxy.stats
            assert (stats.no_upstream, stats.rejected, stats.forwarded) == (20, 0, 0)
            assert stats.dial_failures == 20
            rig.pool.reconcile(specs(bad, a.address))
            rig.pool.record_probe(a.address, True, 0.0005, "ok", 0.0)
            good = await rig.connect()
            assert good.upstream == "A"
            good.sock.close()
            await eventually(lambda: rig.proxy.active == 0)
            rig.clients.clear()
        assert open_fds() == fds_before


async def test_an_unexpected_error_while_admitting_closes_the_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug anywhere between accept and dial: the client is closed, the slot given back,
    one traceback logged for the episode, the rest counted."""

    def broken_rand() -> float:  # the tie-break of choosing among two endpoints
        raise RuntimeError("injected")

    async with NamedEcho("A") as a, NamedEcho("B") as b:
        pool = Pool(healthy_threshold=1, unhealthy_threshold=2, rand=broken_rand)
        pool.reconcile(specs(a.address, b.address))
        async with serving(pool, max_connections=2) as rig:
            for _ in range(5):
                client = await rig.connect(greet=False)
                await client.wait_closed_by_peer()
            await eventually(lambda: rig.proxy.active == 0)
            assert rig.proxy.stats.internal_errors == 5
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1
    assert "unexpected error accepting a connection" in tracebacks[0].getMessage()


async def test_passive_signs_a_slow_dial_and_an_upstream_reset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(proxy_module, "SLOW_DIAL_SHARE", 0.0)  # every dial is "slow"
    async with NamedEcho("A") as a:
        pool = healthy_pool(a.address)
        signs: list[tuple[HostPort, str]] = []
        pool.on_sign = lambda address, why: signs.append((address, why))
        async with serving(pool) as rig:
            client = await rig.connect()
            assert [why.startswith("slow dial (") for _a, why in signs] == [True]
            assert [c.address for c in rig.proxy.connections()] == [a.address]
            signs.clear()
            [server_side] = a.live
            server_side.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            server_side.abort()  # the server resets the forwarded connection
            await client.wait_closed_by_peer()
            await eventually(lambda: signs)
            assert signs == [(a.address, "forwarded connection failed: Connection reset by peer")]
