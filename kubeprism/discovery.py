"""Endpoint sources merged into one desired set for upstream.Pool.reconcile().

A configured upstream given as an IP is one endpoint; one given as a name
becomes one endpoint per A/AAAA address, re-resolved periodically. A failed
or empty resolution keeps the last known addresses: DNS trouble must not take
a working API server away.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable

from kubeprism.config import HostPort, UpstreamSpec
from kubeprism.upstream import EndpointSpec, specs_from

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
SOURCE_STATIC = "static"


async def system_resolve(host: str, port: int) -> list[str]:
    """All A/AAAA addresses of ``host`` from the system resolver (hosts file, DNS)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(ipaddress.ip_address(info[4][0])) for info in infos})


class StaticDiscovery:
    """The configured upstreams, with names expanded to their current addresses."""

    def __init__(self, upstreams: Iterable[UpstreamSpec], resolver: Resolver = system_resolve):
        self.upstreams = tuple(upstreams)
        self._resolver = resolver
        self._known: dict[HostPort, list[str]] = {}

    async def resolve(self) -> dict[HostPort, EndpointSpec]:
        """Resolve every name now (concurrently) and return the merged endpoint set."""
        names = [u.address for u in self.upstreams if not u.address.is_ip]
        results = await asyncio.gather(*(self._resolve_one(a) for a in names))
        for address, ips in zip(names, results, strict=True):
            if ips:
                self._known[address] = ips
        return specs_from(self._entries())

    async def _resolve_one(self, address: HostPort) -> list[str]:
        try:
            ips = await self._resolver(address.host, address.port)
        except (OSError, UnicodeError) as exc:
            if address in self._known:
                logger.warning(
                    "cannot resolve %s (%s); keeping %s", address.host, exc, self._known[address]
                )
            else:
                logger.warning("cannot resolve %s (%s); no address known yet", address.host, exc)
            return []
        if ips != self._known.get(address):
            logger.info("%s resolves to %s", address.host, ", ".join(ips) or "nothing")
        return ips

    def _entries(self) -> Iterable[tuple[HostPort, int, str]]:
        for spec in self.upstreams:
            if spec.address.is_ip:
                yield spec.address, spec.priority, SOURCE_STATIC
                continue
            for ip in self._known.get(spec.address, ()):
                yield HostPort(ip, spec.address.port), spec.priority, f"dns:{spec.address.host}"
