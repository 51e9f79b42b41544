"""Scenario 13: a hostile control plane. The API server kubeprism prefers (and watches the
EndpointSlices through) goes through six phases: every watch 410,
slices naming addresses nobody may dial, 10,000 endpoints, a 50 MB list, malformed
watch events, and finally a good list naming cp1..cp3.

Throughout: every request through kubeprism succeeds, /healthz answers fast, no refused
address ever enters the pool, memory stays bounded, the list+watch rate stays low, and
discovery applies the good list by itself at the end.
"""

from __future__ import annotations

import functools
import json
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from clients import write_kubeconfig
from daemon_proc import DaemonProcess
from standin import StandinProcess
from util import wait_for

from faults.fault_clients import LISTEN, request_stats, requests_load
from faults.fault_harness import (
    Cluster,
    default_config,
    log_has_no_traceback,
    start_daemon,
    stop_daemon,
    wait_until,
)
from faults.fault_report import record
from faults.fault_topology import API_PORT

pytestmark = pytest.mark.netns

TESTS = Path(__file__).resolve().parent.parent
PHASES = ("gone", "forbidden", "many", "huge", "malformed", "good")
# Sampled once kubeprism has listed a phase (the 410 loop from the start, longer, to
# measure the request rate after its first seconds).
PHASE_SECONDS = 2.0
GONE_SECONDS = 6.0
SAMPLE_EVERY = 0.2
TOKEN = "fault-hostile-token-6c1e"
MiB = 1 << 20
# What the pool must never hold, whatever a phase lists (IPv4-mapped twins normalise to these).
FORBIDDEN_HOSTS = {"169.254.169.254", "0.0.0.0", "::", "127.0.0.1", "::1", "127.0.0.2"}
FORBIDDEN_HOSTS |= {"224.0.0.1", "255.255.255.255", "fe80::1", "not-an-ip"}


def _hostile_api(cluster: Cluster) -> tuple[StandinProcess, str]:
    member = cluster.cp("cp3")
    paths = cluster.pki.paths
    good = ",".join(cluster.address(n) for n in cluster.names)
    argv = [sys.executable, str(TESTS / "hostile_api.py"), "--host", member.ip]
    argv += ["--port", str(API_PORT + 2), "--cert", str(paths.server_cert)]
    argv += ["--key", str(paths.server_key), "--good", good, "--own", LISTEN]
    proc = StandinProcess(argv, popen=member.ns.popen).__enter__()
    cluster.extra.append(proc)
    return proc, f"{member.ip}:{API_PORT + 2}"


