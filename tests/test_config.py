"""Pure tests for kubeprism.config: tables for each rule, hypothesis for the whole loader."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubeprism.base.net import HostPort
from kubeprism.config import (
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_LISTEN,
    AdminConfig,
    Config,
    ConfigError,
    DiscoveryConfig,
    HealthCheckConfig,
    KeepaliveConfig,
    UpstreamSpec,
    config_from_dict,
    config_to_dict,
    file_named_by,
    is_loopback,
    load_config,
    parse_duration,
    parse_host_port,
)
from kubeprism.config.safeyaml import MAX_NESTING, read_document

UP = ["10.0.0.1:6443"]
# A file that certainly exists, usable inside hypothesis tests (no function fixtures there).
THIS_FILE = str(Path(__file__).resolve())


def error(data: object) -> ConfigError:
    """The ConfigError that data must raise; its text must lead with the key path."""
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    exc = info.value
    assert str(exc).startswith(f"{exc.key}: " if exc.key else exc.message)
    return exc


def at(path: str, value: object) -> dict[str, Any]:
    """A minimal valid config with value placed at a dotted key path."""
    data: dict[str, Any] = {"upstreams": list(UP)}
    *parents, leaf = path.split(".")
    node = data
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = value
    return data


# ---------------------------------------------------------------- defaults and every key


def test_defaults() -> None:
    cfg = config_from_dict({"upstreams": UP})
    assert cfg == Config(
        upstreams=(UpstreamSpec(HostPort("10.0.0.1", 6443)),),
        listen=(HostPort("127.0.0.1", 7445), HostPort("::1", 7445)),
        admin=AdminConfig(HostPort("127.0.0.1", 7446)),
    )
    assert cfg.health_check == HealthCheckConfig()
    assert cfg.tcp_keepalive == KeepaliveConfig()
    assert cfg.discovery == DiscoveryConfig()
    assert cfg.upstreams[0].priority == 100
    assert [str(a) for a in cfg.listen] == list(DEFAULT_LISTEN)
    assert str(cfg.admin.listen) == DEFAULT_ADMIN_LISTEN
    assert cfg.health_check.timeout < cfg.health_check.interval


def test_null_means_default() -> None:
    data: dict[str, Any] = {
        "upstreams": UP,
        "listen": None,
        "allowNonLoopback": None,
        "healthCheck": None,
        "dialTimeout": None,
        "forwarding": None,
        "tcpKeepalive": {"idle": None, "interval": None, "count": None},
        "tcpUserTimeout": None,
        "idleTimeout": None,
        "drainTimeout": None,
        "maxConnections": None,
        "closeConnectionsOnUnhealthy": None,
        "admin": {"listen": None},
        "discovery": None,
    }
    assert config_from_dict(data) == config_from_dict({"upstreams": UP})


def test_every_key(tmp_path: Path) -> None:
    for name in ("ca.crt", "client.crt", "client.key"):
        (tmp_path / name).write_text("-----BEGIN-----\n")
    data = {
        "listen": ["0.0.0.0:7445", "[::]:7445"],
        "allowNonLoopback": True,
        "upstreams": [
            "10.0.0.1:6443",
            {"address": "[fd00::2]:6443", "priority": 10},
            {"address": "API.example.com:443"},
        ],
        "healthCheck": {
            "type": "tcp",
            "path": "/livez",
            "interval": "2s",
            "timeout": "1500ms",
            "caFile": str(tmp_path / "ca.crt"),
            "serverName": "api.internal",
            "clientCertFile": str(tmp_path / "client.crt"),
            "clientKeyFile": str(tmp_path / "client.key"),
            "healthyThreshold": 3,
            "unhealthyThreshold": 4,
            "keepAlive": False,
            "fastInterval": "500ms",
            "unhealthyInterval": "1500ms",
            "livenessTimeout": "5s",
            "stallTimeout": "0s",
        },
        "dialTimeout": "250ms",
        "forwarding": "copy",
        "tcpKeepalive": {"idle": "30s", "interval": "5s", "count": 9},
        "tcpUserTimeout": "1m",
        "idleTimeout": "1h",
        "drainTimeout": "0s",
        "maxConnections": 500,
        "closeConnectionsOnUnhealthy": False,
        "admin": {"listen": "10.1.2.3:9100"},
        "discovery": {"dnsRefresh": "1m30s"},
    }
    assert config_from_dict(data) == Config(
        upstreams=(
            UpstreamSpec(HostPort("10.0.0.1", 6443)),
            UpstreamSpec(HostPort("fd00::2", 6443), 10),
            UpstreamSpec(HostPort("api.example.com", 443)),
        ),
        listen=(HostPort("0.0.0.0", 7445), HostPort("::", 7445)),
        allow_non_loopback=True,
        health_check=HealthCheckConfig(
            type="tcp",
            path="/livez",
            interval=2.0,
            timeout=1.5,
            ca_file=str(tmp_path / "ca.crt"),
            server_name="api.internal",
            client_cert_file=str(tmp_path / "client.crt"),
            client_key_file=str(tmp_path / "client.key"),
            healthy_threshold=3,
            unhealthy_threshold=4,
            keep_alive=False,
            fast_interval=0.5,
            unhealthy_interval=1.5,
            liveness_timeout=5.0,
            stall_timeout=0.0,
        ),
        dial_timeout=0.25,
        forwarding="copy",
        tcp_keepalive=KeepaliveConfig(idle=30.0, interval=5.0, count=9),
        tcp_user_timeout=60.0,
        idle_timeout=3600.0,
        drain_timeout=0.0,
        max_connections=500,
        close_connections_on_unhealthy=False,
        admin=AdminConfig(HostPort("10.1.2.3", 9100)),
        discovery=DiscoveryConfig(dns_refresh=90.0),
    )
    assert config_from_dict(config_to_dict(config_from_dict(data))) == config_from_dict(data)


# ---------------------------------------------------------------- durations

GOOD_DURATIONS = [
    ("500ms", 0.5),
    ("2s", 2.0),
    ("1m30s", 90.0),
    ("1.5s", 1.5),
    ("1h", 3600.0),
    ("1h1m1s", 3661.0),
    ("0.5ms", 0.0005),
    ("300ms", 0.3),  # exactly 0.3, not 0.30000000000000004
    ("1.1m", 66.0),
    ("1m0.5s", 60.5),
    ("1s500ms", 1.5),
    (" 2s ", 2.0),
    ("0s", 0.0),
    ("007s", 7.0),
]


@pytest.mark.parametrize(("text", "seconds"), GOOD_DURATIONS)
def test_good_durations(text: str, seconds: float) -> None:
    assert parse_duration("k", text) == seconds


BAD_DURATIONS = [
    "5",
    5,
    2.5,
    "",
    "   ",
    "2x",
    "s",
    "ms",
    True,
    False,
    ["1s"],
    {"s": 1},
    "-1s",
    "+1s",
    "1.s",
    ".5s",
    "1 s",
    "1s 2s",
    "1e3s",
    "2S",
    "1d",
    "infs",
    "nans",
    "1s2",
    "s1",
    "\u0663s",  # ARABIC-INDIC DIGIT THREE: \d would match it, a YAML file should not
    "9" * 400 + "s",  # a float overflow, not a duration
    "1" * 100_000 + "h",  # and a decimal one
]


@pytest.mark.parametrize("value", BAD_DURATIONS)
def test_bad_durations(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration("dialTimeout", value)
    assert info.value.key == "dialTimeout"
    assert str(info.value).startswith("dialTimeout: ")
    assert repr(value)[:50] in str(info.value)
    assert error(at("dialTimeout", value)).key == "dialTimeout"


@pytest.mark.parametrize(
    "key",
    [
        "dialTimeout",
        "tcpUserTimeout",
        "healthCheck.interval",
        "healthCheck.timeout",
        "healthCheck.fastInterval",
        "healthCheck.unhealthyInterval",
        "healthCheck.livenessTimeout",
        "tcpKeepalive.idle",
        "tcpKeepalive.interval",
        "discovery.dnsRefresh",
    ],
)
def test_zero_is_refused_where_a_duration_must_be_positive(key: str) -> None:
    exc = error(at(key, "0ms"))
    assert exc.key == key
    assert "'0ms'" in str(exc)


@pytest.mark.parametrize("key", ["idleTimeout", "drainTimeout", "healthCheck.stallTimeout"])
def test_zero_is_allowed_where_it_means_off(key: str) -> None:
    config_from_dict(at(key, "0s"))


# (seconds, how config_to_dict writes it)
DURATION_TEXT = [
    (0.0, "0s"),
    (0.5, "500ms"),
    (0.3, "300ms"),
    (0.0005, "0.5ms"),
    (0.1234567, "123.4567ms"),
    (1e-10, "0.0000001ms"),
    (1.0, "1s"),
    (1.5, "1.5s"),
    (90.0, "90s"),
    (1234567.0, "1234567s"),  # not "1.23457e+06s", which does not parse back
    (1e20, "100000000000000000000s"),
]


@pytest.mark.parametrize(("seconds", "text"), DURATION_TEXT)
def test_duration_text(seconds: float, text: str) -> None:
    cfg = dataclasses.replace(config_from_dict({"upstreams": UP}), drain_timeout=seconds)
    assert config_to_dict(cfg)["drainTimeout"] == text
    assert parse_duration("drainTimeout", text) == seconds


@given(st.floats(min_value=0, max_value=1e300, allow_nan=False, allow_infinity=False))
@settings(max_examples=300, deadline=None)
def test_duration_text_parses_back_exactly(seconds: float) -> None:
    cfg = dataclasses.replace(config_from_dict({"upstreams": UP}), idle_timeout=seconds)
    text = config_to_dict(cfg)["idleTimeout"]
    assert "e" not in text.lower()
    assert parse_duration("idleTimeout", text) == seconds


@given(st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(["ms", "s", "m", "h"]))))
@settings(max_examples=200, deadline=None)
def test_duration_is_the_sum_of_its_parts(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{unit}" for n, unit in parts)
    scale = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
    millis = sum(n * scale[unit] for n, unit in parts)
    if not text:
        with pytest.raises(ConfigError):
            parse_duration("k", text)
    else:
        assert parse_duration("k", text) == millis / 1000


# ---------------------------------------------------------------- host:port

GOOD_ADDRESSES = [
    ("10.0.0.1:6443", HostPort("10.0.0.1", 6443)),
    ("  10.0.0.1:6443 ", HostPort("10.0.0.1", 6443)),
    ("192.168.1.255:1", HostPort("192.168.1.255", 1)),
    ("127.0.0.1:65535", HostPort("127.0.0.1", 65535)),
    ("[::1]:6443", HostPort("::1", 6443)),
    ("[2001:DB8:0:0::1]:443", HostPort("2001:db8::1", 443)),
    ("[::ffff:10.0.0.1]:6443", HostPort(str(ipaddress.ip_address("::ffff:10.0.0.1")), 6443)),
    ("[fe80::1%eth0]:6443", HostPort("fe80::1%eth0", 6443)),
    ("api.example.com:6443", HostPort("api.example.com", 6443)),
    ("API.Example.COM:6443", HostPort("api.example.com", 6443)),
    ("example.com.:6443", HostPort("example.com.", 6443)),
    ("localhost:80", HostPort("localhost", 80)),
    ("kube-apiserver:6443", HostPort("kube-apiserver", 6443)),
    ("123.example.com:80", HostPort("123.example.com", 80)),
    ("a:00080", HostPort("a", 80)),
    ("x" * 63 + ".com:1", HostPort("x" * 63 + ".com", 1)),
]


@pytest.mark.parametrize(("text", "expected"), GOOD_ADDRESSES)
def test_good_addresses(text: str, expected: HostPort) -> None:
    assert parse_host_port("k", text) == expected
    assert parse_host_port("k", str(expected)) == expected  # str() is the config syntax
    cfg = config_from_dict({"upstreams": [text]})
    assert cfg.upstreams[0].address == expected


BAD_ADDRESSES = [
    "10.0.0.1:0",
    "10.0.0.1:65536",
    "10.0.0.1:99999",
    "10.0.0.1:123456",
    "10.0.0.1:" + "1" * 5000,  # int() would raise ValueError past 4300 digits
    "10.0.0.1",
    "10.0.0.1:",
    ":6443",
    "",
    "10.0.0.1:+80",
    "10.0.0.1:-80",
    "10.0.0.1:http",
    "10.0.0.1:\u0663",
    "::1:6443",
    "::1",
    "2001:db8::1:443",
    "[::1]",
    "[::1]6443",
    "[10.0.0.1]:80",
    "[nonsense]:80",
    "[]:80",
    "under_score:80",
    "bad!host:80",
    "sp ace:80",
    "-lead.example.com:80",
    "trail-.example.com:80",
    "a..b:80",
    ".leading.dot:80",
    "x" * 64 + ".com:80",  # label longer than 63
    "a." * 126 + "com:80",  # name longer than 253
    "10.0.0.256:6443",  # a mistyped IP address is not a DNS name
    "1234:80",
    "10.0.0:80",
    "a" * 60 + "!:80",  # took exponential time with the old hostname pattern
    "a." * 60 + "!:80",
    6443,
    None,
    ["10.0.0.1:6443"],
    b"10.0.0.1:6443",
]


@pytest.mark.parametrize("value", BAD_ADDRESSES)
def test_bad_addresses(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_host_port("upstreams[0]", value)
    assert info.value.key == "upstreams[0]"
    assert repr(value)[:60] in str(info.value)


@pytest.mark.parametrize("text", ["localhost:7445", "api.example.com:1"])
def test_names_are_refused_where_an_ip_is_required(text: str) -> None:
    assert parse_host_port("k", text).host == text.split(":", maxsplit=1)[0]
    with pytest.raises(ConfigError) as info:
        parse_host_port("listen[0]", text, require_ip=True)
    assert "expected an IP address" in str(info.value)
    assert error(at("listen", [text])).key == "listen[0]"
    assert error(at("admin.listen", text)).key == "admin.listen"


@pytest.mark.parametrize(
    ("address", "text", "is_ip", "loopback"),
    [
        (HostPort("10.0.0.1", 1), "10.0.0.1:1", True, False),
        (HostPort("127.0.0.1", 1), "127.0.0.1:1", True, True),
        (HostPort("127.255.0.9", 1), "127.255.0.9:1", True, True),
        (HostPort("::1", 1), "[::1]:1", True, True),
        (HostPort("::", 1), "[::]:1", True, False),
        (HostPort("0.0.0.0", 1), "0.0.0.0:1", True, False),
        (HostPort("localhost", 1), "localhost:1", False, False),
        (HostPort("api.example.com", 6443), "api.example.com:6443", False, False),
    ],
)
def test_host_port_properties(address: HostPort, text: str, is_ip: bool, loopback: bool) -> None:
    assert str(address) == text
    assert address.is_ip is is_ip
    assert is_loopback(address) is loopback


# ---------------------------------------------------------------- unknown keys and types

UNKNOWN_KEYS = [
    ({"upstreams": UP, "lisen": ["127.0.0.1:1"]}, "lisen"),
    ({"upstreams": UP, "healthCheck": {"intervl": "1s"}}, "healthCheck.intervl"),
    ({"upstreams": UP, "tcpKeepalive": {"idel": "1s"}}, "tcpKeepalive.idel"),
    ({"upstreams": UP, "admin": {"lsten": "127.0.0.1:1"}}, "admin.lsten"),
    ({"upstreams": UP, "discovery": {"dnsrefresh": "1s"}}, "discovery.dnsrefresh"),
    ({"upstreams": ["10.0.0.1:1", {"address": "10.0.0.2:1", "prio": 1}]}, "upstreams[1].prio"),
    ({"upstreams": UP, "HealthCheck": {}}, "HealthCheck"),
    ({"upstreams": UP, 7: "x"}, "7"),
    ({"upstreams": UP, None: "x"}, "None"),
]


@pytest.mark.parametrize(("data", "key"), UNKNOWN_KEYS)
def test_unknown_keys_are_named_with_their_full_path(data: dict[Any, Any], key: str) -> None:
    exc = error(data)
    assert exc.key == key
    assert str(exc).startswith(f"{key}: unknown key (known keys here: ")


def test_unknown_key_lists_the_known_ones() -> None:
    exc = error(at("healthCheck.intervl", "1s"))
    for known in ("interval", "timeout", "caFile", "unhealthyThreshold"):
        assert known in exc.message


# (key path, bad value): each must be refused naming that key and showing the value.
BAD_VALUES = [
    ("listen", []),
    ("listen", 7445),
    ("listen", {"a": 1}),
    ("listen", ["127.0.0.1:1", "127.0.0.1:1"]),
    ("listen", ["[::1]:1", "[0:0::1]:1"]),
    ("allowNonLoopback", "yes"),
    ("allowNonLoopback", 1),
    ("healthCheck", "fast"),
    ("healthCheck", ["interval"]),
    ("healthCheck.type", "http"),
    ("healthCheck.type", "HTTPS"),
    ("healthCheck.type", ["https"]),
    ("healthCheck.path", "readyz"),
    ("healthCheck.path", ""),
    ("healthCheck.path", 5),
    ("healthCheck.interval", 1),
    ("healthCheck.interval", "1"),
    ("healthCheck.timeout", "-1s"),
    ("healthCheck.caFile", ""),
    ("healthCheck.caFile", 5),
    ("healthCheck.caFile", "/nonexistent/kubeprism/ca.crt"),
    ("healthCheck.caFile", "/"),
    ("healthCheck.clientCertFile", "/nonexistent/client.crt"),
    ("healthCheck.clientKeyFile", "/nonexistent/client.key"),
    ("healthCheck.serverName", ""),
    ("healthCheck.serverName", 5),
    ("healthCheck.healthyThreshold", 0),
    ("healthCheck.healthyThreshold", 101),
    ("healthCheck.healthyThreshold", True),
    ("healthCheck.healthyThreshold", 2.0),
    ("healthCheck.healthyThreshold", "2"),
    ("healthCheck.unhealthyThreshold", -1),
    ("healthCheck.keepAlive", "no"),
    ("healthCheck.fastInterval", "quick"),
    ("healthCheck.unhealthyInterval", 1),
    ("healthCheck.livenessTimeout", "2"),
    ("healthCheck.stallTimeout", "-1s"),
    ("dialTimeout", "fast"),
    ("forwarding", "zerocopy"),
    ("forwarding", True),
    ("tcpKeepalive", 5),
    ("tcpKeepalive.idle", "0s"),
    ("tcpKeepalive.count", 0),
    ("tcpKeepalive.count", 128),
    ("tcpUserTimeout", 10),
    ("idleTimeout", "forever"),
    ("drainTimeout", -1),
    ("maxConnections", 0),
    ("maxConnections", 1_000_001),
    ("maxConnections", False),
    ("maxConnections", "100"),
    ("closeConnectionsOnUnhealthy", "true"),
    ("closeConnectionsOnUnhealthy", 0),
    ("admin", "127.0.0.1:1"),
    ("admin.listen", 9100),
    ("admin.listen", "[::1]"),
    ("admin.listen", []),
    ("discovery", True),
    ("discovery.dnsRefresh", "30"),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_bad_values_name_the_key_and_the_value(key: str, value: object) -> None:
    exc = error(at(key, value))
    assert exc.key == key or exc.key.startswith(f"{key}[")
    shown = value if key != "listen" or not isinstance(value, list) or not value else value[-1]
    assert repr(shown) in str(exc)


# ---------------------------------------------------------------- upstreams


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({}, "upstreams"),
        ({"listen": ["127.0.0.1:1"]}, "upstreams"),
        ({"upstreams": None}, "upstreams"),
        ({"upstreams": []}, "upstreams"),
        ({"upstreams": "10.0.0.1:6443"}, "upstreams"),
        ({"upstreams": {"address": "10.0.0.1:6443"}}, "upstreams"),
        ({"upstreams": ["10.0.0.1:6443", "10.0.0.1:6443"]}, "upstreams[1]"),
        ({"upstreams": ["10.0.0.1:1", "10.0.0.2:1", " 10.0.0.1:1"]}, "upstreams[2]"),
        ({"upstreams": ["[::1]:1", "[0:0::1]:1"]}, "upstreams[1]"),
        ({"upstreams": ["A.example:1", "a.example:1"]}, "upstreams[1]"),
        ({"upstreams": ["10.0.0.1:1", {"address": "10.0.0.1:1", "priority": 1}]}, "upstreams[1]"),
        ({"upstreams": [{"priority": 1}]}, "upstreams[0]"),
        ({"upstreams": [{"address": None}]}, "upstreams[0]"),
        ({"upstreams": [{}]}, "upstreams[0]"),
        ({"upstreams": [None]}, "upstreams[0]"),
        ({"upstreams": [6443]}, "upstreams[0]"),
        ({"upstreams": [["10.0.0.1:6443"]]}, "upstreams[0]"),
        ({"upstreams": ["10.0.0.1:1", "nope"]}, "upstreams[1]"),
        ({"upstreams": [{"address": "nope"}]}, "upstreams[0].address"),
        ({"upstreams": [{"address": "10.0.0.1:1", "priority": -1}]}, "upstreams[0].priority"),
        (
            {"upstreams": [{"address": "10.0.0.1:1", "priority": 1_000_001}]},
            "upstreams[0].priority",
        ),
        ({"upstreams": [{"address": "10.0.0.1:1", "priority": "high"}]}, "upstreams[0].priority"),
    ],
)
def test_bad_upstreams(data: dict[str, Any], key: str) -> None:
    assert error(data).key == key


def test_upstream_forms_and_priority_bounds() -> None:
    cfg = config_from_dict(
        {
            "upstreams": [
                "10.0.0.1:6443",
                {"address": "10.0.0.2:6443", "priority": 0},
                {"address": "10.0.0.3:6443", "priority": 1_000_000},
                {"address": "10.0.0.4:6443", "priority": None},
            ]
        }
    )
    assert [u.priority for u in cfg.upstreams] == [100, 0, 1_000_000, 100]


@pytest.mark.parametrize("root", [[], ["10.0.0.1:6443"], "upstreams", 5, 1.5, True, b"x"])
def test_root_must_be_a_mapping(root: object) -> None:
    exc = error(root)
    assert exc.key == ""
    assert "expected a mapping" in str(exc)
    assert repr(root) in str(exc)


def test_empty_document_asks_for_upstreams() -> None:
    assert error(None).key == "upstreams"


# ---------------------------------------------------------------- cross-field rules


def test_unset_timeout_scales_with_a_short_interval() -> None:
    cfg = config_from_dict(at("healthCheck.interval", "500ms"))
    assert cfg.health_check.timeout == pytest.approx(0.4)
    assert config_from_dict(at("healthCheck.interval", "5s")).health_check.timeout == 0.8


@pytest.mark.parametrize(
    ("interval", "timeout", "ok"),
    [
        ("1s", "999ms", True),
        ("1s", "1s", False),
        ("1s", "1000ms", False),
        ("1s", "2s", False),
        ("2s", "1m", False),
        ("500ms", None, True),  # an unset timeout scales down with the interval (400ms)
        (None, "4900ms", True),
        (None, "5s", False),
    ],
)
def test_timeout_must_be_shorter_than_interval(
    interval: str | None, timeout: str | None, ok: bool
) -> None:
    data = at("healthCheck.interval", interval)
    data["healthCheck"]["timeout"] = timeout
    if ok:
        config_from_dict(data)
    else:
        exc = error(data)
        assert exc.key == "healthCheck.timeout"
        assert "healthCheck.interval" in exc.message


def test_unset_paces_follow_a_short_interval() -> None:
    hc = config_from_dict(at("healthCheck.interval", "200ms")).health_check
    assert (hc.fast_interval, hc.unhealthy_interval) == (0.2, 0.2)
    hc = config_from_dict(at("healthCheck.interval", "500ms")).health_check
    assert (hc.fast_interval, hc.unhealthy_interval) == (0.25, 0.5)
    hc = config_from_dict(at("healthCheck.fastInterval", "2s")).health_check
    assert (hc.fast_interval, hc.unhealthy_interval) == (2.0, 2.0)


@pytest.mark.parametrize(
    ("paces", "key"),
    [
        ({"interval": "1s", "fastInterval": "1s"}, None),
        ({"interval": "1s", "fastInterval": "1001ms"}, "healthCheck.fastInterval"),
        ({"fastInterval": "6s"}, "healthCheck.fastInterval"),
        ({"fastInterval": "300ms", "unhealthyInterval": "300ms"}, None),
        ({"fastInterval": "300ms", "unhealthyInterval": "299ms"}, "healthCheck.unhealthyInterval"),
        ({"unhealthyInterval": "100ms"}, "healthCheck.unhealthyInterval"),
        ({"unhealthyInterval": "1m"}, None),
    ],
)
def test_fast_interval_is_at_most_interval_and_at_most_unhealthy_interval(
    paces: dict[str, str], key: str | None
) -> None:
    data = {"upstreams": UP, "healthCheck": paces}
    if key is None:
        config_from_dict(data)
    else:
        exc = error(data)
        assert exc.key == key
        assert "healthCheck." in exc.message


@pytest.mark.parametrize(
    ("given_keys", "missing"),
    [(["clientCertFile"], "clientKeyFile"), (["clientKeyFile"], "clientCertFile")],
)
def test_client_cert_and_key_go_together(
    tmp_path: Path, given_keys: list[str], missing: str
) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    data: dict[str, Any] = {"upstreams": UP, "healthCheck": {k: str(pem) for k in given_keys}}
    exc = error(data)
    assert exc.key == f"healthCheck.{missing}"
    data["healthCheck"][missing] = str(pem)
    assert config_from_dict(data).health_check.client_key_file == str(pem)


def test_ca_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.crt"
    exc = error(at("healthCheck.caFile", str(missing)))
    assert exc.key == "healthCheck.caFile"
    assert str(missing) in exc.message
    assert error(at("healthCheck.caFile", str(tmp_path))).key == "healthCheck.caFile"
    missing.write_text("x")
    assert config_from_dict(at("healthCheck.caFile", str(missing))).health_check.ca_file == str(
        missing
    )


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"listen": "0.0.0.0:7445"}, "listen[0]"),
        ({"listen": ["127.0.0.1:7445", "10.0.0.5:7445"]}, "listen[1]"),
        ({"listen": ["[::]:7445"]}, "listen[0]"),
        ({"admin": {"listen": "0.0.0.0:9100"}}, "admin.listen"),
        ({"admin": {"listen": "[fd00::1]:9100"}}, "admin.listen"),
        ({"allowNonLoopback": False, "listen": "192.168.0.1:1"}, "listen[0]"),
    ],
)
def test_non_loopback_is_refused_by_default(data: dict[str, Any], key: str) -> None:
    exc = error({"upstreams": UP, **data})
    assert exc.key == key
    assert "allowNonLoopback" in exc.message
    allowed = config_from_dict({"upstreams": UP, **data, "allowNonLoopback": True})
    assert allowed.allow_non_loopback


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:7445", (HostPort("127.0.0.1", 7445),)),
        ("127.0.0.2:80", (HostPort("127.0.0.2", 80),)),
        (["[::1]:1", "127.0.0.1:1"], (HostPort("::1", 1), HostPort("127.0.0.1", 1))),
    ],
)
def test_loopback_listen(listen: object, expected: tuple[HostPort, ...]) -> None:
    assert config_from_dict({"upstreams": UP, "listen": listen}).listen == expected


@pytest.mark.parametrize(
    ("admin", "expected"),
    [
        ({"listen": ""}, None),
        ({"listen": None}, HostPort("127.0.0.1", 7446)),
        ({}, HostPort("127.0.0.1", 7446)),
        (None, HostPort("127.0.0.1", 7446)),
        ({"listen": "[::1]:9100"}, HostPort("::1", 9100)),
    ],
)
def test_admin_listen(admin: object, expected: HostPort | None) -> None:
    cfg = config_from_dict({"upstreams": UP, "admin": admin})
    assert cfg.admin.listen == expected
    # And check-config writes a disabled admin back as the empty string.
    assert config_to_dict(cfg)["admin"]["listen"] == (str(expected) if expected else "")


# ---------------------------------------------------------------- files


def test_load_config_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "kubeprism.yaml"
    path.write_text(
        "upstreams:\n"
        "  - 10.0.0.1:6443\n"
        "  - address: '[fd00::1]:6443'\n"
        "    priority: 5\n"
        "healthCheck:\n"
        "  interval: 2s\n"
        "  timeout: 500ms\n"
        "admin:\n"
        "  listen: ''\n"
    )
    cfg = load_config(path)
    assert cfg.upstreams == (
        UpstreamSpec(HostPort("10.0.0.1", 6443)),
        UpstreamSpec(HostPort("fd00::1", 6443), 5),
    )
    assert (cfg.health_check.interval, cfg.health_check.timeout) == (2.0, 0.5)
    assert cfg.admin.listen is None
    assert load_config(str(path)) == cfg

    # check-config output is a valid config file meaning the same thing.
    again = tmp_path / "effective.yaml"
    again.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(again) == cfg


# "Billion laughs": nine aliases deep, 9**9 strings once expanded.
ALIAS_BOMB = "\n".join(
    ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    + ["upstreams: *a9", ""]
).encode()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"upstreams: [unclosed\n", "is not valid YAML"),
        (b"upstreams:\n  - a\n - b\n", "is not valid YAML"),
        (b"\tupstreams: []\n", "is not valid YAML"),
        (b"\xff\xfe\x00\x01not utf-8", "is not UTF-8 text"),
        (b"", "upstreams: required"),
        (b"# only a comment\n", "upstreams: required"),
        (b"- 10.0.0.1:6443\n", "expected a mapping"),
        (b"just a string\n", "expected a mapping"),
        (b"upstreams: [10.0.0.1:6443]\nhealthCheck: {intervl: 1s}\n", "healthCheck.intervl"),
        # Found by tests/faults: each of these used to end in a traceback or a hang.
        (b"upstreams: " + b"[" * 20000 + b"]" * 20000, "nested too deeply"),
        (b"upstreams: [{address: a, priority: " + b"9" * 5000 + b"}]\n", "not valid YAML"),
        (b"upstreams: [10.0.0.1:6443]\ndialTimeout: 2001-02-30\n", "not valid YAML"),
        (ALIAS_BOMB, "expands to more than 100000 values"),
    ],
)
def test_load_config_bad_files(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in str(info.value)


# Each took seconds (PyYAML's scanner) or ended in a RecursionError: the first, with a
# duplicate key too, made tests/faults 9c time out. The place named is the 65th level, so
# reading stopped there instead of going on to the end of the document.
@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("upstreams: [a]\nupstreams: " + "[" * 30000 + "1" + "]" * 30000, "line 2, column 76"),
        ("x: " + "{a: " * 30000 + "1" + "}" * 30000, "line 1, column 257"),
        ("upstreams:\n" + "- " * 30000 + "1\n", "line 2, column 128"),
        ("x:\n" + "".join(" " * i + "- \n" for i in range(1, 200)), "line 65, column 66"),
    ],
)
def test_deep_nesting_is_refused_while_reading(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"nested too deeply to be a kubeprism config: more than {MAX_NESTING} levels" in str(
        info.value
    )
    assert where in str(info.value)


def test_nesting_up_to_the_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("x: " + "[" * (MAX_NESTING - 1) + "1" + "]" * (MAX_NESTING - 1) + "\n")
    assert read_document(path) == {"x": nested_list(MAX_NESTING - 1)}


def nested_list(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def test_load_config_unreadable(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.yaml", tmp_path):
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert info.value.key == ""
        assert "cannot read config file" in str(info.value)
        assert str(path) in str(info.value)


# ---------------------------------------------------------------- hypothesis: round trip


def _duration(low_ms: int, high_ms: int) -> st.SearchStrategy[str]:
    """Duration text between low and high milliseconds, in a variety of spellings."""

    def spell(ms: int, how: int) -> str:
        if how == 0:
            return f"{ms}ms"
        if how == 1 and ms % 1000 == 0:
            return f"{ms // 1000}s"
        if how == 2:
            return f"{ms / 1000}s"
        if how == 3 and ms >= 60_000:
            return f"{ms // 60_000}m{(ms % 60_000) / 1000}s"
        return f"{ms}ms"

    return st.builds(spell, st.integers(low_ms, high_ms), st.integers(0, 3))


addresses = st.sampled_from(
    [
        "10.0.0.1:6443",
        "10.0.0.2:6443",
        "10.0.0.1:443",
        "[fd00::1]:6443",
        "[FD00:0::2]:6443",
        "[fe80::1%eth0]:6443",
        "api.example.com:6443",
        "API.example.com.:6443",
        "cp-1:6443",
    ]
)
upstream_entries = st.lists(
    st.tuples(addresses, st.one_of(st.none(), st.integers(0, 1_000_000)), st.booleans()),
    min_size=1,
    max_size=5,
    unique_by=lambda e: parse_host_port("k", e[0]),
).map(
    lambda es: [a if p is None and plain else {"address": a, "priority": p} for a, p, plain in es]
)
loopback_listen = st.lists(
    st.sampled_from(["127.0.0.1:7445", "[::1]:7445", "127.0.0.9:1", "[::1]:80"]),
    min_size=1,
    max_size=3,
    unique=True,
)
any_listen = st.lists(
    st.sampled_from(["0.0.0.0:7445", "[::]:7445", "10.0.0.9:1", "127.0.0.1:2"]),
    min_size=1,
    max_size=3,
    unique=True,
)


def optional(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A mapping where each key is present or absent."""
    return st.fixed_dictionaries({}, optional=fields)


