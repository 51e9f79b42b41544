"""Typed, frozen configuration and its YAML loader.

Every value is validated here so that the rest of the daemon can trust its
config; every error names the key path (``healthCheck.timeout``) and the bad
value, because the person reading it is editing a YAML file on a node.
"""

from __future__ import annotations

import contextlib
import decimal
import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from kubeprism.atomic import read_limited
from kubeprism.net import HostPort, ip_or_none

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
# Far more values than any real config holds, far fewer than a YAML alias bomb expands to:
# validating (and quoting in errors) such a document would hang the daemon, a running
# one too on SIGHUP.
MAX_DOCUMENT_VALUES = 100_000
# A real config is a few KiB; reading more (a wrong path, /dev/zero) only wastes time.
MAX_CONFIG_BYTES = 256 * 1024
# Discovered endpoints kept at most: a real control plane has a handful of API servers,
# and each endpoint costs a probe per interval on every node.
DEFAULT_MAX_DISCOVERED = 64

HealthType = Literal["https", "tcp"]
Forwarding = Literal["splice", "copy"]


class ConfigError(Exception):
    """A configuration problem at one key path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


@contextlib.contextmanager
def file_named_by(key: str, path: str | os.PathLike[str] | None) -> Iterator[None]:
    """Turn a failure to use a file the config names into a ConfigError naming key and file.

    ssl.SSLError is an OSError; ValueError covers undecodable text and bad base64.
    """
    try:
        yield
    except (OSError, ValueError, yaml.YAMLError) as exc:
        detail = (exc.strerror if isinstance(exc, OSError) else None) or exc
        if isinstance(exc, yaml.YAMLError):  # PyYAML quotes the line: it may be a secret
            detail = yaml_error_text(exc)
        raise ConfigError(key, f"cannot use {path}: {detail}") from exc


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """One configured upstream: an address and its priority (lower is preferred)."""

    address: HostPort
    priority: int = DEFAULT_PRIORITY


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """Active health check settings."""

    type: HealthType = "https"
    path: str = DEFAULT_HEALTH_PATH
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    ca_file: str | None = None
    server_name: str = DEFAULT_SERVER_NAME
    client_cert_file: str | None = None
    client_key_file: str | None = None
    healthy_threshold: int = DEFAULT_HEALTHY_THRESHOLD
    unhealthy_threshold: int = DEFAULT_UNHEALTHY_THRESHOLD
    keep_alive: bool = True
    fast_interval: float = DEFAULT_FAST_INTERVAL
    unhealthy_interval: float = DEFAULT_UNHEALTHY_INTERVAL
    liveness_timeout: float = DEFAULT_LIVENESS_TIMEOUT
    stall_timeout: float = DEFAULT_STALL_TIMEOUT


@dataclass(frozen=True, slots=True)
class KeepaliveConfig:
    """TCP keepalive on the upstream leg."""

    idle: float = DEFAULT_KEEPALIVE_IDLE
    interval: float = DEFAULT_KEEPALIVE_INTERVAL
    count: int = DEFAULT_KEEPALIVE_COUNT


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin/metrics HTTP endpoint; ``listen`` None disables it."""

    listen: HostPort | None = None


