"""List and watch the `kubernetes` EndpointSlices, through kubeprism's own listener.

Going through our own listener means discovery works whenever any upstream
works. Two API paths do not justify a Kubernetes client library: aiohttp
speaks them. The credentials (credentials.py) are re-read when their files
change, checked before each request, so a rotated client certificate or token
is used without restart or reload; an authentication failure retries at once
if the files changed meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kubeprism.base.net import HostPort
from kubeprism.base.supervise import Backoff, Pacer
from kubeprism.config import ConfigError
from kubeprism.discovery.credentials import Credentials, load_credentials
from kubeprism.discovery.sliceparse import (
    MAX_LIST_BYTES,
    EndpointParse,
    Gone,
    LineSplitter,
    SliceSet,
    WatchError,
    slice_endpoints,
)

# aiohttp is imported where a request is made, not here: importing it costs ~0.3 s (the
# client parses the system CA bundle at import), and this module is on the path to the
# first forwarded byte (membership, metrics). The daemon loads it once forwarding runs.
if TYPE_CHECKING:
    import aiohttp

logger = logging.getLogger(__name__)

__all__ = ["Credentials", "Gone", "SliceWatcher", "load_credentials", "slice_endpoints"]

SLICES_PATH = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
SELECTOR = "kubernetes.io/service-name=kubernetes"
# Server-side watch length; the apiserver ends the watch and we resume from the last
# resourceVersion, which also proves the path is alive every few minutes.
WATCH_SECONDS = 240
# Retry after an error: doubling from the first to the last, with +/-20 % jitter so
# a whole cluster of nodes does not retry in step after an apiserver restart.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
BACKOFF_JITTER = 0.2
# A watch that lasted this long was real progress even without a change to report.
WATCH_PROGRESS_SECONDS = 10.0
# Hard ceiling on list+watch requests per node, whatever the server answers: with
# 5,000 nodes, 1/s each is already as much as a large apiserver should see from us.
MAX_REQUESTS_PER_SECOND = 1.0
REQUEST_BURST = 3  # a list and its watch at once, and one retry
LIST_TIMEOUT = 30.0
READ_CHUNK = 64 * 1024
# Addresses parsed between two turns of the event loop (~1 ms).
PARSE_STEP = 50


# Values of the `reason` label of kubeprism_discovery_errors_total.
ERROR_REASONS = ("unauthorized", "http", "tls", "timeout", "connection", "invalid", "credentials")


class HTTPStatusError(ValueError):
    """The API answered with an unexpected status."""

    def __init__(self, status: int, path: str) -> None:
        super().__init__(f"HTTP {status} from {path}")
        self.status = status


class Unauthorized(HTTPStatusError):
    """401 or 403: expired or rotated credentials (or missing RBAC)."""


@dataclass
class DiscoveryStats:
    """Counters that outlive any one watcher (a reload may replace it); read by the metrics."""

    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    last_success: float | None = None  # wall-clock time of the last list or watch answered 200


class SliceWatcher:
    """Keeps the current set of API server endpoints and reports changes, debounced."""

    def __init__(
        self,
        target: HostPort,
        credentials: Credentials,
        on_update: Callable[[set[HostPort]], None],
        debounce: float,
        stats: DiscoveryStats | None = None,
    ) -> None:
        self.base_url = f"https://{target}"
        self.credentials = credentials
        self.stats = stats or DiscoveryStats()
        self.on_update = on_update
        self.debounce = debounce
        self.state = SliceSet()
        self.lists = 0
        self.watches = 0
        self.failures = 0
        self.last_error: str | None = None
        self.invalid: dict[str, str] = {}  # entries of the slices that are no endpoint
        self._pending: asyncio.TimerHandle | None = None
        self._target: set[HostPort] | None = None  # what the pending timer will apply
        self._applied: set[HostPort] | None = None
        self._decided: set[HostPort] | None = None  # the last set _apply() saw (even if empty)
        self._pace = Pacer(MAX_REQUESTS_PER_SECOND, REQUEST_BURST)
        self._bad_logged = 0
        self._episode = 0  # failure count when the current episode began; 0: none

    @property
    def slices(self) -> dict[str, Mapping[str, Any]]:
        """The slices currently known, by name."""
        return self.state.slices

    async def run(self) -> None:
        """List, then watch from the list's resourceVersion, forever; back off on errors.

        Only progress resets the backoff (a watch that delivered a change or lived for
        WATCH_PROGRESS_SECONDS): a list that works followed by a watch that fails at once,
        or a 410 on every watch, must not turn into a request loop.
        """
        import aiohttp  # noqa: PLC0415  (see the TYPE_CHECKING import)

        backoff = Backoff(BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_JITTER)
        connector = aiohttp.TCPConnector(ssl=self.credentials.ssl)
        async with aiohttp.ClientSession(connector=connector) as session:
            while True:
                try:
                    version = await self._list(session)
                    while True:
                        version = await self._watch_once(session, version, backoff)
                except Gone:
                    self._failed("the watch expired (410 Gone)")
                except (aiohttp.ClientError, *_EXPECTED) as exc:
                    self.stats.errors[error_reason(exc)] += 1
                    self._failed(f"{type(exc).__name__}: {str(exc)[:300]}")
                    if isinstance(exc, Unauthorized) and self.refresh_credentials():
                        continue  # rotated on disk meanwhile: retry with them at once
                await asyncio.sleep(backoff.next())

    async def _watch_once(
        self, session: aiohttp.ClientSession, version: str, backoff: Backoff
    ) -> str:
        loop = asyncio.get_running_loop()
        started = loop.time()
        version, events = await self._watch(session, version, backoff)
        self._log_bad_objects()
        if events or loop.time() - started >= WATCH_PROGRESS_SECONDS:
            backoff.reset()
            self._recovered()
            return version
        # Ended at once without a change: as good as an error, or it becomes a loop.
        raise WatchError("the watch ended without delivering anything")

    def _failed(self, reason: str) -> None:
        self.failures += 1
        self.last_error = reason
        if not self._episode:  # one line per episode, not one per attempt
            self._episode = self.failures
            logger.warning("EndpointSlice discovery failed: %s (retrying with backoff)", reason)
        else:
            logger.debug("EndpointSlice discovery failed again: %s", reason)

    def _recovered(self) -> None:
        if self._episode:
            failed = self.failures - self._episode + 1
            logger.info("EndpointSlice discovery recovered after %d failed attempt(s)", failed)
            self._episode = 0

    def refresh_credentials(self) -> bool:
        """Re-read the credentials if their files changed; True if new ones are in use.

        A half-written rotation (certificate and key not matching yet) keeps the old ones
        and counts a `credentials` error; the next request checks again.
        """
        old = self.credentials
        if not old.changed_on_disk():
            return False
        assert old.source is not None
        try:
            self.credentials = load_credentials(old.source)
        except ConfigError as exc:
            self.stats.errors["credentials"] += 1
            self._failed(str(exc))
            return False
        logger.info("discovery credentials changed on disk; using the new ones")
        return True

    def _log_bad_objects(self) -> None:
        if self.state.bad_objects != self._bad_logged:
            logger.warning(
                "skipped %d malformed EndpointSlice object(s), e.g. %s",
                self.state.bad_objects - self._bad_logged,
                self.state.last_problem,
            )
            self._bad_logged = self.state.bad_objects

    def _get(
        self, session: aiohttp.ClientSession, params: dict[str, str], total: float | None
    ) -> Any:
        import aiohttp  # noqa: PLC0415  (see the TYPE_CHECKING import)

        self.refresh_credentials()
        return session.get(
            self.base_url + SLICES_PATH,
            params={"labelSelector": SELECTOR, **params},
            headers=self.credentials.headers(),
            # Per request: connections made with replaced credentials are not reused.
            ssl=self.credentials.ssl,
            server_hostname=self.credentials.server_name,
            timeout=aiohttp.ClientTimeout(total=total, connect=10, sock_read=WATCH_SECONDS + 30),
        )

    async def _list(self, session: aiohttp.ClientSession) -> str:
        await self._pace.wait()
        self.lists += 1
        async with self._get(session, {}, LIST_TIMEOUT) as resp:
            self._check(resp)
            body = await _read_limited(resp, MAX_LIST_BYTES)
        version = self.state.replace(json.loads(body))
        self.last_error = None  # the API answers; the episode ends only with progress
        self._log_bad_objects()
        await self._changed()
        return version

    async def _watch(
        self, session: aiohttp.ClientSession, version: str, backoff: Backoff
    ) -> tuple[str, int]:
        """One watch request until the server ends it; (last version, changes applied)."""
        params = {
            "watch": "1",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        await self._pace.wait()
        self.watches += 1
        changes = 0
        splitter = LineSplitter()
        async with self._get(session, params, None) as resp:
            self._check(resp)
            async for chunk in resp.content.iter_chunked(READ_CHUNK):
                for line in splitter.feed(chunk):
                    changed, new_version = self.state.event(line)
                    version = new_version or version
                    if changed:  # progress, even if the watch fails a moment later
                        changes += 1
                        backoff.reset()
                        self._recovered()
                        await self._changed()
        return version, changes

    async def _changed(self) -> None:
        """Apply after `debounce` of quiet: restarts flap the slice within seconds.

        A list or event that leaves the endpoint set as it is does not restart the wait,
        or a server re-sending the same list every second would keep anything from
        ever being applied.
        """
        parse = EndpointParse(self.state.slices)
        done = parse.advance(PARSE_STEP)
        while not done:
            await asyncio.sleep(0)  # a big list must not hold the event loop
            done = parse.advance(PARSE_STEP)
        endpoints, invalid = parse.found, parse.invalid
        if invalid != self.invalid:
            if invalid:
                logger.warning(
                    "ignoring %d EndpointSlice address(es) that are no endpoint: %s",
                    len(invalid),
                    "; ".join(f"{k}: {v}" for k, v in sorted(invalid.items())[:5]),
                )
            self.invalid = invalid
        pending = self._pending is not None
        if endpoints == (self._target if pending else self._decided):
            return
        if self._pending is not None:
            self._pending.cancel()
        self._target = endpoints
        self._pending = asyncio.get_running_loop().call_later(self.debounce, self._apply)

    def _apply(self) -> None:
        self._pending = None
        endpoints, self._target = self._target or set(), None
        self._decided = endpoints
        if not endpoints:
            logger.warning("EndpointSlices list no ready API server; keeping the current set")
            return
        if endpoints != self._applied:
            self._applied = endpoints
            try:
                self.on_update(endpoints)
            except Exception:  # a timer callback: nobody else would see it
                logger.exception("applying the discovered endpoints failed")

    def close(self) -> None:
        """Drop a pending debounced update."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    def _check(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status == 410:
            raise Gone()
        if resp.status in (401, 403):
            raise Unauthorized(resp.status, resp.url.path)
        if resp.status != 200:
            raise HTTPStatusError(resp.status, resp.url.path)
        self.stats.last_success = time.time()


async def _read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, refused (ValueError) as soon as it passes ``limit`` bytes."""
    if resp.content_length is not None and resp.content_length > limit:
        raise ValueError(f"list response larger than {limit} bytes ({resp.content_length})")
    body = bytearray()
    async for chunk in resp.content.iter_chunked(READ_CHUNK):
        body += chunk
        if len(body) > limit:
            raise ValueError(f"list response larger than {limit} bytes")
    return bytes(body)


# What a broken or hostile API server (or a proxy in front of it) can make a request end
# with (and aiohttp.ClientError); anything else is a bug, left to the task supervisor.
_EXPECTED = (
    OSError,
    TimeoutError,
    ValueError,
    UnicodeError,
    RecursionError,
    WatchError,
)


def error_reason(exc: BaseException) -> str:
    """The `reason` label for a discovery error (one of ERROR_REASONS)."""
    import aiohttp  # noqa: PLC0415  (see the TYPE_CHECKING import)

    if isinstance(exc, Unauthorized):
        return "unauthorized"
    if isinstance(exc, HTTPStatusError):
        return "http"
    if isinstance(exc, ConfigError):
        return "credentials"
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return "tls"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientError | OSError):
        return "connection"
    return "invalid"
