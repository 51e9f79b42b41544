"""The test infrastructure itself, exercised for real: TLS, kubectl, TCP half-close, netns."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from certs import TestPKI, write_pki
from conftest import StandinFactory
from datagen import BLOCK_SIZE, StreamVerifier, data_bytes, data_chunks, large_body_sha256
from netns import NetNS
from standin import FAILED_HEALTH_BODY, StandinAPIServer, StandinProcess, standin_argv
from tcpservers import EchoServer, NeverReadServer, SinkServer, SourceServer, _TCPServer
from util import eventually, kubectl_argv, run_kubectl, wait_for

MiB = 1024 * 1024
BULK = 64 * MiB


@pytest.fixture
async def client(pki: TestPKI) -> AsyncIterator[aiohttp.ClientSession]:
    """aiohttp client trusting the test CA; closed at teardown."""
    connector = aiohttp.TCPConnector(ssl=pki.client_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


@pytest.fixture(autouse=True)
def _no_logged_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The infra must stay quiet: no 'Error handling request', no 'Exception in callback'."""
    yield
    assert error_records(caplog) == []


def error_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Warnings and errors logged during the test (aiohttp, asyncio, ...)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


# ---------------------------------------------------------------------------------------------
# Deterministic data and helpers


def test_datagen_is_deterministic_and_verifiable() -> None:
    size = 3 * BLOCK_SIZE + 123
    data = data_bytes(size)
    assert len(data) == size
    assert hashlib.sha256(data).hexdigest() == large_body_sha256(size)
    assert data[:BLOCK_SIZE] != data[BLOCK_SIZE : 2 * BLOCK_SIZE]

    ok = StreamVerifier(size)
    for start in range(0, size, 1000):  # splits that straddle block boundaries
        ok.feed(data[start : start + 1000])
    assert ok.complete, ok.describe()

    corrupt = bytearray(data)
    corrupt[BLOCK_SIZE + 7] ^= 0xFF
    bad = StreamVerifier(size)
    bad.feed(bytes(corrupt))
    assert bad.mismatch_offset == BLOCK_SIZE + 7

    too_long = StreamVerifier(10)
    too_long.feed(data[:11])
    assert not too_long.complete and too_long.mismatch_offset == 10


async def test_eventually_returns_value_and_reports_timeout() -> None:
    calls = iter(range(100))
    assert await eventually(lambda: next(calls) >= 3, timeout=1) is True

    async def never() -> int:
        return 0

    with pytest.raises(AssertionError, match="the thing"):
        await eventually(never, timeout=0.1, message="the thing")
    with pytest.raises(AssertionError, match="last: 0"):
        wait_for(lambda: 0, timeout=0.05)


def test_write_pki_writes_usable_files(tmp_path: Path) -> None:
    paths = write_pki(tmp_path / "pki")
    for path in (paths.ca, paths.server_cert, paths.server_key, paths.client_cert):
        assert path.read_bytes().startswith(b"-----BEGIN")
    ctx = ssl.create_default_context(cafile=paths.ca)
    ctx.load_cert_chain(paths.client_cert, paths.client_key)


# ---------------------------------------------------------------------------------------------
# Stand-in API server over real TLS


async def test_standin_health_and_version(
    standin_factory: StandinFactory, client: aiohttp.ClientSession
) -> None:
    api = await standin_factory("A")
    for path in ("/readyz", "/livez", "/healthz"):
        async with client.get(api.url + path) as resp:
            assert (resp.status, await resp.text()) == (200, "ok")
            assert resp.content_type == "text/plain"
    async with client.get(api.url + "/version") as resp:
        version = await resp.json()
    assert version["gitVersion"] == "v1.33.0" and version["minor"] == "33"
    assert version["standin"] == "A"
    assert api.hits["/readyz"] == 1 and api.hits["/version"] == 1


async def test_standin_ready_and_api_status(
    standin_factory: StandinFactory, client: aiohttp.ClientSession
) -> None:
    api = await standin_factory("B")
    api.ready_status = 500
    async with client.get(api.url + "/readyz") as resp:
        assert (resp.status, await resp.text()) == (500, FAILED_HEALTH_BODY)
    api.ready_status = 200
    api.api_status = 503
    for path in ("/version", "/api", "/apis"):
        async with client.get(api.url + path) as resp:
            assert resp.status == 503
            body = await resp.json()
        assert body["kind"] == "Status" and body["code"] == 503
    async with client.get(api.url + "/readyz") as resp:
        assert resp.status == 200  # etcd trouble shows on API paths, not necessarily on readyz


async def test_standin_on_ipv6_loopback(
    standin_factory: StandinFactory, client: aiohttp.ClientSession
) -> None:
    api = await standin_factory("v6", host="::1")
    assert api.url.startswith("https://[::1]:")
    async with client.get(api.url + "/version") as resp:
        assert (await resp.json())["standin"] == "v6"


