"""Typed, frozen configuration and its YAML loader.

Every value is validated here so that the rest of the daemon can trust its
config; every error names the key path (``healthCheck.timeout``) and the bad
value, because the person reading it is editing a YAML file on a node. Each
key is declared once, in the field table below (fields.option): that
declaration drives parsing, the default, check-config's rendering and errors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kubeprism.base.net import HostPort
from kubeprism.config.fields import Section, option, read, render, section
from kubeprism.config.safeyaml import file_named_by, read_document, yaml_error_text
from kubeprism.config.values import (
    BOOL,
    CIDR_FILTERS,
    DURATION,
    HOST_PORT,
    LISTEN_LIST,
    OPTIONAL_LISTEN,
    OPTIONAL_PATH,
    POSITIVE_DURATION,
    READABLE_FILE,
    STR,
    URL_PATH,
    ConfigError,
    Kind,
    choice,
    int_in,
    is_loopback,
    parse_duration,
    parse_host_port,
)

__all__ = [
    "DEFAULT_ADMIN_LISTEN",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_LISTEN",
    "DEFAULT_PRIORITY",
    "AdminConfig",
    "Config",
    "ConfigError",
    "DiscoveryConfig",
    "HealthCheckConfig",
    "KeepaliveConfig",
    "KubernetesDiscoveryConfig",
    "UpstreamSpec",
    "config_from_dict",
    "config_to_dict",
    "file_named_by",
    "is_loopback",
    "load_config",
    "parse_duration",
    "parse_host_port",
    "yaml_error_text",
]

DEFAULT_CONFIG_PATH = "/etc/kubeprism/kubeprism.yaml"

# Loopback on both families: clients resolving "localhost" to ::1 first must work too.
DEFAULT_LISTEN = ("127.0.0.1:7445", "[::1]:7445")
DEFAULT_ADMIN_LISTEN = "127.0.0.1:7446"
# /readyz (not /healthz) because it turns 500 when etcd breaks behind a live apiserver;
# ?verbose because its ~1.6 KB answer needs a full-size segment, so a path that drops
# those (an MTU black hole) fails the check instead of passing it.
DEFAULT_HEALTH_PATH = "/readyz?verbose"
# A SAN every kube-apiserver certificate carries, so probes of IP endpoints verify.
DEFAULT_SERVER_NAME = "kubernetes"
# Readiness every 5 s on a kept-alive connection: <= 0.2 requests/s per node per API
# server (the fleet's cost budget). Speed comes from the fast pace below, taken on any
# sign of trouble, and from the kernel's liveness checks on the health connection.
DEFAULT_INTERVAL = 5.0
# While something is changing (a sign, a failure, a recovery), check this often: a
# broken server is out ~one timeout + fastInterval after the first sign.
DEFAULT_FAST_INTERVAL = 0.25
# Checks of a server that is down back off from fastInterval up to this: a server that
# returns is used again within ~1 s; refused connects cost its host nothing.
DEFAULT_UNHEALTHY_INTERVAL = 1.0
DEFAULT_TIMEOUT = 0.8
# An unset timeout is at most this share of the interval (a short interval just works).
TIMEOUT_SHARE = 0.8
# Keepalive probes every second on the idle health connection and TCP_USER_TIMEOUT 2 s:
# a silent path kills it 1-2 s after the last answer, at no API-server process cost.
DEFAULT_LIVENESS_TIMEOUT = 2.0
# A forwarded connection whose client sent a request that got no byte back for this long
# is a passive sign (an MTU black hole, a hung server): check its server at once. Measured
# in the fault suite's MTU scenario: at 1 s the black hole was out after 2.5-2.7 s (too
# close to the 3 s target); 500 ms leaves room. A false alarm (a slow LIST) costs one check
# on the kept-alive connection, far less than the slow request that caused it.
DEFAULT_STALL_TIMEOUT = 0.5
DEFAULT_HEALTHY_THRESHOLD = 1
DEFAULT_UNHEALTHY_THRESHOLD = 2
# One lost SYN is retransmitted after 1 s; failing over to the next endpoint then is
# faster than waiting for the retransmit to an endpoint that may be gone.
DEFAULT_DIAL_TIMEOUT = 1.0
# Keepalive on the upstream leg notices a silent peer on receive-only watch streams
# (TCP_USER_TIMEOUT alone only counts while data is unacknowledged).
DEFAULT_KEEPALIVE_IDLE = 5.0
DEFAULT_KEEPALIVE_INTERVAL = 2.0
DEFAULT_KEEPALIVE_COUNT = 3
DEFAULT_TCP_USER_TIMEOUT = 10.0
# Watches live for hours: no idle timeout unless the user asks for one.
DEFAULT_IDLE_TIMEOUT = 0.0
# Long watches never finish on their own; a short drain lets in-flight requests end.
DEFAULT_DRAIN_TIMEOUT = 5.0
# Two fds per connection; stays below common LimitNOFILE settings with headroom.
DEFAULT_MAX_CONNECTIONS = 10000
DEFAULT_DNS_REFRESH = 30.0
# The apiserver adds and removes itself from the kubernetes EndpointSlice quickly
# while it restarts; wait for this much quiet before applying a change (k3s: 3 s).
DEFAULT_DEBOUNCE = 3.0
# Connections of an endpoint that discovery removed get this long to finish.
DEFAULT_REMOVAL_GRACE = 10.0
DEFAULT_CACHE_FILE = "/var/lib/kubeprism/endpoints.json"
# Plain-string upstreams sit in the middle so entries can be made better or worse.
DEFAULT_PRIORITY = 100
# Discovered endpoints kept at most: a real control plane has a handful of API servers,
# and each endpoint costs a probe per interval on every node.
DEFAULT_MAX_DISCOVERED = 64

HealthType = Literal["https", "tcp"]
Forwarding = Literal["splice", "copy"]
KeyPath = Callable[[str], str]  # a field name -> its full key path, for errors


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """One configured upstream: an address and its priority (lower is preferred)."""

    address: HostPort = option("address", HOST_PORT, HostPort("", 0))
    priority: int = option("priority", int_in(0, 1_000_000), DEFAULT_PRIORITY)


def _default_timeout(read_so_far: Mapping[str, Any]) -> float:
    # Unset values follow a shorter interval, so setting only the interval just works.
    interval: float = read_so_far["interval"]
    return min(DEFAULT_TIMEOUT, interval * TIMEOUT_SHARE)


def _default_fast(read_so_far: Mapping[str, Any]) -> float:
    interval: float = read_so_far["interval"]
    return min(DEFAULT_FAST_INTERVAL, interval)


def _default_unhealthy(read_so_far: Mapping[str, Any]) -> float:
    fast: float = read_so_far["fast_interval"]
    interval: float = read_so_far["interval"]
    return max(fast, min(DEFAULT_UNHEALTHY_INTERVAL, interval))


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """Active health check settings."""

    type: HealthType = option("type", choice("https", "tcp"), "https")
    path: str = option("path", URL_PATH, DEFAULT_HEALTH_PATH)
    interval: float = option("interval", POSITIVE_DURATION, DEFAULT_INTERVAL)
    timeout: float = option(
        "timeout", POSITIVE_DURATION, DEFAULT_TIMEOUT, default_from=_default_timeout
    )
    ca_file: str | None = option("caFile", READABLE_FILE, None)
    server_name: str = option("serverName", STR, DEFAULT_SERVER_NAME)
    client_cert_file: str | None = option("clientCertFile", READABLE_FILE, None)
    client_key_file: str | None = option("clientKeyFile", READABLE_FILE, None)
    healthy_threshold: int = option("healthyThreshold", int_in(1, 100), DEFAULT_HEALTHY_THRESHOLD)
    unhealthy_threshold: int = option(
        "unhealthyThreshold", int_in(1, 100), DEFAULT_UNHEALTHY_THRESHOLD
    )
    keep_alive: bool = option("keepAlive", BOOL, True)
    fast_interval: float = option(
        "fastInterval", POSITIVE_DURATION, DEFAULT_FAST_INTERVAL, default_from=_default_fast
    )
    unhealthy_interval: float = option(
        "unhealthyInterval",
        POSITIVE_DURATION,
        DEFAULT_UNHEALTHY_INTERVAL,
        default_from=_default_unhealthy,
    )
    liveness_timeout: float = option("livenessTimeout", POSITIVE_DURATION, DEFAULT_LIVENESS_TIMEOUT)
    stall_timeout: float = option("stallTimeout", DURATION, DEFAULT_STALL_TIMEOUT)

    def check(self, key: KeyPath) -> None:
        """Rules across keys."""
        if self.timeout >= self.interval:
            raise ConfigError(
                key("timeout"),
                f"{self.timeout:g}s must be shorter than healthCheck.interval "
                f"({self.interval:g}s), or probes would overlap",
            )
        self._check_paces(key)
        if (self.client_cert_file is None) != (self.client_key_file is None):
            missing = "clientKeyFile" if self.client_key_file is None else "clientCertFile"
            raise ConfigError(key(missing), "clientCertFile and clientKeyFile go together")

    def _check_paces(self, key: KeyPath) -> None:
        if self.fast_interval > self.interval:
            raise ConfigError(
                key("fastInterval"),
                f"{self.fast_interval:g}s must not be longer than healthCheck.interval "
                f"({self.interval:g}s): it is the pace used while something looks wrong",
            )
        if self.unhealthy_interval < self.fast_interval:
            raise ConfigError(
                key("unhealthyInterval"),
                f"{self.unhealthy_interval:g}s must not be shorter than "
                f"healthCheck.fastInterval ({self.fast_interval:g}s): checks of a down "
                "server back off from one to the other",
            )


@dataclass(frozen=True, slots=True)
class KeepaliveConfig:
    """TCP keepalive on the upstream leg."""

    idle: float = option("idle", POSITIVE_DURATION, DEFAULT_KEEPALIVE_IDLE)
    interval: float = option("interval", POSITIVE_DURATION, DEFAULT_KEEPALIVE_INTERVAL)
    count: int = option("count", int_in(1, 127), DEFAULT_KEEPALIVE_COUNT)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin/metrics HTTP endpoint; ``listen`` None disables it."""

    listen: HostPort | None = option(
        "listen", OPTIONAL_LISTEN, parse_host_port("admin.listen", DEFAULT_ADMIN_LISTEN)
    )


