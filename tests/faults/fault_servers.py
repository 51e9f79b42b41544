"""Small servers the fault suite runs inside control-plane namespaces.

    python fault_servers.py relay --listen 10.250.0.13:6443 --to 127.0.0.1:6444 --delay 0.025
        a TCP relay that holds every chunk for --delay in each direction: a server an
        ocean away (this kernel has no sch_netem, so `tc qdisc ... netem delay` is not
        available; the relay adds the same one-way latency in user space)
    python fault_servers.py noread --listen 10.250.0.13:6444
        accepts connections and never reads from them (a stuck peer)

Both print "READY <port>" once listening and stop on SIGTERM. Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
from typing import cast

CHUNK = 65536


def _split(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def _delayed_pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
) -> None:
    """Copy reader to writer, each chunk delivered `delay` after it arrived, order kept."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(deliver(), name="deliver")
    try:
        while True:
            data = await reader.read(CHUNK)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                break
        await sender
    finally:
        sender.cancel()


async def _relay_one(
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    target: tuple[str, int],
    delay: float,
) -> None:
    try:
        server_r, server_w = await asyncio.open_connection(*target)
    except OSError:
        client_w.transport.abort()
        return
    try:
        await asyncio.gather(
            _delayed_pipe(client_r, server_w, delay), _delayed_pipe(server_r, client_w, delay)
        )
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        client_w.transport.abort()
        server_w.transport.abort()


async def _serve(args: argparse.Namespace) -> None:
    host, port = _split(args.listen)
    held: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if args.mode == "relay":
            await _relay_one(reader, writer, _split(args.to), args.delay)
        else:
            # start_server's transports read too; typeshed types StreamWriter.transport write-only.
            cast(asyncio.Transport, writer.transport).pause_reading()  # buffers fill, peer stalls
            held.append(writer)

    server = await asyncio.start_server(handle, host, port, family=socket.AF_INET)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stop.wait()
        for writer in held:
            writer.transport.abort()


def main(argv: list[str] | None = None) -> int:
    """Run one server until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("mode", choices=("relay", "noread"))
    parser.add_argument("--listen", required=True)
    parser.add_argument("--to", help="relay target host:port")
    parser.add_argument("--delay", type=float, default=0.025, help="one-way delay in seconds")
    asyncio.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
