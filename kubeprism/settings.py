"""What each running part takes from the config, at start and on every reload.

The wings below never read the config themselves where they need not: forwarding gets
``ProxySettings``, the checker its ``Intervals``, membership kubeprism's own addresses.
The translation lives here, next to the composition root that hands them out.
"""

from __future__ import annotations

from kubeprism.base.net import HostPort
from kubeprism.config import Config, HealthCheckConfig
from kubeprism.core.cadence import Intervals
from kubeprism.forward.proxy import ProxySettings


def proxy_settings(cfg: Config) -> ProxySettings:
    """The proxy's part of the config."""
    ka = cfg.tcp_keepalive
    return ProxySettings(
        dial_timeout=cfg.dial_timeout,
        mode=cfg.forwarding,
        keepalive_idle=ka.idle,
        keepalive_interval=ka.interval,
        keepalive_count=ka.count,
        user_timeout=cfg.tcp_user_timeout,
        max_connections=cfg.max_connections,
        idle_timeout=cfg.idle_timeout,
        close_on_unhealthy=cfg.close_connections_on_unhealthy,
    )


def own_addresses(cfg: Config) -> tuple[HostPort, ...]:
    """kubeprism's own addresses: never an upstream."""
    return (*cfg.listen, *([cfg.admin.listen] if cfg.admin.listen else []))


def intervals(hc: HealthCheckConfig) -> Intervals:
    """The checker's paces."""
    return Intervals(hc.interval, hc.fast_interval, hc.unhealthy_interval)
