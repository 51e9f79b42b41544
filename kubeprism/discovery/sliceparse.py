"""EndpointSlice lists and watch events as untrusted input: parsed defensively, bounded.

Nothing a control plane (or a proxy in front of it) sends may crash discovery, grow
memory without bound, or hold the event loop for long: every size has a cap, every
field its type checked, and a bad object is skipped and counted instead of ending the
watch. Pure: no sockets, no clock.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubeprism.base.net import HostPort
from kubeprism.discovery.sources import parse_endpoint

# A real `kubernetes` EndpointSlice list is a few KiB (one slice per address family, a
# handful of API servers); 256 KiB is far beyond any real one and still parses in a few
# ms (json.loads cannot yield to the event loop part-way).
MAX_LIST_BYTES = 256 * 1024
# One watch event is one slice: the same bound.
MAX_EVENT_BYTES = 256 * 1024
# Slices remembered at most; a real cluster has one or two for this service.
MAX_SLICES = 100
# Addresses examined at most (Kubernetes itself puts at most 1,000 in one slice); the
# endpoint cap applies later, after the filter.
MAX_ADDRESSES = 1000


class Gone(Exception):
    """The resourceVersion is too old (HTTP 410): list again."""


class WatchError(Exception):
    """The API server ended the watch with an ERROR event other than 410."""


@dataclass
class SliceSet:
    """The slices currently known, keyed by name, and what was wrong with the input."""

    slices: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    bad_objects: int = 0  # events or list items skipped as malformed (a counter)
    last_problem: str | None = None

    def bad(self, why: str) -> None:
        """Count one malformed object."""
        self.bad_objects += 1
        self.last_problem = why

    def replace(self, body: object) -> str:
        """Take a whole list body; return its resourceVersion (ValueError if unusable)."""
        if not isinstance(body, dict):
            raise ValueError(f"list body is a {type(body).__name__}, not an object")
        version = _version(body.get("metadata"))
        if version is None:
            raise ValueError("list has no metadata.resourceVersion")
        items = body.get("items") or []
        if not isinstance(items, list):
            raise ValueError("list items is not an array")
        slices: dict[str, Mapping[str, Any]] = {}
        for item in items:
            name = _name(item)
            if name is None:
                self.bad("list item without metadata.name")
            elif len(slices) >= MAX_SLICES:
                self.bad(f"more than {MAX_SLICES} slices")
            else:
                slices[name] = item
        self.slices = slices
        return version

    def event(self, line: bytes) -> tuple[bool, str | None]:
        """Apply one watch event line: (whether the slices changed, its resourceVersion)."""
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):
            self.bad("watch event is not JSON")
            return False, None
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            self.bad("watch event without an object")
            return False, None
        kind, obj = event.get("type"), event["object"]
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise WatchError(f"watch error {obj.get('code')!r:.10}: {obj.get('message')!r:.200}")
        name, version = _name(obj), _version(obj.get("metadata"))
        if kind == "BOOKMARK":
            return False, version
        if name is None or kind not in ("ADDED", "MODIFIED", "DELETED"):
            self.bad(f"watch event {kind!r:.20} without metadata.name")
            return False, version
        if kind == "DELETED":
            return self.slices.pop(name, None) is not None, version
        if name not in self.slices and len(self.slices) >= MAX_SLICES:
            self.bad(f"more than {MAX_SLICES} slices")
            return False, version
        # The same object again (a server replaying history) is no change and no progress.
        changed = self.slices.get(name) != obj
        self.slices[name] = obj
        return changed, version

    def endpoints(self) -> tuple[set[HostPort], dict[str, str]]:
        """Ready, valid endpoints; and the invalid entries with the reason for each."""
        return slice_endpoints(self.slices)


def slice_endpoints(
    slices: Mapping[str, Mapping[str, Any]],
) -> tuple[set[HostPort], dict[str, str]]:
    """Ready addresses with their slice's https port; invalid entries separately."""
    parse = EndpointParse(slices)
    while not parse.advance(MAX_ADDRESSES):
        pass
    return parse.found, parse.invalid


class EndpointParse:
    """slice_endpoints() in steps, so that an event loop can run between them."""

    def __init__(self, slices: Mapping[str, Mapping[str, Any]]) -> None:
        self.found: set[HostPort] = set()
        self.invalid: dict[str, str] = {}
        self._addresses = _ready_addresses(slices)
        self._seen = 0

    def advance(self, step: int) -> bool:
        """Parse up to ``step`` more addresses; True once every address was seen."""
        for host, port in itertools.islice(self._addresses, step):
            if self._seen >= MAX_ADDRESSES:
                self.invalid["..."] = f"more than {MAX_ADDRESSES} addresses; the rest not read"
                return True
            self._seen += 1
            try:
                self.found.add(parse_endpoint(host, port))
            except ValueError as exc:
                self.invalid[f"{host!r:.60} port {port!r:.20}"] = str(exc)
            step -= 1
        return step > 0


def _ready_addresses(slices: Mapping[str, Mapping[str, Any]]) -> Iterator[tuple[object, object]]:
    for item in slices.values():
        ports = [p for p in _list(item.get("ports")) if isinstance(p, dict)]
        port = next((p.get("port") for p in ports if p.get("name") == "https"), None)
        if port is None and ports:
            port = ports[0].get("port")
        if port is None:
            continue
        for ep in _list(item.get("endpoints")):
            if not isinstance(ep, dict):
                continue
            conditions = ep.get("conditions")
            # An unset ready condition means "unknown", which consumers treat as ready.
            if isinstance(conditions, dict) and conditions.get("ready") is False:
                continue
            for address in _list(ep.get("addresses")):
                yield address, port


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _name(obj: object) -> str | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) and name else None


def _version(meta: object) -> str | None:
    version = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return (
        str(version) if isinstance(version, str | int) and not isinstance(version, bool) else None
    )


class LineSplitter:
    """Newline-delimited events from arbitrary chunks, each at most MAX_EVENT_BYTES."""

    def __init__(self, limit: int = MAX_EVENT_BYTES) -> None:
        self.limit = limit
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        """Complete, non-blank lines in ``chunk``; ValueError once a line outgrows the limit."""
        self._buf += chunk
        *lines, rest = self._buf.split(b"\n")
        if len(rest) > self.limit:
            raise ValueError(f"watch event longer than {self.limit} bytes")
        self._buf = bytearray(rest)
        too_long = [line for line in lines if len(line) > self.limit]
        if too_long:
            raise ValueError(f"watch event longer than {self.limit} bytes")
        return [bytes(line) for line in lines if line.strip()]
