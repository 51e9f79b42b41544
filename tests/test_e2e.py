"""End to end: the daemon as a subprocess, real TLS stand-in API servers, real clients."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from certs import TestPKI
from clients import addr, client_session, metric_sample, open_stream, served_by
from daemon_proc import DaemonProcess, base_config
from datagen import data_chunks, data_sha256
from prometheus_client.parser import text_string_to_metric_families
from standin import StandinAPIServer
from tcpservers import EchoServer, SinkServer, SourceServer
from util import eventually, kubectl_argv, run_kubectl

BULK = 64 * 1024 * 1024


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


# ------------------------------------------------------------------ a real client


async def test_kubectl_get_version_through_kubeprism(
    pki: TestPKI, two_standins: Any, daemon_factory: Any, tmp_path: Path
) -> None:
    a, b = two_standins
    daemon = await daemon_factory(base_config([addr(a), addr(b)], healthCheck=hc_config(pki)))
    argv = kubectl_argv(
        f"https://127.0.0.1:{daemon.port}", pki.paths.ca, "get", "--raw", "/version"
    )
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
        up_daemon = await daemon_factory(
            base_config([addr(sink)], forwarding=mode, healthCheck=tcp)
        )
        down_daemon = await daemon_factory(
            base_config([addr(source)], forwarding=mode, healthCheck=tcp)
        )
        up, down = await asyncio.gather(_upload(up_daemon.port), _download(down_daemon.port))
        assert up == (data_sha256(BULK), BULK)
        assert down == (data_sha256(BULK), BULK)
        for daemon in (up_daemon, down_daemon):
            metrics = await daemon.ametrics()
            assert f'kubeprism_forwarding_mode{{mode="{mode}"}} 1.0' in metrics
            # Bulk went through pipes (now back in the pool) in splice mode, none in copy.
            pipes = metric_sample(metrics, "kubeprism_pipes_free")
            assert pipes >= 1 if mode == "splice" else pipes == 0
        assert (
            metric_sample(
                await up_daemon.ametrics(),
                "kubeprism_forwarded_bytes_total",
                direction="client_to_upstream",
            )
            == BULK
        )


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
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


# ------------------------------------------------------------------ half-close


async def test_half_close_client_side(daemon_factory: Any) -> None:
    """Client FIN reaches the upstream; the upstream's reply still flows back."""
    async with EchoServer() as echo:
        daemon = await daemon_factory(base_config([addr(echo)], healthCheck={"type": "tcp"}))
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        payload = b"x" * 300_000
        writer.write(payload)
        writer.write_eof()  # half-close: the echo server sees EOF, flushes, then FINs
        received = await asyncio.wait_for(reader.read(), 10)
        assert received == payload
        writer.close()
        await _closed(writer)


async def test_half_close_upstream_side(daemon_factory: Any) -> None:
    """Upstream FIN reaches the client; the client can still send afterwards."""
    async with SourceServer() as source:
        daemon = await daemon_factory(base_config([addr(source)], healthCheck={"type": "tcp"}))
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        writer.write(b"1000\n")
        assert await asyncio.wait_for(reader.read(), 10) == b"".join(data_chunks(1000))
        # Our direction is still open: the source keeps reading until we close.
        writer.write(b"still here")
        await writer.drain()
        await eventually(lambda: source.sent == [1000], message="source finished sending")
        writer.close()
        await _closed(writer)
        await eventually(lambda: source.active == 0, message="source saw our close")


# ------------------------------------------------------------------ failover and selection


async def test_refused_upstream_is_skipped_transparently(
    pki: TestPKI, standin_factory: Any, daemon_factory: Any
) -> None:
    """A healthy-looking endpoint that refuses: every client is still served by the other."""
    a, b = await standin_factory("A"), await standin_factory("B")
    # Readiness every 30 s: what notices A going away is the close of its health connection
    # or a refused dial, each a sign that has A checked again at once.
    cfg = base_config(
        [{"address": addr(a), "priority": 0}, {"address": addr(b), "priority": 1}],
        healthCheck=hc_config(pki, interval="30s", timeout="1s"),
    )
    daemon = await daemon_factory(cfg)
    await daemon.await_state(addr(a), "healthy")
    await daemon.await_state(addr(b), "healthy")
    await a.close()
    async with client_session(pki) as session:
        assert await served_by(session, daemon.port, 10) == ["B"] * 10
    # Two refused checks (or a refused dial and a check) took A out long before 30 s.
    await daemon.await_state(addr(a), "unhealthy", timeout=5)
    ups = await daemon.aupstreams()
    assert ups[addr(a)]["dialFailuresTotal"] <= 1
    assert "refused" in ups[addr(a)]["reason"]


async def test_readyz_500_endpoint_gets_no_new_connections(
    pki: TestPKI, two_standins: Any, daemon_factory: Any
) -> None:
    a, b = two_standins
    upstreams = [{"address": addr(a), "priority": 0}, {"address": addr(b), "priority": 1}]
    daemon = await daemon_factory(base_config(upstreams, healthCheck=hc_config(pki)))
    await daemon.await_state(addr(a), "healthy")
    async with client_session(pki) as session:
        assert await served_by(session, daemon.port, 4) == ["A"] * 4  # preferred
    a.ready_status = 500
    await daemon.await_state(addr(a), "unhealthy")
    ups = await daemon.aupstreams()
    assert "HTTP 500" in ups[addr(a)]["reason"]
    async with client_session(pki) as session:
        assert await served_by(session, daemon.port, 12) == ["B"] * 12
    a.ready_status = 200
    await daemon.await_state(addr(a), "healthy")
    async with client_session(pki) as session:
        assert await served_by(session, daemon.port, 4) == ["A"] * 4