@dataclass(frozen=True, slots=True)
class KubernetesDiscoveryConfig:
    """Watch the `kubernetes` EndpointSlices through kubeprism's own listener."""

    enabled: bool = option("enabled", BOOL, False)
    kubeconfig: str | None = option("kubeconfig", READABLE_FILE, None)
    token_file: str | None = option("tokenFile", READABLE_FILE, None)
    ca_file: str | None = option("caFile", READABLE_FILE, None)
    server_name: str = option("serverName", STR, DEFAULT_SERVER_NAME)
    debounce: float = option("debounce", DURATION, DEFAULT_DEBOUNCE)

    def check(self, key: KeyPath) -> None:
        """Rules across keys."""
        if self.enabled and self.kubeconfig is None and self.token_file is None:
            raise ConfigError(
                key("kubeconfig"),
                "discovery.kubernetes is enabled but has no credentials: set kubeconfig "
                "(e.g. /etc/kubernetes/kubelet.conf) or tokenFile + caFile",
            )
        if self.kubeconfig is not None and self.token_file is not None:
            raise ConfigError(key("tokenFile"), "set either kubeconfig or tokenFile, not both")


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """Endpoint discovery settings."""

    dns_refresh: float = option("dnsRefresh", POSITIVE_DURATION, DEFAULT_DNS_REFRESH)
    kubernetes: KubernetesDiscoveryConfig = section("kubernetes", KubernetesDiscoveryConfig)
    cache_file: str | None = option("cacheFile", OPTIONAL_PATH, DEFAULT_CACHE_FILE)
    filters: tuple[str, ...] = option("filters", CIDR_FILTERS, ())
    removal_grace: float = option("removalGrace", DURATION, DEFAULT_REMOVAL_GRACE)
    max_endpoints: int = option("maxEndpoints", int_in(1, 10_000), DEFAULT_MAX_DISCOVERED)


