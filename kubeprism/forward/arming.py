"""The upstream leg's kernel liveness checks, set once a connection has lived a moment.

Keepalive and TCP_USER_TIMEOUT are five setsockopt calls per upstream socket, a fifth of
all the syscalls of a short connection (an HTTP request with `Connection: close`, a CNI
plugin's one call), which ends long before either check could ever fire: keepalive's
first probe comes keepaliveIdle (>= 1 s) after the last byte, and the user timeout counts
from the first unacknowledged retransmission. So they are set in batches, on connections
still open between ARM_AFTER and twice that after they started: every long-lived
connection (a watch, kubelet's stream) gets them within a second, a short one never pays.
The kernel times keepalive from the last byte received, not from when it was set, so a
connection armed late is judged as if it had been armed from the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Final

from kubeprism.base.sockets import DialOptions, set_liveness

# Seconds a connection lives before it is armed (at most twice that): shorter than any
# keepaliveIdle (>= 1 s) and than the checks' interval, longer than a short request.
ARM_AFTER: Final = 0.5


class Arming:
    """Arms young connections in two generations, from one timer that runs only while
    there is something to arm."""

    __slots__ = ("_loop", "_old", "_options", "_timer", "_young", "armed")

    def __init__(self, loop: asyncio.AbstractEventLoop, options: Callable[[], DialOptions]) -> None:
        self._loop = loop
        self._options = options  # read at arming time: a reload's values apply
        # Upstream sockets, not connections: a closed connection's objects are freed at
        # once instead of living on here for up to a second (10,000 churned connections
        # held 3 MiB of RSS that way).
        self._young: list[socket.socket] = []  # started since the last tick
        self._old: list[socket.socket] = []  # started before it: armed at the next tick
        self._timer: asyncio.TimerHandle | None = None
        self.armed = 0

    def add(self, upstream: socket.socket) -> None:
        """A connection just started forwarding to ``upstream``."""
        self._young.append(upstream)
        if self._timer is None:
            self._timer = self._loop.call_later(ARM_AFTER, self._tick)

    def _tick(self) -> None:
        self._timer = None
        opts = self._options()
        for sock in self._old:
            if sock.fileno() >= 0:  # not closed (nor handed over) since
                with contextlib.suppress(OSError):  # reset meanwhile: the pumps see it
                    set_liveness(sock, opts)
                    self.armed += 1
        self._old, self._young = self._young, []
        if self._old:
            self._timer = self._loop.call_later(ARM_AFTER, self._tick)

    def close(self) -> None:
        """Stop the timer and forget every connection."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._old, self._young = [], []
