"""Configuration: the frozen, typed config (``model``), the field table that reads and
renders every key (``fields``), each kind of value (``values``) and safe YAML reading
(``safeyaml``).

Imports only ``kubeprism.base``; every wing that needs settings imports this one, except
forwarding and the core, which are handed plain values. The names below are the public
ones: ``from kubeprism.config import Config, ConfigError``.
"""

from __future__ import annotations

from kubeprism.config.model import (
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_CONFIG_PATH,
    DEFAULT_LISTEN,
    DEFAULT_PRIORITY,
    AdminConfig,
    Config,
    ConfigError,
    DiscoveryConfig,
    HealthCheckConfig,
    KeepaliveConfig,
    KubernetesDiscoveryConfig,
    UpstreamSpec,
    config_from_dict,
    config_to_dict,
    file_named_by,
    is_loopback,
    load_config,
    parse_duration,
    parse_host_port,
    yaml_error_text,
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