@dataclass(frozen=True, slots=True)
class KubernetesDiscoveryConfig:
    """Watch the `kubernetes` EndpointSlices through kubeprism's own listener."""

    enabled: bool = False
    kubeconfig: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    server_name: str = DEFAULT_SERVER_NAME
    debounce: float = DEFAULT_DEBOUNCE


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """Endpoint discovery settings."""

    dns_refresh: float = DEFAULT_DNS_REFRESH
    kubernetes: KubernetesDiscoveryConfig = field(default_factory=KubernetesDiscoveryConfig)
    cache_file: str | None = DEFAULT_CACHE_FILE
    filters: tuple[str, ...] = ()
    removal_grace: float = DEFAULT_REMOVAL_GRACE
    max_endpoints: int = DEFAULT_MAX_DISCOVERED


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated daemon configuration."""

    upstreams: tuple[UpstreamSpec, ...]
    listen: tuple[HostPort, ...] = ()
    allow_non_loopback: bool = False
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    dial_timeout: float = DEFAULT_DIAL_TIMEOUT
    forwarding: Forwarding = "splice"
    tcp_keepalive: KeepaliveConfig = field(default_factory=KeepaliveConfig)
    tcp_user_timeout: float = DEFAULT_TCP_USER_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    close_connections_on_unhealthy: bool = True
    admin: AdminConfig = field(default_factory=AdminConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    log_level: str | None = None


# ---------------------------------------------------------------- scalar parsers

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
# Decimal, not float, so "300ms" is exactly 0.3 and config_to_dict output parses back equal.
_DURATION_UNITS = {
    u: decimal.Decimal(v) for u, v in (("ms", "0.001"), ("s", 1), ("m", 60), ("h", 3600))
}
# No traps: an absurdly long number becomes Infinity and is rejected, not an ArithmeticError.
_DECIMAL = decimal.Context(prec=40, traps=[])
# At most 5 port digits: int() refuses strings over 4300 digits with a ValueError.
_HOSTPORT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]{1,5})$")
# One label, then dot-led labels: unambiguous, so no exponential backtracking on a bad name.
# Digits and dots only is a mistyped IP address (10.0.0.256), not a name.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$)(?![0-9.]+$){_LABEL}(?:\.{_LABEL})*\.?$")


def parse_duration(key: str, value: object) -> float:
    """Parse a Go-style duration ("500ms", "2s", "1m30s") into seconds."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ConfigError(
            key, f"expected a duration with a unit such as '500ms' or '2s', got {value!r}"
        )
    text = value.strip()
    pos, total = 0, decimal.Decimal(0)
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        part = _DECIMAL.multiply(decimal.Decimal(match.group(1)), _DURATION_UNITS[match.group(2)])
        total = _DECIMAL.add(total, part)
        pos = match.end()
    if pos != len(text) or not text:
        raise ConfigError(key, f"bad duration {value!r}: use a number and a unit (ms, s, m, h)")
    seconds = float(total)
    if not math.isfinite(seconds):
        raise ConfigError(key, f"duration {value!r} is too long")
    return seconds


def parse_host_port(key: str, value: object, *, require_ip: bool = False) -> HostPort:
    """Parse "host:port", "[v6]:port"; hosts may be names unless require_ip."""
    if not isinstance(value, str):
        raise ConfigError(key, f'expected "host:port", got {value!r}')
    match = _HOSTPORT.match(value.strip())
    if match is None:
        raise ConfigError(key, f'bad address {value!r}: expected "host:port" or "[ipv6]:port"')
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise ConfigError(key, f"bad port {port} in {value!r}: must be 1-65535")
    host = match["v6"] or match["host"]
    ip = ip_or_none(host)
    if match["v6"] and (ip is None or ip.version != 6):
        raise ConfigError(key, f"bad IPv6 address {host!r} in {value!r}")
    if ip is None and (require_ip or not _HOSTNAME.match(host)):
        wanted = "an IP address" if require_ip else "an IP address or DNS name"
        raise ConfigError(key, f"bad host {host!r} in {value!r}: expected {wanted}")
    return HostPort(str(ip) if ip is not None else host.lower(), port)


def is_loopback(address: HostPort) -> bool:
    """True for 127.0.0.0/8 and ::1."""
    ip = ip_or_none(address.host)
    return ip is not None and ip.is_loopback


# ---------------------------------------------------------------- section reader

T = TypeVar("T")


class _Section:
    """A YAML mapping being read; remembers its key path and which keys were used."""

    def __init__(self, path: str, data: object) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(path, f"expected a mapping, got {type(data).__name__} {data!r}")
        self.path = path
        self.data: Mapping[Any, Any] = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, parse: Callable[[str, object], T], default: T) -> T:
        self.used.add(name)
        if name not in self.data or self.data[name] is None:
            return default
        return parse(self.key(name), self.data[name])

    def section(self, name: str) -> _Section:
        self.used.add(name)
        return _Section(self.key(name), self.data.get(name))

    def finish(self) -> None:
        """Reject keys nobody asked for: a typo must not silently mean 'default'."""
        for name in self.data:
            if name not in self.used:
                known = ", ".join(sorted(self.used))
                raise ConfigError(self.key(str(name)), f"unknown key (known keys here: {known})")


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {value!r}")
    return value


