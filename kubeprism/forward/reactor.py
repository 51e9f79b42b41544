"""The forwarding engine's own readiness reactor: one level-triggered epoll set that the
event loop watches as a single fd.

Why not ``loop.add_reader``/``add_writer`` per socket: uvloop builds a libuv poll handle
for every fd it is asked to watch and tears it down again when the last callback goes,
each time with a FIONBIO and an epoll_ctl probe/ADD/DEL. A proxied connection paid 18
epoll_ctl calls that way (haproxy pays ~4). Here a registration lives as long as its
socket: one ADD when a socket joins, a MOD when what it waits for changes, and no DEL at
all on close (closing the last fd of a socket takes it out of every epoll set). Like
haproxy's epoll poller, an explicit DEL is needed only for a socket whose file lives on
elsewhere: one handed to the next process, or parked (see Port).

Level-triggered, so nothing is lost by doing less per wakeup: a socket that still has
bytes, a FIN or an error to read is reported again at the next poll.

Once woken with work, the reactor keeps waiting on its own set (LINGER) before it hands the
thread back to the event loop: uvloop's set holds this one, and a wakeup that reaches the
thread by way of the nested set made the unpinned round trip slower and its modes more
frequent. Measured unpinned on the 2-core machine (sockperf through kubeprism, medians of
5, against haproxy in the same run; bench/results/2026-12-08-0017-lingerT): p50/p99
1.04x/1.20x when every wakeup came through the loop, 1.01x/1.07x with a 5 ms linger, 1.00x/
1.01x with 50 ms. A 1 ms linger made it 1.71x (2026-12-08-0013-linger50), hence no less.
The loop's own work (health checks, the admin server, timers, signals) waits at most
HOLD + LINGER meanwhile: far below any timeout it keeps, and noise to the latency classes,
which read the lowest of several probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Final, Protocol

from kubeprism.forward.fastio import Poller, poller

logger = logging.getLogger(__name__)

IN: Final = select.EPOLLIN
OUT: Final = select.EPOLLOUT
ERR: Final = select.EPOLLERR
HUP: Final = select.EPOLLHUP
RDHUP: Final = select.EPOLLRDHUP
# What a reading side waits for: bytes, and whether the peer's FIN already came with them.
READ: Final = IN | RDHUP
# Events that say the socket has an end to read (a FIN, a hang-up, an error).
CLOSING: Final = RDHUP | HUP | ERR
# What a reading side, and a writing side, is woken by.
_READABLE: Final = IN | CLOSING
_WRITABLE: Final = OUT | ERR | HUP
_WAITING: Final = IN | OUT
# Events per poll: bounds one wakeup's work; the rest are reported at the next poll.
MAX_EVENTS: Final = 256
# After a wakeup with work: wait this long on the set itself for more (see above).
LINGER: Final = 0.005
# ... and give the event loop its turn after this long serving without a pause.
HOLD: Final = 0.002
# Linger only while the set is quiet: a poll that found more events than this means they
# queue up while we work, so the thread would not sleep anyway, and lingering would only cut
# the batches (pinned keep-alive: 0.95x haproxy lingering after every poll, 1.02x so:
# bench/results/2026-12-08-0038-quietPIN).
QUIET: Final = 1

Handler = Callable[[int], None]
ErrorHandler = Callable[[int, Exception], None]


class Reactor:
    """An epoll set driven from the event loop; handlers run with the events of their fd."""

    __slots__ = (
        "_closing",
        "_ep",
        "_handlers",
        "_loop",
        "_masks",
        "_on_error",
        "_poll_now",
        "_wait",
        "polls",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_error: ErrorHandler | None = None
    ) -> None:
        self._loop = loop
        self._on_error = on_error or _log_error
        # Opened with the first registration: a proxy that never serves holds no fd.
        self._ep: select.epoll | None = None
        self._poll_now: Poller | None = None  # polls _ep without waiting
        self._wait: Poller | None = None  # waits on _ep up to LINGER
        self._handlers: dict[int, Handler] = {}
        self._masks: dict[int, int] = {}  # what the kernel's set holds for each fd
        # fds closed during the poll being dispatched: an event already read for one of
        # them belongs to the old socket, not to a new one that reuses the number.
        self._closing: set[int] = set()
        self.polls = 0  # polls that found events

    def _open(self) -> select.epoll:
        ep = self._ep = select.epoll()  # close-on-exec by default
        self._poll_now = poller(ep, MAX_EVENTS, 0.0)
        self._wait = poller(ep, MAX_EVENTS, LINGER)
        self._loop.add_reader(ep.fileno(), self._poll)
        return ep

    def watch(self, fd: int, mask: int, handler: Handler) -> None:
        """Deliver ``mask`` events of ``fd`` to ``handler`` (registers or modifies)."""
        self._handlers[fd] = handler
        self.set(fd, mask)

    def set(self, fd: int, mask: int) -> None:
        """Change what ``fd`` waits for (a watched fd; one syscall if it changed)."""
        old = self._masks.get(fd)
        if old == mask:
            return
        ep = self._ep or self._open()
        try:
            if old is None:
                ep.register(fd, mask)
            else:
                ep.modify(fd, mask)
        except FileNotFoundError:  # closed without forget(): the kernel dropped it
            ep.register(fd, mask)
        except FileExistsError:  # pragma: no cover - registered without our knowing
            ep.modify(fd, mask)
        self._masks[fd] = mask

    def forget(self, fd: int) -> None:
        """The caller closes ``fd`` next: closing removes it from the set, no syscall."""
        self._handlers.pop(fd, None)
        self._masks.pop(fd, None)
        self._closing.add(fd)

    def unregister(self, fd: int) -> None:
        """Take ``fd`` out of the set now (its file lives on: a handover, a paused socket)."""
        with contextlib.suppress(OSError):  # closed under us: gone from the set already
            self.park(fd)
        self._handlers.pop(fd, None)
        self._closing.add(fd)

    def park(self, fd: int) -> None:
        """Out of the set but still handled: the next ``set`` adds it again. For a socket
        that reports a hang-up nobody waits for yet (level-triggered, it would repeat)."""
        if self._masks.pop(fd, None) is not None and self._ep is not None:
            self._ep.unregister(fd)

    def mask(self, fd: int) -> int | None:
        """What ``fd`` waits for; None when it is not in the set (for tests and asserts)."""
        return self._masks.get(fd)

    @property
    def watched(self) -> int:
        """How many fds have a handler."""
        return len(self._handlers)

    def _poll(self) -> None:
        """The event loop saw the set ready: serve it, then serve what comes within LINGER
        of each round, for HOLD at most, before returning to the loop."""
        ep, poll_now, wait = self._ep, self._poll_now, self._wait
        assert ep is not None and poll_now is not None and wait is not None  # while open
        ready = poll_now()
        if not ready:
            return
        self._dispatch(ready)
        if len(ready) > QUIET:
            return
        until = time.monotonic() + HOLD
        while self._ep is ep:  # a handler may have closed the set
            ready = wait()
            if not ready:
                return
            self._dispatch(ready)
            if len(ready) > QUIET or time.monotonic() >= until:
                return

    def _dispatch(self, ready: list[tuple[int, int]]) -> None:
        self.polls += 1
        handlers, closing = self._handlers, self._closing
        if closing:  # closed outside a poll (a timer, a health verdict): nothing read yet
            closing.clear()
        for fd, events in ready:
            if fd in closing:
                continue
            handler = handlers.get(fd)
            if handler is None:  # pragma: no cover - every registration has a handler
                logger.error("BUG: epoll reported fd %d, which nobody watches", fd)
                if self._ep is not None:  # not closed by an earlier handler
                    with contextlib.suppress(OSError):
                        self._ep.unregister(fd)
                continue
            try:
                handler(events)
            except Exception as exc:
                # A bug in a handler: level-triggered, the event would repeat forever, so
                # the fd is dropped from the set and its owner is told.
                self.unregister(fd)
                self._on_error(fd, exc)
        if closing:
            closing.clear()

    def close(self) -> None:
        """Stop polling and close the set (every socket must be closed or given away); a
        later registration opens a new one."""
        ep, self._ep, self._poll_now, self._wait = self._ep, None, None, None
        if ep is not None:
            self._loop.remove_reader(ep.fileno())
            ep.close()
        self._handlers.clear()
        self._masks.clear()


def _log_error(fd: int, exc: Exception) -> None:
    logger.error("BUG: handling events of fd %d failed", fd, exc_info=exc)


class Side(Protocol):
    """One direction of a connection, as a socket's Port sees it (a Pump)."""

    done: bool

    def on_readable(self, events: int) -> None: ...

    def on_writable(self) -> None: ...

    def fail(self, exc: OSError) -> None: ...


