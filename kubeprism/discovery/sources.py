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
import functools
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from kubeprism.base.atomic import read_limited, write_atomically
from kubeprism.base.net import HostPort, ip_or_none, is_loopback_host
from kubeprism.config import UpstreamSpec
from kubeprism.core.endpoint import EndpointSpec
from kubeprism.core.upstream import specs_from

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
SOURCE_STATIC = "static"
SOURCE_KUBERNETES = "kubernetes"
SOURCE_CACHE = "cache"
CACHE_VERSION = 1
# Cached endpoints are credentials-free facts, but still nobody else's business.
CACHE_MODE = 0o600
# 64 endpoints take ~4 KiB; anything near this is not a file kubeprism wrote.
MAX_CACHE_BYTES = 1 << 20
# The longest IPv6 text form is 45 characters; longer is not an address.
MAX_ADDRESS_TEXT = 64


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
    """What discovered and cached endpoints may be: the CIDR rules and the fixed refusals.

    `!` rules exclude; when any include rule is present one must match. Whatever the
    rules say, addresses nobody should dial for a node's API traffic are refused: the
    unspecified, multicast, broadcast/reserved and link-local ones (the cloud metadata
    service), kubeprism's own listeners, and loopback unless an include rule names a
    loopback range.
    """

    def __init__(self, rules: Iterable[str], own: Iterable[HostPort] = ()) -> None:
        self.include: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.exclude: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for rule in rules:
            target = self.exclude if rule.startswith("!") else self.include
            target.append(ipaddress.ip_network(rule.removeprefix("!"), strict=False))
        self.own = frozenset(own)
        self._own_ports = {a.port for a in self.own if _is_unspecified(a.host)}
        self._loopback_rules = [n for n in self.include if _is_loopback_net(n)]

    def allows(self, address: HostPort) -> bool:
        """True when discovery may use this endpoint."""
        return self.refusal(address) is None

    def refusal(self, address: HostPort) -> str | None:
        """Why discovery may not use this endpoint, or None when it may."""
        ip = _ip(address.host)
        if ip is None:
            return "not an IP address"
        if self.is_own(address):
            return "kubeprism's own listen address"
        fixed = _fixed_refusal(ip)
        if fixed is not None:
            return fixed
        for net in self.exclude:
            if ip in net:
                return f"excluded by filter !{net}"
        if ip.is_loopback and not any(ip in net for net in self._loopback_rules):
            return "loopback (allow it with an include filter such as 127.0.0.0/8)"
        if self.include and not any(ip in net for net in self.include):
            return "outside every include filter"
        return None

    def is_own(self, address: HostPort) -> bool:
        """True for one of kubeprism's own listen addresses (a loop through ourselves)."""
        if address in self.own:
            return True
        # A wildcard listener is reachable on every local address; loopback is the sure case.
        return address.port in self._own_ports and is_loopback_host(address.host)


# Cached: a list is parsed, then screened, again on every change (~20 us each).
_ip = functools.lru_cache(maxsize=4096)(ip_or_none)


def _fixed_refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if ip.is_unspecified:
        return "unspecified address"
    if ip.is_multicast:
        return "multicast address"
    if ip.version == 4 and ip.is_reserved:  # 240.0.0.0/4, with the broadcast address
        return "broadcast or reserved address"
    if ip.is_link_local:
        return "link-local address (e.g. the cloud metadata service)"
    return None


def _is_unspecified(host: str) -> bool:
    ip = _ip(host)
    return ip is not None and ip.is_unspecified


def _is_loopback_net(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    return net.network_address.is_loopback and net.broadcast_address.is_loopback


def parse_endpoint(host: object, port: object) -> HostPort:
    """A discovered or cached endpoint as data: an IP (IPv4-mapped IPv6 made IPv4) and a port.

    Raises ValueError naming what is wrong, quoting at most a few dozen characters of it.
    """
    if not isinstance(host, str) or len(host) > MAX_ADDRESS_TEXT:
        raise ValueError(f"bad address {host!r:.60}")
    ip = _ip(host)
    if ip is None:
        raise ValueError(f"not an IP address: {host!r}")
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            raise ValueError(f"scoped address {host!r}")
        ip = ip.ipv4_mapped or ip  # so that IPv4 filters apply to ::ffff:a.b.c.d too
    # bool is an int in Python: `true` from JSON must not become port 1.
    if type(port) is not int or not 1 <= port <= 65535:
        raise ValueError(f"bad port {port!r:.30} for {ip}")
    return HostPort(str(ip), port)


@dataclass(frozen=True)
class Screened:
    """Discovered endpoints after the filter and the cap."""

    accepted: list[HostPort]
    refused: dict[HostPort, str]  # endpoint -> why
    dropped: list[HostPort]  # over the cap (not examined)


def screen(candidates: Iterable[HostPort], allowed: EndpointFilter, cap: int) -> Screened:
    """Apply the filter, then keep at most ``cap`` endpoints (in address order, so every
    node keeps the same ones)."""
    refused: dict[HostPort, str] = {}
    ok: list[HostPort] = []
    ordered = sorted(set(candidates))
    for i, address in enumerate(ordered):
        if len(ok) == cap:  # the rest is not even examined: bounded work per change
            return Screened(ok, refused, ordered[i:])
        why = allowed.refusal(address)
        if why is None:
            ok.append(address)
        else:
            refused[address] = why
    return Screened(ok, refused, [])


def merge(
    seeds: dict[HostPort, EndpointSpec],
    discovered: Collection[HostPort],
    source: str,
    allowed: EndpointFilter,
    priority: int,
) -> dict[HostPort, EndpointSpec]:
    """Seeds (except kubeprism's own listeners) plus the discovered endpoints the filter allows."""
    entries = [
        (a, spec.priority, src)
        for a, spec in seeds.items()
        for src in spec.sources
        if not allowed.is_own(a)
    ]
    entries += [(a, priority, source) for a in discovered if allowed.allows(a)]
    return specs_from(entries)


def load_cache(path: str) -> list[HostPort]:
    """Endpoints saved by a previous run; a missing or broken file is only a warning."""
    try:
        data = json.loads(read_limited(path, MAX_CACHE_BYTES))
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            raise ValueError("not a version 1 endpoint cache")
        entries = data["endpoints"]
        if not isinstance(entries, list):
            raise ValueError("'endpoints' is not a list")
        endpoints = [_cached_endpoint(e) for e in entries]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        logger.warning("ignoring endpoint cache %s: %s", path, str(exc)[:200])
        return []
    logger.info("loaded %d endpoint(s) from cache %s", len(endpoints), path)
    return endpoints


def _cached_endpoint(entry: object) -> HostPort:
    if not isinstance(entry, dict):
        raise ValueError(f"bad entry {entry!r:.60}")
    return parse_endpoint(entry.get("host"), entry.get("port"))


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
