"""Client load for the fault suite, run as a process inside the node namespace.

    ip netns exec NODE python fault_load.py requests --target 127.0.0.1:7445 --ca ca.pem
    ip netns exec NODE python fault_load.py streams --count 6 ...
    ip netns exec NODE python fault_load.py churn --count 10000 --style hello ...
    ip netns exec NODE python fault_load.py hold --count 300 ...

A separate process, like kubelet: its timing is not disturbed by the test driving faults.
Every record is one JSON line on stdout, stamped with time.monotonic() (CLOCK_MONOTONIC is
system-wide, so the test compares it with its own fault times). SIGTERM ends a mode
cleanly: no new work, in-flight work finishes (bounded), a final {"kind": "end"} line.
Every loop is bounded in count and in time (--max-seconds), whatever the test does.
Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import re
import signal
import socket
import ssl
import struct
import sys
import time
from typing import Any

# Hard ceiling for any mode: a forgotten load process ends by itself.
DEFAULT_MAX_SECONDS = 180.0
SERVER_NAME = "kubernetes"  # what kubelet's kubeconfig sets as tls-server-name
_STANDIN = re.compile(rb'"standin": ?"(\w+)"')
_LINGER_RST = struct.pack("ii", 1, 0)


def emit(record: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed at once."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def _target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _tls(ca: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Wait for the event at most `seconds`; True if it was set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, seconds)):
            await event.wait()
    return event.is_set()


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


# ------------------------------------------------------------------ requests


async def https_get(
    host: str, port: int, ctx: ssl.SSLContext, path: str
) -> tuple[int, bytes, asyncio.StreamWriter]:
    """A fresh TCP + TLS connection and one GET; returns status, body and the open writer."""
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=SERVER_NAME)
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: {SERVER_NAME}\r\nConnection: close\r\n\r\n"
        writer.write(request.encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await (reader.readexactly(length) if length is not None else reader.read())
    except BaseException:
        writer.transport.abort()
        raise
    return status, body, writer


async def _one_request(i: int, args: argparse.Namespace, ctx: ssl.SSLContext) -> None:
    host, port = _target(args.target)
    record: dict[str, Any] = {"kind": "req", "i": i, "t0": time.monotonic()}
    writer = None
    try:
        async with asyncio.timeout(args.timeout):
            status, body, writer = await https_get(host, port, ctx, args.path)
        record["status"] = status
        match = _STANDIN.search(body[:4096])
        record["server"] = match.group(1).decode() if match else None
        record["bytes"] = len(body)
    except Exception as exc:
        record["error"] = _error(exc)
    record["dt"] = time.monotonic() - record["t0"]
    emit(record)
    if writer is not None:
        writer.transport.abort()  # the response is complete; no need to wait for close_notify


async def run_requests(args: argparse.Namespace) -> None:
    """A fresh HTTPS request every --interval (never waiting for the previous one)."""
    ctx = _tls(args.ca)
    stop = _stop_event()
    tasks: set[asyncio.Task[None]] = set()
    started = time.monotonic()
    emit({"kind": "ready", "t": started})
    for i in range(args.max_count):
        if stop.is_set() or time.monotonic() - started > args.max_seconds:
            break
        task = asyncio.create_task(_one_request(i, args, ctx), name=f"request {i}")
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        if await _wait(stop, started + (i + 1) * args.interval - time.monotonic()):
            break
    if tasks:
        await asyncio.wait(set(tasks), timeout=args.timeout + 1)
    emit({"kind": "end", "t": time.monotonic()})


# ------------------------------------------------------------------ streams


class Stream:
    """One watch-like /stream response being read."""

    def __init__(self, i: int, server: str, writer: asyncio.StreamWriter) -> None:
        self.i, self.server, self.writer = i, server, writer
        self.last = time.monotonic()
        self.bytes = 0
        self.open = True
        self.task: asyncio.Task[None] | None = None


async def _open_stream(
    i: int, args: argparse.Namespace, ctx: ssl.SSLContext, streams: dict[int, Stream]
) -> None:
    host, port = _target(args.target)
    try:
        async with asyncio.timeout(args.timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=ctx, server_hostname=SERVER_NAME
            )
            request = f"GET /stream HTTP/1.1\r\nHost: {SERVER_NAME}\r\n\r\n"
            writer.write(request.encode())
            buf = b""
            while (match := _STANDIN.search(buf)) is None:
                chunk = await reader.read(4096)
                if not chunk:
                    raise ConnectionError("stream ended before its first line")
                buf += chunk
    except Exception as exc:
        emit({"kind": "open_failed", "i": i, "error": _error(exc), "t": time.monotonic()})
        return
    stream = Stream(i, match.group(1).decode(), writer)
    streams[i] = stream
    emit({"kind": "open", "i": i, "server": stream.server, "t": time.monotonic()})
    stream.task = asyncio.create_task(_watch(stream, reader), name=f"stream {i}")


async def _watch(stream: Stream, reader: asyncio.StreamReader) -> None:
    how = "eof"
    try:
        while data := await reader.read(65536):
            stream.last = time.monotonic()
            stream.bytes += len(data)
    except Exception as exc:
        how = _error(exc)
    if stream.open:
        stream.open = False
        now = time.monotonic()
        emit({"kind": "closed", "i": stream.i, "server": stream.server, "t": now, "how": how})
    stream.writer.transport.abort()


async def run_streams(args: argparse.Namespace) -> None:
    """Open --count streams one after another; "open N" on stdin opens N more."""
    ctx = _tls(args.ca)
    stop = _stop_event()
    streams: dict[int, Stream] = {}
    commands: asyncio.Queue[str] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def on_stdin() -> None:
        line = sys.stdin.readline()
        if not line:
            loop.remove_reader(sys.stdin.fileno())
            stop.set()  # the test went away
            return
        commands.put_nowait(line.strip())

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    started = time.monotonic()
    emit({"kind": "ready", "t": started})
    opened = 0
    pending = args.count
    while not stop.is_set() and time.monotonic() - started < args.max_seconds:
        while pending > 0 and opened < args.max_count and not stop.is_set():
            await _open_stream(opened, args, ctx, streams)
            opened, pending = opened + 1, pending - 1
        emit({"kind": "idle", "opened": opened, "t": time.monotonic()})
        get = asyncio.ensure_future(commands.get())
        halt = asyncio.ensure_future(stop.wait())
        await asyncio.wait({get, halt}, timeout=args.max_seconds, return_when="FIRST_COMPLETED")
        halt.cancel()
        if get.done():
            words = get.result().split()
            if len(words) == 2 and words[0] == "open":
                pending = int(words[1])
        else:
            get.cancel()
    now = time.monotonic()
    for stream in streams.values():
        if stream.open:
            stream.open = False
            record = {"kind": "alive", "i": stream.i, "server": stream.server, "t": now}
            emit(record | {"last": stream.last, "bytes": stream.bytes})
            stream.writer.transport.abort()
    emit({"kind": "end", "t": time.monotonic()})


# ------------------------------------------------------------------ churn and hold


async def _churn_one(style: str, host: str, port: int, timeout: float) -> str:
    """One short connection; returns how it ended ("ok", "reset", or an error kind)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (host, port))
            if style in ("rst", "rst-early"):
                if style == "rst":
                    await loop.sock_sendall(sock, random.randbytes(random.randint(1, 512)))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                return "ok"
            await loop.sock_sendall(sock, random.randbytes(64 if style == "hello" else 4096))
            if style == "garbage":
                return "ok"
            sock.shutdown(socket.SHUT_WR)
            while await loop.sock_recv(sock, 65536):
                pass
            return "ok"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return f"error {exc.errno}"
    finally:
        sock.close()


