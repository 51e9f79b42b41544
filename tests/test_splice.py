"""splice.py: Pump and PipePool on a real uvloop loop with real TCP sockets on 127.0.0.1.

Each test wires one pump between two TCP connections::

    feeder ──tcp── src ==Pump==> dst ──tcp── sink

The test writes into ``feeder`` and reads from ``sink``; the pump owns ``src``/``dst``. The
reactor says what each fd waits for, so the tests can see backpressure (reader off, writer
on) and that ``stop()`` leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from netns import NetNS
from util import CountingEpoll, count_epoll, count_fds, eventually, tcp_pair

from kubeprism.forward import splice
from kubeprism.forward.pipes import PipePool
from kubeprism.forward.reactor import IN, OUT, Port, Reactor
from kubeprism.forward.splice import ByteCounter, Mode, Pump, PumpContext

MODES: list[Mode] = ["splice", "copy"]
MiB = 1 << 20
# Small kernel buffers on the pump's output leg, so a non-reading sink stalls it quickly.
SMALL_BUFFER = 64 * 1024
# What SO_SNDBUF reads back once the pump fixed it: Linux doubles the value set (socket(7)).
BOUNDED = 2 * splice.LOOPBACK_SEND_BUFFER


@dataclass
class Rig:
    """One pump between two TCP connections, and what it reported."""

    loop: asyncio.AbstractEventLoop
    reactor: Reactor
    pool: PipePool
    counter: ByteCounter
    feeder: socket.socket
    src: socket.socket
    dst: socket.socket
    sink: socket.socket
    pump: Pump
    ctx: PumpContext
    epoll: CountingEpoll
    done: list[tuple[Pump, OSError | None]] = field(default_factory=list)

    @property
    def readers(self) -> set[int]:
        """fds the reactor reports readability of."""
        return {
            s.fileno() for s in (self.src, self.dst) if (self.reactor.mask(s.fileno()) or 0) & IN
        }

    @property
    def writers(self) -> set[int]:
        """fds the reactor reports writability of."""
        return {
            s.fileno() for s in (self.src, self.dst) if (self.reactor.mask(s.fileno()) or 0) & OUT
        }

    @property
    def backpressured(self) -> bool:
        """The pump stopped reading src and waits for dst to become writable."""
        return not self.readers and self.writers == {self.dst.fileno()}

    async def send(self, data: bytes, eof: bool = False) -> None:
        """Write into the feeder (and then half-close it)."""
        await self.loop.sock_sendall(self.feeder, data)
        if eof:
            self.feeder.shutdown(socket.SHUT_WR)

    async def receive(self, size: int, chunk: int = 256 * 1024) -> bytes:
        """Read exactly ``size`` bytes from the sink."""
        buf = bytearray()
        while len(buf) < size:
            data = await self.loop.sock_recv(self.sink, min(chunk, size - len(buf)))
            assert data, f"EOF after {len(buf)} of {size} bytes"
            buf += data
        return bytes(buf)

    async def digest_to_eof(self, chunk: int) -> tuple[str, int]:
        """Read the sink to EOF in ``chunk``-sized reads; return (sha256, byte count)."""
        digest, count = hashlib.sha256(), 0
        while data := await self.loop.sock_recv(self.sink, chunk):
            digest.update(data)
            count += len(data)
        return digest.hexdigest(), count


@contextlib.asynccontextmanager
async def rig(
    mode: Mode, pool: PipePool | None = None, small_buffers: bool = False
) -> AsyncIterator[Rig]:
    """A started pump; on exit it is stopped, must have no reader/writer left, sockets closed."""
    loop = asyncio.get_running_loop()
    reactor = Reactor(loop)
    own_pool = pool is None
    pool = PipePool() if pool is None else pool
    feeder, src = tcp_pair()
    sink, dst = tcp_pair(rcvbuf=SMALL_BUFFER if small_buffers else None)
    if small_buffers:
        dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    counter = ByteCounter()
    done: list[tuple[Pump, OSError | None]] = []
    ctx = PumpContext(reactor, mode, pool)
    ports = Port(reactor, src), Port(reactor, dst)
    pump = Pump(ctx, *ports, counter, lambda p, exc: done.append((p, exc)))
    pump.start()  # registers src: the reactor's set is open from here on
    epoll = count_epoll(reactor)
    r = Rig(loop, reactor, pool, counter, feeder, src, dst, sink, pump, ctx, epoll, done)
    try:
        yield r
    finally:
        pump.stop()
        assert (r.readers, r.writers) == (set(), set())
        for port in ports:
            port.leave()
        for sock in (feeder, src, dst, sink):
            sock.close()
        reactor.close()
        if own_pool:
            pool.close()
    await asyncio.sleep(0)  # let the loop poll once more with the fds gone


def payload(size: int) -> bytes:
    """Deterministic incompressible bytes."""
    return random.Random(size).randbytes(size)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_integrity_with_a_slow_reader_pauses_and_resumes_reading(mode: Mode) -> None:
    size = 16 * MiB
    data = payload(size)
    async with rig(mode, small_buffers=True) as r:
        sender = asyncio.create_task(r.send(data, eof=True), name="feeder")
        # Nobody reads the sink yet: the pump must stop reading src and wait for dst.
        await eventually(lambda: r.backpressured, message="pump never paused reading")
        assert r.pump.moved < size
        assert not r.done
        digest, count = await asyncio.wait_for(r.digest_to_eof(chunk=32 * 1024), 20)
        await sender
        assert (digest, count) == (hashlib.sha256(data).hexdigest(), size)
        await eventually(lambda: r.done)
        assert r.done == [(r.pump, None)]
        assert r.pump.moved == r.counter.value == size
        assert r.epoll.starts(OUT) > 1  # it paused and resumed more than once
        assert r.pump.mode == mode
        assert not r.pump.holds_pipe
        assert r.pool.free == r.pool.created


@pytest.mark.parametrize("mode", MODES)
async def test_eof_half_closes_dst_and_reports_none(mode: Mode) -> None:
    async with rig(mode) as r:
        await r.send(b"last words", eof=True)
        assert await r.receive(10) == b"last words"
        assert await r.loop.sock_recv(r.sink, 1) == b""  # FIN passed on
        await eventually(lambda: r.done)
        assert r.done == [(r.pump, None)]
        # Half-close only: the other direction of both connections still works.
        await r.loop.sock_sendall(r.sink, b"reply")
        assert await r.loop.sock_recv(r.dst, 5) == b"reply"
        await r.loop.sock_sendall(r.src, b"back")
        assert await r.loop.sock_recv(r.feeder, 4) == b"back"
        assert (r.pump.moved, r.counter.value) == (10, 10)


@pytest.mark.parametrize("mode", MODES)
async def test_reset_source_reports_the_error(mode: Mode) -> None:
    async with rig(mode) as r:
        await r.send(b"x" * 1000)
        assert await r.receive(1000) == b"x" * 1000
        r.feeder.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        r.feeder.close()  # RST
        await eventually(lambda: r.done)
        [(pump, exc)] = r.done
        assert pump is r.pump
        assert isinstance(exc, OSError)
        assert exc.errno == errno.ECONNRESET
        assert r.pump.done
        assert not r.pump.holds_pipe
        assert r.pool.free == r.pool.created


@pytest.mark.parametrize("reads", [splice.READS_PER_WAKEUP, 1])
@pytest.mark.parametrize("mode", MODES)
async def test_data_and_reset_arriving_together_are_both_seen(
    mode: Mode, reads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by tests/faults (scenario 9a): uvloop stops watching a socket after reporting
    POLLERR once, so a pump that read once per wakeup forwarded the data, never saw the
    reset, and held both connections open forever."""
    monkeypatch.setattr(splice, "READS_PER_WAKEUP", reads)
    async with rig(mode) as r:
        # Both land before the loop polls again: one readiness report with POLLERR.
        r.feeder.send(b"last words")
        r.feeder.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        r.feeder.close()
        assert await r.receive(10) == b"last words"
        await eventually(lambda: r.done, 5, message="the reset was never noticed")
        [(_pump, exc)] = r.done
        assert isinstance(exc, OSError)
        assert exc.errno == errno.ECONNRESET


