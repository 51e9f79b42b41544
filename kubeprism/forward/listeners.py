"""Listening sockets: bound all or none before anything serves, then accepted on in
batches, pausing (never spinning) while accept() fails."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Final

from kubeprism.base.net import ACCEPT_ABORTED_ERRNOS, LOCAL_ERRNOS, HostPort
from kubeprism.forward.fastio import accept
from kubeprism.forward.reactor import IN, Reactor

logger = logging.getLogger(__name__)

# Deep accept queue: a node's clients reconnect all at once after a failover.
LISTEN_BACKLOG: Final = 4096
# Accepts per readiness event: bounds the time one burst holds the loop.
ACCEPT_BATCH: Final = 64
# The type an accepted socket is wrapped as: its fd is non-blocking already (fastio.accept).
_NONBLOCKING_STREAM: Final = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
# After EMFILE/ENFILE, wait this long before accepting again: no busy loop, and
# the listener comes back by itself once descriptors are free.
ACCEPT_BACKOFF: Final = 0.1


class StartupError(Exception):
    """The daemon could not start (a socket could not be bound, ...)."""


def bind_listener(address: HostPort, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A bound, listening, non-blocking TCP socket (IPv6 sockets are v6-only)."""
    family = address.family
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
    return sock


def bind_all(addresses: Iterable[HostPort]) -> dict[HostPort, socket.socket]:
    """Bind every address or none (sockets bound so far are closed on failure)."""
    bound: dict[HostPort, socket.socket] = {}
    try:
        for address in addresses:
            bound[address] = bind_listener(address)
    except StartupError:
        for sock in bound.values():
            sock.close()
        raise
    return bound


class Acceptor:
    """Accepts on listening sockets and hands each client to ``admit``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        reactor: Reactor,
        admit: Callable[[socket.socket], None],
        failed: Callable[[], None],
    ) -> None:
        self.loop = loop
        self._reactor = reactor
        self._admit = admit
        self._failed = failed  # counts every failed accept()
        self._listeners: list[socket.socket] = []
        self._trouble = False

    def serve(self, listeners: Iterable[socket.socket]) -> None:
        """Start accepting on already bound, listening sockets."""
        for lsock in listeners:
            lsock.setblocking(False)
            # Set once here: Linux copies TCP_NODELAY to every accepted socket.
            lsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._listeners.append(lsock)
            self._watch(lsock)

    def stop(self) -> None:
        """Stop accepting; the listening sockets stay open for their owner."""
        for lsock in self._listeners:
            # The listening socket lives on (its owner, the next process): out of the set.
            self._reactor.unregister(lsock.fileno())
        self._listeners.clear()

    def _watch(self, lsock: socket.socket) -> None:
        # The family read once: the property is Python code that builds an enum.
        family = int(lsock.family)
        self._reactor.watch(lsock.fileno(), IN, lambda _events: self._on_accept(lsock, family))

    def _on_accept(self, lsock: socket.socket, family: int) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                fd = accept(lsock)
            except OSError as exc:
                self._accept_failed(lsock, exc)
                return
            if fd < 0:  # none waiting
                return
            # Non-blocking from accept4(): the socket object is told so, no ioctl.
            client = socket.socket(family, _NONBLOCKING_STREAM, 0, fd)
            if self._trouble:
                self._trouble = False
                logger.info("accepting connections again")
            self._admit(client)

    def _accept_failed(self, lsock: socket.socket, exc: OSError) -> None:
        self._failed()
        if exc.errno in ACCEPT_ABORTED_ERRNOS:
            return
        if not self._trouble:  # one line per episode, not one per backoff
            self._trouble = True
            if exc.errno in LOCAL_ERRNOS:
                logger.warning(
                    "accept failed (%s); pausing accepts for %gs at a time", exc, ACCEPT_BACKOFF
                )
            else:
                logger.error("accept failed unexpectedly (%s); pausing accepts", exc)
        self._reactor.unregister(lsock.fileno())
        self.loop.call_later(ACCEPT_BACKOFF, self._resume, lsock)

    def _resume(self, lsock: socket.socket) -> None:
        if lsock in self._listeners and lsock.fileno() >= 0:
            self._watch(lsock)
