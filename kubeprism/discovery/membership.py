"""Keeps the pool's endpoint set equal to seeds + discovery, and retires what leaves.

Sources: the configured upstreams (names re-resolved every dnsRefresh), the
Kubernetes EndpointSlice watch, and until that watch first answers, the
on-disk cache of what it said last time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from kubeprism.base.net import HostPort
from kubeprism.base.supervise import supervised
from kubeprism.config import DEFAULT_PRIORITY, DiscoveryConfig, UpstreamSpec
from kubeprism.core.endpoint import EndpointSpec
from kubeprism.core.upstream import Pool
from kubeprism.discovery.credentials import Credentials
from kubeprism.discovery.kubewatch import DiscoveryStats, SliceWatcher
from kubeprism.discovery.sources import (
    SOURCE_CACHE,
    SOURCE_KUBERNETES,
    EndpointFilter,
    Screened,
    StaticDiscovery,
    load_cache,
    merge,
    save_cache,
    screen,
)

logger = logging.getLogger(__name__)


class Membership:
    """Merges every endpoint source into the pool."""

    def __init__(
        self,
        pool: Pool,
        on_changed: Callable[[], None],
        retire: Callable[[HostPort], None],
    ) -> None:
        self.pool = pool
        self._on_changed = on_changed
        self._retire = retire
        self.seeds: dict[HostPort, EndpointSpec] = {}
        self.discovered: set[HostPort] | None = None
        self.cached: list[HostPort] = []
        self._static = StaticDiscovery(())
        self._filter = EndpointFilter(())
        self._dc = DiscoveryConfig()
        self._watch_key: tuple[Any, ...] | None = None
        self._watcher: SliceWatcher | None = None
        self.discovery_stats = DiscoveryStats()
        self._watch_task: asyncio.Task[None] | None = None
        self._dns_task: asyncio.Task[None] | None = None
        self._removals: dict[HostPort, asyncio.TimerHandle] = {}
        self._stopped: set[asyncio.Task[None]] = set()
        self.screened = Screened([], {}, [])  # what the filter and the cap made of discovery

    def configure(
        self,
        upstreams: tuple[UpstreamSpec, ...],
        dc: DiscoveryConfig,
        credentials: Credentials | None,
        watch_target: HostPort,
        own: tuple[HostPort, ...] = (),
    ) -> None:
        """Apply (new) settings; the watch restarts only if its own settings or credentials changed.

        A reload thus always applies credentials re-read from disk (the watcher also picks up
        rotated files by itself), with a fresh backoff.
        ``own`` are kubeprism's listen addresses: never an endpoint, whoever names them.
        """
        first = self._watch_key is None
        self._static = StaticDiscovery(upstreams)
        self._filter = EndpointFilter(dc.filters, own or (watch_target,))
        self._dc = dc
        # The cache stands in for the watch until it answers; without the watch nothing
        # would ever replace it, and a stale file would add endpoints for good.
        if first and dc.cache_file and dc.kubernetes.enabled:
            self.cached = load_cache(dc.cache_file)
        key = (dc.kubernetes, watch_target, credentials and credentials.fingerprint)
        if key != self._watch_key:
            self._watch_key = key
            self._stop_watch()
            if credentials is not None:
                self._watcher = SliceWatcher(
                    watch_target,
                    credentials,
                    self._on_slices,
                    dc.kubernetes.debounce,
                    self.discovery_stats,
                )

    @property
    def watcher(self) -> SliceWatcher | None:
        """The EndpointSlice watcher, if Kubernetes discovery is on."""
        return self._watcher

    def start(self) -> None:
        """Start the DNS refresh loop and the EndpointSlice watch (if enabled)."""
        if self._dns_task is None:
            self._dns_task = supervised("dns refresh", self._dns_loop)
        if self._watcher is not None and self._watch_task is None:
            # Through our own listener: discovery works whenever any upstream works.
            self._watch_task = supervised("endpointslice watch", self._watcher.run)

    async def refresh(self) -> None:
        """Resolve the configured names now and apply the result."""
        self.seeds = await self._static.resolve()
        self.reconcile()

    async def _dns_loop(self) -> None:
        while True:
            await asyncio.sleep(self._dc.dns_refresh)
            await self.refresh()

    def _on_slices(self, endpoints: set[HostPort]) -> None:
        logger.info(
            "EndpointSlices list %d API server(s): %s",
            len(endpoints),
            ", ".join(str(a) for a in sorted(endpoints)[:20]),
        )
        self.discovered = endpoints
        self.reconcile()
        if self._dc.cache_file:
            try:
                # Only what passed the filter and the cap: the cache must not outlive a rule.
                save_cache(self._dc.cache_file, self.screened.accepted)
            except OSError as exc:
                logger.warning("cannot write endpoint cache %s: %s", self._dc.cache_file, exc)

    def reconcile(self) -> None:
        """Seeds plus discovered endpoints (or, until the first list, the cached ones)."""
        if self.discovered is not None:
            extra, source = self.discovered, SOURCE_KUBERNETES
        else:
            extra, source = set(self.cached), SOURCE_CACHE
        self._screen(extra, source)
        desired = merge(self.seeds, self.screened.accepted, source, self._filter, DEFAULT_PRIORITY)
        if not desired:
            logger.warning("no endpoint known (every name failed to resolve); keeping the set")
            return
        for ep in self.pool.reconcile(desired):
            self._schedule_retire(ep.address)
        self._on_changed()

    def _screen(self, extra: set[HostPort], source: str) -> None:
        """Filter and cap; log what is refused or dropped once per change, not per pass."""
        old, new = self.screened, screen(extra, self._filter, self._dc.max_endpoints)
        self.screened = new
        if new.refused and new.refused != old.refused:
            logger.warning(
                "refusing %d %s endpoint(s): %s",
                len(new.refused),
                source,
                "; ".join(f"{a}: {why}" for a, why in sorted(new.refused.items())[:10]),
            )
        if new.dropped and new.dropped != old.dropped:
            logger.warning(
                "%s names %d usable endpoints; using the first %d (discovery.maxEndpoints), "
                "ignoring %d",
                source,
                len(new.accepted) + len(new.dropped),
                len(new.accepted),
                len(new.dropped),
            )

    def _schedule_retire(self, address: HostPort) -> None:
        grace = self._dc.removal_grace
        logger.info("endpoint %s removed; closing its connections in %gs", address, grace)

        def close() -> None:
            self._removals.pop(address, None)
            if address not in self.pool.endpoints:  # unless it came back meanwhile
                self._retire(address)

        old = self._removals.pop(address, None)
        if old is not None:
            old.cancel()
        self._removals[address] = asyncio.get_running_loop().call_later(grace, close)

    def _stop_watch(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        if self._watch_task is not None:
            self._watch_task.cancel()
            self._stopped.add(self._watch_task)  # awaited in stop()
            self._watch_task = None

    async def stop(self) -> None:
        """Stop every loop and pending removal."""
        for timer in self._removals.values():
            timer.cancel()
        self._removals.clear()
        self._stop_watch()
        tasks = [*self._stopped, *([self._dns_task] if self._dns_task else [])]
        self._stopped.clear()
        if self._dns_task is not None:
            self._dns_task.cancel()
            self._dns_task = None
        await asyncio.gather(*tasks, return_exceptions=True)
