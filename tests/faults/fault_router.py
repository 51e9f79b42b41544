"""A fourth API server behind a router namespace, for faults that only a router can make.

    kp-fnode-*  10.250.0.10 --- switch (br0) --- kp-frt-* up0 10.250.0.14
                                                   kp-frt-* down0 10.251.0.1
                                                        |
                                                 kp-fcp4-* veth0 10.251.0.11  (stand-in)

The node reaches 10.251.0.0/24 through the router (a route added in the node namespace
and removed on exit). Segmentation and receive offloads are off on every link of the
path behind the switch, so the packets the router forwards are the real ones a server
sends on a 1500-byte link, not 64 KiB GSO aggregates.
"""

from __future__ import annotations

import subprocess
from types import TracebackType

from netns import NetNS

from faults.fault_topology import API_PORT, PREFIX_LEN, Topology, run_ip

ROUTER_UP = "10.250.0.14"
ROUTER_DOWN = "10.251.0.1"
SERVER_IP = "10.251.0.11"
SERVER_NET = "10.251.0.0/24"
OFFLOADS = ("tso", "off", "gso", "off", "gro", "off")


class RoutedServer:
    """The router and the namespace behind it; everything is deleted on exit."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.router = NetNS("frt")
        self.server = NetNS("fcp4")
        self._route = ["route", "add", SERVER_NET, "via", ROUTER_UP]

    @property
    def api(self) -> str:
        """host:port of the API server behind the router."""
        return f"{SERVER_IP}:{API_PORT}"

    def __enter__(self) -> RoutedServer:
        self.router.__enter__()
        try:
            self.server.__enter__()
            self._wire()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wire(self) -> None:
        sw, rt, srv = self.topo.switch.name, self.router.name, self.server.name
        veth = ("type", "veth", "peer", "name")
        run_ip("-n", sw, "link", "add", "router", *veth, "up0", "netns", rt)
        run_ip("-n", sw, "link", "set", "router", "master", "br0", "up")
        run_ip("-n", rt, "link", "add", "down0", *veth, "veth0", "netns", srv)
        for ns, dev, address in (
            (rt, "up0", f"{ROUTER_UP}/{PREFIX_LEN}"),
            (rt, "down0", f"{ROUTER_DOWN}/24"),
            (srv, "veth0", f"{SERVER_IP}/24"),
        ):
            run_ip("-n", ns, "addr", "add", address, "dev", dev)
            run_ip("-n", ns, "link", "set", dev, "up")
        run_ip("-n", srv, "route", "add", "default", "via", ROUTER_DOWN)
        self._forget_router()  # a router of an earlier test had another MAC address
        run_ip("-n", self.topo.node.ns.name, *self._route)
        self.router.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        for member, dev in ((self.router, "up0"), (self.router, "down0"), (self.server, "veth0")):
            member.run(["ethtool", "-K", dev, *OFFLOADS])
        self.topo.switch.run(["ethtool", "-K", "router", *OFFLOADS])

    def _forget_router(self) -> None:
        subprocess.run(
            ["ip", "-n", self.topo.node.ns.name, "neigh", "flush", "to", ROUTER_UP],
            capture_output=True,
            check=False,
        )

    def drop_large_towards_node(self, size: int) -> None:
        """Silently drop every packet of ``size`` bytes or more on its way to the node
        (no ICMP): a path-MTU black hole."""
        rule = ["FORWARD", "-o", "up0", "-m", "length", "--length", f"{size}:65535", "-j", "DROP"]
        self.router.iptables("-I", *rule)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        subprocess.run(
            ["ip", "-n", self.topo.node.ns.name, "route", "del", SERVER_NET],
            capture_output=True,
            check=False,
        )
        self._forget_router()
        for ns in (self.server, self.router):
            ns.delete()
