"""Prometheus metrics: the private registry and its collectors (admin.py serves them).

A private CollectorRegistry (never the global one) and a scrape-time
collector that reads the pool and the proxy's plain counters, so the byte
path never calls into the metrics library and nothing is mirrored.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import platform
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kubeprism import __version__
from kubeprism.base.net import HostPort
from kubeprism.base.supervise import SUPERVISOR
from kubeprism.core.endpoint import Health
from kubeprism.core.upstream import Pool
from kubeprism.discovery.kubewatch import ERROR_REASONS
from kubeprism.discovery.membership import Membership
from kubeprism.forward.proxy import Proxy
from kubeprism.health.checker import HealthCost
from kubeprism.health.stall import StallMeter

# Dial and probe latencies from loopback (~100 us) to another continent (~300 ms) and
# timeouts (~1-2 s): decades with a midpoint.
LATENCY_BUCKETS = (
    0.0001,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
)


class Result(enum.Enum):
    """The one vocabulary of `result` labels for attempts (dials, probes, reloads)."""

    SUCCESS = "success"
    FAILURE = "failure"

    @classmethod
    def of(cls, ok: bool) -> Result:
        """The label for an attempt that worked (or not): a mapping, never a tuple index."""
        return cls.SUCCESS if ok else cls.FAILURE


class Metrics:
    """The private registry, the histograms fed by the daemon, and the state collector."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Dials happen per connection: count them in plain ints, expose at scrape time.
        self.dials = HistogramCollector(
            "kubeprism_dial_duration_seconds",
            "Time to connect to an upstream endpoint, by result.",
        )
        self.probes = HistogramCollector(
            "kubeprism_health_check_duration_seconds",
            "Duration of active health checks, by result.",
        )
        self.registry.register(self.dials)
        self.registry.register(self.probes)
        self.reloads = Counter(
            "kubeprism_config_reloads",
            "Configuration reloads (SIGHUP), by result.",
            ["result"],
            registry=self.registry,
        )
        for result in Result:
            self.reloads.labels(result.value)
        self.last_reload = Gauge(
            "kubeprism_config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully (start or reload).",
            registry=self.registry,
        )
        self.last_reload.set_to_current_time()

    def watch(self, pool: Pool, proxy: Proxy) -> None:
        """Expose the pool's and the proxy's state, read at scrape time."""
        self.registry.register(StateCollector(pool, proxy))

    def guard(self, proxy: Proxy, membership: Membership) -> None:
        """Expose restarts, internal errors and refused discovery input."""
        self.registry.register(GuardCollector(proxy, membership))

    def forget(self, address: HostPort) -> None:
        """An endpoint left the pool: drop its dial and probe series."""
        self.dials.forget(address)
        self.probes.forget(address)

    def watch_health(self, cost: HealthCost, meter: StallMeter) -> None:
        """Expose what the health checks cost the API servers, and how long kubeprism
        itself waited for a CPU, read at scrape time."""
        self.registry.register(HealthCostCollector(cost, meter))

    def reloaded(self, ok: bool) -> None:
        """Count one reload attempt."""
        self.reloads.labels(Result.of(ok).value).inc()
        if ok:
            self.last_reload.set_to_current_time()

    def observe_dial(self, address: HostPort, seconds: float, ok: bool) -> None:
        """Record one dial."""
        self.dials.observe(address, Result.of(ok), seconds)

    def observe_probe(self, address: HostPort, seconds: float, ok: bool) -> None:
        """Record one health check."""
        self.probes.observe(address, Result.of(ok), seconds)

    def exposition(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


class _Buckets:
    """One histogram's bucket counts (non-cumulative) and sum, as plain numbers."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0


class HistogramCollector(Collector):
    """A per-endpoint latency histogram kept in plain ints, rendered at scrape time."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name, self.documentation = name, documentation
        self._by_key: dict[tuple[HostPort, Result], _Buckets] = {}

    def observe(self, address: HostPort, result: Result, seconds: float) -> None:
        """Count one sample: a dict lookup, a bisect and two additions."""
        buckets = self._by_key.get((address, result))
        if buckets is None:
            buckets = self._by_key[(address, result)] = _Buckets()
        buckets.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        buckets.sum += seconds

    def forget(self, address: HostPort) -> None:
        """Drop an endpoint's series (it left the pool): /metrics must not grow with churn."""
        for result in Result:
            self._by_key.pop((address, result), None)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["endpoint", "result"])
        bounds = [*(str(float(b)) for b in LATENCY_BUCKETS), "+Inf"]
        for (address, result), b in sorted(self._by_key.items(), key=_endpoint_then_result):
            cumulative = list(itertools.accumulate(b.counts))
            family.add_metric(
                [str(address), result.value], list(zip(bounds, cumulative, strict=True)), b.sum
            )
        yield family


def _endpoint_then_result(item: tuple[tuple[HostPort, Result], _Buckets]) -> tuple[str, str]:
    (address, result), _ = item
    return str(address), result.value


class HealthCostCollector(Collector):
    """Health-check handshakes and requests per endpoint (the control plane's bill)."""

    def __init__(self, cost: HealthCost, meter: StallMeter) -> None:
        self.cost = cost
        self.meter = meter

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

    def collect(self) -> Iterator[Metric]:
        yield from self._endpoint_metrics()
        yield from self._proxy_metrics()
        build = GaugeMetricFamily(
            "kubeprism_build_info", "Build information.", labels=["version", "python"]
        )
        build.add_metric([__version__, platform.python_version()], 1)
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
