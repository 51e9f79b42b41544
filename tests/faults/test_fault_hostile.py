"""Scenario 9, network part: hostile bytes on the listener, malformed HTTP on the admin
port, and peers that accept but never read (in either direction).

kubeprism forwards bytes it does not understand (TLS is passed through), so garbage is
the API server's problem; kubeprism's is to give back every descriptor, never log a
traceback, keep serving, and never buffer more than its pipes when a peer stops reading.
"""

from __future__ import annotations

import random
import ssl
import time
from pathlib import Path

import pytest
from clients import metric_sample
from daemon_proc import DaemonProcess
from util import rss_bytes, wait_for

from faults.fault_clients import LISTEN, LoadProcess, requests_load
from faults.fault_harness import (
    ADMIN,
    Cluster,
    default_config,
    fds_back_to,
    log_has_no_traceback,
    net_fds,
    start_daemon,
    stop_daemon,
    wait_states,
    wait_until,
)
from faults.fault_report import record
from faults.fault_topology import API_PORT

pytestmark = pytest.mark.netns

MiB = 1 << 20
HOSTILE_PER_STYLE = 500
PUSH_BYTES = 200 * MiB
# A send that makes no progress for this long means backpressure reached the client.
STALL_SECONDS = 1.0
# How long a malformed admin request may go unanswered (a half request waits for more).
ADMIN_ANSWER_SECONDS = 2.0


def _pid(daemon: DaemonProcess) -> int:
    assert daemon.proc is not None
    return daemon.proc.pid


def _quiet(daemon: DaemonProcess) -> None:
    wait_for(
        lambda: metric_sample(daemon.metrics(), "kubeprism_active_connections") == 0,
        30,
        0.1,
        "no active connection",
    )


def _served(cluster: Cluster) -> bool:
    with requests_load(cluster.topo, cluster.pki, "--max-count", "1") as load:
        [req] = load.wait(lambda r: r["kind"] == "req", message="one request")
    return req.get("status") == 200


def test_9a_garbage_and_resets_on_the_listener(cluster: Cluster, tmp_path: Path) -> None:
    """500 connections each of: random bytes then close, random bytes then RST (SO_LINGER
    0), RST right after connecting (while kubeprism is still dialing)."""
    daemon = start_daemon(cluster.topo, default_config(cluster, tmp_path), tmp_path)
    outcomes = {}
    try:
        wait_states(daemon, {cluster.address(n): "healthy" for n in cluster.names})
        _churn(cluster, "hello", 200)  # warm-up
        _quiet(daemon)
        fds0, _pipes = net_fds(daemon)
        for style in ("garbage", "rst", "rst-early"):
            outcomes[style] = _churn(cluster, style, HOSTILE_PER_STYLE)
        _quiet(daemon)
        fds1, _pipes = fds_back_to(daemon, fds0)
        served = _served(cluster)
        alive = daemon.proc is not None and daemon.proc.poll() is None
        log_has_no_traceback(daemon)
    finally:
        stop_daemon(daemon)
    met = fds1 <= fds0 and served and alive
    record(
        "9a garbage and resets on the listener",
        f"{3 * HOSTILE_PER_STYLE} hostile connections: fds {fds0} -> {fds1}, still serving, "
        "no traceback",
        "no crash, no leak, still serving",
        met,
        outcomes=outcomes,
        fds_before=fds0,
        fds_after=fds1,
        served_after=served,
    )
    assert alive and served
    assert fds1 <= fds0, (fds0, fds1)


def _churn(cluster: Cluster, style: str, count: int) -> dict[str, int]:
    args = ["--count", str(count), "--style", style, "--concurrency", "50", "--timeout", "5"]
    with LoadProcess(cluster.topo, "churn", *args).start(wait_ready=False) as churn:
        [result] = churn.wait(lambda r: r["kind"] == "churn", timeout=60, message="churn")
    outcomes: dict[str, int] = result["outcomes"]
    return outcomes