def _int_in(low: int, high: int) -> Callable[[str, object], int]:
    def parse(key: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(key, f"expected a whole number from {low} to {high}, got {value!r}")
        return value

    return parse


def _choice(*options: str) -> Callable[[str, object], str]:
    def parse(key: str, value: object) -> str:
        if value not in options:
            raise ConfigError(key, f"expected one of {', '.join(options)}, got {value!r}")
        return str(value)

    return parse


def _str(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"expected a non-empty string, got {value!r}")
    return value


def _url_path(key: str, value: object) -> str:
    path = _str(key, value)
    if not path.startswith("/"):
        raise ConfigError(key, f"expected an absolute URL path such as /readyz, got {value!r}")
    return path


def _positive_duration(key: str, value: object) -> float:
    seconds = parse_duration(key, value)
    if seconds <= 0:
        raise ConfigError(key, f"must be greater than zero, got {value!r}")
    return seconds


def _readable_file(key: str, value: object) -> str:
    path = _str(key, value)
    if not Path(path).is_file():
        raise ConfigError(key, f"file {path!r} does not exist or is not a regular file")
    return path


# ---------------------------------------------------------------- sections


def _upstream(key: str, value: object) -> UpstreamSpec:
    if isinstance(value, str):
        return UpstreamSpec(parse_host_port(key, value))
    entry = _Section(key, value)
    if entry.data.get("address") is None:
        raise ConfigError(
            key, "an upstream entry needs an 'address' (or write it as a plain string)"
        )
    spec = UpstreamSpec(
        address=entry.get("address", parse_host_port, HostPort("", 0)),
        priority=entry.get("priority", _int_in(0, 1_000_000), DEFAULT_PRIORITY),
    )
    entry.finish()
    return spec


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


def _listen_list(key: str, value: object) -> tuple[HostPort, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(key, f'expected a non-empty list of "ip:port" entries, got {value!r}')
    addrs = tuple(parse_host_port(f"{key}[{i}]", v, require_ip=True) for i, v in enumerate(value))
    if len(set(addrs)) != len(addrs):
        raise ConfigError(key, f"duplicate listen address in {value!r}")
    return addrs


def _health_check(section: _Section) -> HealthCheckConfig:
    interval = section.get("interval", _positive_duration, DEFAULT_INTERVAL)
    # Unset values follow a shorter interval, so setting only the interval just works.
    default_timeout = min(DEFAULT_TIMEOUT, interval * TIMEOUT_SHARE)
    fast = section.get("fastInterval", _positive_duration, min(DEFAULT_FAST_INTERVAL, interval))
    hc = HealthCheckConfig(
        type=section.get("type", _choice("https", "tcp"), "https"),  # type: ignore[arg-type]
        path=section.get("path", _url_path, DEFAULT_HEALTH_PATH),
        interval=interval,
        timeout=section.get("timeout", _positive_duration, default_timeout),
        ca_file=section.get("caFile", _readable_file, None),
        server_name=section.get("serverName", _str, DEFAULT_SERVER_NAME),
        client_cert_file=section.get("clientCertFile", _readable_file, None),
        client_key_file=section.get("clientKeyFile", _readable_file, None),
        keep_alive=section.get("keepAlive", _bool, True),
        fast_interval=fast,
        unhealthy_interval=section.get(
            "unhealthyInterval",
            _positive_duration,
            max(fast, min(DEFAULT_UNHEALTHY_INTERVAL, interval)),
        ),
        liveness_timeout=section.get(
            "livenessTimeout", _positive_duration, DEFAULT_LIVENESS_TIMEOUT
        ),
        stall_timeout=section.get("stallTimeout", parse_duration, DEFAULT_STALL_TIMEOUT),
        healthy_threshold=section.get(
            "healthyThreshold", _int_in(1, 100), DEFAULT_HEALTHY_THRESHOLD
        ),
        unhealthy_threshold=section.get(
            "unhealthyThreshold", _int_in(1, 100), DEFAULT_UNHEALTHY_THRESHOLD
        ),
    )
    section.finish()
    if hc.timeout >= hc.interval:
        raise ConfigError(
            section.key("timeout"),
            f"{hc.timeout:g}s must be shorter than healthCheck.interval ({hc.interval:g}s), "
            "or probes would overlap",
        )
    _check_paces(section, hc)
    if (hc.client_cert_file is None) != (hc.client_key_file is None):
        missing = "clientKeyFile" if hc.client_key_file is None else "clientCertFile"
        raise ConfigError(section.key(missing), "clientCertFile and clientKeyFile go together")
    return hc


def _check_paces(section: _Section, hc: HealthCheckConfig) -> None:
    if hc.fast_interval > hc.interval:
        raise ConfigError(
            section.key("fastInterval"),
            f"{hc.fast_interval:g}s must not be longer than healthCheck.interval "
            f"({hc.interval:g}s): it is the pace used while something looks wrong",
        )
    if hc.unhealthy_interval < hc.fast_interval:
        raise ConfigError(
            section.key("unhealthyInterval"),
            f"{hc.unhealthy_interval:g}s must not be shorter than healthCheck.fastInterval "
            f"({hc.fast_interval:g}s): checks of a down server back off from one to the other",
        )


def _keepalive(section: _Section) -> KeepaliveConfig:
    ka = KeepaliveConfig(
        idle=section.get("idle", _positive_duration, DEFAULT_KEEPALIVE_IDLE),
        interval=section.get("interval", _positive_duration, DEFAULT_KEEPALIVE_INTERVAL),
        count=section.get("count", _int_in(1, 127), DEFAULT_KEEPALIVE_COUNT),
    )
    section.finish()
    return ka


def _admin_listen(key: str, value: object) -> HostPort | None:
    # An empty string, unlike a missing key, switches the admin endpoint off.
    return None if value == "" else parse_host_port(key, value, require_ip=True)


def _admin(section: _Section) -> AdminConfig:
    default: HostPort | None = parse_host_port("admin.listen", DEFAULT_ADMIN_LISTEN)
    listen = section.get("listen", _admin_listen, default)
    section.finish()
    return AdminConfig(listen=listen)


def _filters(key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(
            key, f'expected a list of CIDRs such as ["10.0.0.0/8", "!10.9.0.0/16"], got {value!r}'
        )
    result = []
    for i, item in enumerate(value):
        text = _str(f"{key}[{i}]", item)
        try:
            net = ipaddress.ip_network(text.removeprefix("!"), strict=False)
        except ValueError:
            raise ConfigError(
                f"{key}[{i}]", f"bad CIDR {item!r}: expected e.g. 10.0.0.0/8 or !10.9.0.0/16"
            ) from None
        result.append(("!" if text.startswith("!") else "") + str(net))
    return tuple(result)


def _optional_path(key: str, value: object) -> str | None:
    """A path, or "" for 'off'."""
    return None if value == "" else _str(key, value)


def _kubernetes(section: _Section) -> KubernetesDiscoveryConfig:
    kc = KubernetesDiscoveryConfig(
        enabled=section.get("enabled", _bool, False),
        kubeconfig=section.get("kubeconfig", _readable_file, None),
        token_file=section.get("tokenFile", _readable_file, None),
        ca_file=section.get("caFile", _readable_file, None),
        server_name=section.get("serverName", _str, DEFAULT_SERVER_NAME),
        debounce=section.get("debounce", parse_duration, DEFAULT_DEBOUNCE),
    )
    section.finish()
    if kc.enabled and kc.kubeconfig is None and kc.token_file is None:
        raise ConfigError(
            section.key("kubeconfig"),
            "discovery.kubernetes is enabled but has no credentials: set kubeconfig "
            "(e.g. /etc/kubernetes/kubelet.conf) or tokenFile + caFile",
        )
    if kc.kubeconfig is not None and kc.token_file is not None:
        raise ConfigError(section.key("tokenFile"), "set either kubeconfig or tokenFile, not both")
    return kc


def _discovery(section: _Section) -> DiscoveryConfig:
    cache_default: str | None = DEFAULT_CACHE_FILE
    dc = DiscoveryConfig(
        dns_refresh=section.get("dnsRefresh", _positive_duration, DEFAULT_DNS_REFRESH),
        kubernetes=_kubernetes(section.section("kubernetes")),
        cache_file=section.get("cacheFile", _optional_path, cache_default),
        filters=section.get("filters", _filters, ()),
        removal_grace=section.get("removalGrace", parse_duration, DEFAULT_REMOVAL_GRACE),
        max_endpoints=section.get("maxEndpoints", _int_in(1, 10_000), DEFAULT_MAX_DISCOVERED),
    )
    section.finish()
    return dc


def _check_loopback(cfg: Config) -> None:
    if cfg.allow_non_loopback:
        return
    for i, addr in enumerate(cfg.listen):
        if not is_loopback(addr):
            raise ConfigError(
                f"listen[{i}]",
                f"{addr} is not a loopback address; a node-local balancer should not be "
                "reachable from the network (set allowNonLoopback: true to accept it)",
            )
    if cfg.admin.listen is not None and not is_loopback(cfg.admin.listen):
        raise ConfigError(
            "admin.listen",
            f"{cfg.admin.listen} is not a loopback address "
            "(set allowNonLoopback: true to accept it)",
        )


def config_from_dict(data: object) -> Config:
    """Build a validated Config from parsed YAML."""
    root = _Section("", data)
    if root.data.get("upstreams") is None:
        raise ConfigError("upstreams", 'required: list the API servers, e.g. ["10.0.0.10:6443"]')
    cfg = Config(
        upstreams=root.get("upstreams", _upstreams, ()),
        listen=root.get(
            "listen", _listen_list, tuple(parse_host_port("listen", a) for a in DEFAULT_LISTEN)
        ),
        allow_non_loopback=root.get("allowNonLoopback", _bool, False),
        health_check=_health_check(root.section("healthCheck")),
        dial_timeout=root.get("dialTimeout", _positive_duration, DEFAULT_DIAL_TIMEOUT),
        forwarding=root.get("forwarding", _choice("splice", "copy"), "splice"),  # type: ignore[arg-type]
        tcp_keepalive=_keepalive(root.section("tcpKeepalive")),
        tcp_user_timeout=root.get("tcpUserTimeout", _positive_duration, DEFAULT_TCP_USER_TIMEOUT),
        idle_timeout=root.get("idleTimeout", parse_duration, DEFAULT_IDLE_TIMEOUT),
        drain_timeout=root.get("drainTimeout", parse_duration, DEFAULT_DRAIN_TIMEOUT),
        max_connections=root.get("maxConnections", _int_in(1, 1_000_000), DEFAULT_MAX_CONNECTIONS),
        close_connections_on_unhealthy=root.get("closeConnectionsOnUnhealthy", _bool, True),
        admin=_admin(root.section("admin")),
        discovery=_discovery(root.section("discovery")),
        log_level=root.get("logLevel", _choice("debug", "info", "warning", "error"), None),
    )
    root.finish()
    _check_loopback(cfg)
    _check_no_self_upstream(cfg)
    return cfg


def _check_no_self_upstream(cfg: Config) -> None:
    own = {*cfg.listen, *([cfg.admin.listen] if cfg.admin.listen else [])}
    for i, spec in enumerate(cfg.upstreams):
        if spec.address in own:
            raise ConfigError(
                f"upstreams[{i}]",
                f"{spec.address} is kubeprism's own listen address: every connection "
                "would loop back into kubeprism",
            )


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    try:
        text = read_limited(path, MAX_CONFIG_BYTES)
    except OSError as exc:
        raise ConfigError(
            "", f"cannot read config file {str(path)!r}: {exc.strerror or exc}"
        ) from exc
    try:
        data = yaml.load(text, Loader=StrictLoader)  # a SafeLoader subclass
        size = _expanded_size(data, {})
    except DuplicateKeyError as exc:
        raise ConfigError(exc.key, f"duplicate key in {path} (line {exc.line})") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: 2001-02-30, a 5000-digit number
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError("", f"{path} is nested too deeply to be a kubeprism config") from exc
    if size > MAX_DOCUMENT_VALUES:
        raise ConfigError(
            "", f"{path} expands to more than {MAX_DOCUMENT_VALUES} values (YAML aliases?)"
        )
    return config_from_dict(data)


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice (YAML says it is an error; PyYAML keeps the last)."""

    def __init__(self, key: str, line: int) -> None:
        super().__init__(f"duplicate key {key!r} at line {line}")
        self.key, self.line = key, line


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise DuplicateKeyError(str(key)[:80], key_node.start_mark.line + 1)
            if isinstance(key, str | int | float | bool):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def yaml_error_text(exc: yaml.YAMLError) -> str:
    """Where a YAML document is broken, without quoting it (it may hold a secret)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"
    problem = str(getattr(exc, "problem", None) or "syntax error")
    # Problems quote the text they tripped on ('found undefined alias 'tok3n''): drop it.
    return f"not valid YAML at {where}: " + _QUOTED.sub("'…'", problem)


def _expanded_size(data: object, seen: dict[int, int]) -> int:
    """How many values the document holds with every alias expanded, in linear time."""
    if not isinstance(data, dict | list):
        return 1
    if id(data) in seen:
        return seen[id(data)]
    seen[id(data)] = 1  # a node that contains itself counts once, not forever
    children = [*data.keys(), *data.values()] if isinstance(data, dict) else data
    seen[id(data)] = size = 1 + sum(_expanded_size(child, seen) for child in children)
    return size


def _duration_text(seconds: float) -> str:
    # Shortest exact decimal, never an exponent: parse_duration must read it back equal.
    exact = decimal.Decimal(repr(seconds))
    if seconds and seconds < 1:
        return f"{(exact * 1000).normalize():f}ms"
    return f"{exact.normalize():f}s"


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The effective config in the file's own vocabulary (for check-config)."""
    hc, ka = cfg.health_check, cfg.tcp_keepalive
    return {
        "listen": [str(a) for a in cfg.listen],
        "allowNonLoopback": cfg.allow_non_loopback,
        "upstreams": [{"address": str(u.address), "priority": u.priority} for u in cfg.upstreams],
        "healthCheck": {
            "type": hc.type,
            "path": hc.path,
            "interval": _duration_text(hc.interval),
            "timeout": _duration_text(hc.timeout),
            "caFile": hc.ca_file,
            "serverName": hc.server_name,
            "clientCertFile": hc.client_cert_file,
            "clientKeyFile": hc.client_key_file,
            "healthyThreshold": hc.healthy_threshold,
            "unhealthyThreshold": hc.unhealthy_threshold,
            "keepAlive": hc.keep_alive,
            "fastInterval": _duration_text(hc.fast_interval),
            "unhealthyInterval": _duration_text(hc.unhealthy_interval),
            "livenessTimeout": _duration_text(hc.liveness_timeout),
            "stallTimeout": _duration_text(hc.stall_timeout),
        },
        "dialTimeout": _duration_text(cfg.dial_timeout),
        "forwarding": cfg.forwarding,
        "tcpKeepalive": {
            "idle": _duration_text(ka.idle),
            "interval": _duration_text(ka.interval),
            "count": ka.count,
        },
        "tcpUserTimeout": _duration_text(cfg.tcp_user_timeout),
        "idleTimeout": _duration_text(cfg.idle_timeout),
        "drainTimeout": _duration_text(cfg.drain_timeout),
        "maxConnections": cfg.max_connections,
        "closeConnectionsOnUnhealthy": cfg.close_connections_on_unhealthy,
        "admin": {"listen": str(cfg.admin.listen) if cfg.admin.listen else ""},
        "discovery": _discovery_dict(cfg.discovery),
        "logLevel": cfg.log_level,
    }


def _discovery_dict(dc: DiscoveryConfig) -> dict[str, Any]:
    kc = dc.kubernetes
    return {
        "dnsRefresh": _duration_text(dc.dns_refresh),
        "kubernetes": {
            "enabled": kc.enabled,
            "kubeconfig": kc.kubeconfig,
            "tokenFile": kc.token_file,
            "caFile": kc.ca_file,
            "serverName": kc.server_name,
            "debounce": _duration_text(kc.debounce),
        },
        "cacheFile": dc.cache_file or "",
        "filters": list(dc.filters),
        "removalGrace": _duration_text(dc.removal_grace),
        "maxEndpoints": dc.max_endpoints,
    }
