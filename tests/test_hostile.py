"""A broken or hostile control plane, and bounded resources (issue 10), against a real daemon.

Stand-in A is the seed and serves the EndpointSlices exactly as each test scripts them
(tests.slices.ScriptedSlices); stand-in B is a healthy API server that a good slice names.
Each case checks what the issue asks of it: forwarding keeps working, /healthz answers
fast, descriptors and active connections return to their baseline, discovery recovers
once the slices are good again, and forbidden addresses are never dialled (a listener
on each counts what arrives).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import resource
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from certs import TestPKI
from clients import addr, client_session, metric_sample, served_by, write_kubeconfig
from daemon_proc import DaemonProcess, base_config
from slices import ScriptedSlices, list_body, optional_client_cert_context, slice_object
from standin import StandinAPIServer
from tcpservers import EchoServer
from util import eventually

from kubeprism.ops.admin import ADMIN_IDLE_TIMEOUT

TOKEN = "tok-9f3b27c4e1d05a68"
MiB = 1 << 20
# The bounds.
HEALTHZ_SECONDS = 0.1
RSS_LIMIT = 120 * MiB
REQUEST_RATE_LIMIT = 1.0  # list+watch per second, after the first seconds


@dataclass
class ControlPlane:
    """Stand-in A (seed, scripted slices) and B (healthy, named by good slices)."""

    slices: ScriptedSlices
    a: StandinAPIServer
    b: StandinAPIServer

    def good_list(self) -> bytes:
        """A list naming A and B, as a healthy cluster would."""
        return list_body(
            slice_object("kubernetes", ["127.0.0.1"], self.a.port),
            slice_object("kubernetes-b", ["127.0.0.1"], self.b.port),
        )


@pytest.fixture
async def plane(pki: TestPKI) -> AsyncIterator[ControlPlane]:
    slices = ScriptedSlices()
    servers = []
    for name, routes in (("A", slices.routes()), ("B", [])):
        ctx = optional_client_cert_context(pki.server_context(), str(pki.paths.ca))
        server = StandinAPIServer(name, ssl_context=ctx, extra_routes=routes)
        await server.start()
        servers.append(server)
    try:
        yield ControlPlane(slices, *servers)
    finally:
        slices.end_watches()
        for server in servers:
            await server.close()


def config(pki: TestPKI, tmp_path: Path, plane: ControlPlane, **disc: Any) -> dict[str, Any]:
    kubeconfig = write_kubeconfig(pki, tmp_path / "kubelet.conf", "https://x", {"token": TOKEN})
    return base_config(
        [addr(plane.a)],
        healthCheck={"caFile": str(pki.paths.ca)},
        discovery={
            "kubernetes": {"enabled": True, "kubeconfig": str(kubeconfig), "debounce": "100ms"},
            "cacheFile": str(tmp_path / "state" / "endpoints.json"),
            "removalGrace": "0s",
            **disc,
        },
    )


# ---------------------------------------------------------------- what every case checks


async def healthz_seconds(daemon: DaemonProcess) -> float:
    started = time.monotonic()
    status, _ = await daemon.aadmin("/healthz")
    assert status == 200
    return time.monotonic() - started


async def forwards(daemon: DaemonProcess, pki: TestPKI, n: int = 3) -> list[str]:
    async with client_session(pki) as session:
        return await served_by(session, daemon.port, n)


async def metric(daemon: DaemonProcess, name: str, **labels: str) -> float:
    return metric_sample(await daemon.ametrics(), name, **labels)


async def still_serving(daemon: DaemonProcess, pki: TestPKI) -> None:
    """Forwarding works and /healthz answers within the bound (best of three: a loaded
    test machine may stall one request; a blocked event loop stalls all three)."""
    assert len(await forwards(daemon, pki)) == 3
    fastest = min([await healthz_seconds(daemon) for _ in range(3)])
    assert fastest < HEALTHZ_SECONDS, fastest


async def back_to_baseline(daemon: DaemonProcess, fds: int, active: float) -> None:
    """The daemon's descriptors and active connections (its own watch is one) are back."""
    await eventually(lambda: daemon.fd_count() <= fds, 5, message=f"fds back to {fds}")
    assert await metric(daemon, "kubeprism_active_connections") == active


