"""The calls every forwarded message makes: relay (one recv, then one send of what it read),
a poller (an epoll poll bound once to its set, its bound on events and its timeout), and
accept (a non-blocking socket at once).

The compiled engine takes them from ``_fastio.c``, which skips what CPython's socket and
epoll calls do around a syscall that cannot block (release and retake the GIL, generic
argument and result handling): a third of a small message's user-space cost. These Python
versions are the same functions for the engine without a compiler; tests/test_fastio.py
holds both to the same results.

They take fds, not socket objects: the C side would otherwise call each socket's fileno()
method, a quarter of a small message's user-space cost.
"""

from __future__ import annotations

import functools
import math
import os
import select
import socket
from collections.abc import Callable

from kubeprism import ENGINE


def relay_py(src_fd: int, dst_fd: int, buffer: memoryview) -> tuple[int, int]:
    """One read from socket ``src_fd`` into ``buffer``, then one write of what it read to
    socket ``dst_fd``: (read, sent). read is -1 when src has nothing (EAGAIN) and 0 at EOF;
    sent is 0 when dst is full. Other errors raise OSError (a reset peer: EPIPE, not
    SIGPIPE, which the interpreter ignores)."""
    try:
        n = os.readv(src_fd, (buffer,))
    except BlockingIOError:
        return -1, 0
    if n == 0:
        return 0, 0
    try:
        return n, os.write(dst_fd, buffer[:n])
    except BlockingIOError:
        return n, 0


def accept_py(listener: socket.socket) -> int:
    """A new connection's fd, non-blocking and close-on-exec; -1 when none is waiting (an
    exception per accept burst cost more than the accept)."""
    try:
        # socket.accept() without its wrapper: it converts family and type to enums and
        # asks for timeouts, five Python calls per connection.
        fd, _peer = listener._accept()  # type: ignore[attr-defined]
    except BlockingIOError:
        return -1
    os.set_blocking(fd, False)
    return int(fd)


Relay = Callable[[int, int, memoryview], tuple[int, int]]
Poller = Callable[[], list[tuple[int, int]]]
Accept = Callable[[socket.socket], int]


def poller_py(ep: select.epoll, maxevents: int, timeout: float = 0.0) -> Poller:
    """``ep.poll(timeout, maxevents)`` as a call without arguments: the events ready now,
    or (``timeout`` seconds, rounded up to milliseconds) the first that come within it."""
    return functools.partial(ep.poll, timeout, maxevents)


relay: Relay = relay_py
accept: Accept = accept_py
poller: Callable[[select.epoll, int, float], Poller] = poller_py
if ENGINE == "native":  # the package checked that the extension was built (native.py)
    from kubeprism.forward import _fastio

    def poller_c(ep: select.epoll, maxevents: int, timeout: float = 0.0) -> Poller:
        """The C poll, bound to ``ep``'s fd once: no fileno() call per poll."""
        return functools.partial(_fastio.poll, ep.fileno(), maxevents, math.ceil(timeout * 1000))

    relay, accept, poller = _fastio.relay, _fastio.accept, poller_c
