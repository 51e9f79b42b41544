"""Composition root: bind, wire, warm up, serve, reload, drain, clean up.

Everything that can fail at start (every socket, the credentials) is settled
before anything is served, so a bad port fails the start instead of leaving
half a daemon. Listening sockets passed by systemd (socket activation) are used
instead of binding, so a restart refuses no connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import importlib
import logging
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kubeprism import ENGINE, ENGINE_REASON, prepare
from kubeprism.base import systemd
from kubeprism.base.logs import set_level
from kubeprism.base.net import HostPort
from kubeprism.base.supervise import supervised
from kubeprism.config import ConfigError
from kubeprism.core.endpoint import Health, Transition
from kubeprism.core.upstream import Pool
from kubeprism.discovery.membership import Membership
from kubeprism.forward import succession
from kubeprism.forward.connection import CloseReason, Frozen
from kubeprism.forward.proxy import Proxy
from kubeprism.forward.startup import open_sockets
from kubeprism.health.checker import HealthChecker, HealthCost, TcpProbe
from kubeprism.health.https import HttpsProbe
from kubeprism.health.passive import StallWatch
from kubeprism.health.stall import StallMeter
from kubeprism.ops.metrics import Metrics
from kubeprism.prepare import Prepared
from kubeprism.settings import intervals, own_addresses, proxy_settings

# aiohttp (the admin server, and the discovery client in kubewatch.py) takes ~0.3 s to
# import, more on a loaded node: loaded in a thread once forwarding runs (_load_aiohttp),
# not before it, so a restart's pause in forwarding does not include it.
if TYPE_CHECKING:
    from aiohttp import web

logger = logging.getLogger(__name__)
# Young-generation GC passes: a proxied connection allocates ~40 tracked objects and frees
# them by reference counting (its cycles are broken on close), so the default pass every
# 700 allocations only walks garbage-free survivors. Every 20,000 (a few MB at most) cut
# the user-space instructions per connection by 2.4 % (callgrind, churn).
GC_THRESHOLDS = (20_000, 20, 20)

# How long start-up waits for every endpoint's first probe before calling itself ready
# (and telling systemd READY=1): long enough for a slow TLS handshake, short enough
# that a dead control plane does not hold the node's boot.
FIRST_PASS_TIMEOUT = 5.0


class Daemon:
    """One running kubeprism: pool, checker, discovery, proxy and admin server."""

    def __init__(self, prepared: Prepared, config_path: str | Path | None = None) -> None:
        # Everything that can fail was loaded by prepare(): bad files are a config error
        # (exit 2) before anything is bound.
        self.cfg = prepared.cfg
        self.credentials = prepared.credentials
        # What the checks cost, per endpoint: kept across the probes each reload brings.
        self.cost = HealthCost()
        # How long the event loop waited for a CPU: what tells our stall from a server's.
        self.meter = StallMeter()
        self.probe = self._adopt(prepared.probe)
        self.config_path = config_path
        self.listeners: list[socket.socket] = []
        self.admin_socket: socket.socket | None = None
        self.stop_requested = asyncio.Event()
        self.force_requested = asyncio.Event()
        self._signals = 0
        self._reload_task: asyncio.Task[bool] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        # Probe clients replaced by a reload, closed once their probes must be done.
        self._retiring: set[asyncio.Task[None]] = set()
        set_level(self.cfg.log_level)
        # Restart without closing connections: what the previous process passed on, and
        # how this one passes them on ("store": systemd's fd store; "exec": in place).
        self.taken: list[Frozen] = []
        self._stored_names: list[str] = []
        self._store_listeners: list[socket.socket] = []
        self._handover: str | None = None
        self._reexec_task: asyncio.Task[None] | None = None
        self.successor: tuple[list[Frozen], list[socket.socket]] | None = None
        self._runner: web.AppRunner | None = None  # the admin server's, once forwarding runs

    # ------------------------------------------------------------ start-up

    def bind(self) -> None:
        """Adopt sockets passed by systemd, bind the rest; raise StartupError on failure."""
        opened = open_sockets(self.cfg.listen, self.cfg.admin.listen)
        self.listeners, self.admin_socket = opened.listeners, opened.admin
        self._store_listeners = opened.store_listeners
        self.taken, self._stored_names = opened.taken, opened.stored_names

    def _build(self, loop: asyncio.AbstractEventLoop) -> None:
        cfg, hc = self.cfg, self.cfg.health_check
        self.pool = Pool(hc.healthy_threshold, hc.unhealthy_threshold)
        self.metrics = Metrics()
        self.proxy = Proxy(
            loop, self.pool, proxy_settings(cfg), self._on_transition, self.metrics.observe_dial
        )
        self.metrics.watch(self.pool, self.proxy)
        self.metrics.watch_health(self.cost, self.meter)
        self.checker = HealthChecker(
            self.pool, self.probe, intervals(hc), self._on_transition, self.metrics.observe_probe
        )
        self.stalls = StallWatch(hc.stall_timeout, self.pool.sign)
        sweep = functools.partial(self.stalls.run, self.proxy.connections, time.monotonic)
        self._stall_task = supervised("stall sweeper", sweep)
        self.membership = Membership(self.pool, self.checker.sync, self._retire)
        self.membership.configure(
            cfg.upstreams, cfg.discovery, self.credentials, cfg.listen[0], own_addresses(cfg)
        )
        self.metrics.guard(self.proxy, self.membership)
        self._was_panic = True

    async def run(self) -> None:
        """Serve until asked to stop; sockets must be bound already."""
        loop = asyncio.get_running_loop()
        self._build(loop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        loop.add_signal_handler(signal.SIGUSR2, self.request_reexec)
        try:
            await self._serve()
        finally:
            await self._shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
                loop.remove_signal_handler(sig)

    async def _serve(self) -> None:
        started = time.monotonic()
        await self.membership.refresh()
        self._take_over()
        self.proxy.serve(self.listeners)
        # Forwarding first; the admin server and discovery (which need aiohttp) after it.
        await _load_aiohttp()
        from kubeprism.ops.admin import AdminSite, admin_app, admin_runner  # noqa: PLC0415

        self._runner = admin_runner(admin_app(self.pool, self.metrics))
        await self._runner.setup()
        if self.admin_socket is not None:
            await AdminSite(self._runner, self.admin_socket).start()
        self.membership.start()
        complete = await self.checker.first_pass(FIRST_PASS_TIMEOUT)
        logger.info("forwarding engine: %s (%s)", ENGINE, ENGINE_REASON)
        logger.info(
            "ready in %.3fs: listening on %s, %s%s",
            time.monotonic() - started,
            ", ".join(str(a) for a in self.cfg.listen),
            self._status_text(),
            "" if complete else " (first health pass still running)",
        )
        systemd.ready(self._status_text())
        # Everything built so far lives as long as the process: keep it out of GC passes,
        # which then only walk what connections allocate.
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        interval = systemd.watchdog_interval()
        if interval:
            self._watchdog_task = asyncio.create_task(self._watchdog(interval), name="watchdog")
        await self.stop_requested.wait()

    async def _watchdog(self, interval: float) -> None:
        """Ping systemd at half the watchdog interval while the event loop is alive."""
        while True:
            systemd.watchdog()
            await asyncio.sleep(interval / 2)

    # ------------------------------------------------------------ signals

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """First call: drain and stop. Second call: stop now."""
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            if signum == signal.SIGTERM and systemd.fdstore_capacity():
                self._handover = "store"
                logger.info("received %s; handing connections to the service manager", name)
            else:
                logger.info("received %s; draining", name)
            self.stop_requested.set()
        else:
            logger.warning("received %s again; closing every connection now", name)
            self.force_requested.set()

    def request_reexec(self) -> None:
        """SIGUSR2: replace this process by a fresh one (same PID), keeping every connection."""
        if self.stop_requested.is_set() or self._reexec_task is not None:
            logger.warning("received SIGUSR2 while stopping or re-executing; ignoring it")
            return
        logger.info("received SIGUSR2; checking the config with the installed kubeprism")
        self._reexec_task = asyncio.create_task(self._reexec(), name="re-exec")

    async def _reexec(self) -> None:
        # The new image exits at once on a config it rejects, and every connection with it:
        # ask it (the installed code, maybe newer than ours) before giving anything up.
        problem = await succession.check_successor(self.config_path)
        self._reexec_task = None
        if problem:
            logger.error("not re-executing: %s", problem)
        elif not self.stop_requested.is_set():
            self._signals += 1
            self._handover = "exec"
            logger.info("re-executing in place")
            self.stop_requested.set()

    def request_reload(self) -> None:
        """Re-read the config file (SIGHUP); one reload at a time."""
        if self.stop_requested.is_set():
            logger.warning("stopping; ignoring SIGHUP")
            return
        if self._reload_task is not None and not self._reload_task.done():
            logger.warning("reload already in progress; ignoring SIGHUP")
            return
        self._reload_task = asyncio.create_task(self.reload(), name="reload")

    # ------------------------------------------------------------ reload

    async def reload(self) -> bool:
        """Load, prepare and apply the config file as one step; READY=1 always follows."""
        systemd.reloading(time.monotonic_ns() // 1000)
        try:
            ok = await self._reload()
        except Exception:  # a bug: said loudly, counted, and systemd still hears READY=1
            logger.exception("reload failed unexpectedly")
            ok = False
        self.metrics.reloaded(ok)
        systemd.ready(self._status_text())
        return ok

    async def _reload(self) -> bool:
        try:
            if self.config_path is None:
                raise ConfigError("", "no config file to reload from")
            # Everything that can fail is built here, before any running state changes.
            prepared = prepare.load(self.config_path)
        except ConfigError as exc:
            logger.error("reload rejected, keeping the running config: %s", exc)
            return False
        self._apply(prepared)
        await self.membership.refresh()
        logger.info("reloaded %s: %s", self.config_path, self._status_text())
        return True

    def _apply(self, prepared: Prepared) -> None:
        old, new = self.cfg, prepared.cfg
        if (new.listen, new.admin) != (old.listen, old.admin):
            logger.warning("listen and admin.listen changes take effect only after a restart")
            new = dataclasses.replace(new, listen=old.listen, admin=old.admin)
        self.cfg, self.credentials = new, prepared.credentials
        set_level(new.log_level)
        hc = new.health_check
        self.pool.healthy_threshold = hc.healthy_threshold
        self.pool.unhealthy_threshold = hc.unhealthy_threshold
        self.proxy.update(proxy_settings(new))
        # Always the new probe: it holds the CA and client certificate as the files are now.
        self._close_later(self.probe, old.health_check.timeout + 1)
        self.probe = self.checker.probe = self._adopt(prepared.probe)
        self.checker.set_intervals(intervals(hc))
        self.stalls.timeout = hc.stall_timeout
        self.membership.configure(
            new.upstreams, new.discovery, prepared.credentials, new.listen[0], own_addresses(new)
        )
        self.membership.start()

    def _adopt(self, probe: HttpsProbe | TcpProbe) -> HttpsProbe | TcpProbe:
        """Count the probe's cost with the daemon's, and hear of lost health connections."""
        probe.cost, probe.meter = self.cost, self.meter
        if isinstance(probe, HttpsProbe):
            probe.on_lost = self._health_connection_lost
        return probe

    def _health_connection_lost(self, address: HostPort, reason: str, failure: bool) -> None:
        # A method, not the checker's own: the first probe is made before the checker.
        self.checker.connection_lost(address, reason, failure)

    def _close_later(self, probe: HttpsProbe | TcpProbe, delay: float) -> None:
        task = asyncio.create_task(_close_after(probe, delay), name="close replaced probe")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # ------------------------------------------------------------ events

    def _retire(self, address: HostPort) -> None:
        self.proxy.close_connections_to(
            address, CloseReason.REMOVED, "endpoint removed by discovery"
        )
        self.metrics.forget(address)

    def _status_text(self) -> str:
        text = f"{self.pool.healthy_count}/{len(self.pool.endpoints)} endpoints healthy"
        return text + (", panic mode" if self.pool.panic else "")

    def _on_transition(self, t: Transition) -> None:
        level = logging.WARNING if t.new is Health.UNHEALTHY else logging.INFO
        logger.log(
            level, "endpoint %s is %s (was %s): %s", t.address, t.new.value, t.old.value, t.reason
        )
        self.proxy.handle_transition(t)
        systemd.status(self._status_text())
        panic = self.pool.panic
        if panic != self._was_panic:
            self._was_panic = panic
            if panic:
                logger.warning("no endpoint is healthy: panic mode, trying every endpoint")
            else:
                logger.info("left panic mode: %d endpoint(s) healthy", self.pool.healthy_count)

    # ------------------------------------------------------------ shutdown

    def _take_over(self) -> None:
        """Resume the connections of the previous process (endpoints are known by now)."""
        succession.resume(self.proxy, self.taken, self._stored_names)
        self.taken = []

    def _hand_over(self) -> None:
        """Stop forwarding and pass every connection (and listener) to the next process."""
        frozen = self.proxy.freeze_all()
        if self._handover == "store":
            succession.to_store(frozen, self._store_listeners, systemd.fdstore_capacity())
        else:
            self.successor = (frozen, list(self.listeners))
            self.listeners = []  # not closed: exec_in_place passes them on

    async def _shutdown(self) -> None:
        if self._handover == "exec":
            systemd.reloading(time.monotonic_ns() // 1000)
        else:
            systemd.stopping()
        self.proxy.stop_accepting()
        if self._handover:
            self._hand_over()
        for sock in self.listeners:
            sock.close()
        # Our own EndpointSlice watch runs through our own listener: stopped after the drain,
        # it would hold the drain for the whole drainTimeout on every stop and restart.
        await self.membership.stop()
        drained = asyncio.ensure_future(self.proxy.wait_drained())
        forced = asyncio.ensure_future(self.force_requested.wait())
        await asyncio.wait(
            [drained, forced], timeout=self.cfg.drain_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for fut in (drained, forced):
            fut.cancel()
        left = self.proxy.close_all()
        if left:
            logger.info("closed %d connection(s) still open after draining", left)
        tasks = (self._reload_task, self._watchdog_task, self._reexec_task, self._stall_task)
        for task in (*tasks, *self._retiring):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.checker.stop()
        await self.probe.close()
        if self._runner is not None:
            await self._runner.cleanup()
        logger.info("stopped")


async def _load_aiohttp() -> None:
    """Import the admin server (and so all of aiohttp) in a thread: the event loop keeps
    forwarding meanwhile instead of stopping for the whole import."""
    await asyncio.to_thread(importlib.import_module, "kubeprism.ops.admin")


async def _close_after(probe: HttpsProbe | TcpProbe, delay: float) -> None:
    """Probes in flight finish on the replaced client; close it once they must be done,
    or at once when the daemon stops first."""
    try:
        await asyncio.sleep(delay)
    finally:
        await probe.close()
