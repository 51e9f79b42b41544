"""Types of the C extension _fastio.c (the Python versions are in fastio.py)."""

import select
import socket

def relay(
    src: socket.socket | int, dst: socket.socket | int, buffer: memoryview
) -> tuple[int, int]: ...
def poll_now(epoll: select.epoll | int, maxevents: int) -> list[tuple[int, int]]: ...
def accept(listener: socket.socket | int) -> int: ...
