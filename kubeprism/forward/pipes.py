"""Pipes for splice(2), pooled: borrowed only while bytes are in flight, so an idle
connection holds none (thousands of idle watches would otherwise pin thousands of pipes
and run into the kernel's per-user pipe page limit)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Final

# 1 MiB pipes let one splice move a large chunk per wakeup (measured ~1.4x haproxy
# bulk with this size); capped by /proc/sys/fs/pipe-max-size if that is lower.
PIPE_SIZE: Final = 1 << 20
# Enough free pipes for the connections that are busy at any moment; more are
# closed on return so a burst does not pin pipe pages for good.
PIPE_POOL_KEEP: Final = 64
_F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)

Pipe = tuple[int, int]


class PipePool:
    """Non-blocking pipes, sized once, handed out while data is in flight."""

    def __init__(self, size: int = PIPE_SIZE, keep: int = PIPE_POOL_KEEP) -> None:
        self.size = size
        self.keep = keep
        self.created = 0
        self._free: list[Pipe] = []

    def get(self) -> Pipe:
        """A pipe with nothing in it."""
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Over pipe-max-size or the per-user soft limit the default size still works.
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, _F_SETPIPE_SZ, self.size)
        self.created += 1
        return r, w

    def put(self, pipe: Pipe) -> None:
        """Return an empty pipe."""
        if len(self._free) < self.keep:
            self._free.append(pipe)
        else:
            close_pipe(pipe)

    @property
    def free(self) -> int:
        """Pipes idle in the pool."""
        return len(self._free)

    def close(self) -> None:
        """Close every pooled pipe."""
        while self._free:
            close_pipe(self._free.pop())


def close_pipe(pipe: Pipe) -> None:
    """Close both ends of a pipe."""
    os.close(pipe[0])
    os.close(pipe[1])