health_checks = st.tuples(
    optional(
        type=st.sampled_from(["https", "tcp"]),
        path=st.sampled_from(["/readyz", "/livez", "/healthz?verbose"]),
        caFile=st.just(THIS_FILE),
        serverName=st.sampled_from(["kubernetes", "api.internal"]),
        healthyThreshold=st.integers(1, 100),
        unhealthyThreshold=st.integers(1, 100),
        keepAlive=st.booleans(),
        livenessTimeout=_duration(1, 600_000),
        stallTimeout=_duration(0, 60_000),
    ),
    _duration(2, 3_600_000),
    st.integers(1, 1000),
    st.booleans(),
    st.booleans(),
).map(lambda t: _with_timing(*t))


def _with_timing(
    hc: dict[str, Any], interval: str, permille: int, client_cert: bool, set_interval: bool
) -> dict[str, Any]:
    # The timeout is a fraction of the interval, so the pair is always valid.
    seconds = parse_duration("k", interval) if set_interval else 1.0
    if set_interval:
        hc["interval"] = interval
    hc["timeout"] = f"{max(1, int(seconds * 1000 * permille / 1001))}ms"
    if client_cert:
        hc["clientCertFile"] = hc["clientKeyFile"] = THIS_FILE
    return hc


valid_configs = st.tuples(
    optional(
        healthCheck=health_checks,
        dialTimeout=_duration(1, 60_000),
        forwarding=st.sampled_from(["splice", "copy"]),
        tcpKeepalive=optional(
            idle=_duration(1, 7_200_000),
            interval=_duration(1, 60_000),
            count=st.integers(1, 127),
        ),
        tcpUserTimeout=_duration(1, 600_000),
        idleTimeout=_duration(0, 100_000_000),
        drainTimeout=_duration(0, 600_000),
        maxConnections=st.integers(1, 1_000_000),
        closeConnectionsOnUnhealthy=st.booleans(),
        discovery=optional(dnsRefresh=_duration(1, 86_400_000)),
    ),
    upstream_entries,
    st.booleans(),
    st.one_of(st.none(), st.just(""), st.sampled_from(["127.0.0.1:1", "0.0.0.0:9100"])),
).map(lambda t: _assemble(*t))


