"""Passive signs from forwarded connections: a request whose answer is stuck.

An MTU black hole passes the TCP handshake and every small packet, and swallows every
full-size one: a client's request goes out, a small TLS session ticket or response head
may still come back, and the rest never does. A kept-alive health check every few
seconds would notice only at its next turn; the forwarded connections notice first.

Each sweep compares the bytes each connection has moved in both directions (counters the
pumps keep anyway, so the byte path pays nothing). A connection whose client spoke around
or after its server's last bytes, and whose server then stayed silent for
``stallTimeout``, is looked at once more closely, with one TCP_INFO call: if the kernel
has received segments *out of order* since the last look (the tail of a flight whose
full-size head vanished), or never received a byte at all, the server's path is suspect
and it is reported. A report only makes the checker check that server now; the verdict
is the check's. Quiet watches and slow answers cost one getsockopt each, and no check.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from kubeprism.base.net import HostPort

# Sweep period: a stall is reported stallTimeout to stallTimeout + this after the request.
SWEEP_PERIOD = 0.25
# Fewer unanswered bytes are not a request: HTTP/2 WINDOW_UPDATE and PING frames in a TLS
# record are 35-50 bytes, while the smallest TLS ClientHello or HTTP request is hundreds.
STALL_MIN_BYTES = 64
# struct tcp_info: tcpi_rcv_ooopack (Linux >= 5.4), the out-of-order segments received.
_TCPI_RCV_OOOPACK = struct.Struct("=I")
_TCPI_RCV_OOOPACK_OFFSET = 224
_TCP_INFO_SIZE = 256


class Moved(Protocol):
    """One direction of a forwarded connection: how many bytes it moved so far."""

    @property
    def moved(self) -> int: ...


class Connection(Protocol):
    """A forwarded connection as the sweep sees it (connection.Connection)."""

    @property
    def address(self) -> HostPort: ...

    @property
    def upstream(self) -> socket.socket: ...

    @property
    def pumps(self) -> tuple[Moved, Moved]: ...  # client -> upstream, upstream -> client


def out_of_order_segments(sock: socket.socket) -> int:
    """Segments the kernel received out of order on ``sock`` so far (0 if unknown)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return 0
    end = _TCPI_RCV_OOOPACK_OFFSET + _TCPI_RCV_OOOPACK.size
    if len(info) < end:
        return 0
    return int(_TCPI_RCV_OOOPACK.unpack_from(info, _TCPI_RCV_OOOPACK_OFFSET)[0])


@dataclass(slots=True)
class _Mark:
    up: int  # client -> server bytes, as last seen changing
    down: int  # server -> client bytes, as last seen changing
    up_at: float  # sweep that saw each change
    down_at: float
    ooo: int = 0  # out-of-order segments at the last close look
    looked: bool = False  # this silence was looked at already


class StallWatch:
    """Remembers each connection's byte counts between sweeps and reports stalls."""

    def __init__(
        self,
        timeout: float,
        report: Callable[[HostPort, str], None],
        out_of_order: Callable[[socket.socket], int] = out_of_order_segments,
    ) -> None:
        self.timeout = timeout
        self._report = report
        self._out_of_order = out_of_order
        self._marks: dict[Connection, _Mark] = {}

    def sweep(self, conns: Iterable[Connection], now: float) -> None:
        """Look at every live connection once; forget the ones that are gone.

        About 1-2 us per connection (10,000 connections: ~17 ms per sweep on a busy 2-core
        machine), so the loop stays plain.
        """
        old, marks = self._marks, {}
        quiet_since = now - self.timeout
        for conn in conns:
            mark = old.get(conn)
            if mark is None:
                mark = _Mark(0, 0, now, now)
            marks[conn] = mark
            pumps = conn.pumps
            up, down = pumps[0].moved, pumps[1].moved
            if down != mark.down:
                mark.down, mark.down_at, mark.looked = down, now, False
            if up != mark.up:
                mark.up, mark.up_at, mark.looked = up, now, False
            # Silent since the client spoke, and the client spoke at most one sweep before
            # the server's last bytes (a session ticket or a response head may cross the
            # request) or after them.
            if (
                not mark.looked
                and mark.down_at <= quiet_since
                and mark.up_at <= quiet_since
                and mark.up_at >= mark.down_at - SWEEP_PERIOD
                and mark.up >= STALL_MIN_BYTES
            ):
                mark.looked = True
                self._look(conn, mark)
        self._marks = marks

    def _look(self, conn: Connection, mark: _Mark) -> None:
        ooo = self._out_of_order(conn.upstream)
        holed, mark.ooo = ooo > mark.ooo, ooo
        if holed or mark.down == 0:
            what = "out-of-order segments and no progress" if holed else "no answer at all"
            self._report(conn.address, f"a forwarded request got {what} for {self.timeout:g}s")

    async def run(
        self, conns: Callable[[], Iterable[Connection]], clock: Callable[[], float]
    ) -> None:
        """Sweep every SWEEP_PERIOD until cancelled (stallTimeout 0: switched off)."""
        while True:
            await asyncio.sleep(SWEEP_PERIOD)
            if self.timeout > 0:
                self.sweep(conns(), clock())
            else:
                self._marks.clear()