@pytest.mark.parametrize("mode", MODES)
async def test_stop_unregisters_and_closes_a_pipe_that_still_holds_bytes(mode: Mode) -> None:
    async with rig(mode, small_buffers=True) as r:
        sender = asyncio.create_task(r.send(payload(4 * MiB)), name="feeder")
        await eventually(lambda: r.backpressured)
        free_before, fds_before = r.pool.free, count_fds()
        if mode == "splice":
            assert r.pump.holds_pipe
            assert r.pump.pending > 0
        r.pump.stop()
        assert (r.readers, r.writers) == (set(), set())
        assert not r.pump.holds_pipe
        assert r.pump.pending == 0
        assert r.pool.free == free_before  # a dirty pipe never goes back to the pool
        assert count_fds() == fds_before - (2 if mode == "splice" else 0)
        assert r.pool.created == (1 if mode == "splice" else 0)
        assert not r.done  # stop() is the caller's decision, not a completion
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender


@pytest.mark.parametrize("mode", MODES)
async def test_idle_pumps_hold_no_pipe_and_the_pool_reuses_pipes(mode: Mode) -> None:
    pool = PipePool()
    try:
        async with contextlib.AsyncExitStack() as stack:
            rigs = [await stack.enter_async_context(rig(mode, pool)) for _ in range(3)]
            for n in range(60):
                message = payload(1000 + 997 * n)
                for r in rigs:
                    await r.send(message)
                for r in rigs:
                    assert await r.receive(len(message)) == message
                    assert not r.pump.holds_pipe, "an idle pump kept its pipe"
            total = sum(1000 + 997 * n for n in range(60))
            assert all(r.pump.moved == r.counter.value == total for r in rigs)
        # At most one pipe per pump ever existed, over 180 transfers; all are back.
        assert pool.created <= (len(rigs) if mode == "splice" else 0)
        assert pool.free == pool.created
    finally:
        pool.close()


