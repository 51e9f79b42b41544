"""The scrape-time collectors: endpoint and proxy state, what the checks cost, and what
kubeprism refused or survived, read from the running parts when /metrics is scraped
(nothing is mirrored into gauges).

What they read of the health checks comes through two narrow interfaces (``CheckCost``,
``RunQueueMeter``), so operations imports nothing of the health wing; the pool, the
proxy's counters and the discovery state are read from their own types.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator, Mapping
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kubeprism import ENGINE, __version__
from kubeprism.base.net import HostPort
from kubeprism.base.supervise import SUPERVISOR
from kubeprism.core.endpoint import Health
from kubeprism.core.upstream import Pool
from kubeprism.discovery.kubewatch import ERROR_REASONS
from kubeprism.discovery.membership import Membership
from kubeprism.forward.proxy import Proxy


class CheckCost(Protocol):
    """What the health checks cost each endpoint (health.checker.HealthCost)."""

    @property
    def handshakes(self) -> Mapping[HostPort, int]: ...

    @property
    def requests(self) -> Mapping[HostPort, int]: ...

    def forget(self, address: HostPort) -> None: ...


class RunQueueMeter(Protocol):
    """How long the event loop waited for a CPU (health.stall.StallMeter)."""

    def runq(self) -> float: ...


class HealthCostCollector(Collector):
    """Health-check handshakes and requests per endpoint (the control plane's bill)."""

    def __init__(self, cost: CheckCost, meter: RunQueueMeter) -> None:
        self.cost = cost
        self.meter = meter

    def forget(self, address: HostPort) -> None:
        """Drop a retired endpoint's counts (they exist only for these series)."""
        self.cost.forget(address)

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "kubeprism_stall_seconds",
            "Time kubeprism's event loop was runnable but waiting for a CPU (run-queue wait).",
            value=self.meter.runq(),
        )
        for name, doc, counts in (
            (
                "kubeprism_health_handshakes",
                "New connections (TCP, and TLS for https checks) opened by health checks.",
                self.cost.handshakes,
            ),
            ("kubeprism_health_requests", "Readiness requests sent.", self.cost.requests),
        ):
            family = CounterMetricFamily(name, doc, labels=["endpoint"])
            for address, n in sorted(counts.items(), key=lambda kv: str(kv[0])):
                family.add_metric([str(address)], n)
            yield family


class StateCollector(Collector):
    """Reads endpoint and proxy state at scrape time."""

    def __init__(self, pool: Pool, proxy: Proxy) -> None:
        self.pool = pool
        self.proxy = proxy

    def forget(self, address: HostPort) -> None:
        """Nothing to drop: the series are read from the pool, which no longer has it."""

    def collect(self) -> Iterator[Metric]:
        yield from self._endpoint_metrics()
        yield from self._proxy_metrics()
        build = GaugeMetricFamily(
            "kubeprism_build_info",
            "Build information; engine: native (the data path compiled) or python.",
            labels=["version", "python", "engine"],
        )
        build.add_metric([__version__, platform.python_version(), ENGINE], 1)
        yield build

    def _endpoint_metrics(self) -> Iterator[Metric]:
        lbl = ["endpoint"]
        up = GaugeMetricFamily("kubeprism_upstream_up", "1 if the endpoint is healthy.", labels=lbl)
        state = GaugeMetricFamily(
            "kubeprism_upstream_state",
            "Current health state (1 for the current one).",
            labels=["endpoint", "state"],
        )
        info = GaugeMetricFamily(
            "kubeprism_upstream_info",
            "Endpoint sources and priority.",
            labels=["endpoint", "sources", "priority"],
        )
        active = GaugeMetricFamily(
            "kubeprism_upstream_active_connections", "Open connections per endpoint.", labels=lbl
        )
        total = CounterMetricFamily(
            "kubeprism_upstream_connections", "Connections forwarded per endpoint.", labels=lbl
        )
        dial_fail = CounterMetricFamily(
            "kubeprism_upstream_dial_failures", "Failed dials per endpoint.", labels=lbl
        )
        latency = GaugeMetricFamily(
            "kubeprism_upstream_latency_seconds", "Smoothed health-check latency.", labels=lbl
        )
        slow = GaugeMetricFamily(
            "kubeprism_upstream_slow",
            "1 while clearly slower than the best endpoint of its priority (no new connections).",
            labels=lbl,
        )
        inconclusive = CounterMetricFamily(
            "kubeprism_health_inconclusive",
            "Checks whose time ran out while kubeprism could hardly run (no verdict).",
            labels=lbl,
        )
        held = CounterMetricFamily(
            "kubeprism_health_held_timeouts",
            "Timeouts not counted against the endpoint: no other endpoint answered either.",
            labels=lbl,
        )
        for ep in self.pool.endpoints.values():
            name = [str(ep.address)]
            inconclusive.add_metric(name, ep.inconclusive_total)
            held.add_metric(name, ep.held_total)
            up.add_metric(name, float(ep.health is Health.HEALTHY))
            for h in Health:
                state.add_metric([name[0], h.value], float(ep.health is h))
            info.add_metric([name[0], ",".join(sorted(ep.sources)), str(ep.priority)], 1)
            active.add_metric(name, ep.active)
            total.add_metric(name, ep.connections_total)
            dial_fail.add_metric(name, ep.dial_failures_total)
            if ep.latency is not None:
                latency.add_metric(name, ep.latency)
            if ep.slow is not None:
                slow.add_metric(name, float(ep.slow))
        yield from (up, state, info, active, total, dial_fail, latency, slow, inconclusive, held)
        yield GaugeMetricFamily(
            "kubeprism_checks_late",
            "1 while some endpoint's last check could not judge it (the node looks overloaded).",
            value=float(self.pool.overloaded),
        )
        yield GaugeMetricFamily(
            "kubeprism_panic_mode",
            "1 while no endpoint is healthy and every endpoint is tried.",
            value=float(self.pool.panic),
        )
        yield GaugeMetricFamily(
            "kubeprism_endpoints", "Known endpoints.", value=len(self.pool.endpoints)
        )
        yield GaugeMetricFamily(
            "kubeprism_healthy_endpoints", "Healthy endpoints.", value=self.pool.healthy_count
        )

    def _proxy_metrics(self) -> Iterator[Metric]:
        st = self.proxy.stats
        conns = CounterMetricFamily(
            "kubeprism_connections", "Accepted client connections by result.", labels=["result"]
        )
        conns.add_metric(["forwarded"], st.forwarded)
        conns.add_metric(["no_upstream"], st.no_upstream)
        conns.add_metric(["rejected_limit"], st.rejected)
        yield conns
        closed = CounterMetricFamily(
            "kubeprism_connections_closed",
            "Connections closed by kubeprism, by reason.",
            labels=["reason"],
        )
        for reason, count in st.closed.items():
            closed.add_metric([reason.value], count)
        yield closed
        nbytes = CounterMetricFamily(
            "kubeprism_forwarded_bytes", "Bytes forwarded, by direction.", labels=["direction"]
        )
        nbytes.add_metric(["client_to_upstream"], st.upstream_bytes.value)
        nbytes.add_metric(["upstream_to_client"], st.client_bytes.value)
        yield nbytes
        yield GaugeMetricFamily(
            "kubeprism_active_connections", "Open client connections.", value=self.proxy.active
        )
        yield CounterMetricFamily(
            "kubeprism_accept_errors", "Failed accept() calls.", value=st.accept_errors
        )
        yield CounterMetricFamily(
            "kubeprism_dials_overtaken",
            "Connects still in progress when a staggered connect to another endpoint won.",
            value=st.dials_overtaken,
        )
        yield CounterMetricFamily(
            "kubeprism_connections_adopted",
            "Connections taken over, still open, from the process before a restart.",
            value=st.adopted,
        )
        mode = GaugeMetricFamily(
            "kubeprism_forwarding_mode", "Configured forwarding mode (1 = active).", labels=["mode"]
        )
        for m in ("splice", "copy"):
            mode.add_metric([m], float(self.proxy.mode == m))
        yield mode
        yield GaugeMetricFamily(
            "kubeprism_pipes_free", "Idle pipes in the splice pool.", value=self.proxy.pipes.free
        )
        yield CounterMetricFamily(
            "kubeprism_splice_fallbacks",
            "Connection directions that fell back from splice to copying.",
            value=self.proxy.pumps.fallbacks,
        )


