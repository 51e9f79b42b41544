"""One proxied connection: a client socket, the upstream socket serving it, two pumps."""

from __future__ import annotations

import contextlib
import enum
import errno
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from kubeprism.base.net import HostPort
from kubeprism.forward.reactor import Port
from kubeprism.forward.splice import ByteCounter, Pump, PumpContext

# SO_LINGER {on, 0 s}: close with RST, so a dead upstream leaves no FIN_WAIT behind.
_LINGER_RST: Final = struct.pack("ii", 1, 0)
# Errors on the upstream side of a forwarded connection that hint at the server or the
# path (a passive health sign); a FIN is not one: HTTP/1.1 servers close first routinely.
_UPSTREAM_TROUBLE: Final = frozenset(
    {errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH}
)


class CloseReason(enum.Enum):
    """Why kubeprism itself closed a connection (the `reason` label of the close counter)."""

    UNHEALTHY = "unhealthy"
    IDLE = "idle"
    REMOVED = "removed"


@dataclass(slots=True)
class Frozen:
    """A connection stopped for a handover: its sockets and the bytes not yet delivered.

    ``upstream`` is None for a client that was accepted but not forwarded yet (its dial
    was cancelled); the next process dials for it.
    """

    client: socket.socket
    upstream: socket.socket | None = None
    address: HostPort | None = None
    to_upstream: bytes = b""
    to_client: bytes = b""


@dataclass(frozen=True, slots=True)
class ConnectionContext:
    """What a connection needs from its proxy, and nothing more."""

    pumps: PumpContext
    clock: Callable[[], float]
    to_upstream: ByteCounter
    to_client: ByteCounter
    forget: Callable[[Connection], None]  # called once, when the connection closes
    sign: Callable[[HostPort, str], None] = lambda _a, _why: None  # passive health signs


class Connection:
    """One proxied client connection and the upstream connection serving it."""

    __slots__ = (
        "_forget",
        "_sign",
        "address",
        "client",
        "closed",
        "idle_mark",
        "idle_since",
        "ports",
        "pumps",
        "upstream",
    )

    def __init__(
        self,
        ctx: ConnectionContext,
        client: socket.socket,
        upstream: socket.socket,
        address: HostPort,
    ) -> None:
        self._forget, self._sign = ctx.forget, ctx.sign
        self.client, self.upstream, self.address = client, upstream, address
        self.closed = False
        # Bytes moved at the last sweep that saw a change, and when that sweep ran.
        self.idle_mark = 0
        self.idle_since = ctx.clock()
        reactor = ctx.pumps.reactor
        self.ports = (Port(reactor, client), Port(reactor, upstream))
        client_port, upstream_port = self.ports
        self.pumps = (
            Pump(ctx.pumps, client_port, upstream_port, ctx.to_upstream, self._done),
            Pump(ctx.pumps, upstream_port, client_port, ctx.to_client, self._done),
        )

    @property
    def moved(self) -> int:
        """Bytes moved in both directions so far."""
        return self.pumps[0].moved + self.pumps[1].moved

    def start(self, frozen: Frozen | None = None) -> None:
        """Start both directions (an adopted connection first sends what was left)."""
        a, b = self.pumps
        a.peer, b.peer = b, a
        a.resume(frozen.to_upstream if frozen else b"", join=False)
        b.resume(frozen.to_client if frozen else b"", join=False)
        for port in self.ports:
            port.join()
        if frozen is None:
            # The client usually spoke while we dialed (a TLS ClientHello, a request):
            # read it now instead of after one more poll. Nothing there costs one EAGAIN.
            a.on_readable(0)

    def freeze(self) -> Frozen:
        """Stop both directions without closing anything (a handover)."""
        self.closed = True
        to_upstream, to_client = (pump.freeze() for pump in self.pumps)
        for port in self.ports:
            port.hand_over()  # its file lives on in the next process: out of our set now
        for pump in self.pumps:
            pump.detach()
        self._forget(self)
        return Frozen(self.client, self.upstream, self.address, to_upstream, to_client)

    def idle_for(self, now: float) -> float:
        """Seconds since a sweep last saw bytes move (never counted from before they moved)."""
        if self.moved != self.idle_mark:
            self.idle_mark, self.idle_since = self.moved, now
        return now - self.idle_since

    def _done(self, pump: Pump, exc: OSError | None) -> None:
        # A reset or write error ends the whole connection; a FIN ends one direction.
        if exc is not None and pump is self.pumps[1] and exc.errno in _UPSTREAM_TROUBLE:
            self._sign(self.address, f"forwarded connection failed: {exc.strerror}")
        to_upstream, to_client = self.pumps
        if exc is not None or (to_upstream.done and to_client.done):
            self.close()

    def close(self, reset_upstream: bool = False) -> None:
        """Stop both pumps, then close both sockets (pumps first: fds get reused)."""
        if self.closed:
            return
        self.closed = True
        for port in self.ports:
            port.leave()  # first: the pumps stopping then costs no epoll_ctl
        for pump in self.pumps:
            pump.stop()
            pump.detach()
        if reset_upstream:
            set_linger_rst(self.upstream)
        self.client.close()
        self.upstream.close()
        self._forget(self)


def set_linger_rst(sock: socket.socket) -> None:
    """Make close() send RST instead of FIN (a dead peer then leaves no FIN_WAIT behind)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
