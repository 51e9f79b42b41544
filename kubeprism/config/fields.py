"""The field table: each config key is declared once, as dataclass field metadata, and that
one declaration drives parsing, the default, rendering (check-config) and error key paths.

    interval: float = option("interval", POSITIVE_DURATION, DEFAULT_INTERVAL)
    health_check: HealthCheckConfig = section("healthCheck", HealthCheckConfig)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from kubeprism.config.values import ConfigError, Kind, Parser

T = TypeVar("T")
_OPTION = "kubeprism.option"
_SECTION = "kubeprism.section"


@dataclasses.dataclass(frozen=True)
class Option:
    """One YAML key: its name, its kind, and what to do when it is missing."""

    key: str
    kind: Kind[Any]
    # When set, the key must be present (the text says what to write).
    required: str | None = None
    # A default computed from the fields read before it (in field order).
    default_from: Callable[[Mapping[str, Any]], Any] | None = None


def option(
    key: str,
    kind: Kind[Any],
    default: Any,
    *,
    required: str | None = None,
    default_from: Callable[[Mapping[str, Any]], Any] | None = None,
) -> Any:
    """A dataclass field read from YAML key ``key`` (Any: the field's annotation types it)."""
    meta = {_OPTION: Option(key, kind, required, default_from)}
    return dataclasses.field(default=default, metadata=meta)


def section(key: str, cls: type[Any]) -> Any:
    """A dataclass field holding the nested mapping under ``key``, read as ``cls``."""
    return dataclasses.field(default_factory=cls, metadata={_SECTION: (key, cls)})


class Section:
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
        """The full key path of ``name`` in this mapping."""
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, parse: Parser[T], default: T) -> T:
        """The parsed value of ``name``, or ``default`` when it is missing or null."""
        self.used.add(name)
        if name not in self.data or self.data[name] is None:
            return default
        return parse(self.key(name), self.data[name])

    def section(self, name: str) -> Section:
        """The nested mapping ``name`` (missing or null reads as empty)."""
        self.used.add(name)
        return Section(self.key(name), self.data.get(name))

    def finish(self) -> None:
        """Reject keys nobody asked for: a typo must not silently mean 'default'."""
        for name in self.data:
            if name not in self.used:
                known = ", ".join(sorted(self.used))
                raise ConfigError(self.key(str(name)), f"unknown key (known keys here: {known})")


def read(cls: type[T], mapping: Section) -> T:
    """Read ``cls`` from a mapping through its field table, then run its ``check()``."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if _SECTION in f.metadata:
            key, sub = f.metadata[_SECTION]
            values[f.name] = read(sub, mapping.section(key))
            continue
        opt: Option = f.metadata[_OPTION]
        if opt.required is not None and mapping.data.get(opt.key) is None:
            raise ConfigError(mapping.key(opt.key), f"required: {opt.required}")
        default = opt.default_from(values) if opt.default_from else f.default
        values[f.name] = mapping.get(opt.key, opt.kind.parse, default)
    mapping.finish()
    result = cls(**values)
    check: Callable[[Callable[[str], str]], None] | None = getattr(result, "check", None)
    if check is not None:
        check(mapping.key)
    return result


def render(obj: object) -> dict[str, Any]:
    """The inverse of :func:`read`: a dataclass as YAML-ready data, in field order."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if _SECTION in f.metadata:
            out[f.metadata[_SECTION][0]] = render(value)
        else:
            opt: Option = f.metadata[_OPTION]
            out[opt.key] = opt.kind.render(value)
    return out
