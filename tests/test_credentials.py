"""Discovery credentials that follow rotation (in-process; the systemd test runs it end to end).

A kubelet rotates its client certificate in place and service-account tokens get refreshed:
the watcher must use the new files for its next request, count rejected ones by reason, and a
reload with new credentials must restart the watch. tests/test_systemd_real.py runs the whole
story (an expired certificate, 401s, a replacement on disk) under systemd.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from certs import TestPKI
from clients import write_kubeconfig
from slices import SliceStore, optional_client_cert_context, run_watcher
from standin import StandinAPIServer
from util import eventually

from kubeprism.base.net import HostPort
from kubeprism.config import DiscoveryConfig, KubernetesDiscoveryConfig
from kubeprism.core.upstream import Pool
from kubeprism.discovery.credentials import load_credentials
from kubeprism.discovery.kubewatch import SliceWatcher
from kubeprism.discovery.membership import Membership

TOKEN = "rotated-token-0123456789"
NODE_CN = "system:node:node1"


def write_node_cert(pki: TestPKI, directory: Path, cn: str) -> Path:
    """Certificate and key in one file, replaced atomically (as the kubelet rotates it)."""
    leaf = pki.ca.issue_cert("node1", common_name=cn, organization_name="system:nodes")
    pem = b"".join(b.bytes() for b in leaf.cert_chain_pems) + leaf.private_key_pem.bytes()
    target = directory / "kubelet-client-current.pem"
    tmp = directory / "kubelet-client-current.pem.tmp"
    tmp.write_bytes(pem)
    tmp.replace(target)
    return target


@pytest.fixture
async def cluster(pki: TestPKI) -> AsyncIterator[tuple[StandinAPIServer, SliceStore]]:
    """A stand-in serving the slices to any client certificate of the test CA."""
    store = SliceStore(token=None)
    store.put("kubernetes", ["10.0.0.1"], 6443)
    ctx = optional_client_cert_context(pki.server_context(), str(pki.paths.ca))
    async with StandinAPIServer("A", ssl_context=ctx, extra_routes=store.routes()) as server:
        yield server, store


async def test_a_rotated_client_certificate_is_used_for_the_next_request(
    pki: TestPKI, cluster: tuple[StandinAPIServer, SliceStore], tmp_path: Path
) -> None:
    server, store = cluster
    cert = write_node_cert(pki, tmp_path, "system:node:old")
    user = {"client-certificate": str(cert), "client-key": str(cert)}
    kc = write_kubeconfig(pki, tmp_path / "kubelet.conf", "https://ignored", user)
    creds = load_credentials(KubernetesDiscoveryConfig(enabled=True, kubeconfig=str(kc)))
    assert str(cert) in creds.files
    watcher = SliceWatcher(HostPort("127.0.0.1", server.port), creds, lambda _s: None, 0.05)
    async for _ in run_watcher(watcher):
        await eventually(lambda: any(s.watch for s in store.seen), message="watching")
        write_node_cert(pki, tmp_path, NODE_CN)
        assert creds.changed_on_disk()
        store.end_watches()  # the next watch request must present the new certificate
        await eventually(lambda: store.seen[-1].client_cn == NODE_CN, message="new cert used")
    assert watcher.credentials is not creds
    # The cut watch may count as an error; the credentials never were one.
    assert watcher.stats.errors["unauthorized"] == watcher.stats.errors["tls"] == 0


async def test_rejected_requests_are_counted_and_a_fixed_token_file_recovers(
    pki: TestPKI, tmp_path: Path
) -> None:
    store = SliceStore(token=TOKEN)
    store.put("kubernetes", ["10.0.0.1"], 6443)
    token = tmp_path / "token"
    token.write_text("an-old-token\n")
    kc = KubernetesDiscoveryConfig(enabled=True, token_file=str(token), ca_file=str(pki.paths.ca))
    found: list[set[HostPort]] = []
    async with StandinAPIServer(
        "A", ssl_context=pki.server_context(), extra_routes=store.routes()
    ) as server:
        watcher = SliceWatcher(
            HostPort("127.0.0.1", server.port), load_credentials(kc), found.append, 0.05
        )
        async for _ in run_watcher(watcher):
            await eventually(lambda: watcher.stats.errors["unauthorized"] >= 1, message="401")
            assert watcher.stats.last_success is None
            token.write_text(TOKEN + "\n")
            await eventually(lambda: found == [{HostPort("10.0.0.1", 6443)}], timeout=10)
    assert watcher.stats.last_success is not None


async def test_a_reload_with_new_credentials_restarts_the_watch(
    pki: TestPKI, tmp_path: Path
) -> None:
    """Same discovery settings, other credentials on disk: the watcher is replaced."""
    token = tmp_path / "token"
    token.write_text("one\n")
    kc = KubernetesDiscoveryConfig(enabled=True, token_file=str(token), ca_file=str(pki.paths.ca))
    dc = DiscoveryConfig(kubernetes=kc, cache_file=None)
    target = HostPort("127.0.0.1", 7445)
    membership = Membership(Pool(1, 2), lambda: None, lambda _address: None)
    membership.configure((), dc, load_credentials(kc), target)
    first = membership.watcher
    membership.configure((), dc, load_credentials(kc), target)  # nothing changed
    assert membership.watcher is first
    token.write_text("two\n")
    membership.configure((), dc, load_credentials(kc), target)
    assert membership.watcher is not first and membership.watcher is not None
    assert membership.watcher.stats is membership.discovery_stats  # counters carry over
    await membership.stop()