def peak_rss(daemon: DaemonProcess) -> int:
    assert daemon.proc is not None
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def no_traceback(daemon: DaemonProcess) -> None:
    log = daemon.log()
    assert "Traceback" not in log, log[-4000:]
    assert TOKEN[-12:] not in log


async def has(daemon: DaemonProcess, address: str) -> bool:
    return address in await daemon.aupstreams()


# ---------------------------------------------------------------- 1: the 410 loop


async def test_1_gone_on_every_watch_is_paced_logged_once_and_recovers(
    pki: TestPKI, plane: ControlPlane, tmp_path: Path
) -> None:
    """Every watch answers 410: the node's list+watch rate stays <= 1/s after the first
    seconds, one log line for the episode, forwarding untouched; a good slice recovers."""
    plane.slices.serve(list_body(), watch_status=410)
    cfg = config(pki, tmp_path, plane, filters=["127.0.0.0/8"])
    daemon = await DaemonProcess(cfg, tmp_path).astart()
    try:
        started = time.monotonic()
        await still_serving(daemon, pki)
        await asyncio.sleep(max(0.0, started + 6 - time.monotonic()))  # a measured window
        window = plane.slices.count(started + 2, started + 6) / 4
        assert window <= REQUEST_RATE_LIMIT, plane.slices.requests
        assert daemon.log().count("EndpointSlice discovery failed:") == 1
        await still_serving(daemon, pki)
        plane.slices.serve(plane.good_list())
        await eventually(lambda: has(daemon, addr(plane.b)), 20, message="B discovered")
        no_traceback(daemon)
    finally:
        await daemon.astop()


# ---------------------------------------------------------------- 2 and 4: what is dialled


async def test_2_4_invalid_and_forbidden_endpoints_are_never_dialled(
    pki: TestPKI, plane: ControlPlane, tmp_path: Path
) -> None:
    """With the default filters: bad ports, loopback (also IPv4-mapped), the unspecified
    addresses (which Linux routes to loopback), link-local, multicast, broadcast and
    kubeprism's own listener are refused; a listener on each reachable one sees nothing."""
    async with (
        EchoServer("127.0.0.5") as loop5,
        EchoServer("127.0.0.1") as unspec4,
        EchoServer("::1") as unspec6,
    ):
        cfg = config(pki, tmp_path, plane)
        own = int(cfg["listen"][0].rsplit(":", 1)[1])
        bad = [
            slice_object("ports", ["127.0.0.5"], 65536),
            slice_object("negative", ["127.0.0.5"], -1),
            slice_object("bool", ["127.0.0.5"], True),
            slice_object("text", ["127.0.0.5"], "6443"),
            slice_object("loopback", ["127.0.0.5", "::ffff:127.0.0.5"], loop5.port),
            slice_object("unspec4", ["0.0.0.0"], unspec4.port),
            slice_object("unspec6", ["::"], unspec6.port),
            slice_object("self", ["127.0.0.1"], own),
            slice_object("meta", ["169.254.169.254", "::ffff:169.254.169.254"], 80),
            slice_object("odd", ["224.0.0.1", "255.255.255.255", "fe80::1", "not-an-ip"], 6443),
        ]
        plane.slices.serve(list_body(*bad))
        daemon = await DaemonProcess(cfg, tmp_path).astart()
        try:
            await eventually(
                lambda: metric(daemon, "kubeprism_discovery_refused_endpoints", reason="filtered"),
                10,
                message="slices screened",
            )
            ups = await daemon.aupstreams()
            assert set(ups) - {"_panic"} == {addr(plane.a)}
            fds = daemon.fd_count()
            active = await metric(daemon, "kubeprism_active_connections")
            for _ in range(20):
                await still_serving(daemon, pki)
            await back_to_baseline(daemon, fds, active)
            # Probes and dials alike would have reached these listeners.
            assert (loop5.accepted, unspec4.accepted, unspec6.accepted) == (0, 0, 0)
            refused = await metric(
                daemon, "kubeprism_discovery_refused_endpoints", reason="filtered"
            )
            invalid = await metric(
                daemon, "kubeprism_discovery_refused_endpoints", reason="invalid"
            )
            # Deduplicated after normalising: ::ffff:127.0.0.5 is 127.0.0.5.
            assert (refused, invalid) == (8, 5)
            assert daemon.log().count("refusing 8 kubernetes endpoint(s)") == 1
            no_traceback(daemon)
        finally:
            await daemon.astop()


