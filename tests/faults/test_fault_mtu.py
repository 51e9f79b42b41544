"""Scenario 12: a path-MTU black hole between the node and one API server.

A router namespace sits between the node and a fourth stand-in ("cp4", preferred, so it
holds the node's streams); at the fault instant the router starts dropping, without any
ICMP, every packet of 1400 bytes or more on its way to the node. The TCP handshake and
every small packet still pass: the watch-like streams keep flowing, and so would a check
that is answered in one small segment. What breaks is everything large: a TLS handshake
whose server flight needs a full-size segment (an RSA-2048 certificate: 1,598 bytes; an
ECDSA one fits in 1,015), a list response, and kubeprism's own `GET /readyz?verbose`
(~1.7 KB, like the real apiserver's 1,596 bytes). Clients on the node keep listing pods
(~16 KiB answers, headers and body written together as Go's net/http does); kubeprism
runs with its defaults.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from certs import SERVER_SANS, TestPKI
from daemon_proc import DaemonProcess
from standin import StandinProcess, standin_argv

from faults.fault_clients import LoadProcess, closed_after, open_streams, request_stats
from faults.fault_harness import (
    Cluster,
    default_config,
    log_has_no_traceback,
    start_daemon,
    stop_daemon,
    wait_states,
)
from faults.fault_report import record
from faults.fault_router import RoutedServer
from faults.fault_topology import API_PORT

pytestmark = pytest.mark.netns

DROP_FROM = 1400  # bytes: every full-size segment (1500) vanishes, small ones pass
BOUND = 3.0  # the issue's target: marked unhealthy and pinned streams closed within 3 s
STREAMS = 3
# A list answer: needs full-size segments whatever the certificate.
LARGE = "/api/v1/pods?limit=50"


@dataclass(frozen=True)
class Leaf:
    """A server certificate (leaf only) and key for the stand-in behind the router."""

    cert: Path
    key: Path


@pytest.fixture(scope="module")
def rsa_ca() -> trustme.CA:
    """A kubeadm-style RSA-2048 CA."""
    return trustme.CA(key_type=trustme.KeyType.RSA)


def _leaf(directory: Path, ca: trustme.CA, key_type: trustme.KeyType) -> Leaf:
    leaf = ca.issue_cert(*SERVER_SANS, common_name="kube-apiserver", key_type=key_type)
    cert, key = directory / "cp4.pem", directory / "cp4-key.pem"
    leaf.cert_chain_pems[0].write_to_path(cert)  # the leaf alone, as kubeadm serves it
    leaf.private_key_pem.write_to_path(key)
    key.chmod(0o600)
    return Leaf(cert, key)


@pytest.fixture
def trust(tmp_path: Path, pki: TestPKI, rsa_ca: trustme.CA) -> Path:
    """A CA bundle trusting the cluster's CA and the RSA one."""
    bundle = tmp_path / "ca-bundle.pem"
    bundle.write_bytes(pki.paths.ca.read_bytes() + rsa_ca.cert_pem.bytes())
    return bundle


@pytest.fixture
def routed(cluster: Cluster) -> Iterator[RoutedServer]:
    """cp4 behind its router (the cluster's cp1..cp3 run as usual)."""
    with RoutedServer(cluster.topo) as server:
        yield server


@pytest.mark.parametrize("key_type", ["ecdsa", "rsa"])
def test_12_mtu_black_hole(
    cluster: Cluster,
    routed: RoutedServer,
    trust: Path,
    pki: TestPKI,
    rsa_ca: trustme.CA,
    tmp_path: Path,
    key_type: str,
) -> None:
    """Large packets from cp4 to the node vanish: cp4 is marked unhealthy and its streams
    are closed within 3 s, with an ECDSA and with an RSA-2048 certificate alike."""
    ca, kt = (rsa_ca, trustme.KeyType.RSA) if key_type == "rsa" else (pki.ca, trustme.KeyType.ECDSA)
    leaf = _leaf(tmp_path, ca, kt)
    argv = standin_argv("cp4", leaf.cert, leaf.key, host=routed.api.split(":")[0], port=API_PORT)
    upstreams = [
        {"address": routed.api, "priority": 0},  # preferred: it holds the streams
        cluster.address("cp1"),
        cluster.address("cp2"),
    ]
    cfg = default_config(cluster, tmp_path, upstreams)
    cfg["healthCheck"]["caFile"] = str(trust)
    with StandinProcess(argv, popen=routed.server.popen):
        daemon = start_daemon(cluster.topo, cfg, tmp_path)
        try:
            healthy = {routed.api: "healthy", cluster.address("cp1"): "healthy"}
            try:
                wait_states(daemon, healthy)
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {daemon.upstreams()}") from None
            figures = _black_hole(cluster, routed, trust, daemon)
            log_has_no_traceback(daemon)
        finally:
            stop_daemon(daemon)
    closed, marked, state, stats_text = figures
    worst = max(closed)
    met = worst <= BOUND and marked <= BOUND
    record(
        f"12 MTU black hole ({key_type.upper()} certificate)",
        f"marked unhealthy after {marked:.2f} s, pinned streams closed after {worst:.2f} s "
        f"({state}); {stats_text}",
        f"unhealthy and streams closed <= {BOUND:g} s",
        met,
        stream_close_seconds=closed,
        marked_unhealthy_after_seconds=marked,
        victim_state=state,
    )
    assert marked <= BOUND, state
    assert worst <= BOUND, closed


def _black_hole(
    cluster: Cluster, routed: RoutedServer, trust: Path, daemon: DaemonProcess
) -> tuple[list[float], float, str, str]:
    topo = cluster.topo
    streams = LoadProcess(topo, "streams", "--count", "0", ca=trust).start()
    load = LoadProcess(topo, "requests", "--path", LARGE, "--interval", "0.2", ca=trust)
    try:
        owners = open_streams(streams, STREAMS)
        assert list(owners) == ["cp4"], owners
        load.start()
        load.wait(lambda r: r["kind"] == "req" and r.get("status") == 200, 3)
        fault = time.monotonic()
        routed.drop_large_towards_node(DROP_FROM)
        marked = _wait_unhealthy(daemon, routed.api, fault)
        streams.wait(
            lambda r: r["kind"] == "closed" and r["i"] in owners["cp4"],
            len(owners["cp4"]),
            message="streams on cp4 closed",
        )
        closed = closed_after(streams, owners["cp4"], fault)
        state = daemon.upstreams()[routed.api]
        load.wait(lambda r: r["kind"] == "req" and r["t0"] >= fault + marked + 1, 3)
        stats = request_stats(load.stop(), fault + marked + 0.5, fault + marked + 5)
    finally:
        load.stop()
        streams.stop()
    stats_text = f"afterwards {len(stats.failed)}/{stats.total} list requests failed"
    return closed, marked, f"{state['state']}: {state['reason']}", stats_text


def _wait_unhealthy(daemon: DaemonProcess, address: str, fault: float) -> float:
    wait_states(daemon, {address: "unhealthy"}, timeout=15)
    return time.monotonic() - fault
