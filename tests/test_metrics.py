"""ops/metrics.py against a private registry (every family: name, type, labels, label values),
and the daemon as a subprocess: what a real forwarded or refused dial shows up as."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

from clients import metric_sample
from daemon_proc import DaemonProcess, base_config
from prometheus_client.core import Metric
from tcpservers import EchoServer
from util import eventually, free_port

from kubeprism.base.net import HostPort
from kubeprism.core.endpoint import EndpointSpec, Health
from kubeprism.core.upstream import Pool
from kubeprism.forward.proxy import Proxy, ProxySettings
from kubeprism.health.checker import HealthCost
from kubeprism.health.stall import StallMeter
from kubeprism.ops.metrics import Metrics, Result

SETTINGS = ProxySettings(
    dial_timeout=1.0,
    mode="copy",
    keepalive_idle=5.0,
    keepalive_interval=2.0,
    keepalive_count=3,
    user_timeout=10.0,
    max_connections=10,
    idle_timeout=0.0,
    close_on_unhealthy=True,
)
MEASURED, UNMEASURED = HostPort("10.0.0.1", 6443), HostPort("10.0.0.2", 6443)

# Every family the registry exposes: type and label names. A new family must be added here.
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "kubeprism_dial_duration_seconds": ("histogram", ("endpoint", "result")),
    "kubeprism_health_check_duration_seconds": ("histogram", ("endpoint", "result")),
    "kubeprism_config_reloads": ("counter", ("result",)),
    "kubeprism_config_last_reload_success_timestamp_seconds": ("gauge", ()),
    "kubeprism_upstream_up": ("gauge", ("endpoint",)),
    "kubeprism_upstream_state": ("gauge", ("endpoint", "state")),
    "kubeprism_upstream_info": ("gauge", ("endpoint", "sources", "priority")),
    "kubeprism_upstream_active_connections": ("gauge", ("endpoint",)),
    "kubeprism_upstream_connections": ("counter", ("endpoint",)),
    "kubeprism_upstream_dial_failures": ("counter", ("endpoint",)),
    "kubeprism_upstream_latency_seconds": ("gauge", ("endpoint",)),
    "kubeprism_upstream_slow": ("gauge", ("endpoint",)),
    "kubeprism_panic_mode": ("gauge", ()),
    "kubeprism_health_inconclusive": ("counter", ("endpoint",)),
    "kubeprism_health_held_timeouts": ("counter", ("endpoint",)),
    "kubeprism_checks_late": ("gauge", ()),
    "kubeprism_health_handshakes": ("counter", ("endpoint",)),
    "kubeprism_health_requests": ("counter", ("endpoint",)),
    "kubeprism_stall_seconds": ("counter", ()),
    "kubeprism_endpoints": ("gauge", ()),
    "kubeprism_healthy_endpoints": ("gauge", ()),
    "kubeprism_connections": ("counter", ("result",)),
    "kubeprism_connections_closed": ("counter", ("reason",)),
    "kubeprism_forwarded_bytes": ("counter", ("direction",)),
    "kubeprism_active_connections": ("gauge", ()),
    "kubeprism_accept_errors": ("counter", ()),
    "kubeprism_dials_overtaken": ("counter", ()),
    "kubeprism_connections_adopted": ("counter", ()),
    "kubeprism_forwarding_mode": ("gauge", ("mode",)),
    "kubeprism_pipes_free": ("gauge", ()),
    "kubeprism_splice_fallbacks": ("counter", ()),
    "kubeprism_build_info": ("gauge", ("version", "python", "engine")),
}
# The values each enumerated label may take (endpoint, version, sources... are free-form).
LABEL_VALUES: dict[tuple[str, str], set[str]] = {
    ("kubeprism_dial_duration_seconds", "result"): {"success", "failure"},
    ("kubeprism_health_check_duration_seconds", "result"): {"success", "failure"},
    ("kubeprism_config_reloads", "result"): {"success", "failure"},
    ("kubeprism_upstream_state", "state"): {"unknown", "healthy", "unhealthy"},
    ("kubeprism_connections", "result"): {"forwarded", "no_upstream", "rejected_limit"},
    ("kubeprism_connections_closed", "reason"): {"unhealthy", "idle", "removed"},
    ("kubeprism_forwarded_bytes", "direction"): {"client_to_upstream", "upstream_to_client"},
    ("kubeprism_forwarding_mode", "mode"): {"splice", "copy"},
}
# Labels the histogram machinery adds to its samples.
_SAMPLE_LABELS = {"le"}


def _filled_metrics() -> Metrics:
    """A Metrics with one measured and one unmeasured endpoint, dials, probes and reloads."""
    return _filled()[0]


def _filled() -> tuple[Metrics, Pool]:
    """_filled_metrics(), and the pool it reads: every endpoint family has a sample of
    each endpoint."""
    pool = Pool(healthy_threshold=1, unhealthy_threshold=2)
    spec = EndpointSpec(priority=0, sources=frozenset({"static"}))
    pool.reconcile({MEASURED: spec, UNMEASURED: spec})
    pool.record_probe(MEASURED, True, 0.004, "ok", now=1.0)
    pool.record_probe(MEASURED, True, 0.004, "ok", now=1.25)  # a class needs two figures
    metrics = Metrics()
    proxy = Proxy(asyncio.get_running_loop(), pool, SETTINGS, lambda _t: None)
    metrics.watch(pool, proxy)
    metrics.observe_dial(MEASURED, 0.002, True)
    metrics.observe_dial(MEASURED, 0.003, True)
    metrics.observe_dial(UNMEASURED, 1.0, False)
    metrics.observe_probe(MEASURED, 0.004, True)
    metrics.observe_probe(UNMEASURED, 0.4, False)
    metrics.reloaded(True)
    metrics.reloaded(False)
    cost = HealthCost()
    for address in (MEASURED, UNMEASURED):
        cost.handshakes[address] += 1
        cost.requests[address] += 2
    metrics.watch_health(cost, StallMeter())
    return metrics, pool


def _families(metrics: Metrics) -> dict[str, Metric]:
    return {family.name: family for family in metrics.registry.collect()}


def _samples(family: Metric, suffix: str = "", **labels: str) -> Iterator[float]:
    for sample in family.samples:
        if sample.name == family.name + suffix and all(
            sample.labels.get(k) == v for k, v in labels.items()
        ):
            yield sample.value


async def test_every_family_has_its_name_type_and_labels() -> None:
    families = _families(_filled_metrics())
    assert set(families) == set(FAMILIES)
    for name, family in families.items():
        kind, labels = FAMILIES[name]
        assert family.type == kind, name
        for sample in family.samples:
            assert set(sample.labels) - _SAMPLE_LABELS == set(labels), sample
            for label in labels:
                allowed = LABEL_VALUES.get((name, label))
                assert allowed is None or sample.labels[label] in allowed, sample


async def test_dial_and_probe_results_are_labelled_by_outcome() -> None:
    """Regression: successful dials were counted under result="failure"."""
    families = _families(_filled_metrics())
    dials = families["kubeprism_dial_duration_seconds"]
    assert list(_samples(dials, "_count", endpoint=str(MEASURED), result="success")) == [2]
    assert list(_samples(dials, "_count", endpoint=str(MEASURED), result="failure")) == []
    assert list(_samples(dials, "_count", endpoint=str(UNMEASURED), result="failure")) == [1]
    probes = families["kubeprism_health_check_duration_seconds"]
    assert list(_samples(probes, "_count", endpoint=str(MEASURED), result="success")) == [1]
    assert list(_samples(probes, "_count", endpoint=str(UNMEASURED), result="failure")) == [1]
    reloads = families["kubeprism_config_reloads"]
    assert list(_samples(reloads, "_total", result="success")) == [1]
    assert list(_samples(reloads, "_total", result="failure")) == [1]


async def test_unknown_latency_class_is_not_exported() -> None:
    """An unmeasured endpoint has no latency class sample (as it has no latency sample)."""
    families = _families(_filled_metrics())
    slow = families["kubeprism_upstream_slow"]
    assert list(_samples(slow, endpoint=str(UNMEASURED))) == []
    (measured,) = _samples(slow, endpoint=str(MEASURED))
    assert measured == 0  # alone in its priority, it is the best: equal
    latency = families["kubeprism_upstream_latency_seconds"]
    assert list(_samples(latency, endpoint=str(UNMEASURED))) == []


def test_result_is_an_explicit_mapping() -> None:
    assert Result.of(True) is Result.SUCCESS
    assert Result.of(False) is Result.FAILURE
    assert {r.value for r in Result} == {"success", "failure"}
    assert Health.HEALTHY.value == "healthy"  # the state label keeps its own words


async def test_daemon_labels_forwarded_dials_success_and_refused_dials_failure(
    tmp_path: Path,
) -> None:
    """A refused dial (nothing listens yet) and then a forwarded connection, for real."""
    port = free_port()
    upstream = f"127.0.0.1:{port}"
    cfg = base_config([upstream], healthCheck={"type": "tcp"})
    daemon = await DaemonProcess(cfg, tmp_path).astart()
    try:
        # Nothing listens: every endpoint is down, so panic mode dials it and is refused.
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await writer.wait_closed()
        text = await daemon.ametrics()
        count = "kubeprism_dial_duration_seconds_count"
        assert metric_sample(text, count, endpoint=upstream, result="failure") >= 1
        async with EchoServer(port=port):
            reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
            writer.close()
            await writer.wait_closed()

            async def forwarded() -> float:
                return metric_sample(await daemon.ametrics(), count, result="success")

            assert await eventually(forwarded) == 1
    finally:
        await daemon.astop()


def test_health_check_cost_per_endpoint_is_read_at_scrape_time() -> None:
    metrics = Metrics()
    cost = HealthCost()
    metrics.watch_health(cost, StallMeter())
    a, b = HostPort("10.0.0.1", 6443), HostPort("10.0.0.2", 6443)
    cost.handshakes[a] += 1
    cost.requests[a] += 12
    cost.requests[b] += 3
    text = metrics.exposition().decode()
    assert metric_sample(text, "kubeprism_health_handshakes_total", endpoint=str(a)) == 1
    assert metric_sample(text, "kubeprism_health_requests_total", endpoint=str(a)) == 12
    assert metric_sample(text, "kubeprism_health_requests_total", endpoint=str(b)) == 3
    cost.requests[b] += 1  # nothing mirrored: the next scrape sees the counter as it is
    text = metrics.exposition().decode()
    assert metric_sample(text, "kubeprism_health_requests_total", endpoint=str(b)) == 4


def _endpoints_in(metrics: Metrics) -> dict[str, set[str]]:
    """Every family's endpoint label values, from a scrape."""
    seen: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if "endpoint" in sample.labels:
                seen.setdefault(family.name, set()).add(sample.labels["endpoint"])
    return seen


async def test_a_retired_endpoint_leaves_no_series_in_any_family() -> None:
    """Every family with an endpoint label (FAMILIES, which the test above keeps complete)
    is pruned by the one mechanism, Metrics.forget: a family added without pruning fails."""
    metrics, pool = _filled()
    endpoint_families = {name for name, (_, labels) in FAMILIES.items() if "endpoint" in labels}
    before = _endpoints_in(metrics)
    gone, kept = str(MEASURED), str(UNMEASURED)  # the measured one has a sample everywhere
    assert {name for name, values in before.items() if gone in values} == endpoint_families
    spec = EndpointSpec(priority=0, sources=frozenset({"static"}))
    pool.reconcile({UNMEASURED: spec})  # it leaves the pool; removalGrace later it is retired:
    metrics.forget(MEASURED)
    after = _endpoints_in(metrics)
    assert {name for name, values in after.items() if gone in values} == set()
    assert {n for n, v in after.items() if kept in v} == {n for n, v in before.items() if kept in v}