def failing_splice(
    monkeypatch: pytest.MonkeyPatch, r: Rig, fails: Callable[[str, int], bool], exc: OSError
) -> dict[str, int]:
    """Make os.splice raise ``exc`` when ``fails(side, nth call of that side)``; the calls
    of each side ("in" reads src, "out" writes dst) are counted in the dict returned."""
    real_splice = os.splice
    calls = {"in": 0, "out": 0}

    def fake_splice(src: int, dst: int, count: int, *args: Any, **kwargs: Any) -> int:
        side = "in" if src == r.src.fileno() else "out"
        calls[side] += 1
        if fails(side, calls[side]):
            raise exc
        return real_splice(src, dst, count, *args, **kwargs)

    monkeypatch.setattr(os, "splice", fake_splice)
    return calls


@pytest.mark.parametrize("direction", ["in", "out"])
async def test_splice_failure_falls_back_to_copy_without_losing_bytes(
    direction: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="kubeprism.forward.splice")
    size = 4 * MiB
    data = payload(size)
    async with rig("splice") as r:
        einval = OSError(errno.EINVAL, "Invalid argument")
        # Fail once, mid-transfer.
        calls = failing_splice(monkeypatch, r, lambda side, n: side == direction and n == 3, einval)
        sender = asyncio.create_task(r.send(data, eof=True), name="feeder")
        digest, count = await asyncio.wait_for(r.digest_to_eof(chunk=64 * 1024), 20)
        await sender
        await eventually(lambda: r.done)
        assert (digest, count) == (hashlib.sha256(data).hexdigest(), size)
        assert r.done == [(r.pump, None)]
        assert r.pump.mode == "copy"
        assert r.ctx.fallbacks == 1
        assert r.pump.moved == r.counter.value == size
        assert calls[direction] == 3  # no splice after the fallback
        assert not r.pump.holds_pipe
        assert r.pool.free == r.pool.created == 1
    assert any("splice failed" in m for m in caplog.messages)


