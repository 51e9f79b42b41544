"""Config values one at a time: ConfigError, and each kind of value with its parser and its
renderer (the inverse, for check-config), so a value's two directions sit side by side.

No YAML here and no knowledge of which key holds what: model.py declares that.
"""

from __future__ import annotations

import decimal
import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from kubeprism.base.net import HostPort, ip_or_none, is_loopback_host

T = TypeVar("T")
Parser = Callable[[str, object], T]


class ConfigError(Exception):
    """A configuration problem at one key path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Kind(Generic[T]):
    """One kind of config value: how to read it from YAML and how to write it back."""

    parse: Parser[T]
    render: Callable[[T], Any] = _same


# ---------------------------------------------------------------- durations

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
# Decimal, not float, so "300ms" is exactly 0.3 and config_to_dict output parses back equal.
_DURATION_UNITS = {
    u: decimal.Decimal(v) for u, v in (("ms", "0.001"), ("s", 1), ("m", 60), ("h", 3600))
}
# No traps: an absurdly long number becomes Infinity and is rejected, not an ArithmeticError.
_DECIMAL = decimal.Context(prec=40, traps=[])


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


def duration_text(seconds: float) -> str:
    """Shortest exact decimal, never an exponent: parse_duration reads it back equal."""
    exact = decimal.Decimal(repr(seconds))
    if seconds and seconds < 1:
        return f"{(exact * 1000).normalize():f}ms"
    return f"{exact.normalize():f}s"


def _positive_duration(key: str, value: object) -> float:
    seconds = parse_duration(key, value)
    if seconds <= 0:
        raise ConfigError(key, f"must be greater than zero, got {value!r}")
    return seconds


DURATION = Kind(parse_duration, duration_text)
POSITIVE_DURATION = Kind(_positive_duration, duration_text)

# ---------------------------------------------------------------- addresses

# At most 5 port digits: int() refuses strings over 4300 digits with a ValueError.
_HOSTPORT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]{1,5})$")
# One label, then dot-led labels: unambiguous, so no exponential backtracking on a bad name.
# Digits and dots only is a mistyped IP address (10.0.0.256), not a name.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$)(?![0-9.]+$){_LABEL}(?:\.{_LABEL})*\.?$")


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
    return is_loopback_host(address.host)


def _listen_list(key: str, value: object) -> tuple[HostPort, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(key, f'expected a non-empty list of "ip:port" entries, got {value!r}')
    addrs = tuple(parse_host_port(f"{key}[{i}]", v, require_ip=True) for i, v in enumerate(value))
    if len(set(addrs)) != len(addrs):
        raise ConfigError(key, f"duplicate listen address in {value!r}")
    return addrs


def _optional_listen(key: str, value: object) -> HostPort | None:
    # An empty string, unlike a missing key, switches the endpoint off.
    return None if value == "" else parse_host_port(key, value, require_ip=True)


HOST_PORT = Kind(parse_host_port, str)
LISTEN_LIST = Kind(_listen_list, lambda addrs: [str(a) for a in addrs])
OPTIONAL_LISTEN: Kind[HostPort | None] = Kind(_optional_listen, lambda a: str(a) if a else "")


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


CIDR_FILTERS = Kind(_filters, list)

# ---------------------------------------------------------------- scalars


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {value!r}")
    return value


def int_in(low: int, high: int) -> Kind[int]:
    """A whole number from ``low`` to ``high``."""

    def parse(key: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(key, f"expected a whole number from {low} to {high}, got {value!r}")
        return value

    return Kind(parse)


def choice(*options: str) -> Kind[str]:
    """One of ``options``."""

    def parse(key: str, value: object) -> str:
        if value not in options:
            raise ConfigError(key, f"expected one of {', '.join(options)}, got {value!r}")
        return str(value)

    return Kind(parse)


def _str(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"expected a non-empty string, got {value!r}")
    return value


def _url_path(key: str, value: object) -> str:
    path = _str(key, value)
    if not path.startswith("/"):
        raise ConfigError(key, f"expected an absolute URL path such as /readyz, got {value!r}")
    return path


def _readable_file(key: str, value: object) -> str:
    path = _str(key, value)
    if not Path(path).is_file():
        raise ConfigError(key, f"file {path!r} does not exist or is not a regular file")
    return path


def _optional_path(key: str, value: object) -> str | None:
    """A path, or "" for 'off'."""
    return None if value == "" else _str(key, value)


BOOL = Kind(_bool)
STR = Kind(_str)
URL_PATH = Kind(_url_path)
READABLE_FILE = Kind(_readable_file)
OPTIONAL_PATH: Kind[str | None] = Kind(_optional_path, lambda p: p or "")
