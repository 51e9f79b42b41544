"""Active health checks: one jittered probe loop per endpoint, feeding upstream.Pool.

Probes run concurrently (a slow endpoint never delays the others), each bounded
by its timeout. Only state *changes* are logged, with the reason, because a
node logs every second otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from kubeprism.config import HealthCheckConfig, file_named_by
from kubeprism.net import LOCAL_ERRNOS, HostPort
from kubeprism.upstream import Pool, Transition

logger = logging.getLogger(__name__)

# +/-10 % on every wait so thousands of nodes drift apart instead of probing in step.
JITTER = 0.1
# While an endpoint is in doubt (a failure not yet enough to mark it down, or a success
# not yet enough to bring it back), check again after this fraction of the interval:
# detection takes ~1 interval instead of `threshold` intervals, and the extra probes
# happen only while something is actually changing.
RECHECK_FRACTION = 0.25
# Keep a reason short enough for a log line and a /upstreams cell.
MAX_REASON = 160


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of one probe."""

    ok: bool
    latency: float | None
    reason: str
    local: bool = False  # failed on this host (out of fds, ...): no verdict on the endpoint


Probe = Callable[[HostPort], Awaitable[ProbeResult]]
ProbeObserver = Callable[[HostPort, float, bool], None]


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def describe_error(exc: BaseException, timeout: float) -> str:
    """A reason a person can act on: refused, timed out, which TLS problem."""
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        # verify_message is the actionable part ("Hostname mismatch, ... 'name'"); the full
        # text's "[SSL: CERTIFICATE_VERIFY_FAILED] ..." prefix pushed it past MAX_REASON.
        cert_error = exc.certificate_error
        detail = getattr(cert_error, "verify_message", None) or cert_error
        return _short(f"TLS certificate rejected: {detail}")
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return _short(f"TLS error: {exc}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        if isinstance(os_error, ConnectionRefusedError):
            return "connection refused"
        return _short(f"connect failed: {os_error.strerror or os_error}")
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError):
        return _short(f"connect failed: {exc.strerror or exc}")
    return _short(f"{type(exc).__name__}: {exc}")


def is_local_error(exc: BaseException) -> bool:
    """True when the error is this host's (EMFILE, ENOMEM, ...), not the endpoint's."""
    os_error = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    return isinstance(os_error, OSError) and os_error.errno in LOCAL_ERRNOS


def failed(exc: BaseException, timeout: float) -> ProbeResult:
    """The result of a probe that raised."""
    return ProbeResult(False, None, describe_error(exc, timeout), is_local_error(exc))


def client_ssl_context(hc: HealthCheckConfig) -> ssl.SSLContext:
    """Verify API server certificates against caFile (or the system CAs); ConfigError if bad."""
    with file_named_by("healthCheck.caFile", hc.ca_file):
        ctx = ssl.create_default_context(cafile=hc.ca_file)
    if hc.client_cert_file and hc.client_key_file:
        files = f"{hc.client_cert_file} and {hc.client_key_file}"
        with file_named_by("healthCheck.clientCertFile", files):
            ctx.load_cert_chain(hc.client_cert_file, hc.client_key_file)
    return ctx


class HttpsProbe:
    """TLS handshake verifying the CA and serverName, then GET path; 200 is healthy."""

    def __init__(self, hc: HealthCheckConfig) -> None:
        self.hc = hc
        self._ssl = client_ssl_context(hc)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # By default a fresh connection (TCP + TLS handshake) per probe: it checks the
            # whole path a new client takes. keepAlive reuses one, which spares the API
            # server a handshake per node per interval (see the README's capacity note);
            # a dead path is still caught, by the probe's timeout.
            if self.hc.keep_alive:
                connector = aiohttp.TCPConnector(
                    ssl=self._ssl, limit=0, keepalive_timeout=self.hc.interval * 3
                )
            else:
                connector = aiohttp.TCPConnector(ssl=self._ssl, force_close=True, limit=0)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.hc.timeout)
            )
        return self._session

    async def __call__(self, address: HostPort) -> ProbeResult:
        started = time.monotonic()
        url = f"https://{address}{self.hc.path}"
        try:
            async with self._client().get(
                url, server_hostname=self.hc.server_name, allow_redirects=False
            ) as resp:
                body = await resp.content.read(512)
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError, ssl.SSLError) as exc:
            return failed(exc, self.hc.timeout)
        latency = time.monotonic() - started
        if status == 200:
            return ProbeResult(True, latency, "ok")
        text = body.decode("utf-8", "replace").strip()
        return ProbeResult(False, latency, _short(f"HTTP {status} from {self.hc.path}: {text}"))

    async def close(self) -> None:
        """Close the HTTP client."""
        if self._session is not None:
            await self._session.close()
            self._session = None