def _admin_exchange(cluster: Cluster, payload: bytes) -> str:
    """Send raw bytes to the admin port; return the status line or how it ended."""
    host, port = ADMIN.rsplit(":", 1)
    with cluster.topo.node.ns.connect(host, int(port), timeout=ADMIN_ANSWER_SECONDS) as sock:
        try:
            sock.sendall(payload)
            data = sock.recv(4096)
        except TimeoutError:
            return "no answer yet (waits for the rest)"
        except ConnectionError as exc:
            return type(exc).__name__
    return data.split(b"\r\n", 1)[0].decode("latin-1") or "closed"


ADMIN_PAYLOADS = {
    "random bytes": random.Random(9).randbytes(4096),
    "TLS ClientHello": bytes.fromhex("160301") + random.Random(1).randbytes(300),
    "HTTP/9.9": b"GET /metrics HTTP/9.9\r\nHost: x\r\n\r\n",
    "no version": b"GET /healthz\r\n\r\n",
    "bad method": b"G\x00T /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    "100 KiB URL": b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "100 KiB header": b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n",
    "10,000 headers": b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 10_000 + b"\r\n",
    "negative length": b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "bad chunk": b"POST /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "smuggling": b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0",
    "CONNECT": b"CONNECT 10.250.0.11:6443 HTTP/1.1\r\nHost: x\r\n\r\n",
    "half a request": b"GET /upstreams HTTP/1.1\r\nHost: x\r\n",
    "pipelined 1,000": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 1000,
    "header injection": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n",
    "unicode path": "GET /ü\U0001f600 HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
}


def test_9b_malformed_http_on_the_admin_port(cluster: Cluster, tmp_path: Path) -> None:
    """Garbage, oversized and ambiguous requests to /metrics' port: answered or closed,
    never a traceback, and the admin endpoint keeps answering, including while a client
    sits on half a request."""
    daemon = start_daemon(cluster.topo, default_config(cluster, tmp_path), tmp_path)
    answers = {}
    try:
        lines_before = len(daemon.log().splitlines())
        for name, payload in ADMIN_PAYLOADS.items():
            answers[name] = _admin_exchange(cluster, payload)
        host, port = ADMIN.rsplit(":", 1)
        with cluster.topo.node.ns.connect(host, int(port)) as slow:  # a slowloris client
            slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            healthz_meanwhile = daemon.admin("/healthz")[0]
        status = {path: daemon.admin(path)[0] for path in ("/healthz", "/readyz", "/metrics")}
        new_lines = daemon.log().splitlines()[lines_before:]
        log_has_no_traceback(daemon)
    finally:
        stop_daemon(daemon)
    noisy = [line for line in new_lines if "ERROR" in line]
    met = healthz_meanwhile == 200 and all(s == 200 for s in status.values()) and not noisy
    record(
        "9b malformed HTTP on the admin port",
        f"{len(ADMIN_PAYLOADS)} malformed requests answered 4xx or closed; admin kept "
        f"answering (also during a slowloris); {len(new_lines)} log lines, "
        f"{len(noisy)} errors",
        "no traceback, admin keeps serving",
        met,
        answers=answers,
        log_lines=len(new_lines),
        error_lines=noisy[:5],
    )
    assert healthz_meanwhile == 200
    assert all(s == 200 for s in status.values()), status
    assert not noisy, noisy[:5]
    for name, answer in answers.items():
        assert not answer.startswith("HTTP/1.1 5"), (name, answer)


def _tls_to_kubeprism(cluster: Cluster, pki_ca: Path) -> ssl.SSLSocket:
    host, port = LISTEN.rsplit(":", 1)
    raw = cluster.topo.node.ns.connect(host, int(port), timeout=5)
    ctx = ssl.create_default_context(cafile=str(pki_ca))
    return ctx.wrap_socket(raw, server_hostname="kubernetes")


