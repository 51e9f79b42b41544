"""Composition root: bind, wire, warm up, serve, drain, clean up.

Everything that can fail at start (every socket) is bound before anything
is served, so a bad port fails the start instead of leaving half a daemon.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Iterable

from aiohttp import web

from kubeprism.config import DEFAULT_PRIORITY, Config, HostPort
from kubeprism.discovery import (
    SOURCE_CACHE,
    SOURCE_KUBERNETES,
    EndpointFilter,
    StaticDiscovery,
    load_cache,
    merge,
    save_cache,
)
from kubeprism.health import HealthChecker, make_probe
from kubeprism.kubewatch import SliceWatcher, load_credentials
from kubeprism.metrics import Metrics, admin_app
from kubeprism.proxy import Proxy, ProxySettings
from kubeprism.upstream import Endpoint, EndpointSpec, Health, Pool, Transition

logger = logging.getLogger(__name__)

# Deep accept queue: a node's clients reconnect all at once after a failover.
LISTEN_BACKLOG = 4096
# How long start-up waits for every endpoint's first probe before calling itself ready.
FIRST_PASS_TIMEOUT = 5.0


class StartupError(Exception):
    """The daemon could not start (a socket could not be bound, ...)."""


def bind_listener(address: HostPort, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A bound, listening, non-blocking TCP socket (IPv6 sockets are v6-only)."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
    return sock


def bind_all(addresses: Iterable[HostPort]) -> list[socket.socket]:
    """Bind every address or none (sockets bound so far are closed on failure)."""
    bound: list[socket.socket] = []
    try:
        for address in addresses:
            bound.append(bind_listener(address))
    except StartupError:
        for sock in bound:
            sock.close()
        raise
    return bound


def proxy_settings(cfg: Config) -> ProxySettings:
    """The proxy's part of the config."""
    ka = cfg.tcp_keepalive
    return ProxySettings(
        dial_timeout=cfg.dial_timeout,
        mode=cfg.forwarding,
        keepalive_idle=ka.idle,
        keepalive_interval=ka.interval,
        keepalive_count=ka.count,
        user_timeout=cfg.tcp_user_timeout,
        max_connections=cfg.max_connections,
        idle_timeout=cfg.idle_timeout,
        close_on_unhealthy=cfg.close_connections_on_unhealthy,
    )