async def run_churn(args: argparse.Namespace) -> None:
    """--count short connections, --concurrency at a time, in --style."""
    host, port = _target(args.target)
    gate = asyncio.Semaphore(args.concurrency)
    outcomes: collections.Counter[str] = collections.Counter()
    started = time.monotonic()

    async def one() -> None:
        async with gate:
            if time.monotonic() - started > args.max_seconds:
                outcomes["skipped"] += 1
                return
            outcomes[await _churn_one(args.style, host, port, args.timeout)] += 1

    await asyncio.gather(*(one() for _ in range(args.count)))
    emit(
        {
            "kind": "churn",
            "count": args.count,
            "outcomes": dict(outcomes),
            "seconds": time.monotonic() - started,
        }
    )
    emit({"kind": "end", "t": time.monotonic()})


async def run_hold(args: argparse.Namespace) -> None:
    """Open --count plain TCP connections as fast as possible and hold them until SIGTERM."""
    host, port = _target(args.target)
    stop = _stop_event()
    loop = asyncio.get_running_loop()
    held: list[socket.socket] = []
    errors: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    for _ in range(args.count):
        if stop.is_set() or time.monotonic() - started > args.max_seconds:
            break
        sock = socket.socket()
        sock.setblocking(False)
        try:
            async with asyncio.timeout(args.timeout):
                await loop.sock_connect(sock, (host, port))
            held.append(sock)
        except (OSError, TimeoutError) as exc:
            errors[type(exc).__name__] += 1
            sock.close()
    emit({"kind": "held", "ok": len(held), "errors": dict(errors), "t": time.monotonic()})
    await _wait(stop, args.max_seconds - (time.monotonic() - started))
    for sock in held:
        sock.close()
    emit({"kind": "end", "t": time.monotonic()})


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the load tool."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("mode", choices=("requests", "streams", "churn", "hold"))
    parser.add_argument("--target", default="127.0.0.1:7445")
    parser.add_argument("--ca", help="CA file for the TLS modes")
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--path", default="/version")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--style", choices=("hello", "garbage", "rst", "rst-early"))
    parser.add_argument("--max-count", type=int, default=10_000)
    parser.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one mode."""
    args = parse_args(argv)
    runner = {
        "requests": run_requests,
        "streams": run_streams,
        "churn": run_churn,
        "hold": run_hold,
    }[args.mode]
    asyncio.run(runner(args))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