def test_pipe_pool_keeps_at_most_keep_pipes_and_closes_the_rest() -> None:
    pool = PipePool(keep=2)
    fds = count_fds()
    pipes = [pool.get() for _ in range(4)]
    assert (pool.created, count_fds()) == (4, fds + 8)
    for pipe in pipes:
        pool.put(pipe)
    assert (pool.free, count_fds()) == (2, fds + 4)
    again = pool.get()
    assert again in pipes[:2]  # reused, not created
    assert pool.created == 4
    pool.put(again)
    pool.close()
    assert (pool.free, count_fds()) == (0, fds)


@pytest.mark.parametrize("direction", ["in", "out"])
async def test_ebadf_from_splice_is_a_bug_that_closes_not_a_fallback(
    direction: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: EBADF counted as "splice unsupported" and silently fell back to copying."""
    caplog.set_level(logging.WARNING, logger="kubeprism.forward.splice")
    async with rig("splice") as r:
        ebadf = OSError(errno.EBADF, "Bad file descriptor")
        failing_splice(monkeypatch, r, lambda side, _n: side == direction, ebadf)
        # 1 MiB: the first read is bulk, so the pump switches to splice(2) at once.
        sender = asyncio.create_task(r.send(payload(MiB)), name="feeder")
        await eventually(lambda: r.done)
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        [(pump, exc)] = r.done
        assert isinstance(exc, OSError) and exc.errno == errno.EBADF
        assert pump.mode == "splice"  # no fallback
        assert r.ctx.fallbacks == 0
    assert any(m.startswith("BUG: ") for m in caplog.messages)
    assert not any("splice failed" in m for m in caplog.messages)


def send_buffer(sock: socket.socket) -> int:
    """The kernel's current send buffer size of ``sock``."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


@pytest.mark.parametrize(
    ("mode", "size", "bounded"),
    [("splice", 4 * MiB, True), ("splice", 1024, False), ("copy", 4 * MiB, False)],
)
async def test_only_bulk_spliced_to_a_loopback_peer_fixes_its_send_buffer(
    mode: Mode, size: int, bounded: bool
) -> None:
    """Bulk spliced to a peer on this host gets splice.LOOPBACK_SEND_BUFFER; small traffic
    and the copy path (which reads 256 KiB at a time) keep the kernel's autotuning."""
    data = payload(size)
    async with rig(mode) as r:
        sender = asyncio.create_task(r.send(data, eof=True), name="feeder")
        digest, count = await asyncio.wait_for(r.digest_to_eof(chunk=256 * 1024), 20)
        await sender
        assert (digest, count) == (hashlib.sha256(data).hexdigest(), size)
        await eventually(lambda: r.done)
        assert r.done == [(r.pump, None)]
        assert (send_buffer(r.dst) == BOUNDED) is bounded, send_buffer(r.dst)
        assert send_buffer(r.src) != BOUNDED  # the side it reads from is left alone


def test_the_send_buffer_is_fixed_for_loopback_peers_only(netns: NetNS) -> None:
    """A fixed buffer caps a connection at buffer / RTT: a peer elsewhere keeps autotuning.
    The namespace's lo gets an address outside 127.0.0.0/8 to stand for one."""
    netns.run(["ip", "addr", "add", "10.255.0.1/32", "dev", "lo"])
    pairs = {
        "10.255.0.1": netns.call_inside(lambda: tcp_pair(host="10.255.0.1")),
        "127.0.0.1": tcp_pair(),
        "::1": tcp_pair(host="::1"),
    }
    try:
        for host, (client, server) in pairs.items():
            for sock in (client, server):
                before = send_buffer(sock)
                splice.bound_loopback_send_buffer(sock)
                expected = before if host == "10.255.0.1" else BOUNDED
                assert send_buffer(sock) == expected, (host, before)
    finally:
        for pair in pairs.values():
            for sock in pair:
                sock.close()
    with socket.socket() as unconnected:  # no peer (yet, or any more): nothing to do
        before = send_buffer(unconnected)
        splice.bound_loopback_send_buffer(unconnected)
        assert send_buffer(unconnected) == before
