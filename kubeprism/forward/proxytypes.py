"""What the proxy is told (a slice of the config) and what it counts (read at scrape time)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kubeprism.base.sockets import DialOptions
from kubeprism.forward.connection import CloseReason
from kubeprism.forward.splice import ByteCounter, Mode


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The slice of the config the proxy needs."""

    dial_timeout: float
    mode: Mode
    keepalive_idle: float
    keepalive_interval: float
    keepalive_count: int
    user_timeout: float
    max_connections: int
    idle_timeout: float
    close_on_unhealthy: bool


@dataclass
class ProxyStats:
    """Plain counters, read by the metrics collector at scrape time."""

    accepted: int = 0
    forwarded: int = 0
    no_upstream: int = 0
    rejected: int = 0
    accept_errors: int = 0
    closed: dict[CloseReason, int] = field(default_factory=lambda: dict.fromkeys(CloseReason, 0))
    dial_failures: int = 0
    dials_overtaken: int = 0
    local_dial_errors: int = 0
    adopted: int = 0  # connections taken over from the previous process
    internal_errors: int = 0
    upstream_bytes: ByteCounter = field(default_factory=ByteCounter)  # client -> upstream
    client_bytes: ByteCounter = field(default_factory=ByteCounter)  # upstream -> client


def dial_options(s: ProxySettings) -> DialOptions:
    """The upstream sockets' options for these settings."""
    return DialOptions.of(
        s.dial_timeout, s.keepalive_idle, s.keepalive_interval, s.keepalive_count, s.user_timeout
    )