async def test_all_unhealthy_panic_mode_still_forwards(
    pki: TestPKI, two_standins: Any, daemon_factory: Any
) -> None:
    a, b = two_standins
    daemon = await daemon_factory(base_config([addr(a), addr(b)], healthCheck=hc_config(pki)))
    await daemon.await_state(addr(b), "healthy")
    assert (await daemon.aadmin("/readyz"))[0] == 200
    a.ready_status = b.ready_status = 500
    await daemon.await_state(addr(a), "unhealthy")
    await daemon.await_state(addr(b), "unhealthy")
    status, body = await daemon.aadmin("/readyz")
    assert status == 503 and b"0/2" in body
    assert metric_sample(await daemon.ametrics(), "kubeprism_panic_mode") == 1
    async with client_session(pki) as session:
        assert set(await served_by(session, daemon.port, 6)) <= {"A", "B"}
    b.ready_status = 200
    await daemon.await_state(addr(b), "healthy")
    assert metric_sample(await daemon.ametrics(), "kubeprism_panic_mode") == 0
    assert (await daemon.aadmin("/readyz"))[0] == 200


# ------------------------------------------------------------------ closing what is dead


async def test_streams_on_unhealthy_endpoint_are_closed_others_flow(
    pki: TestPKI, two_standins: Any, daemon_factory: Any
) -> None:
    a, b = two_standins
    interval, threshold, timeout = 0.5, 2, 0.4
    # A is preferred (priority 0), so streams land on it unless it is out (two loopback
    # servers are equal in latency and would share them).
    daemon = await daemon_factory(
        base_config(
            [{"address": addr(a), "priority": 0}, {"address": addr(b), "priority": 1}],
            healthCheck=hc_config(
                pki, interval="500ms", timeout="400ms", unhealthyThreshold=threshold
            ),
        )
    )
    await daemon.await_state(addr(a), "healthy")
    await daemon.await_state(addr(b), "healthy")
    async with client_session(pki) as session:
        streams: dict[str, list[Any]] = {"A": [], "B": []}
        a.ready_status = 500  # out for a moment: two streams go to B
        await daemon.await_state(addr(a), "unhealthy")
        for _ in range(2):
            resp, name = await open_stream(session, daemon.port)
            streams[name].append(resp)
        a.ready_status = 200  # back: two streams go to A
        await daemon.await_state(addr(a), "healthy")
        for _ in range(2):
            resp, name = await open_stream(session, daemon.port)
            streams[name].append(resp)
        assert len(streams["A"]) == 2 and len(streams["B"]) == 2
        a.ready_status = 500
        broke = time.monotonic()
        bound = interval * threshold + timeout + 1.0
        for resp in streams["A"]:
            with pytest.raises(
                (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, ConnectionError)
            ):
                async with asyncio.timeout(bound + 2):
                    while await resp.content.readline():
                        pass
                    raise ConnectionError("stream ended")  # a clean EOF counts as closed too
        closed_after = time.monotonic() - broke
        assert closed_after <= bound, f"closed after {closed_after:.2f}s, bound {bound:.2f}s"
        for resp in streams["B"]:  # untouched: still flowing
            line = await asyncio.wait_for(resp.content.readline(), 2)
            assert json.loads(line)["standin"] == "B"
        for resp in streams["A"] + streams["B"]:
            resp.close()
    assert (
        metric_sample(
            await daemon.ametrics(), "kubeprism_connections_closed_total", reason="unhealthy"
        )
        >= 2
    )


# ------------------------------------------------------------------ admin and metrics


async def test_metrics_exposition(pki: TestPKI, two_standins: Any, daemon_factory: Any) -> None:
    a, b = two_standins
    daemon = await daemon_factory(base_config([addr(a), addr(b)], healthCheck=hc_config(pki)))
    await daemon.await_state(addr(a), "healthy")
    async with client_session(pki) as session:
        await served_by(session, daemon.port, 4)
    text = await daemon.ametrics()
    names = {f.name for f in text_string_to_metric_families(text)}
    for name in (
        "kubeprism_upstream_up",
        "kubeprism_upstream_state",
        "kubeprism_upstream_info",
        "kubeprism_upstream_active_connections",
        "kubeprism_upstream_connections",
        "kubeprism_upstream_dial_failures",
        "kubeprism_upstream_latency_seconds",
        "kubeprism_upstream_slow",
        "kubeprism_connections",
        "kubeprism_connections_closed",
        "kubeprism_forwarded_bytes",
        "kubeprism_active_connections",
        "kubeprism_panic_mode",
        "kubeprism_forwarding_mode",
        "kubeprism_build_info",
        "kubeprism_dial_duration_seconds",
        "kubeprism_health_check_duration_seconds",
        "kubeprism_accept_errors",
    ):
        assert name in names, name
    assert metric_sample(text, "kubeprism_upstream_up", endpoint=addr(a)) == 1
    assert metric_sample(text, "kubeprism_connections_total", result="forwarded") == 4
    assert (
        metric_sample(text, "kubeprism_forwarded_bytes_total", direction="upstream_to_client") > 0
    )
    assert (
        metric_sample(
            text,
            "kubeprism_health_check_duration_seconds_count",
            endpoint=addr(a),
            result="success",
        )
        >= 1
    )
    ups = await daemon.aupstreams()
    assert ups[addr(a)]["sources"] == ["static"]

    async def class_decided() -> bool:  # on two figures: the second a fast interval later
        return (await daemon.aupstreams())[addr(a)]["latencyClass"] in {"equal", "slow"}

    await eventually(class_decided, 10, message="a latency class from the first two checks")
    assert (await daemon.aadmin("/healthz"))[0] == 200
