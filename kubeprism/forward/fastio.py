"""The calls every forwarded message makes, relay (one recv, then one send of what it read)
and poll_now (an epoll poll that does not wait), and accept (a non-blocking socket at once).

The compiled engine takes them from ``_fastio.c``, which skips what CPython's socket and
epoll calls do around a syscall that cannot block (release and retake the GIL, generic
argument and result handling): a third of a small message's user-space cost. These Python
versions are the same functions for the engine without a compiler; tests/test_fastio.py
holds both to the same results.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Callable

from kubeprism import ENGINE


def relay_py(src: socket.socket, dst: socket.socket, buffer: memoryview) -> tuple[int, int]:
    """One recv from ``src`` into ``buffer``, then one send of what it read to ``dst``:
    (read, sent). read is -1 when src has nothing (EAGAIN) and 0 at EOF; sent is 0 when dst
    is full. Other errors raise OSError."""
    try:
        n = src.recv_into(buffer)
    except BlockingIOError:
        return -1, 0
    if n == 0:
        return 0, 0
    try:
        return n, dst.send(buffer[:n])
    except BlockingIOError:
        return n, 0


def accept_py(listener: socket.socket) -> int:
    """A new connection's fd, non-blocking and close-on-exec (BlockingIOError when none
    is waiting)."""
    # socket.accept() without its wrapper: it converts family and type to enums and asks
    # for timeouts, five Python calls per connection.
    fd, _peer = listener._accept()  # type: ignore[attr-defined]
    os.set_blocking(fd, False)
    return int(fd)


def poll_now_py(ep: select.epoll, maxevents: int) -> list[tuple[int, int]]:
    """``ep.poll(0, maxevents)``: the events ready now, without waiting."""
    return ep.poll(0, maxevents)


Relay = Callable[[socket.socket, socket.socket, memoryview], tuple[int, int]]
PollNow = Callable[[select.epoll, int], list[tuple[int, int]]]
Accept = Callable[[socket.socket], int]

relay: Relay = relay_py
poll_now: PollNow = poll_now_py
accept: Accept = accept_py
if ENGINE == "native":  # the package checked that the extension was built (native.py)
    from kubeprism.forward import _fastio

    relay, poll_now, accept = _fastio.relay, _fastio.poll_now, _fastio.accept
