"""Plain-TCP upstreams for proxy tests; each is an async context manager exposing `.port`.

Closing a server aborts its live connections, so no transport outlives a test
(pytest runs with filterwarnings=error, where an unclosed transport fails the test).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from types import TracebackType
from typing import Self, cast

from datagen import data_chunks

READ_SIZE = 256 * 1024
# Longest request line SourceServer accepts ("<bytes>\n"); anything longer is a broken client.
MAX_LINE = 64


class _TCPServer:
    """Lifecycle shared by all test servers: bind on start, abort live connections on close."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._live: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    @property
    def active(self) -> int:
        """Connections currently open on the server side."""
        return len(self._live)

    async def start(self) -> None:
        """Bind and listen; `.port` is the bound port afterwards."""
        self._server = await asyncio.start_server(self._serve, sock=self._listen_socket())
        self.port = self._server.sockets[0].getsockname()[1]

    def _listen_socket(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._tune(sock)
            sock.bind((self.host, self.port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _tune(self, sock: socket.socket) -> None:
        """Hook for socket options that must be set before listen() (inherited by accepts)."""

    async def close(self) -> None:
        """Stop listening and abort every live connection."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        writers = list(self._live.values())
        for task in list(self._live):
            task.cancel()
        await asyncio.gather(*self._live, return_exceptions=True)
        # gather, not one await each: a handler cancelled while in wait_closed() cancels
        # that writer's close future too, and awaiting it again would raise CancelledError
        # into the test (1 restart test in 15 under load); returned here, not raised.
        await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._live[task] = writer
        self.accepted += 1
        try:
            await self.handle(reader, writer)
            writer.close()
            await writer.wait_closed()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            # Resets are routine in proxy tests, and only close() cancels us. Cancellation is
            # swallowed on purpose: Python 3.11's start_server done-callback calls
            # task.exception() on a cancelled task and logs a spurious error.
            writer.transport.abort()
        except BaseException:
            # A bug in a handler: never wait to flush to a peer that may not read.
            writer.transport.abort()
            raise
        finally:
            del self._live[task]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection; returning closes it."""
        raise NotImplementedError


async def _wait_for_peer_close(reader: asyncio.StreamReader) -> None:
    while await reader.read(READ_SIZE):
        pass


class EchoServer(_TCPServer):
    """Echo everything; on client EOF flush, half-close the write side, then close."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()


class SinkServer(_TCPServer):
    """Read to EOF, then reply '<sha256 hex> <byte count>\\n' and close; results kept in order."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.results: list[tuple[str, int]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest = hashlib.sha256()
        count = 0
        while data := await reader.read(READ_SIZE):
            digest.update(data)
            count += len(data)
        self.results.append((digest.hexdigest(), count))
        writer.write(f"{digest.hexdigest()} {count}\n".encode())
        await writer.drain()


class SourceServer(_TCPServer):
    """Read '<N>\\n', send N deterministic bytes, half-close, then read until the client closes."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.sent: list[int] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readuntil(b"\n")
        if len(line) > MAX_LINE:
            return
        size = int(line)
        for chunk in data_chunks(size):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        self.sent.append(size)
        # The client may still send after our EOF; half-close means the other half stays open.
        await _wait_for_peer_close(reader)


class NeverReadServer(_TCPServer):
    """Accept and never read, so the peer's writes back up (backpressure tests).

    `rcvbuf` shrinks SO_RCVBUF on the listening socket (accepted sockets inherit it, and
    window scaling is negotiated at SYN time, so it cannot be set later).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, rcvbuf: int | None = None) -> None:
        super().__init__(host, port)
        self.rcvbuf = rcvbuf

    def _tune(self, sock: socket.socket) -> None:
        if self.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The stream reader may already have pulled one read's worth; stop it pulling more.
        # cast, not isinstance: uvloop's transports do not subclass asyncio.Transport.
        cast(asyncio.Transport, writer.transport).pause_reading()
        await asyncio.Event().wait()  # until close() cancels us