async def test_4_exclude_rules_hold_for_ipv4_mapped_addresses(
    pki: TestPKI, plane: ControlPlane, tmp_path: Path
) -> None:
    """filters [127/8, !127.0.0.7/32]: ::ffff:127.0.0.7 is 127.0.0.7 and stays excluded,
    while B (named by an include rule) is used."""
    async with EchoServer("127.0.0.7") as excluded:
        items = [
            slice_object("excluded", ["::ffff:127.0.0.7", "127.0.0.7"], excluded.port),
            slice_object("b", ["::ffff:127.0.0.1"], plane.b.port),
        ]
        plane.slices.serve(list_body(*items))
        cfg = config(pki, tmp_path, plane, filters=["127.0.0.0/8", "!127.0.0.7/32"])
        daemon = await DaemonProcess(cfg, tmp_path).astart()
        try:
            await eventually(lambda: has(daemon, addr(plane.b)), 10, message="B discovered")
            await daemon.await_state(addr(plane.b), "healthy")
            assert set(await daemon.aupstreams()) - {"_panic"} == {addr(plane.a), addr(plane.b)}
            await still_serving(daemon, pki)
            assert excluded.accepted == 0
        finally:
            await daemon.astop()


# ---------------------------------------------------------------- 3: malformed input


async def test_3_malformed_lists_and_events_are_skipped_and_counted(
    pki: TestPKI, plane: ControlPlane, tmp_path: Path
) -> None:
    """A list body `[]`, then watch events without metadata.name, with a string object or
    a bad name: discovery survives them all, counts them, and applies the good event that
    follows. A 300 KiB event (over the 256 KiB cap) ends that watch, never the daemon."""
    plane.slices.serve(b"[]")
    cfg = config(pki, tmp_path, plane, filters=["127.0.0.0/8"])
    daemon = await DaemonProcess(cfg, tmp_path).astart()
    try:
        await eventually(lambda: "EndpointSlice discovery failed" in daemon.log(), 10)
        await still_serving(daemon, pki)
        good = {"type": "ADDED", "object": slice_object("b", ["127.0.0.1"], plane.b.port)}
        lines = [
            {"type": "ADDED", "object": "a string"},
            {"type": "ADDED", "object": {"metadata": {}}},
            {"type": "MODIFIED", "object": {"metadata": {"name": 7}}},
        ]
        plane.slices.serve(
            list_body(),
            *(json.dumps(line).encode() + b"\n" for line in lines),
            b"not json\n",
            json.dumps(good).encode() + b"\n",
        )
        await eventually(lambda: has(daemon, addr(plane.b)), 15, message="B from the watch")
        assert await metric(daemon, "kubeprism_discovery_malformed_objects_total") == 4
        plane.slices.serve(plane.good_list(), b"x" * (300 * 1024) + b"\n")
        await eventually(
            lambda: "longer than" in daemon.log(), 15, message="oversized event noticed"
        )
        await still_serving(daemon, pki)
        assert await has(daemon, addr(plane.b))
        text = await daemon.ametrics()
        assert "kubeprism_task_restarts_total{" not in text  # nothing needed restarting
        no_traceback(daemon)
    finally:
        await daemon.astop()


# ---------------------------------------------------------------- 5: sizes