async def test_standin_large_body_matches_generator(
    standin_factory: StandinFactory, client: aiohttp.ClientSession
) -> None:
    api = await standin_factory("A")
    size = 8 * MiB + 5
    digest = hashlib.sha256()
    async with client.get(api.url + f"/large?bytes={size}") as resp:
        assert resp.content_length == size
        async for chunk in resp.content.iter_any():
            digest.update(chunk)
    assert digest.hexdigest() == large_body_sha256(size)


async def test_standin_echo_streams_body_back(
    standin_factory: StandinFactory, client: aiohttp.ClientSession
) -> None:
    api = await standin_factory("A")
    small = data_bytes(100_000)
    async with client.post(api.url + "/echo", data=small) as resp:
        assert resp.content_length == len(small)
        assert await resp.read() == small

    async def upload() -> AsyncIterator[bytes]:
        for chunk in data_chunks(4 * MiB):  # chunked upload, streamed back as it arrives
            yield chunk

    verifier = StreamVerifier(4 * MiB)
    async with client.post(api.url + "/echo", data=upload()) as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_any():
            verifier.feed(chunk)
    assert verifier.complete, verifier.describe()


async def test_standin_stream_until_client_leaves(
    standin_factory: StandinFactory,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = await standin_factory("W")
    async with client.get(api.url + "/stream") as resp:
        lines = [json.loads(await resp.content.readline()) for _ in range(3)]
    assert [line["n"] for line in lines] == [0, 1, 2]
    assert {line["standin"] for line in lines} == {"W"}
    # The handler notices the vanished client on its next write, up to 100 ms later.
    await eventually(lambda: api.open_streams == 0, message="stream handler ended")
    async with client.get(api.url + "/readyz") as resp:
        assert resp.status == 200
    assert error_records(caplog) == []


async def test_standin_shutdown_is_fast_with_open_streams(
    pki: TestPKI, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    # Streams that waited for aiohttp's shutdown timeout would hold close() for a minute; the
    # guard is far from both that and a prompt close, so load on the machine cannot flake it.
    api = StandinAPIServer("S", ssl_context=pki.server_context(), shutdown_timeout=60)
    await api.start()
    responses = [await client.get(api.url + "/stream") for _ in range(3)]
    try:
        for resp in responses:
            assert json.loads(await resp.content.readline())["n"] == 0
        assert api.open_streams == 3
        async with asyncio.timeout(10):
            await api.close()
        for resp in responses:  # each stream ends cleanly (chunked terminator), no reset
            await resp.read()
        assert api.open_streams == 0
    finally:
        for resp in responses:
            resp.release()
    assert error_records(caplog) == []


async def test_standin_quiet_on_tcp_probes_and_garbage(
    standin_factory: StandinFactory, client: aiohttp.ClientSession
) -> None:
    api = await standin_factory("A")
    for probe in (b"", b"GET / HTTP/1.0\r\n\r\n", bytes(range(256))):
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        writer.write(probe)
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), 2) if probe else None
        await close_writer(writer)
    async with client.get(api.url + "/readyz") as resp:
        assert resp.status == 200  # and the autouse fixture checks nothing was logged


async def test_kubectl_get_raw_version(
    standin_factory: StandinFactory, pki: TestPKI, tmp_path: Path
) -> None:
    api = await standin_factory("kubectl-target")
    argv = kubectl_argv(api.url, pki.paths.ca, "get", "--raw", "/version")
    rc, out, err = await run_kubectl(argv, home=tmp_path)
    assert rc == 0, err
    assert json.loads(out)["standin"] == "kubectl-target"
    assert dict(api.hits) == {"/version": 1}  # --raw does no discovery


async def test_wrong_ca_fails_handshake(standin_factory: StandinFactory, pki: TestPKI) -> None:
    api = await standin_factory("A")
    wrong = aiohttp.TCPConnector(ssl=pki.client_context(trust_wrong_ca=True))
    async with aiohttp.ClientSession(connector=wrong) as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(api.url + "/version")
    impostor = await standin_factory("impostor", ssl_context=pki.server_context(wrong=True))
    right = aiohttp.TCPConnector(ssl=pki.client_context())
    async with aiohttp.ClientSession(connector=right) as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(impostor.url + "/version")
    assert impostor.hits == {}


def _get_status(port: int, path: str, ctx: ssl.SSLContext) -> int:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="kubernetes") as tls,
    ):
        tls.sendall(f"GET {path} HTTP/1.0\r\nHost: kubernetes\r\n\r\n".encode())
        return int(tls.recv(64).split()[1])


def test_standin_subprocess_signals(pki: TestPKI) -> None:
    ctx = pki.client_context()
    argv = standin_argv("P", pki.paths.server_cert, pki.paths.server_key)
    with StandinProcess(argv) as proc:
        assert proc.port > 0
        assert _get_status(proc.port, "/readyz", ctx) == 200
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: _get_status(proc.port, "/readyz", ctx) == 500, message="readyz -> 500")
        proc.send_signal(signal.SIGUSR2)
        wait_for(lambda: _get_status(proc.port, "/version", ctx) == 503, message="api -> 503")
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: _get_status(proc.port, "/readyz", ctx) == 200, message="readyz -> 200")
        assert proc.stop() == 0  # SIGTERM is a clean exit