def _assemble(
    base: dict[str, Any], upstreams: list[Any], non_loopback: bool, admin: str | None
) -> dict[str, Any]:
    data = {**base, "upstreams": upstreams}
    if non_loopback:
        data["allowNonLoopback"] = True
        data["listen"] = ["0.0.0.0:7445", "[::]:7445"]
    else:
        data["listen"] = ["127.0.0.1:7445"]
    if admin is not None and (non_loopback or admin != "0.0.0.0:9100"):
        data["admin"] = {"listen": admin}
    return data


@given(valid_configs)
@settings(max_examples=200, deadline=None)
def test_config_round_trips_through_its_dict(data: dict[str, Any]) -> None:
    cfg = config_from_dict(data)
    effective = config_to_dict(cfg)
    # Through real YAML, as check-config prints it and an admin would save it.
    reread = yaml.safe_load(yaml.safe_dump(effective))
    assert config_from_dict(reread) == cfg
    assert config_to_dict(config_from_dict(reread)) == effective


@given(loopback_listen | any_listen, st.booleans())
@settings(max_examples=50, deadline=None)
def test_loopback_rule(listen: list[str], allow: bool) -> None:
    data = {"upstreams": UP, "listen": listen, "allowNonLoopback": allow}
    all_loopback = all(is_loopback(parse_host_port("k", a)) for a in listen)
    if allow or all_loopback:
        assert len(config_from_dict(data).listen) == len(listen)
    else:
        first_bad = next(
            i for i, a in enumerate(listen) if not is_loopback(parse_host_port("k", a))
        )
        assert error(data).key == f"listen[{first_bad}]"