class GuardCollector(Collector):
    """What kubeprism refused or survived: task restarts, internal errors, bad discovery
    input. Read at scrape time from the supervisor, the proxy and the membership."""

    def __init__(self, proxy: Proxy, membership: Membership) -> None:
        self.proxy = proxy
        self.membership = membership

    def collect(self) -> Iterator[Metric]:
        restarts = CounterMetricFamily(
            "kubeprism_task_restarts",
            "Background tasks restarted after an unexpected error.",
            labels=["task"],
        )
        for name, count in sorted(SUPERVISOR.restarts.items()):
            restarts.add_metric([name], count)
        yield restarts
        yield CounterMetricFamily(
            "kubeprism_internal_errors",
            "Unexpected errors in the data path (each closed one client connection).",
            value=self.proxy.stats.internal_errors,
        )
        screened = self.membership.screened
        refused = GaugeMetricFamily(
            "kubeprism_discovery_refused_endpoints",
            "Discovered or cached endpoints currently refused, by reason.",
            labels=["reason"],
        )
        watcher = self.membership.watcher
        invalid = len(watcher.invalid) if watcher is not None else 0
        refused.add_metric(["invalid"], invalid)
        refused.add_metric(["filtered"], len(screened.refused))
        refused.add_metric(["over_limit"], len(screened.dropped))
        yield refused
        requests = CounterMetricFamily(
            "kubeprism_discovery_requests",
            "EndpointSlice list and watch requests sent.",
            labels=["kind"],
        )
        requests.add_metric(["list"], watcher.lists if watcher else 0)
        requests.add_metric(["watch"], watcher.watches if watcher else 0)
        yield requests
        yield CounterMetricFamily(
            "kubeprism_discovery_malformed_objects",
            "EndpointSlice list items and watch events skipped as malformed.",
            value=watcher.state.bad_objects if watcher else 0,
        )
        yield from self._discovery_outcome()

    def _discovery_outcome(self) -> Iterator[Metric]:
        """Errors by reason and the last success: they outlive watchers a reload replaces."""
        stats = self.membership.discovery_stats
        errors = CounterMetricFamily(
            "kubeprism_discovery_errors",
            "Failed EndpointSlice list and watch requests, by reason.",
            labels=["reason"],
        )
        for reason in ERROR_REASONS:
            errors.add_metric([reason], stats.errors[reason])
        yield errors
        # 0 (long ago) until the first success, as the alert on it expects.
        yield GaugeMetricFamily(
            "kubeprism_discovery_last_success_timestamp_seconds",
            "When an EndpointSlice list or watch request last succeeded (watches renew "
            "every 240 s); 0 before the first.",
            value=stats.last_success or 0.0,
        )
