"""Dialing upstream endpoints in preference order, from readiness callbacks.

No task, coroutine or future per connection: a non-blocking connect(), one
writer callback and one timer. On a busy node that is the difference between
keeping up with connection churn and not (measured: ~12-15 us less CPU per
connection than the coroutine version).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from kubeprism.net import HostPort

_TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC


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


def open_upstream_socket(address: HostPort, opts: DialOptions) -> socket.socket:
    """A non-blocking socket with NODELAY, keepalive and TCP_USER_TIMEOUT set."""
    sock = socket.socket(address.family, _STREAM)
    try:
        tcp = socket.IPPROTO_TCP
        sock.setsockopt(tcp, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(tcp, socket.TCP_KEEPIDLE, opts.keepalive_idle)
        sock.setsockopt(tcp, socket.TCP_KEEPINTVL, opts.keepalive_interval)
        sock.setsockopt(tcp, socket.TCP_KEEPCNT, opts.keepalive_count)
        sock.setsockopt(tcp, _TCP_USER_TIMEOUT, opts.user_timeout_ms)
    except BaseException:
        sock.close()
        raise
    return sock


class DialOwner(Protocol):
    """What a Dial reports to (the Proxy)."""

    def dial_succeeded(
        self, dial: Dial, upstream: socket.socket, address: HostPort, seconds: float
    ) -> None: ...

    def dial_failed(self, address: HostPort, seconds: float, exc: OSError) -> None: ...

    def dial_exhausted(self, dial: Dial) -> None: ...


class Dial:
    """One client's dial: try candidates in order until one accepts, or none is left."""

    __slots__ = (
        "_address",
        "_candidates",
        "_clock",
        "_loop",
        "_next",
        "_opts",
        "_owner",
        "_sock",
        "_started",
        "_timer",
        "client",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        owner: DialOwner,
        opts: DialOptions,
        clock: Callable[[], float],
        client: socket.socket,
        candidates: Sequence[HostPort],
    ) -> None:
        self._loop, self._owner, self._opts, self._clock = loop, owner, opts, clock
        self.client = client
        self._candidates = candidates
        self._next = 0
        self._sock: socket.socket | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._address = HostPort("", 0)
        self._started = 0.0

    def start(self) -> None:
        """Dial the first candidate (results arrive through the owner)."""
        self._try_next()

    def _try_next(self) -> None:
        while self._next < len(self._candidates):
            address = self._address = self._candidates[self._next]
            self._next += 1
            self._started = self._clock()
            try:
                sock = open_upstream_socket(address, self._opts)
            except OSError as exc:
                self._owner.dial_failed(address, 0.0, exc)
                continue
            except Exception as exc:  # e.g. a bad address family: this candidate, not the rest
                self._failed(_unusable(address, exc))
                continue
            try:
                err = sock.connect_ex((address.host, address.port))
            except Exception as exc:  # OverflowError for port 65536, TypeError, ...
                sock.close()
                self._failed(_unusable(address, exc))
                continue
            if err == 0:
                self._owner.dial_succeeded(self, sock, address, self._clock() - self._started)
                return
            if err != errno.EINPROGRESS:
                sock.close()
                self._failed(OSError(err, os.strerror(err)))
                continue
            self._sock = sock
            self._loop.add_writer(sock.fileno(), self._on_writable)
            self._timer = self._loop.call_later(self._opts.timeout, self._on_timeout)
            return
        self._owner.dial_exhausted(self)

    def _failed(self, exc: OSError) -> None:
        self._owner.dial_failed(self._address, self._clock() - self._started, exc)

    def _take(self) -> socket.socket:
        sock = self._sock
        assert sock is not None
        self._sock = None
        self._loop.remove_writer(sock.fileno())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return sock

    def _on_writable(self) -> None:
        sock = self._take()
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            self._owner.dial_succeeded(self, sock, self._address, self._clock() - self._started)
            return
        sock.close()
        self._failed(OSError(err, os.strerror(err)))
        self._try_next()

    def _on_timeout(self) -> None:
        self._timer = None
        self._take().close()
        self._failed(TimeoutError(errno.ETIMEDOUT, "timed out"))
        self._try_next()

    def cancel(self) -> None:
        """Abandon the dial in progress (shutdown); the client is the owner's to close."""
        if self._sock is not None:
            self._take().close()
        self._next = len(self._candidates)


def _unusable(address: HostPort, exc: Exception) -> OSError:
    """A dial that raised something other than OSError, as the OSError the owner expects."""
    return OSError(errno.EINVAL, f"cannot dial {address}: {type(exc).__name__}: {exc}")