# ---------------------------------------------------------------- hypothesis: never crash

KNOWN_KEYS = [
    "upstreams",
    "listen",
    "allowNonLoopback",
    "healthCheck",
    "dialTimeout",
    "forwarding",
    "tcpKeepalive",
    "tcpUserTimeout",
    "idleTimeout",
    "drainTimeout",
    "maxConnections",
    "closeConnectionsOnUnhealthy",
    "admin",
    "discovery",
    "address",
    "priority",
    "type",
    "path",
    "interval",
    "timeout",
    "caFile",
    "serverName",
    "clientCertFile",
    "clientKeyFile",
    "healthyThreshold",
    "unhealthyThreshold",
    "idle",
    "count",
    "dnsRefresh",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(
        ["", "1s", "500ms", "10.0.0.1:6443", "[::1]:1", "0.0.0.0:1", "/readyz", THIS_FILE]
    ),
)
yamlish = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=8), inner, max_size=5),
    ),
    max_leaves=25,
)


@st.composite
def mutated_configs(draw: st.DrawFn) -> object:
    """A valid config with one value, at any depth, replaced by arbitrary data."""
    data = draw(valid_configs)
    node: Any = data
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return data
        key = draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, dict | list) and child and draw(st.booleans()):
            node = child
            continue
        node[key] = draw(yamlish)
        return data


