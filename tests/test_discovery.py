"""Discovery: filters, the on-disk cache, credentials, EndpointSlice list/watch over real TLS."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from certs import TestPKI
from clients import cert_user, write_kubeconfig
from slices import SliceStore, optional_client_cert_context, run_watcher
from standin import StandinAPIServer
from util import eventually

from kubeprism.base.net import HostPort
from kubeprism.config import ConfigError, KubernetesDiscoveryConfig, config_from_dict
from kubeprism.core.endpoint import EndpointSpec
from kubeprism.core.upstream import Pool
from kubeprism.discovery.credentials import load_credentials
from kubeprism.discovery.kubewatch import SliceWatcher, slice_endpoints
from kubeprism.discovery.membership import Membership
from kubeprism.discovery.sources import EndpointFilter, load_cache, merge, save_cache

TOKEN = "s3cret-discovery-token"


def hp(text: str) -> HostPort:
    host, port = text.rsplit(":", 1)
    return HostPort(host.strip("[]"), int(port))


# ------------------------------------------------------------------ filters and merging


@pytest.mark.parametrize(
    ("rules", "address", "allowed"),
    [
        ([], "192.0.2.1:6443", True),
        (["10.0.0.0/8"], "10.1.2.3:6443", True),
        (["10.0.0.0/8"], "192.0.2.1:6443", False),
        (["10.0.0.0/8", "!10.9.0.0/16"], "10.9.1.1:6443", False),
        (["10.0.0.0/8", "!10.9.0.0/16"], "10.8.1.1:6443", True),
        (["!10.9.0.0/16"], "192.0.2.1:6443", True),
        (["!10.9.0.0/16"], "10.9.0.1:6443", False),
        (["fd00::/8"], "[fd00::1]:6443", True),
        (["fd00::/8"], "10.0.0.1:6443", False),
        (["0.0.0.0/0", "!127.0.0.0/8"], "127.0.0.1:6443", False),
    ],
)
def test_filter(rules: list[str], address: str, allowed: bool) -> None:
    assert EndpointFilter(rules).allows(hp(address)) is allowed


def test_merge_keeps_seeds_filters_only_discovered() -> None:
    seeds = {hp("10.9.0.1:6443"): EndpointSpec(100, frozenset({"static"}))}
    discovered = [hp("10.9.0.2:6443"), hp("10.1.0.1:6443"), hp("10.9.0.1:6443")]
    merged = merge(seeds, discovered, "kubernetes", EndpointFilter(["!10.9.0.0/16"]), 100)
    # The seed stays although the filter excludes its range; a discovered twin is not added.
    assert merged == {
        hp("10.9.0.1:6443"): EndpointSpec(100, frozenset({"static"})),
        hp("10.1.0.1:6443"): EndpointSpec(100, frozenset({"kubernetes"})),
    }


def test_merge_unions_sources_and_keeps_the_best_priority() -> None:
    seeds = {hp("10.0.0.1:6443"): EndpointSpec(0, frozenset({"static"}))}
    merged = merge(seeds, [hp("10.0.0.1:6443")], "kubernetes", EndpointFilter([]), 100)
    assert merged[hp("10.0.0.1:6443")] == EndpointSpec(0, frozenset({"static", "kubernetes"}))


# ------------------------------------------------------------------ the cache


def test_cache_round_trip_atomic_and_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "endpoints.json"
    endpoints = [hp("10.0.0.2:6443"), hp("[fd00::1]:6443")]
    save_cache(str(path), endpoints)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(load_cache(str(path))) == sorted(endpoints)
    assert [p.name for p in path.parent.iterdir()] == ["endpoints.json"]  # no temp file left
    inode = path.stat().st_ino
    save_cache(str(path), endpoints[:1])
    assert path.stat().st_ino != inode  # replaced by rename, never rewritten in place
    assert load_cache(str(path)) == endpoints[:1]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"[]",
        b'{"version": 99, "endpoints": []}',
        b'{"version": 1}',
        b'{"version": 1, "endpoints": [{"host": "nope", "port": 1}]}',
        b'{"version": 1, "endpoints": [{"host": "10.0.0.1", "port": 0}]}',
        b'{"version": 1, "endpoints": ["10.0.0.1:6443"]}',
        b"\xff\xfe",
    ],
)
def test_corrupt_cache_is_ignored_with_a_warning(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "endpoints.json"
    path.write_bytes(content)
    assert load_cache(str(path)) == []
    assert "ignoring endpoint cache" in caplog.text


def test_missing_cache_is_silent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert load_cache(str(tmp_path / "none.json")) == []
    assert caplog.text == ""


# ------------------------------------------------------------------ slices and credentials


def test_slice_endpoints_ready_only_with_the_https_port() -> None:
    slices: dict[str, dict[str, Any]] = {
        "a": {
            "ports": [{"name": "https", "port": 6443}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": True}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": False}},
                {"addresses": ["10.0.0.3"], "conditions": {}},
                {"addresses": ["10.0.0.4"]},
            ],
        },
        "b": {
            "ports": [{"name": "metrics", "port": 1}, {"name": "https", "port": 16443}],
            "endpoints": [{"addresses": ["fd00::5"]}],
        },
        "c": {"ports": [], "endpoints": [{"addresses": ["10.0.0.9"]}]},
    }
    assert slice_endpoints(slices) == (
        {hp("10.0.0.1:6443"), hp("10.0.0.3:6443"), hp("10.0.0.4:6443"), hp("[fd00::5]:16443")},
        {},
    )


def test_bad_kubeconfig_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "kc.yaml"
    path.write_text("apiVersion: v1\nclusters: [{name: c, cluster: {server: https://x}}]\n")
    with pytest.raises(ConfigError) as err:
        load_credentials(KubernetesDiscoveryConfig(enabled=True, kubeconfig=str(path)))
    assert err.value.key == "discovery.kubernetes.kubeconfig"
    assert "current-context" in str(err.value)


def test_token_is_never_in_the_error_text(pki: TestPKI, tmp_path: Path) -> None:
    path = write_kubeconfig(pki, tmp_path / "kc.yaml", "https://x", {"token": TOKEN})
    doc = yaml.safe_load(path.read_text())
    doc["clusters"][0]["cluster"]["certificate-authority-data"] = "bm90IGEgY2VydA=="
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as err:
        load_credentials(KubernetesDiscoveryConfig(enabled=True, kubeconfig=str(path)))
    assert TOKEN not in str(err.value)


# ------------------------------------------------------------------ the watcher over TLS


@pytest.fixture
async def slice_server(pki: TestPKI) -> AsyncIterator[tuple[StandinAPIServer, SliceStore]]:
    store = SliceStore(token=TOKEN)
    ctx = optional_client_cert_context(pki.server_context(), str(pki.paths.ca))
    async with StandinAPIServer("A", ssl_context=ctx, extra_routes=store.routes()) as server:
        yield server, store


class Updates:
    """Collects what a SliceWatcher reports."""

    def __init__(self) -> None:
        self.sets: list[set[HostPort]] = []

    def __call__(self, endpoints: set[HostPort]) -> None:
        self.sets.append(set(endpoints))

    @property
    def last(self) -> set[HostPort] | None:
        return self.sets[-1] if self.sets else None


def token_watcher(
    pki: TestPKI, server: StandinAPIServer, updates: Updates, tmp_path: Path, debounce: float = 0.05
) -> SliceWatcher:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    creds = load_credentials(
        KubernetesDiscoveryConfig(
            enabled=True, token_file=str(token_file), ca_file=str(pki.paths.ca)
        )
    )
    return SliceWatcher(HostPort("127.0.0.1", server.port), creds, updates, debounce)


async def test_list_then_watch_adds_and_removes(
    pki: TestPKI, slice_server: Any, tmp_path: Path
) -> None:
    server, store = slice_server
    store.put("kubernetes", ["10.0.0.1"], 6443)
    updates = Updates()
    watcher = token_watcher(pki, server, updates, tmp_path)
    async for _ in run_watcher(watcher):
        await eventually(lambda: updates.last == {hp("10.0.0.1:6443")}, message="listed")
        store.put("kubernetes", ["10.0.0.1", "10.0.0.2"], 6443)
        await eventually(lambda: updates.last == {hp("10.0.0.1:6443"), hp("10.0.0.2:6443")})
        store.put("kubernetes", ["10.0.0.2"], 6443)
        await eventually(lambda: updates.last == {hp("10.0.0.2:6443")}, message="removed")
        assert all(s.token == TOKEN for s in store.seen)
        assert store.seen[0].watch is False and store.seen[1].watch is True
        assert store.seen[1].resource_version == "101"


async def test_empty_lists_are_ignored(pki: TestPKI, slice_server: Any, tmp_path: Path) -> None:
    server, store = slice_server
    store.put("kubernetes", ["10.0.0.1"], 6443)
    updates = Updates()
    async for _ in run_watcher(token_watcher(pki, server, updates, tmp_path)):
        await eventually(lambda: updates.last == {hp("10.0.0.1:6443")})
        store.put("kubernetes", ["10.0.0.1"], 6443, ready=False)  # nothing ready
        store.delete("kubernetes")
        store.put("other", ["10.0.0.7"], 6443)
        await eventually(lambda: updates.last == {hp("10.0.0.7:6443")})
        assert set() not in updates.sets


async def test_debounce_swallows_churn(pki: TestPKI, slice_server: Any, tmp_path: Path) -> None:
    server, store = slice_server
    store.put("kubernetes", ["10.0.0.1", "10.0.0.2"], 6443)
    updates = Updates()
    async for _ in run_watcher(token_watcher(pki, server, updates, tmp_path, debounce=0.5)):
        await eventually(lambda: len(updates.sets) == 1)
        for _ in range(5):  # an apiserver restarting: out, in, out, in...
            store.put("kubernetes", ["10.0.0.1"], 6443)
            store.put("kubernetes", ["10.0.0.1", "10.0.0.2"], 6443)
        store.put("kubernetes", ["10.0.0.1", "10.0.0.2", "10.0.0.3"], 6443)
        await eventually(lambda: len(updates.sets) == 2, message="one debounced update")
        assert updates.last == {hp("10.0.0.1:6443"), hp("10.0.0.2:6443"), hp("10.0.0.3:6443")}


@pytest.mark.parametrize("as_status", [False, True], ids=["error-event", "http-410"])
async def test_gone_relists(
    pki: TestPKI, slice_server: Any, tmp_path: Path, as_status: bool
) -> None:
    server, store = slice_server
    store.gone_as_status = as_status
    store.put("kubernetes", ["10.0.0.1"], 6443)
    updates = Updates()
    watcher = token_watcher(pki, server, updates, tmp_path)
    async for _ in run_watcher(watcher):
        await eventually(lambda: updates.last == {hp("10.0.0.1:6443")})
        store.put("kubernetes", ["10.0.0.5"], 6443)
        store.compact()  # the watch ends; resuming from its version is now too old
        await eventually(lambda: watcher.lists >= 2, message="listed again after 410")
        await eventually(lambda: updates.last == {hp("10.0.0.5:6443")})


async def test_client_certificate_from_kubeconfig(pki: TestPKI, tmp_path: Path) -> None:
    store = SliceStore(token=None)  # any client certificate signed by the CA
    store.put("kubernetes", ["10.0.0.1"], 6443)
    ctx = optional_client_cert_context(pki.server_context(), str(pki.paths.ca))
    async with StandinAPIServer("A", ssl_context=ctx, extra_routes=store.routes()) as server:
        kc = write_kubeconfig(pki, tmp_path / "kubelet.conf", "https://ignored", cert_user(pki))
        creds = load_credentials(KubernetesDiscoveryConfig(enabled=True, kubeconfig=str(kc)))
        updates = Updates()
        watcher = SliceWatcher(HostPort("127.0.0.1", server.port), creds, updates, 0.05)
        async for _ in run_watcher(watcher):
            await eventually(lambda: updates.last == {hp("10.0.0.1:6443")})
        assert store.seen[0].client_cn == "system:kubeprism"
        assert store.seen[0].token is None


async def test_wrong_ca_is_refused(pki: TestPKI, tmp_path: Path) -> None:
    store = SliceStore(token=TOKEN)
    store.put("kubernetes", ["10.0.0.1"], 6443)
    async with StandinAPIServer(
        "W", ssl_context=pki.server_context(wrong=True), extra_routes=store.routes()
    ) as server:
        updates = Updates()
        watcher = token_watcher(pki, server, updates, tmp_path)
        async for _ in run_watcher(watcher):
            await eventually(lambda: watcher.last_error is not None, message="TLS refused")
        assert "certificate" in (watcher.last_error or "").lower()
        assert updates.sets == [] and store.seen == []


async def test_wrong_token_backs_off_and_sends_nothing_usable(
    pki: TestPKI, slice_server: Any, tmp_path: Path
) -> None:
    server, store = slice_server
    store.token = "another"
    store.put("kubernetes", ["10.0.0.1"], 6443)
    updates = Updates()
    watcher = token_watcher(pki, server, updates, tmp_path)
    async for _ in run_watcher(watcher):
        await eventually(lambda: "401" in (watcher.last_error or ""), message="401 seen")
        store.token = TOKEN  # fixed: the next retry recovers
        await eventually(lambda: updates.last == {hp("10.0.0.1:6443")}, timeout=5)
    assert watcher.last_error is None


async def test_watch_resumes_from_its_last_version_after_it_ends(
    pki: TestPKI, slice_server: Any, tmp_path: Path
) -> None:
    server, store = slice_server
    store.put("kubernetes", ["10.0.0.1"], 6443)
    updates = Updates()
    watcher = token_watcher(pki, server, updates, tmp_path)
    async for _ in run_watcher(watcher):
        await eventually(lambda: updates.last == {hp("10.0.0.1:6443")})
        store.put("kubernetes", ["10.0.0.2"], 6443)
        await eventually(lambda: updates.last == {hp("10.0.0.2:6443")})
        store.end_watches()  # the apiserver's watch timeout
        await eventually(lambda: sum(s.watch for s in store.seen) >= 2, message="re-watched")
        store.put("kubernetes", ["10.0.0.3"], 6443)
        await eventually(lambda: updates.last == {hp("10.0.0.3:6443")})
    rewatch = [s for s in store.seen if s.watch][1]
    assert rewatch.resource_version == "102"  # resumed, not re-listed
    assert watcher.lists == 1


async def test_cache_is_ignored_while_kubernetes_discovery_is_off(tmp_path: Path) -> None:
    """Found by tests/faults: a cache left by an earlier run (discovery since switched off)
    added its endpoints for good, since no list would ever replace it."""
    path, token = tmp_path / "endpoints.json", tmp_path / "token"
    save_cache(str(path), [HostPort("10.9.9.9", 6443)])
    token.write_text("t")
    for enabled, expected in ((False, {"static"}), (True, {"static", "cache"})):
        kubernetes = {"enabled": True, "tokenFile": str(token)} if enabled else {}
        cfg = config_from_dict(
            {
                "upstreams": ["10.0.0.1:6443"],
                "discovery": {"cacheFile": str(path), "kubernetes": kubernetes},
            }
        )
        pool = Pool()
        membership = Membership(pool, lambda: None, lambda _address: None)
        membership.configure(cfg.upstreams, cfg.discovery, None, cfg.listen[0])
        await membership.refresh()
        assert {s for ep in pool.endpoints.values() for s in ep.sources} == expected
        await membership.stop()
