"""A small multi-host network in namespaces: one node, three control planes, one switch.

    kp-fnode-* (10.250.0.10)  kubeprism + clients          kp-fsw-*: bridge br0
    kp-fcp1-*  (10.250.0.11)  stand-in API server "cp1"     + one veth port per member
    kp-fcp2-*  (10.250.0.12)  stand-in API server "cp2"
    kp-fcp3-*  (10.250.0.13)  stand-in API server "cp3"

The bridge lives in its own "switch" namespace and every veth is created there with its
peer moved straight into the member's namespace, so nothing is ever added to the root
namespace and the 10.250.0.0/24 addresses exist only inside these namespaces. Deleting
the namespaces deletes everything (a veth dies with either end); leftovers of a killed run
are removed by `netns.remove_stale_namespaces()` (the names embed the owning pid).

Faults are applied inside a member's namespace (iptables) or on its switch port (ip link),
never on the host. Latency would be `tc qdisc ... netem`, but kernels built without
CONFIG_NET_SCH_NETEM (this CI's) refuse it; fault_servers.py relays with a delay instead.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from types import TracebackType

from netns import NetNS

SUBNET = "10.250.0"
PREFIX_LEN = 24
NODE_IP = f"{SUBNET}.10"
CP_IPS = {"cp1": f"{SUBNET}.11", "cp2": f"{SUBNET}.12", "cp3": f"{SUBNET}.13"}
# An address in the subnet that no namespace owns: dials to it get no answer at all.
UNUSED_IP = f"{SUBNET}.20"
API_PORT = 6443
IFACE = "veth0"  # the member's end; the switch end is named after the member


@dataclass
class Member:
    """One host of the topology: its namespace, address and switch port."""

    name: str
    ns: NetNS
    ip: str
    port: str  # interface name of its veth end inside the switch namespace

    @property
    def api(self) -> str:
        """host:port of the API server address on this member."""
        return f"{self.ip}:{API_PORT}"


class Topology:
    """Creates the namespaces, the bridge and the links; deletes them all on exit."""

    def __init__(self) -> None:
        self.switch = NetNS("fsw")
        self.node = Member("node", NetNS("fnode"), NODE_IP, "node")
        self.cps = {name: Member(name, NetNS(f"f{name}"), ip, name) for name, ip in CP_IPS.items()}
        self._entered: list[NetNS] = []

    @property
    def members(self) -> list[Member]:
        """Node first, then the control planes."""
        return [self.node, *self.cps.values()]

    def __enter__(self) -> Topology:
        try:
            for ns in (self.switch, *(m.ns for m in self.members)):
                ns.__enter__()
                self._entered.append(ns)
            run_ip("-n", self.switch.name, "link", "add", "br0", "type", "bridge")
            run_ip("-n", self.switch.name, "link", "set", "br0", "up")
            for member in self.members:
                self._attach(member)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process started in the namespaces and delete them (idempotent)."""
        errors: list[BaseException] = []
        for ns in reversed(self._entered):
            try:
                ns.delete()
            except Exception as exc:  # keep deleting the others
                errors.append(exc)
        self._entered.clear()
        if errors:
            raise errors[0]

    def _attach(self, member: Member) -> None:
        sw = self.switch.name
        # Created in the switch namespace with the peer placed straight into the member's.
        peer = ["peer", "name", IFACE, "netns", member.ns.name]
        run_ip("-n", sw, "link", "add", member.port, "type", "veth", *peer)
        run_ip("-n", sw, "link", "set", member.port, "master", "br0", "up")
        run_ip("-n", member.ns.name, "addr", "add", f"{member.ip}/{PREFIX_LEN}", "dev", IFACE)
        run_ip("-n", member.ns.name, "link", "set", IFACE, "up")

    # ------------------------------------------------------------ faults

    def partition(self, member: Member) -> None:
        """Drop every packet to and from the member's link (no RST, no ICMP; ARP still works)."""
        for rule in _partition_rules():
            member.ns.iptables("-I", *rule)

    def heal(self, member: Member) -> None:
        """Undo partition()."""
        for rule in _partition_rules():
            member.ns.iptables("-D", *rule)

    def port_down(self, member: Member) -> None:
        """Take the member's switch port down: the link goes dark, frames vanish."""
        run_ip("-n", self.switch.name, "link", "set", member.port, "down")

    def port_up(self, member: Member) -> None:
        """Bring the member's switch port back."""
        run_ip("-n", self.switch.name, "link", "set", member.port, "up")

    def reset(self) -> None:
        """Back to a fault-free network between tests: flush iptables, every port up."""
        for member in self.members:
            member.ns.iptables("-F")
            self.port_up(member)


def _partition_rules() -> list[list[str]]:
    return [["INPUT", "-i", IFACE, "-j", "DROP"], ["OUTPUT", "-o", IFACE, "-j", "DROP"]]


def run_ip(*args: str) -> None:
    """`ip ARGS`; RuntimeError with its stderr if it fails."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
