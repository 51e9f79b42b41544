"""Endpoint sources merged into one desired set for upstream.Pool.reconcile().

A configured upstream given as an IP is one endpoint; one given as a name
becomes one endpoint per A/AAAA address, re-resolved periodically. A failed
or empty resolution keeps the last known addresses: DNS trouble must not take
a working API server away. Discovered endpoints (Kubernetes EndpointSlices,
or the on-disk cache of them until the first list) pass through the CIDR
filters and are added to the seeds; seeds themselves are never filtered or
dropped, so in the worst case kubeprism behaves like the seeds alone.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from pathlib import Path

from kubeprism.atomic import write_atomically
from kubeprism.config import UpstreamSpec
from kubeprism.net import HostPort
from kubeprism.upstream import EndpointSpec, specs_from

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
SOURCE_STATIC = "static"
SOURCE_KUBERNETES = "kubernetes"
SOURCE_CACHE = "cache"
CACHE_VERSION = 1
# Cached endpoints are credentials-free facts, but still nobody else's business.
CACHE_MODE = 0o600


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


class EndpointFilter:
    """CIDR rules for discovered endpoints: `!` excludes; any include must match if present."""

    def __init__(self, rules: Iterable[str]) -> None:
        self.include: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.exclude: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for rule in rules:
            target = self.exclude if rule.startswith("!") else self.include
            target.append(ipaddress.ip_network(rule.removeprefix("!"), strict=False))

    def allows(self, address: HostPort) -> bool:
        """True when discovery may use this endpoint."""
        ip = ipaddress.ip_address(address.host)
        if any(ip in net for net in self.exclude):
            return False
        return not self.include or any(ip in net for net in self.include)


def merge(
    seeds: dict[HostPort, EndpointSpec],
    discovered: Collection[HostPort],
    source: str,
    allowed: EndpointFilter,
    priority: int,
) -> dict[HostPort, EndpointSpec]:
    """Seeds plus the discovered endpoints the filter allows."""
    entries = [(a, spec.priority, src) for a, spec in seeds.items() for src in spec.sources]
    entries += [(a, priority, source) for a in discovered if allowed.allows(a)]
    return specs_from(entries)


def load_cache(path: str) -> list[HostPort]:
    """Endpoints saved by a previous run; a missing or broken file is only a warning."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("version") != CACHE_VERSION:
            raise ValueError(f"unknown version {data.get('version')!r}")
        endpoints = [_cached_endpoint(e) for e in data["endpoints"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning("ignoring endpoint cache %s: %s", path, exc)
        return []
    logger.info("loaded %d endpoint(s) from cache %s", len(endpoints), path)
    return endpoints


def _cached_endpoint(entry: object) -> HostPort:
    if not isinstance(entry, dict):
        raise ValueError(f"bad entry {entry!r}")
    ip = str(ipaddress.ip_address(entry["host"]))
    port = entry["port"]
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"bad port in {entry!r}")
    return HostPort(ip, port)


def save_cache(path: str, endpoints: Iterable[HostPort]) -> None:
    """Write atomically: temp file in the same directory, fsync, rename, fsync the directory.

    A crash at any point leaves either the old file or the new one, never half
    of one (a stale or torn cache has stranded nodes with other balancers).
    """
    target = Path(path)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    body = {
        "version": CACHE_VERSION,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "endpoints": [{"host": a.host, "port": a.port} for a in sorted(endpoints)],
    }
    write_atomically(target, json.dumps(body, indent=1) + "\n", CACHE_MODE)