def test_9d_client_that_never_reads(cluster: Cluster, tmp_path: Path) -> None:
    """A client asks for 200 MiB and never reads: kubeprism stops reading the API server
    once the kernel buffers and one pipe are full, and its memory does not grow."""
    daemon = start_daemon(cluster.topo, default_config(cluster, tmp_path), tmp_path)
    try:
        wait_states(daemon, {cluster.address(n): "healthy" for n in cluster.names})
        rss0 = rss_bytes(_pid(daemon))
        with _tls_to_kubeprism(cluster, cluster.pki.paths.ca) as client:
            client.sendall(f"GET /large?bytes={PUSH_BYTES} HTTP/1.1\r\nHost: k\r\n\r\n".encode())
            started = time.monotonic()
            wait_until(started + 3.0)  # a fixed window in which the client reads nothing
            moved = _bytes(daemon, "upstream_to_client")
            rss1 = rss_bytes(_pid(daemon))
            wait_until(time.monotonic() + 1.0)
            moved_later = _bytes(daemon, "upstream_to_client")
        log_has_no_traceback(daemon)
    finally:
        stop_daemon(daemon)
    growth = (rss1 - rss0) / MiB
    met = moved < 64 * MiB and moved_later == moved and growth < 16
    record(
        "9d client never reads (asks for 200 MiB)",
        f"forwarding stopped at {moved / MiB:.1f} MiB (kernel buffers + one pipe); daemon RSS "
        f"+{growth:.1f} MiB",
        "backpressure: bounded bytes in flight, bounded memory",
        met,
        forwarded_before_stall_mib=moved / MiB,
        forwarded_one_second_later_mib=moved_later / MiB,
        rss_before_mib=rss0 / MiB,
        rss_during_mib=rss1 / MiB,
    )
    assert moved < 64 * MiB, moved
    assert moved_later == moved, (moved, moved_later)
    assert growth < 16, growth


def _bytes(daemon: DaemonProcess, direction: str) -> int:
    text = daemon.metrics()
    return int(metric_sample(text, "kubeprism_forwarded_bytes_total", direction=direction))


def test_9d_upstream_that_never_reads(cluster: Cluster, tmp_path: Path) -> None:
    """The only upstream accepts and never reads; a client pushes up to 200 MiB: the push
    stalls after the buffers are full, and kubeprism's memory does not grow."""
    noread = f"{cluster.cp('cp3').ip}:{API_PORT + 1}"
    cluster.run_server("cp3", "noread", "--listen", noread)
    cfg = default_config(cluster, tmp_path, upstreams=[noread])
    daemon = start_daemon(cluster.topo, cfg, tmp_path)
    pushed = 0
    try:
        # Its TLS probe times out: unhealthy, so panic mode still dials it.
        wait_states(daemon, {noread: "unhealthy"})
        rss0 = rss_bytes(_pid(daemon))
        host, port = LISTEN.rsplit(":", 1)
        chunk = b"\0" * (1 << 20)
        started = time.monotonic()
        with cluster.topo.node.ns.connect(host, int(port), timeout=STALL_SECONDS) as client:
            while pushed < PUSH_BYTES and time.monotonic() - started < 30:
                try:
                    pushed += client.send(chunk)
                except TimeoutError:
                    break  # no progress for STALL_SECONDS: backpressure reached us
            rss1 = rss_bytes(_pid(daemon))
            stalled = pushed < PUSH_BYTES
        log_has_no_traceback(daemon)
    finally:
        stop_daemon(daemon)
    growth = (rss1 - rss0) / MiB
    met = stalled and growth < 16
    record(
        "9d upstream never reads (client pushes 200 MiB)",
        f"client stalled after {pushed / MiB:.1f} MiB (kernel buffers + one pipe); daemon "
        f"RSS +{growth:.1f} MiB",
        "backpressure: bounded bytes in flight, bounded memory",
        met,
        pushed_mib=pushed / MiB,
        rss_before_mib=rss0 / MiB,
        rss_during_mib=rss1 / MiB,
    )
    assert stalled, f"pushed all {pushed} bytes into a peer that never reads"
    assert growth < 16, growth
