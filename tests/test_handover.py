"""Restarts that keep every connection: kubeprism under a stand-in service manager.

The manager (service_manager.py) receives FDSTORE=1 with descriptors on its notify socket
and starts the next process with them in LISTEN_FDS/LISTEN_FDNAMES, as systemd does on
`systemctl restart`; SIGUSR2 re-executes kubeprism in place with the same descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from certs import TestPKI
from clients import metric_sample
from conftest import StandinFactory
from daemon_proc import DaemonProcess, base_config
from restart_load import Load, LoadServer, check_held, open_held, pinger, requester, stream_client
from service_manager import Service
from util import eventually, kubectl_argv, kubectl_env

from kubeprism.base.net import HostPort
from kubeprism.forward import handover

STREAMS = 20
STREAM_SIZE = 64 << 20
HELD = 200 - STREAMS - 1  # with the pinger: 200 connections open through kubeprism
RESTARTS = 3


@contextlib.asynccontextmanager
async def service(cfg: dict[str, Any], workdir: Path) -> AsyncIterator[Service]:
    """A started Service, closed at exit."""
    svc = Service(cfg, workdir)
    try:
        await svc.astart()
        yield svc
    finally:
        svc.close()


def _config(upstream_port: int, **overrides: Any) -> dict[str, Any]:
    return base_config([f"127.0.0.1:{upstream_port}"], healthCheck={"type": "tcp"}, **overrides)


async def test_takeover_closes_what_it_cannot_use_and_resumes_the_rest(tmp_path: Path) -> None:
    """A store holding junk next to one good connection with undelivered bytes both ways:
    the junk is closed with a warning, the good one resumes with its bytes in order."""
    async with LoadServer() as upstream:
        cfg = _config(upstream.port)
        svc = Service(cfg, tmp_path)
        with contextlib.ExitStack() as stack:
            lsock = stack.enter_context(socket.create_server(("127.0.0.1", 0)))

            def pair() -> tuple[socket.socket, socket.socket]:
                outer = stack.enter_context(socket.create_connection(lsock.getsockname()))
                inner = stack.enter_context(lsock.accept()[0])
                return outer, inner

            up = stack.enter_context(socket.create_connection(("127.0.0.1", upstream.port)))
            up.sendall(b"E\n")  # what the previous process forwarded: the echo protocol
            endpoint = handover.encode_endpoint(HostPort("127.0.0.1", upstream.port))
            client, kp_client = pair()
            svc.manager.seed(kp_client.fileno(), "kp.0a-1.c")
            svc.manager.seed(up.fileno(), f"kp.0a-1.u.{endpoint}")
            for data, name in ((b"hello", "kp.0a-1.bu"), (b"early:", "kp.0a-1.bc")):
                memfd = os.memfd_create("test")
                os.write(memfd, data)
                svc.manager.seed(memfd, name)
                os.close(memfd)
            lone, kp_lone = pair()
            svc.manager.seed(kp_lone.fileno(), "kp.0b-2.c")  # no upstream partner
            garbled, kp_garbled = pair()
            svc.manager.seed(kp_garbled.fileno(), "kp.0c-3.zz")
            peer, kp_peer = pair()
            r, w = os.pipe()
            svc.manager.seed(r, "kp.0d-4.c")  # a pipe is no client socket: its partner goes too
            svc.manager.seed(kp_peer.fileno(), f"kp.0d-4.u.{endpoint}")
            udp = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            svc.manager.seed(udp.fileno(), "kp.0e-5.w")
            for fd in (r, w):
                os.close(fd)
            for sock in (up, kp_client, kp_lone, kp_garbled, kp_peer):
                sock.close()
            try:
                daemon = await svc.astart()
                for junk_peer in (lone, garbled, peer, client):
                    junk_peer.settimeout(5)
                for junk_peer in (lone, garbled, peer):
                    assert await asyncio.to_thread(junk_peer.recv, 100) == b""
                got = b""
                while len(got) < len(b"early:hello"):
                    got += await asyncio.to_thread(client.recv, 100)
                assert got == b"early:hello"
                await eventually(lambda: svc.manager.stored_names() == [], 5, message="removed")
            finally:
                svc.close()
    log = daemon.log()
    assert "took over 1 connection(s)" in log
    assert "closed 5 unusable descriptor(s)" in log, log
    assert "Traceback" not in log


async def test_connections_to_an_endpoint_no_longer_configured_are_closed(
    tmp_path: Path,
) -> None:
    """A restart with a config that dropped the endpoint: its connections are not resumed."""
    async with LoadServer() as old, LoadServer() as new:
        cfg = _config(old.port)
        async with service(cfg, tmp_path) as svc:
            held = [await open_held(_port(cfg)) for _ in range(5)]
            cfg["upstreams"] = [f"127.0.0.1:{new.port}"]  # the next process reads this
            await svc.arestart()
            ends = await asyncio.gather(*(asyncio.wait_for(r.read(), 5) for r, _ in held))
            for _, writer in held:
                writer.close()
            assert svc.daemon is not None
            log = svc.daemon.log()
    assert ends == [b""] * len(held)
    assert (
        "took over 0 connection(s) from the previous process; closed 5 whose endpoint is gone"
        in log
    )


async def _restart_measured(svc: Service, load: Load) -> float:
    """One restart under load; return the forwarding pause (longest ping round trip)."""
    await eventually(lambda: len(load.pings) > 3, 10, message="pings flowing")
    t0 = time.monotonic()
    await svc.arestart()
    await eventually(lambda: load.pings[-1][0] > t0 + 0.2, 10, message="pings again")
    return load.pause_around(t0 - 0.05, time.monotonic())


async def test_three_restarts_under_load_lose_nothing(tmp_path: Path) -> None:
    """200 connections (20 streaming 64 MiB each way), a request every 100 ms, 3 restarts:
    nothing closed, every byte verified, no request failed, each pause measured."""
    async with LoadServer() as upstream, service(_config(upstream.port), tmp_path) as svc:
        port = _port(svc.cfg)
        load, stop = Load(), asyncio.Event()
        held = [await open_held(port) for _ in range(HELD)]
        background = [
            asyncio.create_task(pinger(port, load, stop), name="pinger"),
            asyncio.create_task(requester(port, load, stop), name="requester"),
        ]
        streams = [
            asyncio.create_task(stream_client(port, STREAM_SIZE, load), name=f"stream {i}")
            for i in range(STREAMS)
        ]
        await eventually(
            lambda: sum(s.verifier.received > 0 for s in load.streams) == STREAMS,
            20,
            message="every stream under way",
        )
        pauses, in_flight = [], []
        for _ in range(RESTARTS):
            in_flight.append(sum(0 < s.verifier.received < STREAM_SIZE for s in load.streams))
            pauses.append(await _restart_measured(svc, load))
        await asyncio.wait_for(asyncio.gather(*streams), 120)
        stop.set()
        await asyncio.gather(*background)
        await check_held(held, load)
        assert svc.daemon is not None
        metrics = await svc.daemon.ametrics()
    slowest = max(dt for _, dt, _ in load.requests)
    print(f"pauses {[round(p, 3) for p in pauses]} s; streams in flight {in_flight}")
    print(f"{len(load.requests)} requests, slowest {slowest:.3f} s")
    assert load.held_lost == [] and load.held_ok == HELD
    bad = [s for s in load.streams if not (s.verifier.complete and s.sha_ok and not s.error)]
    assert bad == [], [(s.verifier.describe(), s.error) for s in bad]
    assert [v.complete for v in upstream.streams] == [True] * STREAMS
    assert load.failed_requests == 0, load.request_errors
    # The last process took over everything still open: the held ones and the pinger at least.
    assert metric_sample(metrics, "kubeprism_connections_adopted_total") >= HELD + 1
    assert len(pauses) == RESTARTS and min(in_flight) > 0  # each restart hit live streams


async def test_stop_closes_every_connection_within_drain_timeout(tmp_path: Path) -> None:
    """SIGTERM, then no next start: the manager flushes its store, every client sees EOF."""
    async with LoadServer() as upstream, service(_config(upstream.port), tmp_path) as svc:
        port = _port(svc.cfg)
        held = [await open_held(port) for _ in range(50)]
        t0 = time.monotonic()
        assert await svc.aterminate() == 0
        assert svc.manager.flush() >= 2 * len(held)  # what systemctl stop does to the store
        ends = await asyncio.gather(*(asyncio.wait_for(r.read(), 5) for r, _ in held))
        elapsed = time.monotonic() - t0
        for _, writer in held:
            writer.close()
    assert ends == [b""] * len(held)
    assert elapsed < 2.0, elapsed  # drainTimeout in base_config


async def test_reexec_in_place_keeps_connections(tmp_path: Path) -> None:
    """SIGUSR2 three times without any service manager: same PID, every connection kept."""
    async with LoadServer() as upstream:
        daemon = await DaemonProcess(_config(upstream.port), tmp_path).astart()
        try:
            assert daemon.proc is not None
            pid, port = daemon.proc.pid, daemon.port
            held = [await open_held(port) for _ in range(20)]
            good = daemon.config_path.read_text()
            daemon.config_path.write_text("upstreams: [nonsense\n")
            daemon.signal(signal.SIGUSR2)  # refused: the new image would exit on this config
            await eventually(lambda: "not re-executing" in daemon.log(), 15, message="refusal")
            daemon.config_path.write_text(good)
            load = Load()
            stream = asyncio.create_task(stream_client(port, 16 << 20, load), name="stream")
            for n in range(1, 4):
                daemon.signal(signal.SIGUSR2)
                await eventually(_took_over(daemon, n), 15, message=f"re-exec #{n}")
            await asyncio.wait_for(stream, 60)
            await check_held(held, load)
            metrics = await daemon.ametrics()
            assert daemon.proc.poll() is None and daemon.proc.pid == pid
        finally:
            await daemon.astop()
    assert load.held_lost == [] and load.held_ok == len(held)
    assert load.streams[0].verifier.complete and load.streams[0].sha_ok
    assert metric_sample(metrics, "kubeprism_connections_adopted_total") >= len(held)
    assert "re-executing with" in daemon.log()


def _took_over(daemon: DaemonProcess, times: int) -> Callable[[], bool]:
    return lambda: daemon.log().count("took over") == times


async def _watch(request: web.Request) -> web.StreamResponse:
    """A watch: one numbered event line every 50 ms until the client goes away."""
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    with contextlib.suppress(ConnectionError):
        for n in range(100_000):
            event = {"type": "ADDED", "object": {"kind": "Namespace", "n": n}}
            await resp.write(json.dumps(event).encode() + b"\n")
            await asyncio.sleep(0.05)
    return resp


async def test_kubectl_watch_survives_restarts(
    pki: TestPKI, standin_factory: StandinFactory, tmp_path: Path
) -> None:
    """kubectl 1.33 holding a watch stream through kubeprism: 3 restarts, no event lost."""
    api = await standin_factory("A", extra_routes=[web.get("/api/v1/namespaces", _watch)])
    hc = {"caFile": str(pki.paths.ca), "serverName": "kubernetes"}
    cfg = base_config([f"127.0.0.1:{api.port}"], healthCheck=hc)
    async with service(cfg, tmp_path) as svc:
        argv = kubectl_argv(
            f"https://127.0.0.1:{_port(cfg)}",
            pki.paths.ca,
            "get",
            "--raw",
            "/api/v1/namespaces?watch=1",
        )
        proc = await asyncio.create_subprocess_exec(
            *argv, "--request-timeout=0", stdout=PIPE, stderr=PIPE, env=kubectl_env(tmp_path)
        )
        assert proc.stdout is not None
        try:
            events = [await _event(proc.stdout)]
            for _ in range(RESTARTS):
                await svc.arestart()
                events += [await _event(proc.stdout) for _ in range(5)]
        finally:
            with contextlib.suppress(ProcessLookupError):  # uvloop: kubectl already exited
                proc.kill()
            await proc.communicate()
    assert [e["object"]["n"] for e in events] == list(range(len(events)))


async def _event(stdout: asyncio.StreamReader) -> dict[str, Any]:
    line = await asyncio.wait_for(stdout.readline(), 10)
    assert line, "kubectl's watch ended"
    event: dict[str, Any] = json.loads(line)
    return event


def _port(cfg: dict[str, Any]) -> int:
    return int(str(cfg["listen"][0]).rsplit(":", 1)[1])