class Daemon:
    """One running kubeprism: pool, checker, discovery, proxy and admin server."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.listeners: list[socket.socket] = []
        self.admin_socket: socket.socket | None = None
        self.stop_requested = asyncio.Event()
        self.force_requested = asyncio.Event()
        self._signals = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._removals: dict[HostPort, asyncio.TimerHandle] = {}
        kc = cfg.discovery.kubernetes
        # Loaded before anything is bound, so bad credentials are a config error (exit 2).
        self.credentials = load_credentials(kc) if kc.enabled else None

    def bind(self) -> None:
        """Bind every socket the config names; raise StartupError if any fails."""
        admin = [self.cfg.admin.listen] if self.cfg.admin.listen else []
        bound = bind_all([*self.cfg.listen, *admin])
        self.listeners = bound[: len(self.cfg.listen)]
        self.admin_socket = bound[len(self.cfg.listen)] if admin else None

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """First call: drain and stop. Second call: stop now."""
        self._signals += 1
        if self._signals == 1:
            logger.info("received %s; draining", signal.Signals(signum).name)
            self.stop_requested.set()
        else:
            logger.warning(
                "received %s again; closing every connection now", signal.Signals(signum).name
            )
            self.force_requested.set()

    async def run(self) -> None:
        """Serve until asked to stop; sockets must be bound already."""
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        hc = cfg.health_check
        self.pool = Pool(hc.healthy_threshold, hc.unhealthy_threshold)
        self.proxy = Proxy(loop, self.pool, proxy_settings(cfg), self._on_transition)
        self.metrics = Metrics(self.pool, self.proxy)
        self.proxy._observe_dial = self.metrics.observe_dial
        self.probe = make_probe(hc)
        self.checker = HealthChecker(
            self.pool, self.probe, hc.interval, self._on_transition, self.metrics.observe_probe
        )
        self.discovery = StaticDiscovery(cfg.upstreams)
        self.seeds: dict[HostPort, EndpointSpec] = {}
        self.discovered: set[HostPort] | None = None
        self.cached = load_cache(cfg.discovery.cache_file) if cfg.discovery.cache_file else []
        self.endpoint_filter = EndpointFilter(cfg.discovery.filters)
        self.watcher = self._slice_watcher()
        self._was_panic = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig)
        runner = web.AppRunner(admin_app(self.pool, self.metrics), access_log=None)
        await runner.setup()
        try:
            await self._serve(runner)
        finally:
            await self._shutdown(runner)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def _serve(self, runner: web.AppRunner) -> None:
        started = time.monotonic()
        await self._refresh_dns()
        if self.admin_socket is not None:
            await web.SockSite(runner, self.admin_socket).start()
        self.proxy.serve(self.listeners)
        self._spawn(self._dns_loop(), "dns refresh")
        if self.watcher is not None:
            # Through our own listener: discovery works whenever any upstream works.
            self._spawn(self.watcher.run(), "endpointslice watch")
        complete = await self.checker.first_pass(FIRST_PASS_TIMEOUT)
        logger.info(
            "ready in %.3fs: listening on %s, %d/%d endpoints healthy%s",
            time.monotonic() - started,
            ", ".join(str(a) for a in self.cfg.listen),
            self.pool.healthy_count,
            len(self.pool.endpoints),
            "" if complete else " (first health pass still running)",
        )
        await self.stop_requested.wait()

    async def _shutdown(self, runner: web.AppRunner) -> None:
        self.proxy.stop_accepting()
        for sock in self.listeners:
            sock.close()
        drained = asyncio.ensure_future(self.proxy.wait_drained())
        forced = asyncio.ensure_future(self.force_requested.wait())
        await asyncio.wait(
            [drained, forced], timeout=self.cfg.drain_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for fut in (drained, forced):
            fut.cancel()
        left = self.proxy.close_all()
        await self.proxy.wait_dials()
        if left:
            logger.info("closed %d connection(s) still open after draining", left)
        for timer in self._removals.values():
            timer.cancel()
        if self.watcher is not None:
            self.watcher.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.checker.stop()
        await self.probe.close()
        await runner.cleanup()
        logger.info("stopped")

    def _spawn(self, coro: object, name: str) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coro, name=name))  # type: ignore[arg-type]

    def _slice_watcher(self) -> SliceWatcher | None:
        if self.credentials is None:
            return None
        debounce = self.cfg.discovery.kubernetes.debounce
        return SliceWatcher(self.cfg.listen[0], self.credentials, self._on_slices, debounce)

    async def _refresh_dns(self) -> None:
        self.seeds = await self.discovery.resolve()
        self._reconcile()

    async def _dns_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.discovery.dns_refresh)
            await self._refresh_dns()

    def _on_slices(self, endpoints: set[HostPort]) -> None:
        logger.info(
            "EndpointSlices list %d API server(s): %s",
            len(endpoints),
            ", ".join(str(a) for a in sorted(endpoints)),
        )
        self.discovered = endpoints
        self._reconcile()
        path = self.cfg.discovery.cache_file
        if path:
            try:
                save_cache(path, endpoints)
            except OSError as exc:
                logger.warning("cannot write endpoint cache %s: %s", path, exc)

    def _reconcile(self) -> None:
        """Seeds plus discovered endpoints (or, until the first list, the cached ones)."""
        if self.discovered is not None:
            extra, source = self.discovered, SOURCE_KUBERNETES
        else:
            extra, source = set(self.cached), SOURCE_CACHE
        desired = merge(self.seeds, extra, source, self.endpoint_filter, DEFAULT_PRIORITY)
        if not desired:
            logger.warning(
                "no endpoint known (every name failed to resolve); keeping the current set"
            )
            return
        for ep in self.pool.reconcile(desired):
            self._retire(ep)
        self.checker.sync()

    def _retire(self, ep: Endpoint) -> None:
        grace = self.cfg.discovery.removal_grace
        logger.info("endpoint %s removed; closing its connections in %gs", ep.address, grace)

        def close() -> None:
            if ep.address not in self.pool.endpoints:
                self.proxy.stats.closed_removed += self.proxy.close_connections_to(
                    ep.address, "endpoint removed by discovery"
                )

        old = self._removals.pop(ep.address, None)
        if old is not None:
            old.cancel()
        self._removals[ep.address] = asyncio.get_running_loop().call_later(grace, close)

    def _on_transition(self, t: Transition) -> None:
        level = logging.WARNING if t.new is Health.UNHEALTHY else logging.INFO
        logger.log(
            level, "endpoint %s is %s (was %s): %s", t.address, t.new.value, t.old.value, t.reason
        )
        self.proxy.handle_transition(t)
        panic = self.pool.panic
        if panic != self._was_panic:
            self._was_panic = panic
            if panic:
                logger.warning("no endpoint is healthy: panic mode, trying every endpoint")
            else:
                logger.info("left panic mode: %d endpoint(s) healthy", self.pool.healthy_count)