def assert_config_or_config_error(data: object) -> None:
    try:
        cfg = config_from_dict(data)
    except ConfigError as exc:
        assert exc.key in str(exc)
        assert str(exc).startswith(f"{exc.key}: " if exc.key else exc.message)
        assert exc.message
    else:
        assert isinstance(cfg, Config)
        assert config_from_dict(config_to_dict(cfg)) == cfg


@given(yamlish | st.dictionaries(st.sampled_from(KNOWN_KEYS), yamlish, max_size=8))
@settings(max_examples=300, deadline=None)
def test_arbitrary_data_gives_a_config_or_a_config_error(data: object) -> None:
    assert_config_or_config_error(data)


@given(mutated_configs())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_one_bad_value_gives_a_config_or_a_config_error(data: object) -> None:
    assert_config_or_config_error(data)


@given(st.text(max_size=200) | st.builds(yaml.safe_dump, yamlish))
@settings(max_examples=150, deadline=None)
def test_arbitrary_files_give_a_config_or_a_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kubeprism.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            assert exc.key in str(exc)
        else:
            assert isinstance(cfg, Config)


def test_durations_reject_non_finite_floats_from_yaml() -> None:
    # YAML turns ".inf" into a float; a duration must still be a string with a unit.
    for value in (math.inf, math.nan, yaml.safe_load(".inf")):
        assert error(at("dialTimeout", value)).key == "dialTimeout"


