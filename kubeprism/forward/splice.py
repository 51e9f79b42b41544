"""Byte pumps between two raw non-blocking sockets: zero-copy splice(2), copy fallback.

The fd-level modules are this one, pipes.py, reactor.py, dial.py, connection.py,
listeners.py and proxy.py. A :class:`Pump` moves one direction of a connection from the
readiness events of the forwarding reactor (reactor.py), delivered through the Port of
each socket; never through asyncio transports: uvloop crashes when one socket is driven
both ways. Pipes come from a pipes.PipePool, borrowed only while bytes are in flight.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import Final, Literal

from kubeprism.base.net import SPLICE_UNSUPPORTED_ERRNOS, is_fd_bug, is_loopback_host
from kubeprism.forward.fastio import relay
from kubeprism.forward.pipes import Pipe, PipePool, close_pipe
from kubeprism.forward.reactor import CLOSING, OUT, READ, Port, Reactor

logger = logging.getLogger(__name__)

# Copy-mode read size: large enough for bulk, shared by every pump (single thread).
SCRATCH_SIZE: Final = 256 * 1024
# In splice mode, a read at least this large switches the pump to splice(2): small
# request/response traffic is cheaper to copy, bulk is cheaper to splice.
SPLICE_AFTER: Final = 64 * 1024
# Reads per readiness event before yielding to the other connections; level-triggered,
# the reactor reports the socket again at its next poll if more is waiting.
READS_PER_WAKEUP = 16  # not Final: a test varies it (Final ones are inlined when compiled)
# A splicing pump's destination send buffer when the peer is on this host, fixed instead
# of autotuned (the kernel doubles it: 256 KiB in all). Autotuned it grows towards
# tcp_wmem's 4 MiB, and with megabytes queued on loopback the reader copies them out of
# memory instead of cache, and our queue is pushed on by the reader's ACKs, so our sending
# runs in the reader's time slice (kubelet's, on a node). Bounded, what is in flight stays
# in the CPU's L2 and we send in our own time. Measured with bench bulk (iperf3, 2-core
# VM): the whole machine's CPU per GiB forwarded 0.77 -> 0.62 s, throughput 1.2x -> 1.8x
# haproxy's; 64 and 256 KiB were slower. Only once a pump splices: the copy path reads
# 256 KiB at a time and would send into a full buffer. Never for a remote peer: a fixed
# buffer caps a connection at buffer / RTT (256 KiB over 10 ms is 200 Mb/s).
LOOPBACK_SEND_BUFFER: Final = 128 * 1024
_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

Mode = Literal["splice", "copy"]
DoneCallback = Callable[["Pump", "OSError | None"], None]


def splice_supported() -> bool:
    """True where os.splice exists (Linux, Python >= 3.10)."""
    return hasattr(os, "splice")


_SPLICE: Final = splice_supported()


def bound_loopback_send_buffer(sock: socket.socket) -> None:
    """Fix the send buffer of ``sock`` at LOOPBACK_SEND_BUFFER if its peer is on this
    host (two syscalls, once per connection that turns to bulk)."""
    with contextlib.suppress(OSError):  # not connected any more: the next splice says so
        if is_loopback_host(sock.getpeername()[0]):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LOOPBACK_SEND_BUFFER)


class ByteCounter:
    """A plain integer counter: the byte path must not call a metrics library."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class PumpContext:
    """What every pump of one proxy shares; a reload may change the mode for new pumps."""

    __slots__ = ("fallbacks", "mode", "pipes", "reactor", "scratch", "view")

    def __init__(self, reactor: Reactor, mode: Mode, pipes: PipePool | None = None) -> None:
        self.reactor = reactor
        self.mode: Mode = mode
        self.pipes = pipes if pipes is not None else PipePool()
        # Copy-mode read buffer: one is enough, the loop runs one pump at a time.
        self.scratch = bytearray(SCRATCH_SIZE)
        # A view of it made once: slicing a view is one allocation, viewing and slicing two.
        self.view = memoryview(self.scratch)
        # Pumps that fell back from splice to copying (read at scrape time).
        self.fallbacks = 0