async def test_5_ten_thousand_endpoints_are_capped_and_the_loop_stays_responsive(
    pki: TestPKI, plane: ControlPlane, tmp_path: Path
) -> None:
    many = [f"127.0.{i // 250 + 10}.{i % 250 + 1}" for i in range(10_000)]
    # One endpoint with every address: 10,000 of them fit under the list size cap.
    item = slice_object("many", [], 9) | {"endpoints": [{"addresses": many}]}
    plane.slices.serve(list_body(item))
    cfg = config(pki, tmp_path, plane, filters=["127.0.0.0/8"])
    daemon = await DaemonProcess(cfg, tmp_path).astart()
    try:
        await eventually(lambda: "discovery.maxEndpoints" in daemon.log(), 10, message="capped")
        assert len(set(await daemon.aupstreams()) - {"_panic"}) == 64 + 1
        for _ in range(5):
            await still_serving(daemon, pki)
        # 1,000 addresses read (the rest reported, not parsed), 64 of them used.
        assert await metric(
            daemon, "kubeprism_discovery_refused_endpoints", reason="over_limit"
        ) == (1000 - 64)
        assert "more than 1000 addresses" in daemon.log()
    finally:
        await daemon.astop()


async def test_5_a_50_mib_list_is_refused_without_growing_memory(
    pki: TestPKI, plane: ControlPlane, tmp_path: Path
) -> None:
    padding = {"padding": "p" * (50 * MiB)}
    plane.slices.serve(list_body(slice_object("kubernetes", ["127.0.0.1"], 1) | padding))
    daemon = await DaemonProcess(config(pki, tmp_path, plane), tmp_path).astart()
    try:
        await eventually(lambda: "larger than" in daemon.log(), 15, message="list refused")
        await still_serving(daemon, pki)
        assert peak_rss(daemon) < RSS_LIMIT, peak_rss(daemon) / MiB
        no_traceback(daemon)
    finally:
        await daemon.astop()


@pytest.mark.parametrize("content", ["brackets", "huge"])
async def test_5_a_hostile_cache_file_is_ignored(
    pki: TestPKI, plane: ControlPlane, tmp_path: Path, content: str
) -> None:
    """`[` x 100,000 (a RecursionError in json) and a 200 MB file: the daemon starts, warns,
    and its memory stays small."""
    cfg = config(pki, tmp_path, plane)
    cache = Path(cfg["discovery"]["cacheFile"])
    cache.parent.mkdir()
    if content == "brackets":
        cache.write_text("[" * 100_000)
    else:
        _sparse(cache, 200 * MiB)  # the daemon must refuse to read it all
    daemon = await DaemonProcess(cfg, tmp_path).astart()
    try:
        await still_serving(daemon, pki)
        assert "ignoring endpoint cache" in daemon.log()
        assert peak_rss(daemon) < RSS_LIMIT
        no_traceback(daemon)
    finally:
        await daemon.astop()