# ---------------------------------------------------------------- discovery and logging


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("10.0.0.0/8", "discovery.filters"),
        (["10.0.0.0/33"], "discovery.filters[0]"),
        (["10.0.0.0/8", "!nope"], "discovery.filters[1]"),
        ([7], "discovery.filters[0]"),
    ],
)
def test_bad_filters_name_the_entry(value: object, key: str) -> None:
    assert error(at("discovery.filters", value)).key == key


def test_filters_are_normalised() -> None:
    cfg = config_from_dict(at("discovery.filters", ["10.1.2.3/8", "!fd00::1/8"]))
    assert cfg.discovery.filters == ("10.0.0.0/8", "!fd00::/8")


def test_kubernetes_discovery_needs_credentials(tmp_path: Path) -> None:
    exc = error(at("discovery.kubernetes", {"enabled": True}))
    assert exc.key == "discovery.kubernetes.kubeconfig"
    token = tmp_path / "token"
    token.write_text("t")
    both = {"enabled": True, "kubeconfig": str(token), "tokenFile": str(token)}
    assert error(at("discovery.kubernetes", both)).key == "discovery.kubernetes.tokenFile"
    ok = config_from_dict(at("discovery.kubernetes", {"enabled": True, "tokenFile": str(token)}))
    assert ok.discovery.kubernetes.token_file == str(token)


