"""The upstream leg's socket, shared by the forwarding dialer and the health checks.

Both open non-blocking TCP sockets to the same API servers with the same kind of options
(NODELAY, keepalive, TCP_USER_TIMEOUT): the options and the one function that applies them
live here, below both wings, so the health checks need nothing of forwarding.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Final

from kubeprism.base.net import HostPort

_TCP_USER_TIMEOUT: Final = getattr(socket, "TCP_USER_TIMEOUT", 18)
_STREAM: Final = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC


@dataclass(frozen=True, slots=True)
class DialOptions:
    """Socket options for the upstream leg, in the units the kernel wants."""

    timeout: float
    keepalive_idle: int
    keepalive_interval: int
    keepalive_count: int
    user_timeout_ms: int

    @classmethod
    def of(
        cls, timeout: float, idle: float, interval: float, count: int, user_timeout: float
    ) -> DialOptions:
        """Round seconds to what the socket options take (keepalive: whole seconds >= 1)."""
        return cls(
            timeout, max(1, round(idle)), max(1, round(interval)), count, int(user_timeout * 1000)
        )


def open_upstream_socket(
    address: HostPort, opts: DialOptions, liveness: bool = True
) -> socket.socket:
    """A non-blocking socket with NODELAY set, and keepalive and TCP_USER_TIMEOUT unless
    ``liveness`` is False (the caller then sets them with :func:`set_liveness` later)."""
    sock = socket.socket(address.family, _STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if liveness:
            set_liveness(sock, opts)
    except BaseException:
        sock.close()
        raise
    return sock


def set_liveness(sock: socket.socket, opts: DialOptions) -> None:
    """Let the kernel judge the connection's liveness: keepalive probes while idle,
    TCP_USER_TIMEOUT while data waits for an acknowledgement."""
    tcp = socket.IPPROTO_TCP
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(tcp, socket.TCP_KEEPIDLE, opts.keepalive_idle)
    sock.setsockopt(tcp, socket.TCP_KEEPINTVL, opts.keepalive_interval)
    sock.setsockopt(tcp, socket.TCP_KEEPCNT, opts.keepalive_count)
    sock.setsockopt(tcp, _TCP_USER_TIMEOUT, opts.user_timeout_ms)