def _sparse(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.truncate(size)


# ---------------------------------------------------------------- 6: metrics series


async def test_6_series_of_removed_endpoints_are_dropped(
    pki: TestPKI, plane: ControlPlane, tmp_path: Path
) -> None:
    cfg = config(pki, tmp_path, plane, filters=["127.0.0.0/8"])
    daemon = await DaemonProcess(cfg, tmp_path).astart()
    try:
        for round_ in range(4):
            hosts = [f"127.0.{round_ + 20}.{i}" for i in range(1, 6)]
            plane.slices.serve(list_body(slice_object("churn", hosts, 9)))
            probed = functools.partial(_probed, daemon, hosts)
            await eventually(probed, 10, message=f"round {round_} probed")
        text = await daemon.ametrics()
        # Every family with an endpoint label (histograms, check costs, state), not one.
        series = {
            line.split('endpoint="', 1)[1].split('"', 1)[0]
            for line in text.splitlines()
            if 'endpoint="' in line and not line.startswith("#")
        }
        pool = set(await daemon.aupstreams()) - {"_panic"}
        assert series <= pool, series - pool
    finally:
        await daemon.astop()


async def _probed(daemon: DaemonProcess, hosts: list[str]) -> bool:
    text = await daemon.ametrics()
    return all(f'endpoint="{h}:9"' in text for h in hosts)


# ---------------------------------------------------------------- 7: the admin port


async def test_7_idle_admin_connections_cannot_starve_forwarding(
    pki: TestPKI, plane: ControlPlane, tmp_path: Path
) -> None:
    """200 idle connections to the admin port under RLIMIT_NOFILE 128: the admin port
    keeps at most its cap, forwarding and /healthz keep working."""

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    cfg = base_config([addr(plane.a)], healthCheck={"caFile": str(pki.paths.ca)})
    daemon = DaemonProcess(cfg, tmp_path, preexec_fn=low_fd_limit)
    await daemon.astart()
    idle: list[socket.socket] = []
    try:
        for _ in range(200):
            idle.append(
                await asyncio.to_thread(
                    socket.create_connection, ("127.0.0.1", daemon.admin_port), 5
                )
            )
        await still_serving(daemon, pki)
        await eventually(
            lambda: asyncio.to_thread(_still_open, idle), 5, message="some admin connections"
        )
        alive = await asyncio.to_thread(_still_open, idle)
        assert alive <= 32, alive
        assert daemon.fd_count() < 100
        # Half a request is not a reason to keep a connection: closed after the idle timeout.
        half = await asyncio.to_thread(
            socket.create_connection, ("127.0.0.1", daemon.admin_port), 5
        )
        idle.append(half)
        half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        await eventually(
            functools.partial(_closed, half), ADMIN_IDLE_TIMEOUT + 3, 0.2, "half request closed"
        )
        assert time.monotonic() - started <= ADMIN_IDLE_TIMEOUT + 3
    finally:
        for sock in idle:
            sock.close()
        await daemon.astop()


async def _closed(sock: socket.socket) -> bool:
    return await asyncio.to_thread(_still_open, [sock]) == 0


def _still_open(socks: list[socket.socket]) -> int:
    """How many of these connections the server has not closed."""
    open_ = 0
    for sock in socks:
        sock.settimeout(0.01)
        try:
            open_ += sock.recv(1) != b""
        except TimeoutError:
            open_ += 1
        except ConnectionError:
            pass
    return open_


# ---------------------------------------------------------------- 8, 9: files


async def check_config(path: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *DaemonProcess({}, path.parent).argv()[:3],
        "check-config",
        "--config",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(20):
        _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_8_a_broken_kubeconfig_names_file_and_line_never_the_secret(
    pki: TestPKI, plane: ControlPlane, tmp_path: Path
) -> None:
    cfg = config(pki, tmp_path, plane)
    kubeconfig = Path(cfg["discovery"]["kubernetes"]["kubeconfig"])
    text = kubeconfig.read_text().replace(f"token: {TOKEN}", f'token: "{TOKEN}\n  oops: : [')
    kubeconfig.write_text(text)
    path = tmp_path / "kubeprism.yaml"
    path.write_text(json.dumps(cfg))
    rc, err = await check_config(path)
    assert rc == 2, err
    assert str(kubeconfig) in err and "line " in err
    for fragment in (TOKEN, TOKEN[:8], TOKEN[-8:]):
        assert fragment not in err, err


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "100 MB", "duplicate key"])
async def test_9_hostile_config_files_are_clean_errors(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "kubeprism.yaml"
    makers: dict[str, Callable[[], object]] = {
        "fifo": lambda: os.mkfifo(path),
        "dev-zero": lambda: path.symlink_to("/dev/zero"),
        "100 MB": lambda: _sparse(path, 100 * MiB),
        "duplicate key": lambda: path.write_text(
            "upstreams: [10.0.0.1:6443]\ndialTimeout: 1s\ndialTimeout: 2s\n"
        ),
    }
    makers[kind]()
    started = time.monotonic()
    rc, err = await check_config(path)
    assert rc == 2, err
    assert time.monotonic() - started < 10
    assert "Traceback" not in err
    if kind == "duplicate key":
        assert "dialTimeout" in err and "duplicate" in err
