"""Discovery end to end: the daemon watches EndpointSlices through itself, caches, filters."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from certs import TestPKI
from clients import addr, client_session, open_stream, served_by, write_kubeconfig
from daemon_proc import DaemonProcess, base_config
from slices import SliceStore, optional_client_cert_context
from standin import StandinAPIServer
from util import eventually

TOKEN = "e2e-discovery-token"
LOOPBACK_ONLY = ["127.0.0.0/8"]


@pytest.fixture
async def cluster(pki: TestPKI) -> AsyncIterator[tuple[SliceStore, dict[str, StandinAPIServer]]]:
    """Stand-ins A, B (127.0.0.1) and C (127.0.0.3) sharing one EndpointSlice store."""
    store = SliceStore(token=TOKEN)
    servers: dict[str, StandinAPIServer] = {}
    for name, host in (("A", "127.0.0.1"), ("B", "127.0.0.1"), ("C", "127.0.0.3")):
        ctx = optional_client_cert_context(pki.server_context(), str(pki.paths.ca))
        server = StandinAPIServer(name, host=host, ssl_context=ctx, extra_routes=store.routes())
        await server.start()
        servers[name] = server
    try:
        yield store, servers
    finally:
        for server in servers.values():
            await server.close()


def publish(store: SliceStore, *servers: StandinAPIServer) -> None:
    """One slice per stand-in (each has its own port), replacing what was there."""
    for name in list(store.slices):
        store.delete(name)
    for server in servers:
        store.put(f"kubernetes-{server.name.lower()}", [server.host], server.port)


def discovery_config(pki: TestPKI, tmp_path: Path, seeds: list[str], **disc: Any) -> dict[str, Any]:
    kubeconfig = write_kubeconfig(
        pki, tmp_path / "kubelet.conf", "https://unused", {"token": TOKEN}
    )
    # The stand-ins live on loopback, which discovery refuses unless a filter names it.
    disc.setdefault("filters", LOOPBACK_ONLY)
    return base_config(
        seeds,
        healthCheck={"caFile": str(pki.paths.ca)},
        discovery={
            "kubernetes": {"enabled": True, "kubeconfig": str(kubeconfig), "debounce": "100ms"},
            "cacheFile": str(tmp_path / "state" / "endpoints.json"),
            "removalGrace": "1s",
            **disc,
        },
    )


async def test_discovered_servers_get_traffic_removed_ones_are_drained(
    pki: TestPKI, cluster: Any, tmp_path: Path
) -> None:
    store, s = cluster
    publish(store, s["A"], s["B"], s["C"])
    cfg = discovery_config(pki, tmp_path, [addr(s["A"])], filters=[*LOOPBACK_ONLY, "!127.0.0.3/32"])
    daemon = await DaemonProcess(cfg, tmp_path).astart()
    try:
        await eventually(lambda: _has(daemon, addr(s["B"])), 10, message="B discovered")
        ups = await daemon.aupstreams()
        assert ups[addr(s["B"])]["sources"] == ["kubernetes"]
        assert ups[addr(s["A"])]["sources"] == ["kubernetes", "static"]
        assert f"127.0.0.3:{s['C'].port}" not in ups  # filtered out
        assert any(seen.token == TOKEN for seen in store.seen)  # credentials were sent
        await daemon.await_state(addr(s["B"]), "healthy")
        async with client_session(pki) as session:
            assert "B" in await served_by(session, daemon.port, 10)
            # Pin a stream to B, then drop B from the slices: it is drained after the grace.
            resp = None
            for _ in range(20):
                resp, owner = await open_stream(session, daemon.port)
                if owner == "B":
                    break
                resp.close()
            assert resp is not None and owner == "B"
            publish(store, s["A"])
            await eventually(lambda: _gone(daemon, addr(s["B"])), 5, message="B removed")
            assert await served_by(session, daemon.port, 5) == ["A"] * 5
            with pytest.raises(Exception):  # noqa: B017 - closed by kubeprism: any error type
                async with asyncio.timeout(5):
                    while await resp.content.readline():
                        pass
                    raise ConnectionError("stream ended")
            resp.close()
        text = await daemon.ametrics()
        assert 'kubeprism_connections_closed_total{reason="removed"} 1.0' in text
        # The cache holds the last discovered set, privately, written atomically.
        cache = Path(cfg["discovery"]["cacheFile"])
        assert stat.S_IMODE(cache.stat().st_mode) == 0o600
        saved = json.loads(cache.read_text())["endpoints"]
        assert saved == [{"host": "127.0.0.1", "port": s["A"].port}]
    finally:
        await daemon.astop()


async def test_empty_slices_keep_the_current_set(
    pki: TestPKI, cluster: Any, tmp_path: Path
) -> None:
    store, s = cluster
    publish(store, s["A"], s["B"])
    daemon = await DaemonProcess(discovery_config(pki, tmp_path, [addr(s["A"])]), tmp_path).astart()
    try:
        await eventually(lambda: _has(daemon, addr(s["B"])), 10, message="B discovered")
        publish(store)  # every slice gone
        await eventually(lambda: "no ready API server" in daemon.log(), 5, message="empty logged")
        assert await _has(daemon, addr(s["B"]))
    finally:
        await daemon.astop()


async def test_cache_brings_endpoints_back_when_every_seed_is_down(
    pki: TestPKI, cluster: Any, tmp_path: Path
) -> None:
    store, s = cluster
    publish(store, s["A"], s["B"])
    cfg = discovery_config(pki, tmp_path, [addr(s["A"])])
    first = await DaemonProcess(cfg, tmp_path).astart()
    try:
        await eventually(lambda: _has(first, addr(s["B"])), 10, message="B discovered")
        cache = Path(cfg["discovery"]["cacheFile"])
        await eventually(lambda: cache.exists() and str(s["B"].port) in cache.read_text())
    finally:
        await first.astop()
    await s["A"].close()  # the only seed is down now
    second = await DaemonProcess(cfg, tmp_path).astart()
    try:
        ups = await second.aupstreams()
        assert (
            "cache" in ups[addr(s["B"])]["sources"] or "kubernetes" in ups[addr(s["B"])]["sources"]
        )
        await second.await_state(addr(s["B"]), "healthy")
        async with client_session(pki) as session:
            assert await served_by(session, second.port, 3) == ["B"] * 3
        # The watch runs through kubeprism itself, so it works through B and takes over.
        await eventually(
            lambda: _sources_are(second, addr(s["B"]), ["kubernetes"]), 10, message="relisted"
        )
        assert "loaded 2 endpoint(s) from cache" in second.log()
    finally:
        await second.astop()


async def test_corrupt_cache_is_ignored(pki: TestPKI, cluster: Any, tmp_path: Path) -> None:
    store, s = cluster
    publish(store, s["A"])
    cfg = discovery_config(pki, tmp_path, [addr(s["A"])])
    cache = Path(cfg["discovery"]["cacheFile"])
    cache.parent.mkdir()
    cache.write_text('{"version": 1, "endpoints": [{"host": "not-an-ip"')
    daemon = await DaemonProcess(cfg, tmp_path).astart()
    try:
        await daemon.await_state(addr(s["A"]), "healthy")
        assert "ignoring endpoint cache" in daemon.log()
        assert "Traceback" not in daemon.log()
    finally:
        await daemon.astop()


async def _has(daemon: DaemonProcess, address: str) -> bool:
    return address in await daemon.aupstreams()


async def _sources(daemon: DaemonProcess, address: str) -> list[str]:
    return list((await daemon.aupstreams()).get(address, {}).get("sources", []))


async def _gone(daemon: DaemonProcess, address: str) -> bool:
    return not await _has(daemon, address)


async def _sources_are(daemon: DaemonProcess, address: str, expected: list[str]) -> bool:
    return await _sources(daemon, address) == expected


async def test_localhost_entry_with_best_priority_is_used_whenever_healthy(
    pki: TestPKI, cluster: Any, tmp_path: Path
) -> None:
    """A control-plane node: its own apiserver (localhost) first, the others as fallback."""
    _store, s = cluster
    upstreams = [{"address": f"localhost:{s['A'].port}", "priority": 0}, addr(s["B"])]
    cfg = base_config(upstreams, healthCheck={"caFile": str(pki.paths.ca)})
    daemon = await DaemonProcess(cfg, tmp_path).astart()
    try:
        ups = await daemon.aupstreams()
        assert ups[addr(s["A"])]["sources"] == ["dns:localhost"]
        await daemon.await_state(addr(s["A"]), "healthy")
        async with client_session(pki) as session:
            assert await served_by(session, daemon.port, 5) == ["A"] * 5
            s["A"].ready_status = 500
            await daemon.await_state(addr(s["A"]), "unhealthy")
            assert await served_by(session, daemon.port, 3) == ["B"] * 3
            s["A"].ready_status = 200
            await daemon.await_state(addr(s["A"]), "healthy")
            assert await served_by(session, daemon.port, 3) == ["A"] * 3
    finally:
        await daemon.astop()
