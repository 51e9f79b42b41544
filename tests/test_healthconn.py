"""health/https.py: the HTTPS check over a kept-alive connection, against real TLS servers.

A scripted TLS server on 127.0.0.1 (throwaway trustme CA) answers each request the way
the test says, counts connections (each one a TLS handshake) and requests, and can close
or reset its connections while they are idle. The response parser is also fed bytes
directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from test_stall import NoCpu
from util import eventually

from kubeprism.base.net import HostPort
from kubeprism.config import HealthCheckConfig
from kubeprism.core.endpoint import Evidence
from kubeprism.health.checker import HealthCost, ProbeResult, TcpProbe
from kubeprism.health.https import (
    MAX_BODY,
    HttpError,
    HttpsProbe,
    Response,
    _loss_reason,
    liveness_options,
    make_probe,
    read_response,
)

# Far beyond a probe's own timeout, far below what a missing one costs (aiohttp's 5 minutes,
# the kernel's ~2 minutes of SYN retries): no load on the machine makes the probes reach it.
GUARD = 10.0
VERBOSE_OK = "".join(f"[+]check-{i} ok\n" for i in range(60)) + "readyz check passed\n"
VERBOSE_ETCD = "[+]ping ok\n[-]etcd failed: reason withheld\n[+]log ok\nreadyz check failed\n"


@dataclass(frozen=True)
class TLSFiles:
    """A CA that signed the server certificate, an unrelated CA, and the server context."""

    ca: Path
    wrong_ca: Path
    server_context: ssl.SSLContext


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """Throwaway PKI: the server certificate names 'kubernetes' and 127.0.0.1."""
    directory = tmp_path_factory.mktemp("health-pki")
    ca, wrong = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(directory / "ca.pem")
    wrong.cert_pem.write_to_path(directory / "wrong-ca.pem")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("kubernetes", "127.0.0.1").configure_cert(ctx)
    return TLSFiles(directory / "ca.pem", directory / "wrong-ca.pem", ctx)


class ReadyzServer:
    """An HTTPS server answering every request with ``status`` and ``body``."""

    def __init__(self) -> None:
        self.status = 200
        self.body = VERBOSE_OK
        self.chunked = False
        self.port = 0
        self.connections = 0
        self.paths: list[str] = []
        self.writers: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                self.paths.append(head.split(b" ")[1].decode())
                writer.write(self._response())
                if b"connection: close" in head.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self.writers.discard(writer)
            writer.transport.abort()

    def _response(self) -> bytes:
        body = self.body.encode()
        head = f"HTTP/1.1 {self.status} X\r\nContent-Type: text/plain\r\n"
        if self.chunked:
            half = len(body) // 2
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:half], body[half:]))
            return f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunks + b"0\r\n\r\n"
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body

    def close_idle(self) -> None:
        """Close every connection in order (TLS close_notify and FIN): an idle timeout."""
        for writer in list(self.writers):
            writer.close()

    def reset_all(self) -> None:
        """Reset every connection (SO_LINGER 0)."""
        for writer in list(self.writers):
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


@pytest.fixture
async def readyz(tls: TLSFiles) -> AsyncIterator[ReadyzServer]:
    """A started ReadyzServer on 127.0.0.1."""
    server = ReadyzServer()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=tls.server_context)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        for writer in list(server.writers):
            writer.transport.abort()
        await listener.wait_closed()


Lost = list[tuple[HostPort, str, bool]]


@contextlib.asynccontextmanager
async def https_probe(
    ca: Path, lost: Lost | None = None, **hc: object
) -> AsyncIterator[HttpsProbe]:
    """An HttpsProbe (losses go to ``lost``), closed on exit."""
    settings: dict[str, object] = {"ca_file": str(ca), "timeout": 2.0, **hc}
    probe = HttpsProbe(HealthCheckConfig(**settings))  # type: ignore[arg-type]
    if lost is not None:
        probe.on_lost = lambda a, reason, failure: lost.append((a, reason, failure))
    try:
        yield probe
    finally:
        await probe.close()


def local(port: int) -> HostPort:
    """127.0.0.1:port."""
    return HostPort("127.0.0.1", port)


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A port bound but not listening: connects are refused and nobody else can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A port that completes TCP handshakes (in the kernel) and then never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@contextlib.contextmanager
def full_backlog_listener() -> Iterator[int]:
    """A listener whose accept queue is full: Linux then drops SYNs, so connects hang."""
    with socket.socket() as sock, socket.socket() as filler:
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)  # room for one queued connection, never accepted
        port = sock.getsockname()[1]
        filler.settimeout(5)
        filler.connect(("127.0.0.1", port))
        yield port


# ---------------------------------------------------------------------------------------------
# HttpsProbe


async def test_checks_reuse_one_connection_and_the_cost_is_counted(
    tls: TLSFiles, readyz: ReadyzServer
) -> None:
    async with https_probe(tls.ca) as probe:
        results = [await probe(local(readyz.port)) for _ in range(3)]
    assert [(r.ok, r.reason) for r in results] == [(True, "ok")] * 3
    assert all(r.latency is not None and 0 < r.latency < 2.0 for r in results)
    assert readyz.connections == 1
    assert readyz.paths == ["/readyz?verbose"] * 3
    assert probe.cost.handshakes == {local(readyz.port): 1}
    assert probe.cost.requests == {local(readyz.port): 3}


async def test_without_keep_alive_every_check_has_its_own_connection(
    tls: TLSFiles, readyz: ReadyzServer
) -> None:
    cost = HealthCost()
    probe = HttpsProbe(HealthCheckConfig(ca_file=str(tls.ca), keep_alive=False), cost)
    try:
        results = [await probe(local(readyz.port)) for _ in range(3)]
    finally:
        await probe.close()
    assert all(r.ok for r in results)
    assert readyz.connections == 3
    assert cost.handshakes == cost.requests == {local(readyz.port): 3}


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_500_names_the_failing_checks_of_a_verbose_answer(
    tls: TLSFiles, readyz: ReadyzServer, chunked: bool
) -> None:
    readyz.status, readyz.body, readyz.chunked = 500, VERBOSE_ETCD, chunked
    async with https_probe(tls.ca) as probe:
        result = await probe(local(readyz.port))
        readyz.body = "etcd is sad\n"
        plain = await probe(local(readyz.port))  # the connection is still good
    assert not result.ok
    assert result.latency is not None
    assert result.reason == "HTTP 500 from /readyz?verbose: [-]etcd failed: reason withheld"
    assert plain.reason == "HTTP 500 from /readyz?verbose: etcd is sad"
    assert readyz.connections == 1


async def test_wrong_ca_and_wrong_server_name_name_the_certificate_problem(
    tls: TLSFiles, readyz: ReadyzServer
) -> None:
    async with https_probe(tls.wrong_ca) as probe:
        wrong_ca = await probe(local(readyz.port))
    async with https_probe(tls.ca, server_name="not-the-apiserver.example") as probe:
        wrong_name = await probe(local(readyz.port))
    assert (wrong_ca.ok, wrong_ca.latency) == (False, None)
    assert wrong_ca.reason == "TLS certificate rejected: unable to get local issuer certificate"
    assert wrong_name.reason == (
        "TLS certificate rejected: Hostname mismatch, "
        "certificate is not valid for 'not-the-apiserver.example'."
    )


async def test_refused(tls: TLSFiles) -> None:
    with refusing_port() as port:
        async with https_probe(tls.ca) as probe:
            result = await probe(local(port))
    assert result == ProbeResult(False, None, "connection refused")


async def test_a_silent_server_times_out_within_the_timeout(tls: TLSFiles) -> None:
    timeout = 0.5
    with silent_listener() as port:
        async with https_probe(tls.ca, timeout=timeout) as probe:
            started = time.monotonic()
            async with asyncio.timeout(GUARD):
                result = await probe(local(port))
            elapsed = time.monotonic() - started
    assert result == ProbeResult(False, None, "timed out after 0.5s", Evidence.TIMEOUT)
    assert elapsed >= timeout * 0.9  # it waited for its timeout, not a refusal


async def test_an_idle_close_is_reported_as_no_failure_and_the_next_check_reconnects(
    tls: TLSFiles, readyz: ReadyzServer
) -> None:
    lost: Lost = []
    async with https_probe(tls.ca, lost) as probe:
        assert (await probe(local(readyz.port))).ok
        readyz.close_idle()
        await eventually(lambda: lost)
        assert lost == [(local(readyz.port), "server closed the health connection", False)]
        assert (await probe(local(readyz.port))).ok
    assert readyz.connections == 2
    assert probe.cost.handshakes == {local(readyz.port): 2}


async def test_a_reset_while_idle_is_reported_as_a_failure(
    tls: TLSFiles, readyz: ReadyzServer
) -> None:
    lost: Lost = []
    async with https_probe(tls.ca, lost) as probe:
        assert (await probe(local(readyz.port))).ok
        readyz.reset_all()
        await eventually(lambda: lost)
    assert lost == [(local(readyz.port), "health connection reset by the server", True)]


async def test_a_server_that_stops_answering_fails_the_check_and_is_not_reused(
    tls: TLSFiles, readyz: ReadyzServer
) -> None:
    lost: Lost = []
    async with https_probe(tls.ca, lost, timeout=0.3) as probe:
        assert (await probe(local(readyz.port))).ok
        readyz.body = "x" * (MAX_BODY + 1)  # refused by the parser: the check fails
        bad = await probe(local(readyz.port))
        readyz.body = VERBOSE_OK
        assert (await probe(local(readyz.port))).ok
    assert bad.reason.startswith("HttpError: bad or too large Content-Length")
    assert readyz.connections == 2
    assert lost == []  # the failed check reported it; no second report


async def test_liveness_socket_options_are_set_on_the_health_connection(
    tls: TLSFiles, readyz: ReadyzServer
) -> None:
    async with https_probe(tls.ca, liveness_timeout=4.0) as probe:
        assert (await probe(local(readyz.port))).ok
        conn = probe._conns[local(readyz.port)]
        sock = conn._writer.get_extra_info("socket")
        tcp = socket.IPPROTO_TCP
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(tcp, socket.TCP_KEEPIDLE) == 2
        assert sock.getsockopt(tcp, socket.TCP_KEEPINTVL) == 2
        assert sock.getsockopt(tcp, socket.TCP_USER_TIMEOUT) == 4000


def test_liveness_probes_are_whole_seconds_and_at_least_one() -> None:
    opts = liveness_options(HealthCheckConfig(liveness_timeout=0.5))
    assert (opts.keepalive_idle, opts.keepalive_interval, opts.user_timeout_ms) == (1, 1, 500)


async def test_tcp_probe_ok_refused_and_timeout() -> None:
    probe = TcpProbe(timeout=0.3)
    with silent_listener() as port:
        ok = await probe(local(port))
    assert (ok.ok, ok.reason) == (True, "ok")
    assert ok.latency is not None
    assert ok.latency < 0.3
    with refusing_port() as port:
        assert await probe(local(port)) == ProbeResult(False, None, "connection refused")
    with full_backlog_listener() as port:
        started = time.monotonic()
        async with asyncio.timeout(GUARD):
            result = await probe(local(port))
        elapsed = time.monotonic() - started
    assert result == ProbeResult(False, None, "timed out after 0.3s", Evidence.TIMEOUT)
    assert elapsed >= 0.25  # it waited for its timeout
    assert sum(probe.cost.handshakes.values()) == 3
    probe.forget(local(port))
    await probe.close()


def test_make_probe_follows_the_config(tls: TLSFiles) -> None:
    cost = HealthCost()
    tcp = make_probe(HealthCheckConfig(type="tcp", timeout=0.5), cost)
    https = make_probe(HealthCheckConfig(ca_file=str(tls.ca)), cost)
    assert isinstance(tcp, TcpProbe) and tcp.cost is cost
    assert isinstance(https, HttpsProbe) and https.cost is cost


# ---------------------------------------------------------------------------------------------
# The response parser


async def parse(data: bytes) -> Response:
    """read_response over exactly these bytes (then EOF)."""
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await read_response(reader)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", Response(200, b"ok", False)),
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            Response(200, b"ok", True),
        ),
        (b"HTTP/1.0 503 No\r\nContent-Length: 0\r\n\r\n", Response(503, b"", True)),
        (b"HTTP/1.1 200 OK\r\n\r\nuntil close", Response(200, b"until close", True)),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2;ext=1\r\nok\r\n1\r\n!\r\n0\r\nTrailer: x\r\n\r\n",
            Response(200, b"ok!", False),
        ),
        (b"HTTP/1.1 200\r\nno-colon line\r\nContent-Length: 0\r\n\r\n", Response(200, b"", False)),
    ],
)
async def test_responses_are_read_by_length_chunks_or_close(raw: bytes, expected: Response) -> None:
    assert await parse(raw) == expected


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 abc\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % (MAX_BODY + 1),
            "too large",
        ),
    ],
)
async def test_bad_responses_are_refused(raw: bytes, error: str) -> None:
    with pytest.raises(HttpError, match=error):
        await parse(raw)


async def test_a_truncated_response_is_an_incomplete_read() -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        await parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")


async def test_bytes_nobody_asked_for_end_the_connection_as_a_failure(
    tls: TLSFiles, readyz: ReadyzServer
) -> None:
    lost: Lost = []
    async with https_probe(tls.ca, lost) as probe:
        assert (await probe(local(readyz.port))).ok
        for writer in readyz.writers:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await eventually(lambda: lost)
    assert lost == [
        (
            local(readyz.port),
            "health connection lost: HttpError: the server sent bytes nobody asked for",
            True,
        )
    ]


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (TimeoutError(), "health connection timed out (no answer to keepalive probes)"),
        (
            OSError(110, "Connection timed out"),
            "health connection timed out (no answer to keepalive probes)",
        ),
        (ConnectionResetError(104, "reset"), "health connection reset by the server"),
        (
            ssl.SSLError(1, "bad record mac"),
            "health connection lost: SSLError: bad record mac",
        ),
    ],
)
def test_loss_reasons(exc: BaseException, reason: str) -> None:
    assert _loss_reason(exc) == reason


# ------------------------------------------------------------------ under a stall


@contextlib.contextmanager
def threaded_readyz(ctx: ssl.SSLContext, delay: float) -> Iterator[int]:
    """An HTTPS server in its own thread, answering each request after ``delay``: it
    answers while the test's event loop is blocked."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(GUARD)
    stop = threading.Event()

    def serve() -> None:
        with (
            contextlib.suppress(OSError),
            ctx.wrap_socket(listener.accept()[0], server_side=True) as conn,
        ):
            body = VERBOSE_OK.encode()
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            buf = b""
            while not stop.is_set() and (data := conn.recv(4096)):
                buf += data
                while b"\r\n\r\n" in buf:
                    _head, buf = buf.split(b"\r\n\r\n", 1)
                    time.sleep(delay)
                    conn.sendall(answer)

    thread = threading.Thread(target=serve, name="threaded readyz", daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()
        thread.join(GUARD)


async def test_an_answer_that_arrived_during_a_pause_is_read_not_timed_out(
    tls: TLSFiles,
) -> None:
    loop = asyncio.get_running_loop()
    with threaded_readyz(tls.server_context, delay=0.05) as port:
        async with https_probe(tls.ca, timeout=0.2) as probe:
            assert (await probe(local(port))).ok  # the kept-alive connection is open
            # The loop stops 20 ms into the check for 3 timeouts; the answer comes at 50 ms.
            loop.call_later(0.02, time.sleep, 0.6)  # as SIGSTOP or a starved CPU would
            async with asyncio.timeout(GUARD):
                result = await probe(local(port))
    assert result.ok, result


async def test_a_silent_server_while_kubeprism_could_not_run_is_no_verdict(
    tls: TLSFiles,
) -> None:
    with silent_listener() as port:
        async with https_probe(tls.ca, timeout=0.05) as probe:
            probe.meter = NoCpu()
            async with asyncio.timeout(GUARD):
                result = await probe(local(port))
    assert (result.ok, result.evidence) == (False, Evidence.INCONCLUSIVE)
    assert result.reason == "no verdict: kubeprism could hardly run while waiting 0.05s"


async def test_a_500_while_kubeprism_is_stalled_still_counts(tls: TLSFiles) -> None:
    server = ReadyzServer()
    server.status = 500
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=tls.server_context)
    try:
        async with https_probe(tls.ca, timeout=0.5) as probe:
            probe.meter = NoCpu()
            result = await probe(local(listener.sockets[0].getsockname()[1]))
    finally:
        listener.close()
        for writer in list(server.writers):
            writer.transport.abort()
        await listener.wait_closed()
    assert (result.ok, result.evidence) == (False, Evidence.ANSWER)
    assert result.reason.startswith("HTTP 500 from /readyz")