class TcpProbe:
    """Connect only; the latency is the connect time."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    async def __call__(self, address: HostPort) -> ProbeResult:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                _reader, writer = await asyncio.open_connection(address.host, address.port)
        except (OSError, TimeoutError) as exc:
            return failed(exc, self.timeout)
        latency = time.monotonic() - started
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return ProbeResult(True, latency, "ok")

    async def close(self) -> None:
        """Nothing to release."""


class HealthChecker:
    """Runs a probe loop per endpoint of the pool and reports results to it."""

    def __init__(
        self,
        pool: Pool,
        probe: Probe,
        interval: float,
        on_transition: Callable[[Transition], None],
        observe: ProbeObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.pool = pool
        self.probe = probe
        self.interval = interval
        self._on_transition = on_transition
        self._observe = observe or (lambda _a, _s, _ok: None)
        self._clock, self._sleep, self._rand = clock, sleep, rand
        self._tasks: dict[HostPort, asyncio.Task[None]] = {}
        # Loops cancelled by sync() but not finished yet: stop() must wait for them too.
        self._retired: set[asyncio.Task[None]] = set()
        self._first = asyncio.Event()
        # Endpoints whose last probe could not run for a local reason (logged once per spell).
        self._local_failures: set[HostPort] = set()

    def sync(self) -> None:
        """Start loops for new endpoints and stop those of removed ones."""
        for address in list(self._tasks):
            if address not in self.pool.endpoints:
                task = self._tasks.pop(address)
                task.cancel()
                self._retired.add(task)
                task.add_done_callback(self._retired.discard)
        for address in self.pool.endpoints:
            if address not in self._tasks:
                self._tasks[address] = asyncio.get_running_loop().create_task(
                    self._loop(address), name=f"health {address}"
                )
        self._update_first()

    def _update_first(self) -> None:
        if all(ep.probes for ep in self.pool.endpoints.values()):
            self._first.set()

    async def first_pass(self, timeout: float) -> bool:
        """Wait until every endpoint has been probed once; False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._first.wait()
        except TimeoutError:
            return False
        return True

    async def check_once(self, address: HostPort) -> None:
        """Probe one endpoint now and record the result."""
        started = self._clock()
        try:
            result = await self.probe(address)
        except Exception as exc:  # a probe bug counts as a failed probe, and checking goes on
            logger.debug("probe of %s raised", address, exc_info=True)
            result = ProbeResult(False, None, _short(f"probe error: {type(exc).__name__}: {exc}"))
        if result.local:
            if address not in self._local_failures:
                logger.warning(
                    "cannot probe %s: %s (a local limit, not the endpoint)", address, result.reason
                )
            self._local_failures.add(address)
            return
        self._local_failures.discard(address)
        self._observe(address, self._clock() - started, result.ok)
        transition = self.pool.record_probe(
            address, result.ok, result.latency, result.reason, self._clock()
        )
        self._update_first()
        if transition is not None:
            self._on_transition(transition)

    async def _loop(self, address: HostPort) -> None:
        while True:
            started = self._clock()
            try:
                await self.check_once(address)
            except Exception:  # a checker bug must not stop checking
                logger.exception("health check of %s failed unexpectedly", address)
            jitter = 1 + JITTER * (2 * self._rand() - 1)
            ep = self.pool.endpoints.get(address)
            wait = self.interval * (RECHECK_FRACTION if ep is not None and ep.in_doubt else 1)
            await self._sleep(max(0.0, wait * jitter - (self._clock() - started)))

    async def stop(self) -> None:
        """Cancel every probe loop and wait for them."""
        tasks = [*self._tasks.values(), *self._retired]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def make_probe(hc: HealthCheckConfig) -> HttpsProbe | TcpProbe:
    """The probe the config asks for."""
    return HttpsProbe(hc) if hc.type == "https" else TcpProbe(hc.timeout)
