"""health.py: HealthChecker with a fake clock, sleep and probe; the probes against real sockets.

The checker tests never touch the network: a scripted probe answers from a per-endpoint
queue (an empty queue is a probe that hangs), the clock only moves when a scripted probe
says it took time, and the sleep records the delay it was asked for and just yields.
The probe tests use real servers on 127.0.0.1 with a throwaway trustme CA.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.client_reqrep import ConnectionKey
from util import eventually

from kubeprism.config import HealthCheckConfig
from kubeprism.health import (
    JITTER,
    MAX_REASON,
    RECHECK_FRACTION,
    HealthChecker,
    HttpsProbe,
    ProbeResult,
    TcpProbe,
    describe_error,
    is_local_error,
    make_probe,
)
from kubeprism.net import HostPort
from kubeprism.upstream import EndpointSpec, Health, Pool, Transition

A = HostPort("10.0.0.1", 6443)
B = HostPort("10.0.0.2", 6443)
C = HostPort("10.0.0.3", 6443)
INTERVAL = 10.0
OK = ProbeResult(True, 0.002, "ok")


def fail(reason: str = "HTTP 500 from /readyz") -> ProbeResult:
    """A failed probe with the given reason."""
    return ProbeResult(False, None, reason)


# ---------------------------------------------------------------------------------------------
# Fakes


class FakeClock:
    """Monotonic time that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Step:
    """One scripted probe: its result (or the exception it raises) and how long it takes."""

    outcome: ProbeResult | Exception
    duration: float = 0.0


