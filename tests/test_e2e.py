"""End to end: the daemon as a subprocess, real TLS stand-in API servers, real clients."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from certs import TestPKI
from daemon_proc import DaemonProcess, base_config
from datagen import data_chunks, data_sha256
from prometheus_client.parser import text_string_to_metric_families
from standin import StandinAPIServer
from tcpservers import EchoServer, SinkServer, SourceServer
from util import eventually, kubectl_argv, run_kubectl

BULK = 64 * 1024 * 1024


def addr(server: Any) -> str:
    """host:port of an in-process server."""
    return f"127.0.0.1:{server.port}"


def hc_config(pki: TestPKI, **hc: Any) -> dict[str, Any]:
    """healthCheck block verifying the stand-ins' certificates."""
    return {"caFile": str(pki.paths.ca), "serverName": "kubernetes", **hc}


@pytest.fixture
async def two_standins(standin_factory: Any) -> tuple[StandinAPIServer, StandinAPIServer]:
    """Stand-in API servers A and B."""
    return await standin_factory("A"), await standin_factory("B")


@pytest.fixture
async def daemon_factory(tmp_path: Path) -> AsyncIterator[Any]:
    """`await daemon_factory(config)` -> a started DaemonProcess, stopped at teardown."""
    started: list[DaemonProcess] = []

    async def make(config: dict[str, Any], **kwargs: Any) -> DaemonProcess:
        daemon = DaemonProcess(config, tmp_path, **kwargs)
        started.append(daemon)
        return await daemon.astart()

    yield make
    for daemon in started:
        await daemon.astop()


def client_session(pki: TestPKI) -> aiohttp.ClientSession:
    """An HTTPS client trusting the test CA; a new TCP connection per request."""
    ctx = pki.client_context()
    connector = aiohttp.TCPConnector(ssl=ctx, force_close=True)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10))


async def get_json(session: aiohttp.ClientSession, port: int, path: str) -> tuple[int, Any]:
    """GET through kubeprism, verifying the server as `kubernetes` (like tls-server-name)."""
    async with session.get(f"https://127.0.0.1:{port}{path}", server_hostname="kubernetes") as r:
        return r.status, await r.json(content_type=None)


async def served_by(session: aiohttp.ClientSession, port: int, n: int) -> list[str]:
    """Make n fresh requests for /version; return which stand-in answered each."""
    names = []
    for _ in range(n):
        status, body = await get_json(session, port, "/version")
        assert status == 200, body
        names.append(body["standin"])
    return names


# ------------------------------------------------------------------ a real client


async def test_kubectl_get_version_through_kubeprism(
    pki: TestPKI, two_standins: Any, daemon_factory: Any, tmp_path: Path
) -> None:
    a, b = two_standins
    daemon = await daemon_factory(base_config([addr(a), addr(b)], healthCheck=hc_config(pki)))
    argv = kubectl_argv(f"https://127.0.0.1:{daemon.port}", pki.paths.ca, "get", "--raw", "/version")
    rc, out, err = await run_kubectl(argv, tmp_path)
    assert rc == 0, err
    version = json.loads(out)
    assert version["gitVersion"].startswith("v1.33")
    assert version["standin"] in {"A", "B"}


# ------------------------------------------------------------------ byte integrity


@pytest.mark.parametrize("mode", ["splice", "copy"])
async def test_bulk_integrity_both_directions(mode: str, daemon_factory: Any) -> None:
    async with SinkServer() as sink, SourceServer() as source:
        tcp = {"type": "tcp"}
        up_daemon = await daemon_factory(base_config([addr(sink)], forwarding=mode, healthCheck=tcp))
        down_daemon = await daemon_factory(
            base_config([addr(source)], forwarding=mode, healthCheck=tcp)
        )
        up, down = await asyncio.gather(_upload(up_daemon.port), _download(down_daemon.port))
        assert up == (data_sha256(BULK), BULK)
        assert down == (data_sha256(BULK), BULK)
        for daemon in (up_daemon, down_daemon):
            metrics = await daemon.ametrics()
            assert f'kubeprism_forwarding_mode{{mode="{mode}"}} 1.0' in metrics
        assert _sample(await up_daemon.ametrics(), "kubeprism_forwarded_bytes_total",
                       direction="client_to_upstream") == BULK


def _sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from an exposition text."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name}{labels}")


async def _upload(port: int) -> tuple[str, int]:
    """Send BULK bytes, half-close, read the sink's '<sha256> <count>' verdict."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for chunk in data_chunks(BULK):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        digest, count = (await reader.readline()).decode().split()
        return digest, int(count)
    finally:
        writer.close()
        await _closed(writer)


async def _download(port: int) -> tuple[str, int]:
    """Ask the source for BULK bytes and hash what arrives until its EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    digest, count = hashlib.sha256(), 0
    try:
        writer.write(f"{BULK}\n".encode())
        await writer.drain()
        while data := await reader.read(1 << 20):
            digest.update(data)
            count += len(data)
        return digest.hexdigest(), count
    finally:
        writer.close()
        await _closed(writer)


async def _closed(writer: asyncio.StreamWriter) -> None:
    try:
        await writer.wait_closed()
    except (ConnectionError, OSError):
        pass
