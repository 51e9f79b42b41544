"""Pump.freeze() and Pump.resume(): no byte lost or duplicated across a handover.

    feeder ──tcp── src ==Pump==> dst ──tcp── sink

The sink stops reading, so the pump backs up with bytes in flight (in a pipe when splicing,
in its copy backlog otherwise); it is frozen there, and a new pump on the same two sockets
(as the next process builds it, from a fresh context) resumes with what was left. The sink
must then read exactly what the feeder sent, in order.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import Callable

import pytest
from datagen import data_bytes
from util import eventually, tcp_pair

from kubeprism.forward.reactor import Port, Reactor
from kubeprism.forward.splice import ByteCounter, Mode, Pump, PumpContext

SENT = 8 << 20
SMALL_BUFFER = 64 * 1024
# Handovers tried until one freezes with bytes in flight (a final flush can empty the pipe).
FREEZES = 3


def _pump(mode: Mode, src: socket.socket, dst: socket.socket) -> tuple[Pump, PumpContext]:
    """A pump with a reactor of its own, as each process has."""
    reactor = Reactor(asyncio.get_running_loop())
    ctx = PumpContext(reactor, mode)
    return Pump(ctx, Port(reactor, src), Port(reactor, dst), ByteCounter(), _ignore), ctx


def _ignore(_pump: Pump, _exc: OSError | None) -> None:
    """No completion expected."""


def _hand_over(pump: Pump) -> None:
    """What Connection.freeze does after freezing its pumps: the sockets leave the set."""
    pump.src_port.hand_over()
    pump.dst_port.hand_over()


def _close(ctx: PumpContext) -> None:
    ctx.pipes.close()
    ctx.reactor.close()


def _backed_up(pump: Pump, floor: int) -> Callable[[], bool]:
    """True once ``pump`` moved more than ``floor`` bytes and then nothing for one poll."""
    seen = [-1]

    def stalled() -> bool:
        before, seen[0] = seen[0], pump.moved
        return pump.moved > floor and pump.moved == before

    return stalled


@pytest.mark.parametrize("mode", ["splice", "copy"])
async def test_freeze_with_bytes_in_flight_then_resume_delivers_each_byte_once(
    mode: Mode,
) -> None:
    loop = asyncio.get_running_loop()
    feeder, src = tcp_pair()
    sink, dst = tcp_pair(rcvbuf=SMALL_BUFFER)
    dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    data = data_bytes(SENT)
    pump, ctx = _pump(mode, src, dst)
    contexts = [ctx]
    try:
        pump.start()
        sending = asyncio.create_task(loop.sock_sendall(feeder, data), name="feeder")
        # Backed up (moved past what the small receive side holds, then stalled) and
        # frozen there. freeze() flushes once more first; when the destination found room
        # for all that was in flight, that is a clean handover too: the next process
        # freezes again, up to FREEZES times, until a freeze holds bytes.
        moved, left, floor = 0, b"", SMALL_BUFFER
        for _ in range(FREEZES):
            await eventually(_backed_up(pump, floor), 10, 0.05, message="the pump backs up")
            left = pump.freeze()
            _hand_over(pump)
            pump.detach()
            moved += pump.moved
            assert moved + len(left) <= SENT
            pump, ctx = _pump(mode, src, dst)
            contexts.append(ctx)
            pump.resume(left)
            if left:
                break
            floor = -1  # the sink still reads nothing: the next pump backs up at once
        assert left, f"{FREEZES} freezes, none with bytes in flight: the pump never backed up"
        digest = hashlib.sha256()
        received = 0
        while received < SENT:
            chunk = await loop.sock_recv(sink, 1 << 20)
            assert chunk, f"EOF after {received} bytes"
            digest.update(chunk)
            received += len(chunk)
        await sending
        pump.stop()
        _hand_over(pump)
        pump.detach()
    finally:
        for ctx in contexts:
            _close(ctx)
        for sock in (feeder, src, dst, sink):
            sock.close()
    assert received == SENT
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("mode", ["splice", "copy"])
async def test_freeze_of_an_idle_pump_leaves_nothing(mode: Mode) -> None:
    feeder, src = tcp_pair()
    sink, dst = tcp_pair()
    pump, ctx = _pump(mode, src, dst)
    try:
        pump.start()
        assert pump.freeze() == b""
        assert not pump.holds_pipe and pump.done
        _hand_over(pump)
        assert ctx.reactor.watched == 0
    finally:
        pump.detach()
        _close(ctx)
        for sock in (feeder, src, dst, sink):
            sock.close()