# ---------------------------------------------------------------------------------------------
# Raw TCP servers


async def test_echo_preserves_half_close(echo_server: EchoServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", echo_server.port)
    try:
        payload = data_bytes(3 * MiB)
        writer.write(payload)
        writer.write_eof()
        assert await reader.read() == payload  # read() returns at the server's FIN
        assert reader.at_eof()
    finally:
        await close_writer(writer)
    await eventually(lambda: echo_server.active == 0, message="server side closed")


async def test_sink_hashes_bulk_upload(sink_server: SinkServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", sink_server.port)
    try:
        for chunk in data_chunks(BULK):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), 10)
    finally:
        await close_writer(writer)
    assert reply.decode() == f"{large_body_sha256(BULK)} {BULK}\n"
    assert sink_server.results == [(large_body_sha256(BULK), BULK)]


async def test_source_sends_bulk_then_half_closes(source_server: SourceServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", source_server.port)
    try:
        writer.write(f"{BULK}\n".encode())
        verifier = StreamVerifier(BULK)
        async with asyncio.timeout(10):
            while chunk := await reader.read(256 * 1024):
                verifier.feed(chunk)
        assert verifier.complete, verifier.describe()
        # Half-close: our direction is still open and the server is still reading.
        writer.write(b"still here")
        await writer.drain()
        assert source_server.active == 1
    finally:
        await close_writer(writer)
    await eventually(lambda: source_server.active == 0, message="source saw our close")
    assert source_server.sent == [BULK]


async def test_never_read_server_applies_backpressure() -> None:
    async with NeverReadServer(rcvbuf=64 * 1024) as server:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            chunk = bytes(256 * 1024)
            written = 0
            while written < 64 * MiB:  # bounded: a broken server would never stop us
                writer.write(chunk)
                written += len(chunk)
                try:
                    await asyncio.wait_for(writer.drain(), 0.2)
                except TimeoutError:
                    break
            else:
                pytest.fail("64 MiB written to a server that never reads")
            assert written < 16 * MiB
        finally:
            writer.transport.abort()  # do not wait to flush to a server that never reads
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


class _FloodThenClose(_TCPServer):
    """Writes more than the socket buffers hold and returns: the close waits for a flush."""

    def __init__(self) -> None:
        super().__init__()
        self.handled = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(bytes(64 * MiB))
        self.handled.set()


async def test_server_close_while_a_handler_waits_for_its_close_does_not_raise() -> None:
    # Cancelling a handler inside writer.wait_closed() cancels that writer's close future;
    # close() awaited it again and raised CancelledError into the test.
    server = _FloodThenClose()
    await server.start()
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        await asyncio.wait_for(server.handled.wait(), 10)
        assert server.active == 1  # in wait_closed: the client reads nothing
        await asyncio.wait_for(server.close(), 10)
        assert server.active == 0
    finally:
        writer.transport.abort()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_server_close_aborts_live_connections() -> None:
    server = EchoServer()
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        await eventually(lambda: server.active == 1)
        await server.close()
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 2) == b""
    finally:
        await close_writer(writer)


# ---------------------------------------------------------------------------------------------
# Network namespaces


@pytest.mark.netns
def test_netns_blackhole(netns: NetNS, pki: TestPKI) -> None:
    argv = standin_argv("ns", pki.paths.server_cert, pki.paths.server_key)
    with StandinProcess(argv, popen=netns.popen) as proc:
        # The stand-in is reachable inside the namespace only.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proc.port), timeout=1).close()
        netns.connect("127.0.0.1", proc.port).close()

        netns.blackhole_port(proc.port)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            netns.connect("127.0.0.1", proc.port, timeout=0.5).close()
        assert time.monotonic() - started >= 0.5  # silence, not a refusal

        netns.unblackhole_port(proc.port)
        netns.connect("127.0.0.1", proc.port).close()
        assert proc.stop() == 0


@pytest.mark.netns
async def test_netns_plain_http_and_cleanup() -> None:
    with NetNS("http") as ns:
        async with EchoServer() as host_side:  # the host's loopback is not the namespace's
            with pytest.raises(ConnectionRefusedError):
                await ns.open_connection("127.0.0.1", host_side.port)
        # Plain HTTP, like the daemon's admin port will be.
        with StandinProcess(standin_argv("admin"), popen=ns.popen) as proc:
            status, body = await ns.http_get_async("127.0.0.1", proc.port, "/version")
            assert status == 200 and json.loads(body)["standin"] == "admin"
            status, body = ns.http_get("127.0.0.1", proc.port, "/readyz", timeout=2)
            assert (status, body) == (200, b"ok")
        leftover = ns.popen(["sleep", "60"])  # still running at exit: must be reaped
        path = ns.path
    assert not path.exists()
    assert leftover.returncode is not None