class Port:
    """One socket of a connection in the reactor: what its reading side (the pump that
    reads it) and its writing side (the pump that writes it) wait for, as one epoll mask."""

    __slots__ = ("fd", "joined", "mask", "reactor", "reader", "sock", "writer")

    def __init__(self, reactor: Reactor, sock: socket.socket) -> None:
        self.reactor, self.sock, self.fd = reactor, sock, sock.fileno()
        self.mask = 0
        self.joined = False
        self.reader: Side | None = None
        self.writer: Side | None = None

    def join(self) -> None:
        """Be handled by this port from now on, waiting for what the sides asked for so
        far: one ADD, or one MOD for a socket a dial registered."""
        if not self.joined and self.fd >= 0:
            self.joined = True
            self.reactor.watch(self.fd, self.mask, self.on_events)

    def want(self, bit: int, on: bool) -> None:
        """Wait for ``bit`` (READ or OUT) or stop waiting for it."""
        mask = self.mask | bit if on else self.mask & ~bit
        if mask != self.mask:
            self.mask = mask
            if self.joined:
                self.reactor.set(self.fd, mask)

    def leave(self) -> None:
        """The socket is about to be closed: no syscall, no further event."""
        if self.fd >= 0:
            self.reactor.forget(self.fd)
        self._gone()

    def hand_over(self) -> None:
        """The socket goes to another process: out of the set now, no further event."""
        if self.fd >= 0:
            self.reactor.unregister(self.fd)
        self._gone()

    def _gone(self) -> None:
        self.fd, self.mask, self.joined = -1, 0, False

    def on_events(self, events: int) -> None:
        """Dispatch one poll's events to the side waiting for them."""
        mask = self.mask
        if mask & IN and events & _READABLE:
            self.reader.on_readable(events)  # type: ignore[union-attr]  # IN: a reader
        if self.mask & OUT and events & _WRITABLE:
            self.writer.on_writable()  # type: ignore[union-attr]  # OUT: a writer
        if not mask & _WAITING:
            self._unwanted(events)

    def _unwanted(self, events: int) -> None:
        """An error or hang-up while nobody waits (a paused or finished direction). An
        error ends the connection now (an idle socket's reset is noticed at once, not at
        the next byte); a hang-up is parked until a side waits again."""
        if events & ERR:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            live = [side for side in (self.reader, self.writer) if side and not side.done]
            if err and live:
                live[0].fail(OSError(err, os.strerror(err)))
                return
        if self.fd >= 0:
            self.reactor.park(self.fd)
