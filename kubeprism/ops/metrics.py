"""Prometheus metrics: the private registry and its collectors (admin.py serves them).

A private CollectorRegistry (never the global one) and scrape-time collectors
(collectors.py) that read the pool and the proxy's plain counters, so the byte
path never calls into the metrics library and nothing is mirrored. The latency
histograms the daemon feeds are kept here, in plain ints.
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from kubeprism.base.net import HostPort
from kubeprism.core.upstream import Pool
from kubeprism.discovery.membership import Membership
from kubeprism.forward.proxy import Proxy
from kubeprism.ops.collectors import (
    CheckCost,
    GuardCollector,
    HealthCostCollector,
    RunQueueMeter,
    StateCollector,
)

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


class EndpointSeries(Collector, Protocol):
    """A collector with endpoint-labelled series, and a way to drop one endpoint's."""

    def forget(self, address: HostPort) -> None: ...


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
        # Everything that keeps series per endpoint, pruned together by forget().
        self._per_endpoint: list[EndpointSeries] = []
        self._add(self.dials)
        self._add(self.probes)
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

    def _add(self, collector: EndpointSeries) -> None:
        """Register a collector whose series carry an endpoint label: the one way in, so
        that forget() prunes every such family (tests/test_metrics.py checks each)."""
        self.registry.register(collector)
        self._per_endpoint.append(collector)

    def watch(self, pool: Pool, proxy: Proxy) -> None:
        """Expose the pool's and the proxy's state, read at scrape time."""
        self._add(StateCollector(pool, proxy))

    def guard(self, proxy: Proxy, membership: Membership) -> None:
        """Expose restarts, internal errors and refused discovery input."""
        self.registry.register(GuardCollector(proxy, membership))

    def forget(self, address: HostPort) -> None:
        """An endpoint was retired (removalGrace after it left the pool): drop its series
        from every family, so /metrics does not grow with endpoint churn."""
        for collector in self._per_endpoint:
            collector.forget(address)

    def watch_health(self, cost: CheckCost, meter: RunQueueMeter) -> None:
        """Expose what the health checks cost the API servers, and how long kubeprism
        itself waited for a CPU, read at scrape time."""
        self._add(HealthCostCollector(cost, meter))

    def reloaded(self, ok: bool) -> None:
        """Count one reload attempt."""
        self.reloads.labels(Result.of(ok).value).inc()
        if ok:
            self.last_reload.set_to_current_time()

    def observe_dial(self, address: HostPort, seconds: float, ok: bool) -> None:
        """Record one dial."""
        self.dials.observe(address, ok, seconds)

    def observe_probe(self, address: HostPort, seconds: float, ok: bool) -> None:
        """Record one health check."""
        self.probes.observe(address, ok, seconds)

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
        # Keyed by whether it worked, not by Result: the enum's hash and value are Python
        # code, and a dial is observed for every connection.
        self._by_key: dict[tuple[HostPort, bool], _Buckets] = {}

    def observe(self, address: HostPort, ok: bool, seconds: float) -> None:
        """Count one sample: a dict lookup, a bisect and two additions."""
        key = (address, ok)
        buckets = self._by_key.get(key)
        if buckets is None:
            buckets = self._by_key[key] = _Buckets()
        buckets.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        buckets.sum += seconds

    def forget(self, address: HostPort) -> None:
        """Drop an endpoint's series (it left the pool): /metrics must not grow with churn."""
        for ok in (True, False):
            self._by_key.pop((address, ok), None)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["endpoint", "result"])
        bounds = [*(str(float(b)) for b in LATENCY_BUCKETS), "+Inf"]
        for (address, ok), b in sorted(self._by_key.items(), key=_endpoint_then_result):
            cumulative = list(itertools.accumulate(b.counts))
            family.add_metric(
                [str(address), Result.of(ok).value],
                list(zip(bounds, cumulative, strict=True)),
                b.sum,
            )
        yield family


def _endpoint_then_result(item: tuple[tuple[HostPort, bool], _Buckets]) -> tuple[str, str]:
    (address, ok), _ = item
    return str(address), Result.of(ok).value