class Pump:
    """Moves bytes from ``src`` to ``dst`` until EOF, then half-closes ``dst``."""

    __slots__ = (
        "_backlog",
        "_ctx",
        "_on_done",
        "_pipe",
        "_pipes",
        "_scratch",
        "_splicing",
        "counter",
        "done",
        "dst",
        "dst_fd",
        "dst_port",
        "mode",
        "moved",
        "peer",
        "pending",
        "src",
        "src_fd",
        "src_port",
    )

    def __init__(
        self,
        ctx: PumpContext,
        src: Port,
        dst: Port,
        counter: ByteCounter,
        on_done: DoneCallback,
    ) -> None:
        self._ctx = ctx
        self.src_port, self.dst_port = src, dst
        src.reader, dst.writer = self, self
        self.src, self.dst = src.sock, dst.sock
        self.src_fd, self.dst_fd = src.fd, dst.fd
        self.mode: Mode = ctx.mode if _SPLICE else "copy"
        self._pipes = ctx.pipes
        self._scratch = ctx.view
        self.counter = counter
        self._on_done = on_done
        self._pipe: Pipe | None = None
        self._backlog = b""
        self.pending = 0  # bytes sitting in the borrowed pipe
        self.moved = 0
        self.done = False
        # Like haproxy's splice-auto: copy small reads (a syscall pair either way, and
        # copying 100 bytes is cheaper than moving pages through a pipe); splice once a
        # read shows a bulk transfer.
        self._splicing = False
        self.peer: Pump | None = None  # the other direction of the same connection

    def start(self) -> None:
        """Begin forwarding."""
        self.resume(b"")

    def stop(self) -> None:
        """Stop forwarding at once (the connection is being closed)."""
        self.done = True
        if self.src_port.joined:  # a closing connection's ports left already: no call
            self.src_port.want(READ, False)
        if self.dst_port.joined:
            self.dst_port.want(OUT, False)
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            # A pipe that still holds bytes must not go back to the pool.
            close_pipe(pipe) if self.pending else self._pipes.put(pipe)
            self.pending = 0

    def freeze(self) -> bytes:
        """Stop at once for a handover; return the bytes read from src but not yet sent.

        One last non-blocking flush first, so usually nothing is left. What is left
        (a full destination) is returned instead of lost: the next process sends it
        before it reads again, so no byte is lost or duplicated.
        """
        self._want_read(False)
        self._want_write(False)
        with contextlib.suppress(OSError):  # a dead dst: the next process sees the error
            if self._pipe is not None:
                self._splice_out()
            elif self._backlog:
                self._copy_out()
        left = self._backlog + (self._drain_pipe() if self._pipe is not None else b"")
        self._backlog = b""
        self.done = True
        return left

    def resume(self, backlog: bytes, join: bool = True) -> None:
        """Start (an adopted direction: send what the previous process left, then read).
        ``join=False``: the caller joins the ports once both directions said what they
        wait for (one epoll_ctl per socket instead of two)."""
        if backlog:
            self._backlog = backlog
            self._want_write(True)
        else:
            self._want_read(True)
        if join:
            self.src_port.join()
            self.dst_port.join()

    def detach(self) -> None:
        """Drop the done callback and the peer: breaks the reference cycles, so a closed
        connection is freed by reference counting instead of waiting for the GC."""
        self._on_done = _ignore_done
        self.peer = None
        self.src_port.reader = self.dst_port.writer = None

    @property
    def holds_pipe(self) -> bool:
        """True while a pipe is borrowed (for tests and gauges)."""
        return self._pipe is not None

    # ------------------------------------------------------------ readiness

    def _want_read(self, on: bool) -> None:
        self.src_port.want(READ, on)

    def _want_write(self, on: bool) -> None:
        self.dst_port.want(OUT, on)

    def on_readable(self, events: int) -> None:
        """src has bytes, a FIN or an error: move what there is, up to a bound."""
        # Level-triggered: whatever is left after READS_PER_WAKEUP reads, or arrives after
        # a short read, is reported again. A FIN, hang-up or error that epoll reported
        # with the data (EPOLLRDHUP: no syscall to learn it) is read in this wakeup: a
        # response and its close then cost one wakeup, not two.
        drain = events & CLOSING
        try:
            # The common case first, without the loop: one read that took all there was.
            if not self._splicing and not self._copy_in(drain):
                return
            for _ in range(READS_PER_WAKEUP):
                if not (self._splice_in() if self._splicing else self._copy_in(drain)):
                    return
        except OSError as exc:
            self._finish(exc)

    def on_writable(self) -> None:
        """dst has room again: flush what is waiting, then read again."""
        try:
            flushed = self._splice_out() if self._pipe is not None else self._copy_out()
        except OSError as exc:
            self._finish(exc)
            return
        if flushed:
            self._want_write(False)
            self._want_read(True)

    def fail(self, exc: OSError) -> None:
        """The socket reported an error while this pump waited for nothing."""
        self._finish(exc)

    # ------------------------------------------------------------ splice path

    def _splice_in(self) -> bool:
        """One splice from src; True if src may have more to read right now."""
        if self._pipe is None:
            self._pipe = self._pipes.get()
        try:
            n = os.splice(self.src_fd, self._pipe[1], self._pipes.size, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            self._release_pipe()
            return False
        except OSError as exc:
            if exc.errno not in SPLICE_UNSUPPORTED_ERRNOS:
                raise
            self._fall_back(exc)
            return True
        if n == 0:
            self._release_pipe()
            self._eof()
            return False
        self.pending += n
        if not self._splice_out():
            self._want_read(False)
            self._want_write(True)
            return False
        return True

    def _splice_out(self) -> bool:
        """Drain the pipe into dst; True when empty, False when dst is full."""
        assert self._pipe is not None
        while self.pending:
            try:
                n = os.splice(self._pipe[0], self.dst_fd, self.pending, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno not in SPLICE_UNSUPPORTED_ERRNOS:
                    raise
                self._fall_back(exc)
                return not self._backlog
            self.pending -= n
            self.moved += n
            self.counter.value += n
        self._release_pipe()
        return True

    def _release_pipe(self) -> None:
        if self._pipe is not None and not self.pending:
            self._pipes.put(self._pipe)
            self._pipe = None

    def _drain_pipe(self) -> bytes:
        """Read the bytes waiting in the pipe back into memory; the empty pipe goes back."""
        assert self._pipe is not None
        chunks = []
        while self.pending:
            chunk = os.read(self._pipe[0], self.pending)
            self.pending -= len(chunk)
            chunks.append(chunk)
        self._release_pipe()
        return b"".join(chunks)

    def _fall_back(self, exc: OSError) -> None:
        """Switch this pump to copying, keeping any bytes already in the pipe."""
        # Counted for every pump, logged once: the reason is the same each time.
        log = logger.debug if self._ctx.fallbacks else logger.warning
        log("splice failed (%s); copying bytes instead (kubeprism_splice_fallbacks_total)", exc)
        self._ctx.fallbacks += 1
        self.mode = "copy"
        self._splicing = False
        if self._pipe is not None:
            self._backlog = self._drain_pipe()

    # ------------------------------------------------------------ copy path

    def _copy_in(self, drain: int = 0) -> bool:
        """One recv from src; True if src may have more to read right now (``drain``:
        a FIN or an error is known to follow the data)."""
        n, sent = relay(self.src_fd, self.dst_fd, self._scratch)
        if n <= 0:  # -1: nothing to read after all
            if n == 0:
                self._eof()
            return False
        if n >= SPLICE_AFTER and self.mode == "splice":
            self._splicing = True
            bound_loopback_send_buffer(self.dst)
        self.moved += sent  # _count() inlined: this runs for every read
        self.counter.value += sent
        if sent < n:
            # The scratch buffer is shared: keep only the unsent tail, privately.
            self._backlog = bytes(self._scratch[sent:n])
            self._want_read(False)
            self._want_write(True)
            return False
        # A short read took all there was: no recv() for EAGAIN (a syscall and an
        # exception, ~7 % of a small request's cost). What comes next, a FIN or a reset
        # included, the level-triggered reactor reports.
        return bool(drain) or n == len(self._scratch)

    def _copy_out(self) -> bool:
        """Send the backlog; True when it is all sent."""
        try:
            sent = self.dst.send(self._backlog)
        except BlockingIOError:
            return False
        self._count(sent)
        self._backlog = self._backlog[sent:]
        return not self._backlog

    def _count(self, n: int) -> None:
        self.moved += n
        self.counter.value += n

    # ------------------------------------------------------------ the end

    def _eof(self) -> None:
        """The source sent FIN: pass it on (half-close) and report."""
        if self.peer is not None and self.peer.done:
            # Both directions ended: the connection closes now, and close() sends the
            # FIN itself; a shutdown() first would be one more syscall per connection.
            self._finish(None)
            return
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                self._finish(exc)
                return
        self._finish(None)

    def _finish(self, exc: OSError | None) -> None:
        if self.done:
            return
        if exc is not None and is_fd_bug(exc):
            # Never a fallback: a bad fd means one was closed or reused under us.
            logger.error(
                "BUG: %s on fds %d -> %d; closing the connection", exc, self.src_fd, self.dst_fd
            )
        # Done first, so that a connection that now closes leaves the reactor before
        # stop() would change what its sockets wait for (no epoll_ctl for a closing fd).
        self.done = True
        self._on_done(self, exc)
        self.stop()


def _ignore_done(_pump: Pump, _exc: OSError | None) -> None:
    """The done callback of a detached pump."""
