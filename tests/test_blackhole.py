"""A black-holed API server: iptables DROP inside a network namespace made by the test.

Daemon, stand-ins and clients all live in one namespace; packets to and from
one stand-in's port vanish (no RST, no ICMP), the way a dead data-centre link
behaves. Nothing leaves the namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from certs import TestPKI
from daemon_proc import DaemonProcess, base_config
from netns import NetNS, netns_unavailable_reason
from standin import StandinProcess, standin_argv

pytestmark = pytest.mark.netns


@pytest.fixture
def ns() -> Iterator[NetNS]:
    """A fresh namespace; the suite runs as root in CI, so missing tools are a failure."""
    reason = netns_unavailable_reason()
    assert reason is None, f"network namespace tests need root, ip and iptables: {reason}"
    with NetNS("bh") as namespace:
        yield namespace


def _standin(ns: NetNS, pki: TestPKI, name: str) -> StandinProcess:
    argv = standin_argv(name, pki.paths.server_cert, pki.paths.server_key)
    return StandinProcess(argv, popen=ns.popen)


async def _request(ns: NetNS, pki: TestPKI, port: int, path: str) -> tuple[Any, Any]:
    """Open a TLS connection to kubeprism from inside the namespace and send a GET."""
    sock = ns.socket()
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=pki.client_context(), server_hostname="kubernetes"
    )
    writer.write(f"GET {path} HTTP/1.1\r\nHost: kubernetes\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def _close(writer: Any) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


async def _version_from(ns: NetNS, pki: TestPKI, port: int) -> str:
    """Which stand-in answered a fresh /version request."""
    reader, writer = await _request(ns, pki, port, "/version")
    try:
        raw = await reader.read()
    finally:
        await _close(writer)
    body = raw.split(b"\r\n\r\n", 1)[1]
    return str(json.loads(body)["standin"])


async def _stream_owner(reader: Any) -> str:
    """Read the first watch-like line of /stream and return the stand-in's name."""
    buf = b""
    while (match := re.search(rb'"standin": ?"(\w+)"', buf)) is None:
        chunk = await reader.read(4096)
        assert chunk, "stream ended before its first line"
        buf += chunk
    return match.group(1).decode()


async def _open_streams(
    ns: NetNS, pki: TestPKI, port: int, streams: dict[str, list[Any]], n: int
) -> None:
    for _ in range(n):
        reader, writer = await _request(ns, pki, port, "/stream")
        streams[await _stream_owner(reader)].append((reader, writer))


def _daemon(ns: NetNS, pki: TestPKI, tmp: Path, ports: list[int], **hc: Any) -> DaemonProcess:
    # The first stand-in is preferred, so it is the one that holds the traffic when it dies.
    cfg = base_config(
        [{"address": f"127.0.0.1:{p}", "priority": i} for i, p in enumerate(ports)],
        healthCheck={"caFile": str(pki.paths.ca), **hc},
        dialTimeout="1s",
    )
    return DaemonProcess(cfg, tmp, netns=ns)


async def test_black_holed_upstream_fresh_requests_fail_over(
    ns: NetNS, pki: TestPKI, tmp_path: Path
) -> None:
    """Probes every 30 s: only dials can reveal the black hole. No request fails or waits."""
    with _standin(ns, pki, "A") as a, _standin(ns, pki, "B") as b:
        daemon = await _daemon(
            ns, pki, tmp_path, [a.port, b.port], interval="30s", timeout="1s"
        ).astart()
        try:
            await daemon.await_state(f"127.0.0.1:{a.port}", "healthy")
            await daemon.await_state(f"127.0.0.1:{b.port}", "healthy")
            ns.blackhole_port(a.port)
            slowest, slow = 0.0, 0
            for _ in range(10):
                started = time.monotonic()
                assert await asyncio.wait_for(_version_from(ns, pki, daemon.port), 5) == "B"
                took = time.monotonic() - started
                slowest, slow = max(slowest, took), slow + (took > 0.5)
            # The first dial to A is overtaken by one to B after A's attempt delay (at most
            # 250 ms), long before dialTimeout (1 s); A is then suspect and asked last.
            assert slow == 0, slowest
            ups = await daemon.aupstreams()
            assert ups[f"127.0.0.1:{a.port}"]["suspect"] is True
            assert ups[f"127.0.0.1:{a.port}"]["state"] == "healthy"  # suspect, not failed
            assert ups[f"127.0.0.1:{a.port}"]["dialFailuresTotal"] == 0
        finally:
            await daemon.astop()


async def test_black_holed_upstream_streams_closed_and_marked_down(
    ns: NetNS, pki: TestPKI, tmp_path: Path
) -> None:
    """Default-style checks: the pinned streams are closed within the detection bound."""
    interval, threshold, timeout = 0.5, 2, 0.4
    with _standin(ns, pki, "A") as a, _standin(ns, pki, "B") as b:
        daemon = await _daemon(
            ns,
            pki,
            tmp_path,
            [a.port, b.port],
            interval="500ms",
            timeout="400ms",
            unhealthyThreshold=threshold,
        ).astart()
        streams: dict[str, list[Any]] = {"A": [], "B": []}
        try:
            await daemon.await_state(f"127.0.0.1:{a.port}", "healthy")
            await daemon.await_state(f"127.0.0.1:{b.port}", "healthy")
            # A is preferred; take it out for a moment (SIGUSR1 flips its /readyz) so that
            # one stream lands on B, then bring it back and pin two streams to it.
            a.send_signal(signal.SIGUSR1)
            await daemon.await_state(f"127.0.0.1:{a.port}", "unhealthy")
            await _open_streams(ns, pki, daemon.port, streams, 1)
            a.send_signal(signal.SIGUSR1)
            await daemon.await_state(f"127.0.0.1:{a.port}", "healthy")
            await _open_streams(ns, pki, daemon.port, streams, 2)
            assert len(streams["A"]) == 2 and len(streams["B"]) == 1
            ns.blackhole_port(a.port)
            cut = time.monotonic()
            bound = interval * threshold + timeout + 1.0
            for reader, _ in streams["A"]:
                async with asyncio.timeout(bound + 3):
                    while await reader.read(65536):
                        pass
            closed_after = time.monotonic() - cut
            assert closed_after <= bound, f"closed after {closed_after:.2f}s (bound {bound}s)"
            for reader, _ in streams["B"]:
                assert await asyncio.wait_for(reader.read(4096), 2)  # still flowing
            assert await _version_from(ns, pki, daemon.port) == "B"
        finally:
            for _, writer in streams["A"] + streams["B"]:
                await _close(writer)
            await daemon.astop()