def test_cache_file_empty_disables_it() -> None:
    assert config_from_dict(at("discovery.cacheFile", "")).discovery.cache_file is None
    assert config_from_dict(at("discovery.cacheFile", "/x/e.json")).discovery.cache_file == (
        "/x/e.json"
    )


def test_log_level() -> None:
    assert config_from_dict(at("logLevel", "debug")).log_level == "debug"
    assert error(at("logLevel", "loud")).key == "logLevel"


@pytest.mark.parametrize(
    ("error", "detail"),
    [
        (FileNotFoundError(2, "No such file or directory"), "No such file or directory"),
        (ValueError("not base64"), "not base64"),
    ],
)
def test_a_file_the_config_names_fails_as_a_config_error(error: Exception, detail: str) -> None:
    with pytest.raises(ConfigError) as info, file_named_by("healthCheck.caFile", "/etc/ca.pem"):
        raise error
    assert info.value.key == "healthCheck.caFile"
    assert info.value.message == f"cannot use /etc/ca.pem: {detail}"


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("upstreams: [10.0.0.1:1]\nupstreams: [10.0.0.2:1]\n", "upstreams", "(line 2)"),
        ("upstreams: [10.0.0.1:1]\nadmin: {listen: '', listen: ''}\n", "listen", "(line 2)"),
        ("upstreams: [10.0.0.1:1]\n? [a, b]\n: 1\n", "", "not valid YAML"),
    ],
)
def test_duplicate_keys_are_refused_with_their_line(
    tmp_path: Path, text: str, key: str, message: str
) -> None:
    path = tmp_path / "kubeprism.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert message in info.value.message


def _raise(exc: Exception) -> None:
    raise exc


@pytest.mark.parametrize(
    ("error", "where"),
    [
        (lambda: yaml.load("a: *tok3n\n", Loader=yaml.SafeLoader), "line 1, column 4"),
        (lambda: _raise(yaml.YAMLError("no mark")), "?"),
    ],
)
def test_yaml_errors_in_named_files_give_the_place_never_the_text(error: Any, where: str) -> None:
    with pytest.raises(ConfigError) as info, file_named_by("discovery.kubernetes.kubeconfig", "kc"):
        error()
    assert info.value.message.startswith(f"cannot use kc: not valid YAML at {where}: ")
    assert "tok3n" not in info.value.message


@pytest.mark.parametrize("own", ["127.0.0.1:7445", "127.0.0.1:7446"])
def test_an_upstream_that_is_kubeprism_itself_is_refused(own: str) -> None:
    data = {"upstreams": ["10.0.0.1:6443", own], "listen": ["127.0.0.1:7445"]}
    with pytest.raises(ConfigError) as info:
        config_from_dict({**data, "admin": {"listen": "127.0.0.1:7446"}})
    assert info.value.key == "upstreams[1]"
    assert "loop back into kubeprism" in info.value.message