def _upstream(key: str, value: object) -> UpstreamSpec:
    if isinstance(value, str):
        return UpstreamSpec(parse_host_port(key, value))
    entry = Section(key, value)
    if entry.data.get("address") is None:
        raise ConfigError(
            key, "an upstream entry needs an 'address' (or write it as a plain string)"
        )
    return read(UpstreamSpec, entry)


def _upstreams(key: str, value: object) -> tuple[UpstreamSpec, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(key, f'expected a non-empty list of "host:port" entries, got {value!r}')
    specs = tuple(_upstream(f"{key}[{i}]", item) for i, item in enumerate(value))
    seen: set[HostPort] = set()
    for i, spec in enumerate(specs):
        if spec.address in seen:
            raise ConfigError(f"{key}[{i}]", f"duplicate upstream {spec.address}")
        seen.add(spec.address)
    return specs


UPSTREAMS = Kind(_upstreams, lambda specs: [render(s) for s in specs])
_EXAMPLE_UPSTREAMS = 'list the API servers, e.g. ["10.0.0.10:6443"]'


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated daemon configuration."""

    upstreams: tuple[UpstreamSpec, ...] = option(
        "upstreams", UPSTREAMS, (), required=_EXAMPLE_UPSTREAMS
    )
    listen: tuple[HostPort, ...] = option(
        "listen", LISTEN_LIST, tuple(parse_host_port("listen", a) for a in DEFAULT_LISTEN)
    )
    allow_non_loopback: bool = option("allowNonLoopback", BOOL, False)
    health_check: HealthCheckConfig = section("healthCheck", HealthCheckConfig)
    dial_timeout: float = option("dialTimeout", POSITIVE_DURATION, DEFAULT_DIAL_TIMEOUT)
    forwarding: Forwarding = option("forwarding", choice("splice", "copy"), "splice")
    tcp_keepalive: KeepaliveConfig = section("tcpKeepalive", KeepaliveConfig)
    tcp_user_timeout: float = option("tcpUserTimeout", POSITIVE_DURATION, DEFAULT_TCP_USER_TIMEOUT)
    idle_timeout: float = option("idleTimeout", DURATION, DEFAULT_IDLE_TIMEOUT)
    drain_timeout: float = option("drainTimeout", DURATION, DEFAULT_DRAIN_TIMEOUT)
    max_connections: int = option("maxConnections", int_in(1, 1_000_000), DEFAULT_MAX_CONNECTIONS)
    close_connections_on_unhealthy: bool = option("closeConnectionsOnUnhealthy", BOOL, True)
    admin: AdminConfig = section("admin", AdminConfig)
    discovery: DiscoveryConfig = section("discovery", DiscoveryConfig)
    log_level: str | None = option("logLevel", choice("debug", "info", "warning", "error"), None)

    def check(self, key: KeyPath) -> None:
        """Rules across keys: loopback only unless told otherwise, and no upstream that is
        kubeprism itself."""
        self._check_loopback(key)
        own = {*self.listen, *([self.admin.listen] if self.admin.listen else [])}
        for i, spec in enumerate(self.upstreams):
            if spec.address in own:
                raise ConfigError(
                    f"{key('upstreams')}[{i}]",
                    f"{spec.address} is kubeprism's own listen address: every connection "
                    "would loop back into kubeprism",
                )

    def _check_loopback(self, key: KeyPath) -> None:
        if self.allow_non_loopback:
            return
        for i, addr in enumerate(self.listen):
            if not is_loopback(addr):
                raise ConfigError(
                    f"{key('listen')}[{i}]",
                    f"{addr} is not a loopback address; a node-local balancer should not be "
                    "reachable from the network (set allowNonLoopback: true to accept it)",
                )
        if self.admin.listen is not None and not is_loopback(self.admin.listen):
            raise ConfigError(
                key("admin") + ".listen",
                f"{self.admin.listen} is not a loopback address "
                "(set allowNonLoopback: true to accept it)",
            )


def config_from_dict(data: object) -> Config:
    """Build a validated Config from parsed YAML."""
    return read(Config, Section("", data))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The effective config in the file's own vocabulary (for check-config)."""
    return render(cfg)


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    return config_from_dict(read_document(path))
