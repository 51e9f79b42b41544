"""A DNS-name upstream expands to every address and follows changes.

The name lives in a hosts file that `ip netns exec` bind-mounts over /etc/hosts
for processes in the test's own namespace (/etc/netns/NAME/hosts): the host's
resolver configuration is never touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from certs import TestPKI
from daemon_proc import DaemonProcess, base_config
from netns import NetNS, netns_unavailable_reason
from standin import StandinProcess, standin_argv
from util import free_port, wait_for

pytestmark = pytest.mark.netns
NAME = "apiserver.kubeprism.test"


@pytest.fixture
def ns_with_hosts() -> Iterator[tuple[NetNS, Path]]:
    reason = netns_unavailable_reason()
    assert reason is None, f"network namespace tests need root, ip and iptables: {reason}"
    with NetNS("dns") as ns:
        etc = Path("/etc/netns") / ns.name
        etc.mkdir(parents=True)
        hosts = etc / "hosts"
        hosts.write_text("127.0.0.1 localhost\n")
        try:
            yield ns, hosts
        finally:
            hosts.unlink()
            etc.rmdir()


def test_name_expands_to_every_address_and_is_re_resolved(
    ns_with_hosts: tuple[NetNS, Path], pki: TestPKI, tmp_path: Path
) -> None:
    ns, hosts = ns_with_hosts
    port = free_port()  # the same port on three loopback addresses inside the namespace
    servers = [
        StandinProcess(
            standin_argv(
                f"S{i}", pki.paths.server_cert, pki.paths.server_key, f"127.0.0.{i}", port
            ),
            popen=ns.popen,
        )
        for i in (1, 2, 3)
    ]
    for server in servers:
        server.__enter__()
    try:
        # In place (same inode), so the bind mount inside the namespace sees each change.
        hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {NAME}\n127.0.0.2 {NAME}\n")
        cfg = base_config(
            [f"{NAME}:{port}"],
            healthCheck={"caFile": str(pki.paths.ca)},
            discovery={"dnsRefresh": "500ms"},
        )
        with DaemonProcess(cfg, tmp_path, netns=ns) as daemon:
            ups = daemon.upstreams()
            assert {f"127.0.0.1:{port}", f"127.0.0.2:{port}"} <= set(ups)
            assert ups[f"127.0.0.1:{port}"]["sources"] == [f"dns:{NAME}"]
            daemon.wait_state(f"127.0.0.2:{port}", "healthy")
            with hosts.open("w") as f:
                f.write(f"127.0.0.1 localhost\n127.0.0.2 {NAME}\n127.0.0.3 {NAME}\n")
            wait_for(
                lambda: (
                    set(daemon.upstreams()) - {"_panic"}
                    == {f"127.0.0.2:{port}", f"127.0.0.3:{port}"}
                ),
                10,
                message="re-resolved to .2 and .3",
            )
            # A failed lookup (name gone) keeps the last known addresses.
            with hosts.open("w") as f:
                f.write("127.0.0.1 localhost\n")
            wait_for(lambda: "cannot resolve" in daemon.log(), 10, message="failure logged")
            assert set(daemon.upstreams()) - {"_panic"} == {
                f"127.0.0.2:{port}",
                f"127.0.0.3:{port}",
            }
    finally:
        for server in servers:
            server.stop()