class ScriptedProbe:
    """Answers each endpoint's probes from its own queue; an empty queue hangs the probe."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.queues: dict[HostPort, asyncio.Queue[Step]] = collections.defaultdict(asyncio.Queue)
        self.calls: collections.Counter[HostPort] = collections.Counter()
        self.inflight: collections.Counter[HostPort] = collections.Counter()

    def push(self, address: HostPort, *steps: Step | ProbeResult | Exception) -> None:
        """Script the next outcomes for ``address``."""
        for step in steps:
            self.queues[address].put_nowait(step if isinstance(step, Step) else Step(step))

    async def __call__(self, address: HostPort) -> ProbeResult:
        self.calls[address] += 1
        self.inflight[address] += 1
        try:
            step = await self.queues[address].get()
        finally:
            self.inflight[address] -= 1
        self.clock.now += step.duration
        if isinstance(step.outcome, Exception):
            raise step.outcome
        return step.outcome


class RecordingSleep:
    """Records each requested delay under the calling task's name, then only yields."""

    def __init__(self) -> None:
        self.delays: dict[str, list[float]] = collections.defaultdict(list)

    async def __call__(self, delay: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.delays[task.get_name()].append(delay)
        await asyncio.sleep(0)


@dataclass
class Harness:
    """A checker wired to fakes, plus everything it reported."""

    pool: Pool
    clock: FakeClock
    probe: ScriptedProbe
    sleep: RecordingSleep
    checker: HealthChecker
    transitions: list[Transition]
    observed: list[tuple[HostPort, float, bool]]


def specs(*addresses: HostPort) -> dict[HostPort, EndpointSpec]:
    """Discovery output for ``addresses``, all with the same priority."""
    return {a: EndpointSpec(100, frozenset({"static"})) for a in addresses}


def health_tasks() -> dict[str, asyncio.Task[object]]:
    """Live probe-loop tasks by name."""
    return {
        t.get_name(): t
        for t in asyncio.all_tasks()
        if t.get_name().startswith("health ") and not t.done()
    }


@contextlib.asynccontextmanager
async def harness(
    *addresses: HostPort,
    rand: float | random.Random = 0.5,
    healthy_threshold: int = 1,
    unhealthy_threshold: int = 2,
) -> AsyncIterator[Harness]:
    """A synced checker over ``addresses``; stopped (and checked for leftovers) on exit."""
    pool = Pool(healthy_threshold, unhealthy_threshold)
    pool.reconcile(specs(*addresses))
    clock = FakeClock()
    probe = ScriptedProbe(clock)
    sleep = RecordingSleep()
    transitions: list[Transition] = []
    observed: list[tuple[HostPort, float, bool]] = []
    checker = HealthChecker(
        pool,
        probe,
        INTERVAL,
        transitions.append,
        observe=lambda a, s, ok: observed.append((a, s, ok)),
        clock=clock,
        sleep=sleep,
        rand=rand.random if isinstance(rand, random.Random) else lambda: rand,
    )
    checker.sync()
    try:
        yield Harness(pool, clock, probe, sleep, checker, transitions, observed)
    finally:
        await checker.stop()
    assert health_tasks() == {}


# ---------------------------------------------------------------------------------------------
# HealthChecker


async def test_each_endpoint_has_its_own_loop_and_a_hanging_probe_delays_no_other() -> None:
    async with harness(A, B, C) as h:
        assert set(health_tasks()) == {f"health {a}" for a in (A, B, C)}
        h.probe.push(B, OK, OK, OK)
        h.probe.push(C, fail(), fail(), fail())
        await eventually(lambda: h.pool.endpoints[B].probes == h.pool.endpoints[C].probes == 3)
        assert h.pool.endpoints[B].health is Health.HEALTHY
        assert h.pool.endpoints[C].health is Health.UNHEALTHY
        # A's only probe is still in flight and nothing was recorded for it.
        assert (h.probe.calls[A], h.probe.inflight[A]) == (1, 1)
        assert h.pool.endpoints[A].probes == 0
        assert h.pool.endpoints[A].health is Health.UNKNOWN


async def test_first_pass_waits_for_every_endpoint_and_times_out_false() -> None:
    async with harness(A, B) as h:
        waiter = asyncio.create_task(h.checker.first_pass(timeout=30), name="first pass")
        h.probe.push(B, OK)
        await eventually(lambda: h.pool.endpoints[B].probes == 1)
        assert not waiter.done()
        assert await h.checker.first_pass(timeout=0.05) is False  # A still hangs
        h.probe.push(A, fail())  # a failed first probe still completes the pass
        assert await asyncio.wait_for(waiter, 5) is True
        assert await h.checker.first_pass(timeout=0) is True


@pytest.mark.parametrize("r", [0.0, 0.25, 0.5, 0.75, 0.999999])
async def test_wait_is_jittered_interval_minus_probe_duration(r: float) -> None:
    async with harness(A, rand=r) as h:
        h.probe.push(A, Step(OK, duration=0.3), Step(fail(), duration=0.0))
        await eventually(lambda: len(h.sleep.delays[f"health {A}"]) == 2)
        jitter = 1 + JITTER * (2 * r - 1)
        # After the failure the endpoint is in doubt: the next check comes sooner.
        assert h.sleep.delays[f"health {A}"] == pytest.approx(
            [INTERVAL * jitter - 0.3, INTERVAL * RECHECK_FRACTION * jitter]
        )


async def test_jitter_stays_within_ten_percent_and_spreads() -> None:
    rounds = 200
    async with harness(A, rand=random.Random(7)) as h:
        h.probe.push(A, *(Step(OK, duration=0.25) for _ in range(rounds)))
        delays = await eventually(
            lambda: d if len(d := h.sleep.delays[f"health {A}"]) == rounds else None
        )
    low, high = INTERVAL * (1 - JITTER) - 0.25, INTERVAL * (1 + JITTER) - 0.25
    assert all(low <= d <= high for d in delays)
    # The jitter is really used: the waits cover most of the allowed band.
    assert min(delays) < low + 0.1 * INTERVAL * JITTER
    assert max(delays) > high - 0.1 * INTERVAL * JITTER


async def test_a_probe_slower_than_the_interval_probes_again_at_once() -> None:
    async with harness(A, rand=0.999999) as h:
        h.probe.push(A, Step(OK, duration=3 * INTERVAL))
        await eventually(lambda: h.sleep.delays[f"health {A}"])
        assert h.sleep.delays[f"health {A}"] == [0.0]


async def test_transitions_only_on_change_with_hysteresis_and_observer_per_probe() -> None:
    script = [OK, fail("f1"), fail("f2"), fail("f3"), fail("f4"), OK, OK, OK]
    async with harness(A, B, healthy_threshold=2, unhealthy_threshold=3) as h:
        h.probe.push(A, *(Step(r, duration=0.01 * (i + 1)) for i, r in enumerate(script)))
        h.probe.push(B, fail("refused"))
        await eventually(lambda: len(h.observed) == len(script) + 1)
    assert [t for t in h.transitions if t.address == A] == [
        Transition(A, Health.UNKNOWN, Health.HEALTHY, "ok"),
        Transition(A, Health.HEALTHY, Health.UNHEALTHY, "f3"),
        Transition(A, Health.UNHEALTHY, Health.HEALTHY, "ok"),
    ]
    # The first answer decides an unknown endpoint, whatever the thresholds.
    assert [t for t in h.transitions if t.address == B] == [
        Transition(B, Health.UNKNOWN, Health.UNHEALTHY, "refused")
    ]
    observed_a = [(s, ok) for a, s, ok in h.observed if a == A]
    assert [s for s, _ in observed_a] == pytest.approx([0.01 * (i + 1) for i in range(len(script))])
    assert [ok for _, ok in observed_a] == [r.ok for r in script]
    assert h.pool.endpoints[A].reason == "ok"
    assert h.pool.endpoints[A].latency == pytest.approx(OK.latency)


async def test_sync_starts_new_loops_and_cancels_removed_ones() -> None:
    async with harness(A, B) as h:
        await eventually(lambda: h.probe.inflight[A] == h.probe.inflight[B] == 1)
        b_task = health_tasks()[f"health {B}"]
        h.pool.reconcile(specs(B, C))
        h.checker.sync()
        await eventually(lambda: h.probe.inflight[C] == 1)
        await eventually(lambda: h.probe.inflight[A] == 0)  # A's probe was cancelled
        assert set(health_tasks()) == {f"health {B}", f"health {C}"}
        assert health_tasks()[f"health {B}"] is b_task  # a staying endpoint keeps its loop
        assert h.probe.calls == {A: 1, B: 1, C: 1}
        h.probe.push(C, OK)
        await eventually(lambda: h.pool.endpoints[C].health is Health.HEALTHY)


async def test_stop_right_after_sync_removed_every_endpoint_leaves_no_task() -> None:
    async with harness(A, B) as h:
        await eventually(lambda: h.probe.inflight[A] == h.probe.inflight[B] == 1)
        h.pool.reconcile({})
        h.checker.sync()
        await h.checker.stop()
        assert health_tasks() == {}


async def test_a_probe_that_raises_counts_as_failed_and_checking_continues(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="kubeprism.health")
    async with harness(A) as h:
        h.probe.push(A, RuntimeError("checker bug"), OK)
        await eventually(lambda: h.pool.endpoints[A].health is Health.HEALTHY)
        assert len(h.sleep.delays[f"health {A}"]) >= 1  # it waited after the crash too
        # The first answer decides an unknown endpoint: the crash made it unhealthy, with
        # the reason shown; the next good probe made it healthy again.
        assert [(t.new, t.reason) for t in h.transitions] == [
            (Health.UNHEALTHY, "probe error: RuntimeError: checker bug"),
            (Health.HEALTHY, "ok"),
        ]
        assert h.checker._first.is_set()  # the first pass does not hang on a broken probe
    [record] = [r for r in caplog.records if r.name == "kubeprism.health"]
    assert record.levelno == logging.DEBUG  # the transition is the visible log line
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


async def test_a_probe_failing_for_a_local_reason_is_no_verdict_on_the_endpoint(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Out of fds, a probe cannot even open its socket: that must not mark the endpoint
    down (and close its connections), only be logged, once per spell."""
    local = ProbeResult(False, None, "connect failed: Too many open files", local=True)
    async with harness(A) as h:
        h.probe.push(A, OK, local, local, local, OK, local)
        await eventually(lambda: h.probe.calls[A] == 7)
        assert h.transitions == [Transition(A, Health.UNKNOWN, Health.HEALTHY, "ok")]
        assert h.pool.endpoints[A].failures == 0
        assert [ok for _a, _s, ok in h.observed] == [True, True]
    warnings = [r.getMessage() for r in caplog.records if r.name == "kubeprism.health"]
    reason = "connect failed: Too many open files"
    assert warnings == [f"cannot probe {A}: {reason} (a local limit, not the endpoint)"] * 2


async def test_stop_cancels_loops_with_probes_in_flight() -> None:
    async with harness(A, B, C) as h:
        await eventually(lambda: sum(h.probe.inflight.values()) == 3)
        await h.checker.stop()
        assert health_tasks() == {}
        assert sum(h.probe.inflight.values()) == 0


# ---------------------------------------------------------------------------------------------
# describe_error


def _key() -> ConnectionKey:
    # aiohttp only stores the connection key; the tests never connect with it.
    return ConnectionKey("10.0.0.1", 6443, True, True, None, None, None)


def _verify_error(message: str) -> ssl.SSLCertVerificationError:
    # What the ssl module raises: the full text plus the actionable verify_message.
    exc = ssl.SSLCertVerificationError(
        1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message} (_ssl.c:1006)"
    )
    exc.verify_message = message
    return exc


HOSTNAME_MISMATCH = "Hostname mismatch, certificate is not valid for 'kubernetes'."


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (TimeoutError(), "timed out after 0.8s"),
        (aiohttp.ServerTimeoutError("read"), "timed out after 0.8s"),
        (
            aiohttp.ClientConnectorCertificateError(_key(), _verify_error(HOSTNAME_MISMATCH)),
            f"TLS certificate rejected: {HOSTNAME_MISMATCH}",
        ),
        (
            aiohttp.ClientConnectorCertificateError(_key(), ValueError("no verify_message")),
            "TLS certificate rejected: no verify_message",
        ),
        (ssl.SSLError(1, "WRONG_VERSION_NUMBER"), "TLS error: WRONG_VERSION_NUMBER"),
        (
            aiohttp.ClientConnectorError(_key(), ConnectionRefusedError(111, "Refused")),
            "connection refused",
        ),
        (
            aiohttp.ClientConnectorError(_key(), OSError(113, "No route to host")),
            "connect failed: No route to host",
        ),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "connection refused"),
        (OSError(errno.ENETUNREACH, "Network unreachable"), "connect failed: Network unreachable"),
        (OSError("no errno"), "connect failed: no errno"),
        (ValueError("bad\n   value"), "ValueError: bad value"),
        (RuntimeError("x" * 500), "RuntimeError: " + "x" * (MAX_REASON - 17) + "..."),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else "",
)
def test_describe_error(exc: BaseException, reason: str) -> None:
    assert describe_error(exc, 0.8) == reason
    assert len(reason) <= MAX_REASON


@pytest.mark.parametrize(
    ("exc", "local"),
    [
        (aiohttp.ClientConnectorError(_key(), OSError(errno.EMFILE, "Too many open files")), True),
        (OSError(errno.ENFILE, "Too many open files in system"), True),
        (OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"), True),
        (aiohttp.ClientConnectorError(_key(), ConnectionRefusedError(111, "Refused")), False),
        (OSError(errno.EHOSTUNREACH, "No route to host"), False),
        (TimeoutError(), False),
    ],
    ids=lambda v: str(getattr(getattr(v, "os_error", v), "errno", v)),
)
def test_local_errors_are_told_apart(exc: BaseException, local: bool) -> None:
    assert is_local_error(exc) is local


def test_make_probe_follows_the_config(tls: TLSFiles) -> None:
    assert isinstance(make_probe(HealthCheckConfig(type="tcp", timeout=0.5)), TcpProbe)
    assert isinstance(make_probe(HealthCheckConfig(ca_file=str(tls.ca))), HttpsProbe)


# ---------------------------------------------------------------------------------------------
# Real probes on 127.0.0.1


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
    """An HTTPS /readyz answering ``status`` (and the kube-apiserver's failure text)."""

    def __init__(self) -> None:
        self.status = 200
        self.port = 0
        self.clients: set[object] = set()  # client (address, port) pairs: one per connection

    async def readyz(self, request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.clients.add(peer)
        text = "ok" if self.status == 200 else "[-]etcd failed: reason withheld"
        return web.Response(status=self.status, text=text)


@pytest.fixture
async def readyz(tls: TLSFiles) -> AsyncIterator[ReadyzServer]:
    """A started ReadyzServer on 127.0.0.1."""
    server = ReadyzServer()
    app = web.Application()
    app.router.add_get("/readyz", server.readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.server_context).start()
        server.port = runner.addresses[0][1]
        yield server
    finally:
        await runner.cleanup()


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


@contextlib.asynccontextmanager
async def https_probe(
    ca: Path, server_name: str = "kubernetes", timeout: float = 2.0, keep_alive: bool = False
) -> AsyncIterator[HttpsProbe]:
    """An HttpsProbe, closed on exit."""
    probe = HttpsProbe(
        HealthCheckConfig(
            ca_file=str(ca), server_name=server_name, timeout=timeout, keep_alive=keep_alive
        )
    )
    try:
        yield probe
    finally:
        await probe.close()


def local(port: int) -> HostPort:
    """127.0.0.1:port."""
    return HostPort("127.0.0.1", port)


async def test_https_probe_200_is_ok_with_latency(tls: TLSFiles, readyz: ReadyzServer) -> None:
    async with https_probe(tls.ca) as probe:
        first = await probe(local(readyz.port))
        second = await probe(local(readyz.port))  # a fresh connection each time still works
    assert (first.ok, first.reason, second.ok) == (True, "ok", True)
    assert first.latency is not None
    assert 0 < first.latency < 2.0


@pytest.mark.parametrize(("keep_alive", "connections"), [(False, 3), (True, 1)])
async def test_https_probe_reuses_its_connection_only_with_keep_alive(
    tls: TLSFiles, readyz: ReadyzServer, keep_alive: bool, connections: int
) -> None:
    async with https_probe(tls.ca, keep_alive=keep_alive) as probe:
        results = [await probe(local(readyz.port)) for _ in range(3)]
    assert all(r.ok for r in results)
    assert len(readyz.clients) == connections  # a TLS handshake per probe, or just one


async def test_https_probe_500_is_unhealthy_with_status_and_body(
    tls: TLSFiles, readyz: ReadyzServer
) -> None:
    readyz.status = 500
    async with https_probe(tls.ca) as probe:
        result = await probe(local(readyz.port))
    assert not result.ok
    assert result.latency is not None
    assert "HTTP 500" in result.reason
    assert "etcd failed" in result.reason


async def test_https_probe_wrong_ca_names_the_certificate(
    tls: TLSFiles, readyz: ReadyzServer
) -> None:
    async with https_probe(tls.wrong_ca) as probe:
        result = await probe(local(readyz.port))
    assert (result.ok, result.latency) == (False, None)
    assert result.reason == "TLS certificate rejected: unable to get local issuer certificate"


async def test_https_probe_wrong_server_name_names_the_hostname(
    tls: TLSFiles, readyz: ReadyzServer
) -> None:
    async with https_probe(tls.ca, server_name="not-the-apiserver.example") as probe:
        result = await probe(local(readyz.port))
    assert not result.ok
    assert result.reason == (
        "TLS certificate rejected: Hostname mismatch, "
        "certificate is not valid for 'not-the-apiserver.example'."
    )


async def test_https_probe_refused(tls: TLSFiles) -> None:
    with refusing_port() as port:
        async with https_probe(tls.ca) as probe:
            result = await probe(local(port))
    assert result == ProbeResult(False, None, "connection refused")


async def test_https_probe_silent_server_times_out_within_the_timeout(tls: TLSFiles) -> None:
    timeout = 0.5
    with silent_listener() as port:
        async with https_probe(tls.ca, timeout=timeout) as probe:
            started = time.monotonic()
            result = await probe(local(port))
            elapsed = time.monotonic() - started
    assert result == ProbeResult(False, None, "timed out after 0.5s")
    assert timeout * 0.9 <= elapsed < timeout + 0.5


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
        result = await probe(local(port))
        elapsed = time.monotonic() - started
    assert result == ProbeResult(False, None, "timed out after 0.3s")
    assert 0.25 <= elapsed < 0.8
    await probe.close()


async def test_in_doubt_endpoints_are_rechecked_sooner_until_settled() -> None:
    async with harness(A, unhealthy_threshold=3, healthy_threshold=2) as h:
        h.probe.push(A, OK, fail(), fail(), fail(), OK, OK, OK)
        await eventually(lambda: len(h.sleep.delays[f"health {A}"]) == 7)
        fast, slow = INTERVAL * RECHECK_FRACTION, INTERVAL
        # healthy | suspect | suspect | down | recovering | back | steady
        assert h.sleep.delays[f"health {A}"] == pytest.approx(
            [slow, fast, fast, slow, fast, slow, slow]
        )
