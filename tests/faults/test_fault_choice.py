"""Scenarios 5-7: which server kubeprism chooses when one is slow, all are down, or one
presents a certificate from another CA.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from util import wait_for

from faults.fault_clients import request_stats, requests_load, wait_for_requests
from faults.fault_harness import (
    Cluster,
    default_config,
    log_has_no_traceback,
    start_daemon,
    stop_daemon,
    wait_states,
)
from faults.fault_report import record
from faults.fault_topology import API_PORT

pytestmark = pytest.mark.netns

INTERVAL = 1.0  # the default probe interval
JITTER = 0.1  # health.JITTER: +/-10 % on every wait
ONE_WAY_DELAY = 0.05  # a server ~100 ms round trip away, as across regions


def test_5_slow_server_not_preferred(cluster: Cluster, tmp_path: Path) -> None:
    """cp3 answers through a relay adding 50 ms each way: it stays unused while cp1/cp2
    are healthy (it is in the slow latency class: >= 3x the best)."""
    cluster.kill("cp3")
    cluster.start("cp3", host="127.0.0.1")  # the real server, behind the relay
    ip = cluster.cp("cp3").ip
    relay = ["--listen", f"{ip}:{API_PORT}", "--to", f"127.0.0.1:{API_PORT}"]
    cluster.run_server("cp3", "relay", *relay, "--delay", str(ONE_WAY_DELAY))
    daemon = start_daemon(cluster.topo, default_config(cluster, tmp_path), tmp_path)
    try:
        wait_states(daemon, {cluster.address(n): "healthy" for n in cluster.names})
        with requests_load(cluster.topo, cluster.pki) as load:
            start = time.monotonic()
            wait_for_requests(load, start + 3.0, 1)
            stats = request_stats(load.stop(), start, start + 3.0)
        ups = daemon.upstreams()
        log_has_no_traceback(daemon)
    finally:
        stop_daemon(daemon)
    slow = ups[cluster.address("cp3")]
    fast = [ups[cluster.address(n)] for n in ("cp1", "cp2")]
    on_slow = stats.by_server.get("cp3", 0)
    fast_ms = ", ".join(f"{f['latencySeconds'] * 1000:.1f} ms" for f in fast)
    met = on_slow == 0 and not stats.failed
    record(
        "5 slow server (+50 ms each way)",
        f"{on_slow}/{stats.total} requests on the slow server (probe latency "
        f"{slow['latencySeconds'] * 1000:.0f} ms, {slow['latencyClass']}; fast ones "
        f"{fast_ms})",
        "not used while a fast one is healthy",
        met,
        requests=stats.total,
        by_server=stats.by_server,
        failed=len(stats.failed),
        slow_latency_seconds=slow["latencySeconds"],
        slow_class=slow["latencyClass"],
        fast_latency_seconds=[f["latencySeconds"] for f in fast],
        fast_classes=[f["latencyClass"] for f in fast],
    )
    assert on_slow == 0, stats.by_server
    assert not stats.failed, stats.failed


def test_6_all_down_then_one_returns(cluster: Cluster, tmp_path: Path) -> None:
    """Every stand-in killed: /readyz turns 503. cp2 comes back: /readyz is 200 within one
    probe interval, and clients are served again without any restart."""
    daemon = start_daemon(cluster.topo, default_config(cluster, tmp_path), tmp_path)
    try:
        wait_states(daemon, {cluster.address(n): "healthy" for n in cluster.names})
        with requests_load(cluster.topo, cluster.pki) as load:
            wait_for_requests(load, 0, 5, ok_only=True)
            down = time.monotonic()
            for name in cluster.names:
                cluster.kill(name)
            wait_for(lambda: daemon.admin("/readyz")[0] == 503, 10, 0.02, "readyz 503")
            to_503 = time.monotonic() - down
            wait_for_requests(load, down + 2.0, 1)  # clients live through a real outage
            cluster.start("cp2")
            back = time.monotonic()
            wait_for(lambda: daemon.admin("/readyz")[0] == 200, 10, 0.02, "readyz 200")
            to_200 = time.monotonic() - back
            wait_for_requests(load, back + 2.0, 1)
            records = load.stop()
        log_has_no_traceback(daemon)
    finally:
        stop_daemon(daemon)
    outage = request_stats(records, down, back)
    after = [r for r in records if r["kind"] == "req" and r["t0"] >= back]
    served = [r for r in after if r.get("status") == 200]
    first_ok = min((r["t0"] + r["dt"] - back for r in served), default=float("inf"))
    failed_after = [r for r in after if r.get("status") != 200 and r["t0"] >= back + 0.2]
    bound = INTERVAL * (1 + JITTER)
    met = to_200 <= bound and first_ok <= bound and not failed_after
    record(
        "6 all down, then one returns",
        f"/readyz 503 after {to_503:.2f} s; 200 {to_200:.2f} s after the return; first client "
        f"request served {first_ok * 1000:.0f} ms after it",
        f"/readyz 200 within one interval ({bound:g} s with jitter); clients recover",
        met,
        readyz_503_after_seconds=to_503,
        readyz_200_after_return_seconds=to_200,
        first_request_served_after_return_seconds=first_ok,
        requests_during_outage=outage.total,
        failed_during_outage=len(outage.failed),
        failed_after_return=len(failed_after),
    )
    assert to_200 <= bound + 0.3, to_200
    assert first_ok <= bound, first_ok
    assert not failed_after, failed_after


def test_7_wrong_certificate(cluster: Cluster, tmp_path: Path) -> None:
    """cp3 presents a certificate from another CA: unhealthy with a reason that says so,
    and no client connection goes there while cp1 and cp2 are healthy."""
    cluster.kill("cp3")
    cluster.start("cp3", wrong_cert=True)
    daemon = start_daemon(cluster.topo, default_config(cluster, tmp_path), tmp_path)
    wrong = cluster.address("cp3")
    try:
        states = {cluster.address("cp1"): "healthy", cluster.address("cp2"): "healthy"}
        wait_states(daemon, {**states, wrong: "unhealthy"})
        with requests_load(cluster.topo, cluster.pki) as load:
            start = time.monotonic()
            wait_for_requests(load, start + 3.0, 1)
            stats = request_stats(load.stop(), start, start + 3.0)
        ep = daemon.upstreams()[wrong]
        log_has_no_traceback(daemon)
    finally:
        stop_daemon(daemon)
    met = (
        "certificate" in ep["reason"]
        and ep["connectionsTotal"] == 0
        and not stats.failed
        and "cp3" not in stats.by_server
    )
    record(
        "7 wrong certificate",
        f"unhealthy: {ep['reason']!r}; {ep['connectionsTotal']} connections to it, "
        f"{len(stats.failed)}/{stats.total} requests failed",
        "unhealthy with a reason naming the certificate; never used",
        met,
        reason=ep["reason"],
        connections_to_wrong_server=ep["connectionsTotal"],
        requests=stats.total,
        failed=len(stats.failed),
        by_server=stats.by_server,
    )
    assert "certificate" in ep["reason"], ep
    assert ep["connectionsTotal"] == 0, ep
    assert not stats.failed, stats.failed