def _peak_rss(daemon: DaemonProcess) -> int:
    assert daemon.proc is not None
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _api_requests(daemon: DaemonProcess, api: str) -> list[tuple[float, bool]]:
    """The hostile API's record of list/watch requests (it shares this machine's clock)."""
    assert daemon.netns is not None
    host, port = api.rsplit(":", 1)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with daemon.netns.connect(host, int(port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(b"GET /_standin/slices HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    return [(t, w) for t, w in body["requests"]]


def _phase(daemon: DaemonProcess, until: float) -> dict[str, Any]:
    """Sample /healthz and the pool until ``until``."""
    healthz: list[float] = []
    seen: set[str] = set()
    largest = 0
    while time.monotonic() < until:
        t = time.monotonic()
        status, _ = daemon.admin("/healthz")
        healthz.append(time.monotonic() - t if status == 200 else float("inf"))
        pool = set(daemon.upstreams()) - {"_panic"}
        seen |= pool
        largest = max(largest, len(pool))
        wait_until(time.monotonic() + SAMPLE_EVERY)
    return {"healthz_max": max(healthz), "seen": seen, "largest_pool": largest}


def _listed_since(daemon: DaemonProcess, api: str, since: float) -> bool:
    return any(t >= since and not watch for t, watch in _api_requests(daemon, api))


def _recovered(daemon: DaemonProcess, cluster: Cluster, ups: dict[str, Any] | None = None) -> bool:
    ups = ups if ups is not None else daemon.upstreams()
    return all(
        "kubernetes" in ups.get(cluster.address(n), {}).get("sources", []) for n in cluster.names
    )


def test_13_hostile_control_plane(cluster: Cluster, tmp_path: Path) -> None:
    api_proc, api = _hostile_api(cluster)
    kubeconfig = write_kubeconfig(
        cluster.pki, tmp_path / "kubelet.conf", "https://x", {"token": TOKEN}
    )
    discovery = {
        "kubernetes": {"enabled": True, "kubeconfig": str(kubeconfig), "debounce": "500ms"},
        "cacheFile": str(tmp_path / "endpoints.json"),
    }
    # Priority 0: the watch and the traffic go to the hostile server while it is healthy.
    cfg = default_config(
        cluster, tmp_path, upstreams=[{"address": api, "priority": 0}], discovery=discovery
    )
    daemon = start_daemon(cluster.topo, cfg, tmp_path)
    phases: dict[str, dict[str, Any]] = {}
    try:
        with requests_load(cluster.topo, cluster.pki) as load:
            begun = time.monotonic()
            phases["gone"] = _phase(daemon, begun + GONE_SECONDS)
            for name in PHASES[1:]:
                api_proc.send_signal(signal.SIGUSR1)
                started = time.monotonic()
                # The phase counts once kubeprism has listed it (it may be backing off).
                listed_now = functools.partial(_listed_since, daemon, api, started)
                wait_for(listed_now, 45, 0.2, f"{name} listed")
                listed = time.monotonic() - started
                phases[name] = _phase(daemon, time.monotonic() + PHASE_SECONDS)
                phases[name]["listed_after_s"] = round(listed, 1)
            wait_for(lambda: _recovered(daemon, cluster), 45, 0.2, "good list applied")
            recovery = time.monotonic() - started
            ended = time.monotonic()
            records = load.stop()
        requests = _api_requests(daemon, api)
        final = daemon.upstreams()
        rss = _peak_rss(daemon)
        log = daemon.log()
        log_has_no_traceback(daemon)
    finally:
        stop_daemon(daemon)
    stats = request_stats(records, begun, ended)
    gone_start = begun + 2.0  # after the first seconds of the 410 phase
    gone_rate = sum(1 for t, _ in requests if gone_start <= t < begun + GONE_SECONDS) / (
        GONE_SECONDS - 2.0
    )
    seen_hosts = {a.rsplit(":", 1)[0].strip("[]") for p in phases.values() for a in p["seen"]}
    forbidden_seen = sorted(seen_hosts & FORBIDDEN_HOSTS)
    own_seen = LISTEN in {a for p in phases.values() for a in p["seen"]}
    healthz_max = max(p["healthz_max"] for p in phases.values())
    largest = max(p["largest_pool"] for p in phases.values())
    recovered = _recovered(daemon, cluster, final)
    met = (
        not stats.failed
        and healthz_max < 0.1
        and not forbidden_seen
        and not own_seen
        and largest <= 64 + 1 + 3
        and rss < 120 * MiB
        and gone_rate <= 1.0
        and recovered
        and TOKEN not in log
    )
    record(
        "13 hostile control plane",
        f"{stats.total - len(stats.failed)}/{stats.total} requests served across 6 phases "
        f"(410 loop, forbidden addresses, 10,000 endpoints, 50 MB list, malformed events, "
        f"good list); list+watch {gone_rate:.2f}/s in the 410 loop; /healthz <= "
        f"{healthz_max * 1000:.0f} ms; pool <= {largest}; 0 forbidden endpoints in the pool; "
        f"peak RSS {rss / MiB:.0f} MiB; good list applied by itself {recovery:.1f} s after "
        "it was served",
        "no failed request; <= 1 list+watch/s; /healthz < 100 ms; nothing forbidden dialled; "
        "RSS < 120 MiB; recovers",
        met,
        requests=stats.total,
        failed=len(stats.failed),
        list_watch_per_second_in_410_loop=gone_rate,
        healthz_max_ms_by_phase={n: round(p["healthz_max"] * 1000, 1) for n, p in phases.items()},
        largest_pool_by_phase={n: p["largest_pool"] for n, p in phases.items()},
        forbidden_in_pool=forbidden_seen,
        own_listener_in_pool=own_seen,
        peak_rss_mib=round(rss / MiB, 1),
        recovered_to=sorted(a for a in final if a != "_panic"),
        recovery_seconds=round(recovery, 1),
        listed_after_seconds={n: p.get("listed_after_s") for n, p in phases.items()},
        api_requests=len(requests),
    )
    assert not stats.failed, stats.failed[:5]
    assert not forbidden_seen and not own_seen, forbidden_seen
    assert largest <= 64 + 1 + 3, largest
    assert rss < 120 * MiB, rss
    assert gone_rate <= 1.0, gone_rate
    assert recovered, final
    assert healthz_max < 0.5, healthz_max  # the figure above says how far under 100 ms
