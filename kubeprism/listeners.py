"""Listening sockets kubeprism binds itself: all of them or none, before anything serves."""

from __future__ import annotations

import socket
from collections.abc import Iterable

from kubeprism.net import HostPort

# Deep accept queue: a node's clients reconnect all at once after a failover.
LISTEN_BACKLOG = 4096


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
