"""Load that must survive kubeprism restarts: held connections, bulk streams, fresh requests.

One upstream (`LoadServer`) speaks a one-line protocol chosen by the client:
``S <n>`` streams n deterministic bytes each way (both ends verify every byte and its
sha256), ``E`` echoes (held connections, and the pinger that measures forwarding
pauses), ``R`` answers ``OK`` and closes (the fresh requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from dataclasses import dataclass, field

from datagen import StreamVerifier, data_chunks, data_sha256
from tcpservers import READ_SIZE, _TCPServer

PING = b"pingpong"
# Fresh request cadence (the "a fresh request every 100 ms").
REQUEST_INTERVAL = 0.1
# A request that waits out a restart is not a failure; clients wait far longer (kubectl: 32 s).
REQUEST_TIMEOUT = 20.0
PING_INTERVAL = 0.01


class LoadServer(_TCPServer):
    """The upstream of the restart tests; stream results are kept per connection."""

    def __init__(self) -> None:
        super().__init__()
        self.streams: list[StreamVerifier] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            return  # a TCP health probe
        kind, _, arg = line.strip().partition(b" ")
        if kind == b"S":
            await self._stream(reader, writer, int(arg))
        elif kind == b"E":
            while data := await reader.read(READ_SIZE):
                writer.write(data)
                await writer.drain()
        elif kind == b"R":
            writer.write(b"OK\n")
            await writer.drain()

    async def _stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        verifier = StreamVerifier(n)
        self.streams.append(verifier)
        sender = asyncio.create_task(_send(writer, n), name="load server send")
        try:
            while data := await reader.read(READ_SIZE):
                verifier.feed(data)
        finally:
            await sender


async def _send(writer: asyncio.StreamWriter, n: int) -> None:
    for chunk in data_chunks(n):
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()


@dataclass
class Stream:
    """One client stream: what it received (verified) and whether its sha256 matched."""

    size: int
    verifier: StreamVerifier
    sha_ok: bool = False
    error: str = ""


@dataclass
class Load:
    """Everything the clients saw."""

    streams: list[Stream] = field(default_factory=list)
    held_ok: int = 0
    held_lost: list[str] = field(default_factory=list)
    pings: list[tuple[float, float]] = field(default_factory=list)  # (sent at, round trip)
    requests: list[tuple[float, float, bool]] = field(default_factory=list)  # (t0, dt, ok)
    request_errors: list[str] = field(default_factory=list)

    def pause_around(self, t0: float, t1: float) -> float:
        """Longest ping round trip among pings sent in [t0, t1] (the forwarding pause)."""
        return max((rtt for sent, rtt in self.pings if t0 <= sent <= t1), default=0.0)

    @property
    def failed_requests(self) -> int:
        """Fresh requests that did not get their answer."""
        return sum(not ok for _, _, ok in self.requests)


async def stream_client(port: int, size: int, load: Load) -> None:
    """Send and receive ``size`` bytes, verifying every byte received and its sha256."""
    stream = Stream(size, StreamVerifier(size))
    load.streams.append(stream)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sender = asyncio.create_task(_send(writer, size), name="load client send")
    try:
        writer.write(f"S {size}\n".encode())
        digest = hashlib.sha256()
        while data := await reader.read(READ_SIZE):
            stream.verifier.feed(data)
            digest.update(data)
        await sender
        stream.sha_ok = digest.hexdigest() == data_sha256(size)
    except OSError as exc:
        stream.error = repr(exc)
    finally:
        # The sender's error is the stream's: retrieved here, not logged when the task is
        # collected, maybe in the middle of pytest's failure report (failure_reports.py).
        sender.cancel()
        await asyncio.wait([sender])
        if not sender.cancelled() and sender.exception() is not None:
            stream.error = stream.error or repr(sender.exception())
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def open_held(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An echo connection, proven to work once."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"E\n" + PING)
    await writer.drain()
    assert await reader.readexactly(len(PING)) == PING
    return reader, writer


async def check_held(
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], load: Load
) -> None:
    """Every held connection must still echo; close them all."""
    for index, (reader, writer) in enumerate(held):
        try:
            writer.write(PING)
            await writer.drain()
            got = await asyncio.wait_for(reader.readexactly(len(PING)), 5.0)
            load.held_ok += got == PING
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            load.held_lost.append(f"held #{index}: {exc!r}")
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def pinger(port: int, load: Load, stop: asyncio.Event) -> None:
    """Round trips on one held connection until ``stop``: the forwarding pause."""
    reader, writer = await open_held(port)
    try:
        while not stop.is_set():
            sent = time.monotonic()
            writer.write(PING)
            await writer.drain()
            await reader.readexactly(len(PING))
            load.pings.append((sent, time.monotonic() - sent))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PING_INTERVAL)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def requester(port: int, load: Load, stop: asyncio.Event) -> None:
    """A fresh connection and request every REQUEST_INTERVAL until ``stop``."""
    while not stop.is_set():
        t0 = time.monotonic()
        ok = False
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"R\n")
                reply = await reader.read()
                ok = reply == b"OK\n"
                if not ok:
                    load.request_errors.append(f"t={t0:.3f}: reply {reply!r}")
        except (OSError, TimeoutError) as exc:
            load.request_errors.append(f"t={t0:.3f}: {exc!r} after {time.monotonic() - t0:.3f} s")
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        load.requests.append((t0, time.monotonic() - t0, ok))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, t0 + REQUEST_INTERVAL - time.monotonic()))
